"""Our C++ kernels for the CPU (csrc/), compiled for this machine's CPU on first use and cached.

PyTorch's own operators cover everything the engine does, but decode attention over a paged
KV cache through them means a gather of every sequence's blocks or one small call per
sequence per layer; the kernel reads the blocks in place. Building needs a C++ compiler and
ninja (a dependency); where either is missing, or PARROT_CPU_KERNELS=0, the engine logs why
once and runs the PyTorch path: the same math, though not bit for bit (sums run in another
order).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from parrot.engine.loader import cache_dir

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in ("paged_decode.cpp", "fused_layer_ops.cpp")]
HEAD_DIMS = (64, 128)  # the head sizes the kernel is compiled for
MAX_GROUP = 8  # query heads per KV head it is compiled for; larger groups are split
CACHE_DTYPES = (torch.float32, torch.bfloat16)  # the KV caches it reads


@dataclass(frozen=True)
class DecodeAttention:
    """Each query row's attention over its KV entries."""

    out: torch.Tensor  # [B, H, D] float32
    lse: torch.Tensor  # [B, H] float32 log-sum-exp of the scaled scores; -inf for a row with no KV


def _build_key() -> str:
    """The build is for these sources and this CPU (-march=native): either changed builds anew
    in a folder of its own (two checkouts of different sources do not rebuild each other's)."""
    features = platform.processor()
    try:
        with open("/proc/cpuinfo") as info:  # x86: "flags", ARM: "Features"
            features = next((line for line in info if line.startswith(("flags", "Features"))), features)
    except OSError:
        pass
    digest = hashlib.sha256(features.encode())
    for source in sorted(CSRC.iterdir()):  # the headers too
        digest.update(source.read_bytes())
    return digest.hexdigest()[:12]


@functools.cache
def cpu_kernels_available() -> bool:
    """Compiles (first time on this machine) and loads the kernels; False, with the reason
    logged once, where they cannot be built."""
    if os.environ.get("PARROT_CPU_KERNELS", "1") == "0":
        logger.warning("PARROT_CPU_KERNELS=0: CPU attention and layer ops run through PyTorch operators")
        return False
    try:
        from torch.utils import cpp_extension

        if shutil.which("ninja") is None:  # the ninja package's binary sits beside this interpreter, off PATH when not activated
            os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        build = cache_dir() / "kernels" / f"torch-{torch.__version__}-{_build_key()}"
        build.mkdir(parents=True, exist_ok=True)
        # processes that start together build once: the others wait on this lock, which the
        # kernel drops if its holder dies (torch's own lock file would then block them forever)
        with open(build / "parrot.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            (build / "lock").unlink(missing_ok=True)  # torch's, left by a build that was killed
            cpp_extension.load(
                name="parrot_kernels",
                sources=[str(s) for s in SOURCES],
                # fast math: vectorized sums and exp (the kernels never test for infinities)
                extra_cflags=["-O3", "-march=native", "-ffast-math"],
                build_directory=str(build),
                is_python_module=False,
                verbose=False,
            )
    except Exception as error:  # no compiler, no ninja, a read-only cache: the PyTorch path serves
        logger.warning("CPU kernels unavailable, attention and layer ops run through PyTorch operators (slower): %s", error)
        return False
    return True


def kernel_decodes(head_dim: int, kv_dtype: torch.dtype, device: torch.device) -> bool:
    """Whether decode attention over a cache of this dtype and head size on this device goes
    through the kernel (float32 or bfloat16 caches on the CPU)."""
    return device.type == "cpu" and head_dim in HEAD_DIMS and kv_dtype in CACHE_DTYPES and cpu_kernels_available()


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor) -> DecodeAttention:
    """q [B, H, D], caches [Hkv, num_blocks, block_size, D] (float32 or bfloat16, contiguous),
    block_tables [B, W] int64 (padding past a row's length is never read), context_lens [B]
    int64 (0 allowed) -> each row's attention over its first context_lens entries."""
    b, h, d = q.shape
    group = h // k_cache.shape[0]
    if group > MAX_GROUP:
        # the kernel keeps a KV head's query rows in registers, up to MAX_GROUP of them: a larger
        # group is split into groups of at most that many, each a call over the same cache
        rows = q.float().view(b, -1, group, d)  # [B, Hkv, G, D]
        parts = [paged_decode(rows[:, :, i : i + MAX_GROUP].reshape(b, -1, d), k_cache, v_cache, block_tables, context_lens)
                 for i in range(0, group, MAX_GROUP)]
        out = torch.cat([p.out.view(b, k_cache.shape[0], -1, d) for p in parts], dim=2).view(b, h, d)
        lse = torch.cat([p.lse.view(b, k_cache.shape[0], -1) for p in parts], dim=2).view(b, h)
        return DecodeAttention(out, lse)
    out, lse = torch.ops.parrot_kernels.paged_decode(
        q.float().contiguous(), k_cache, v_cache, block_tables.contiguous(), context_lens.contiguous()
    )
    return DecodeAttention(out, lse)
