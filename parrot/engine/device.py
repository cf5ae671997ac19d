"""Where the engine runs (CPU or a CUDA GPU) and how much of the device's memory its KV pool takes.

On the CPU the pool is what `kv_memory_gb` says (1 GiB by default). On a GPU it is, unless
given, what is left of `gpu_memory_utilization` of the device once the weights are loaded,
less a reserve for one step's activations and logits: the way GPU servers size it, so that
the same flags serve a 24 GiB card and an 80 GiB one.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
from dataclasses import dataclass

import torch

from parrot.engine.config import ModelConfig
from parrot.errors import UserError

logger = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda")
DEFAULT_CPU_KV_GB = 1.0

# CPU matmuls in bf16: which steps run float32 weights through a bf16 copy (EngineConfig.cpu_bf16)
CPU_BF16_MODES = ("auto", "off", "small-batches", "all")
ALL_ROWS = sys.maxsize
# Without bf16 dot-product instructions (AVX2 only) a bf16 matmul converts every element to
# float32 first and is compute-bound: it wins only where reading the weights dominates, up to
# 2 rows (2-core AVX2 EPYC: one row in bf16 took 0.43x the float32 time, 3 rows more than it).
# With AVX512-BF16 or AMX it is 3-4x faster than float32 from 2 rows on (2-core AVX512-BF16
# EPYC, one thread: prefill 392 -> 1021 tok/s, decode at batch 8 65 -> 117 tok/s).
SMALL_BATCH_ROWS = 2


HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # Linux


def cpu_zeros_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor whose memory the kernel backs with 2 MiB pages where it can (Linux,
    transparent huge pages on "madvise" or "always"). Decode reads blocks scattered over the
    KV cache; with 4 KiB pages nearly every block read misses the TLB (measured: scattered
    decode attention 1.4-1.6x faster on 2 MiB pages)."""
    tensor = torch.empty(shape, dtype=dtype)
    if sys.platform == "linux":
        start = tensor.data_ptr()
        begin = -(-start // HUGE_PAGE) * HUGE_PAGE
        end = (start + tensor.numel() * tensor.element_size()) // HUGE_PAGE * HUGE_PAGE
        # advised before the first touch, so the zeroing below faults in huge pages
        if end > begin and ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin), MADV_HUGEPAGE):
            logger.debug("madvise(MADV_HUGEPAGE) refused: errno %d", ctypes.get_errno())
    return tensor.zero_()


def cpu_has_bf16_dot() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), as torch's kernels see it."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


@functools.cache
def onednn_packs_bf16() -> bool:
    """Whether bf16 weights go into oneDNN's blocked layout: where the CPU multiplies bf16
    natively (elsewhere oneDNN's bf16 path is no faster) and this torch has the ops."""
    ops = torch.ops.mkldnn
    return (cpu_has_bf16_dot() and torch.backends.mkldnn.is_available()
            and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))


def bf16_matmul_rows(mode: str, device: torch.device, has_bf16_dot: bool | None = None) -> int:
    """Up to how many rows a step's float32 matmuls run in bf16 (0: never; ALL_ROWS: always, and
    the float32 weights are not kept). auto: always where the CPU has bf16 dot products, else
    small batches. GPUs compute in their own dtype: 0. mode: one of CPU_BF16_MODES (EngineConfig checks it)."""
    if device.type != "cpu" or mode == "off":
        return 0
    if mode == "auto":
        mode = "all" if (cpu_has_bf16_dot() if has_bf16_dot is None else has_bf16_dot) else "small-batches"
    return ALL_ROWS if mode == "all" else SMALL_BATCH_ROWS


KV_DTYPE_SETTINGS = ("auto", "float32", "bfloat16")


def kv_cache_dtype(setting: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's element type. auto: the model's dtype. bfloat16 on a float32 CPU model holds
    twice the tokens in the same memory and halves the bytes each decode step reads (decode
    1.08x faster at batch 1, 1.19x at 8, 1.32x at 32 on an AVX512-BF16 EPYC; 1.75x at batch 8
    over 2048-token contexts on a Xeon with AMX); attention widens it to float32 as it reads,
    and the model rounds the k/v it computes the same way before attending to them.
    Not the default, though its answers are as close to float32 throughout's as the float32
    cache's where the matmuls run in bf16 (`benchmarks/precision_probe.py`: 18/24 with either on
    an AMX Xeon): a prompt computed whole and the same prompt computed after its cached first
    part differ more with it (mean logit difference 0.13 against 0.04 with bf16 matmuls; within
    0.05 against 3e-5 with float32 ones), and a served DAG fills its prompts in parts. With it,
    `tests/test_serve_core_engine.py`'s chain no longer reads what a step-by-step client gets."""
    return model_dtype if setting == "auto" else getattr(torch, setting)


PROMPT_ATTENTION_DTYPE_SETTINGS = ("auto", "float32", "bfloat16")


def prompt_attention_dtype(setting: str, model_dtype: torch.dtype) -> torch.dtype | None:
    """The element type prompt attention computes in on the CPU; None: the model's (auto).
    bfloat16 on a float32 CPU model is vLLM's precision for this step and, on CPUs with AMX,
    1.25x faster prefill of 512-token prompts and 1.75x at 2048 (Intel Xeon, RESULTS.md): the
    products and the weights of the softmax are rounded to bf16 (sums stay float32). Decode
    attention stays float32. Not the default: with it and a bf16 KV cache, the default model's
    answer to "What is the capital of France?" begins "L'" (by 0.003 logits, computed exactly)
    where either alone, and float32, begin "The capital of France is Paris"; and a prompt filled
    in parts reads another path than the same prompt whole (kv_cache_dtype)."""
    if setting == "auto" or getattr(torch, setting) == model_dtype:
        return None
    return getattr(torch, setting)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def precision_summary(model_dtype: torch.dtype, bf16_rows: int, kv_dtype: torch.dtype, prompt_dtype: torch.dtype | None) -> str:
    """What an engine computes in, in words, e.g. "float32 (matmuls in bf16), KV cache float32,
    prompt attention float32" (prompt_dtype None: the model's)."""
    matmuls = "" if not bf16_rows else " (matmuls in bf16)" if bf16_rows >= ALL_ROWS else f" (matmuls of up to {bf16_rows} rows in bf16)"
    return (f"{dtype_name(model_dtype)}{matmuls}, KV cache {dtype_name(kv_dtype)}, "
            f"prompt attention {dtype_name(prompt_dtype or model_dtype)}")


def resolve_device(name: str) -> torch.device:
    """The torch device for a --device name; a user error when this machine cannot run it."""
    if name not in DEVICES:
        raise UserError(f"device must be one of {', '.join(DEVICES)}, not {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise UserError(
            f"--device cuda needs a CUDA GPU and a CUDA build of torch; this torch {torch.__version__} is {build} "
            f"and sees no GPU. Run on a GPU machine with a CUDA torch, or use --device cpu"
        )
    return torch.device(name)


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPUs (bf16 matmuls are slow there without AMX), bfloat16 on GPUs (tensor cores)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass(frozen=True)
class DeviceMemory:
    free_bytes: int  # free on the device (other processes' use excluded)
    total_bytes: int
    own_bytes: int  # what this process's allocator holds (the weights, once loaded)


def step_activation_bytes(config: ModelConfig, max_tokens_per_step: int, max_seqs_per_step: int, dtype: torch.dtype,
                          attention_part_rows: int = 0, kept_logits_rows: int = 0) -> int:
    """A bound on one forward step's transient memory: the widest per-token tensors of a layer
    (qkv, gate/up, attention output) for every token of the step, plus float32 logits for the
    sampled rows, plus the float32 attention parts of split or shared decode (attention_part_rows
    rows: out and log-sum-exp, and the merge's two copies), twice over for the allocator's slack;
    plus kept_logits_rows float32 logits rows that stay allocated (captured graphs' outputs)."""
    element = torch.tensor([], dtype=dtype).element_size()
    qkv = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
    per_token = element * (qkv + 3 * config.intermediate_size + 4 * config.hidden_size) + 4 * (config.num_heads * config.head_dim)
    logits = 4 * max_seqs_per_step * config.vocab_size * 2  # the float32 logits and the sampler's copy
    parts = 3 * 4 * attention_part_rows * config.num_heads * (config.head_dim + 1)
    return 2 * (max_tokens_per_step * per_token + logits + parts) + 4 * kept_logits_rows * config.vocab_size


def kv_pool_bytes(
    device: torch.device,
    kv_memory_gb: float | None,
    gpu_memory_utilization: float,
    activation_bytes: int,
    memory: DeviceMemory | None = None,
) -> int:
    """Bytes for the KV pool. memory: the GPU's free and total bytes now (weights loaded);
    read from the device when not given."""
    if kv_memory_gb is not None:
        return int(kv_memory_gb * 2**30)
    if device.type != "cuda":
        return int(DEFAULT_CPU_KV_GB * 2**30)
    if memory is None:
        torch.cuda.empty_cache()  # blocks the allocator caches (freed load-time copies) count as free
        free, total = torch.cuda.mem_get_info(device)
        memory = DeviceMemory(free, total, torch.cuda.memory_reserved(device))
    # this engine's share, counted from its own use, so that engines sharing a GPU (each with
    # its share of the utilization) size alike whichever loads first; never past what is free
    share = int(memory.total_bytes * gpu_memory_utilization) - memory.own_bytes
    budget = min(share, memory.free_bytes) - activation_bytes
    if budget <= 0:
        used = memory.total_bytes - memory.free_bytes
        raise UserError(
            f"no GPU memory left for the KV cache: {used / 2**30:.1f} GiB of {memory.total_bytes / 2**30:.1f} GiB are in use "
            f"({memory.own_bytes / 2**30:.1f} GiB by this engine's weights) and a step needs about "
            f"{activation_bytes / 2**30:.1f} GiB; raise "
            f"--gpu-memory-utilization (now {gpu_memory_utilization}), give --kv-memory-gb, or use a bigger GPU"
        )
    return budget
