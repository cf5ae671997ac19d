"""How a built-in engine is set up (EngineConfig): the model, its KV pool and step sizes, the
device and the CPU's number formats. Checked as it is made, so a bad setting fails with a
message before any weights load."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parrot.engine.device import CPU_BF16_MODES, DEVICES, KV_DTYPE_SETTINGS, PROMPT_ATTENTION_DTYPE_SETTINGS, default_dtype
from parrot.engine.loader import DEFAULT_MODEL
from parrot.engine.random_weights import shape_named
from parrot.errors import UserError


@dataclass(frozen=True)
class EngineConfig:
    model: str = DEFAULT_MODEL
    # the KV pool; None: 1 GiB on the CPU, on a GPU what gpu_memory_utilization leaves after the weights
    kv_memory_gb: float | None = None
    block_size: int = 16
    max_tokens_per_step: int = 512
    max_seqs_per_step: int = 64
    latency_max_tokens_per_step: int = 128  # the step size while a latency-critical job waits
    dtype: str = "auto"  # auto: float32 on CPUs, where bf16 matmuls are slow without AMX; bfloat16 on GPUs
    device: str = "cpu"  # cpu or cuda
    gpu_memory_utilization: float = 0.9  # the share of the GPU the engine may fill (weights, KV, activations)
    # decode steps replayed from CUDA graphs (one per batch-size bucket); None: on a GPU only.
    # True on the CPU runs the same static-buffer path without capture (to test it)
    decode_graphs: bool | None = None
    threads: int | None = None
    # CPU matmuls of float32 weights in bf16, where it is faster: auto (every step where the CPU
    # has bf16 dot products, else steps of at most 2 rows), all, small-batches, or off (every
    # matmul in float32: exact and batch-invariant, for reference checks)
    cpu_bf16: str = "auto"
    kv_dtype: str = "auto"  # the KV cache's element type: auto, float32 or bfloat16 (see device.kv_cache_dtype)
    # what prompt attention computes in on the CPU: auto, float32 or bfloat16 (see device.prompt_attention_dtype)
    prompt_attention_dtype: str = "auto"
    prefix_caching: bool = True  # new root contexts fork from the longest cached prefix of their tokens
    shared_prefix_attention: bool = True  # decode attention over a shared prefix once for all its sequences
    # a shape name (llama-7b, llama-13b, tiny): random weights of that shape with the model's tokenizer, for speed runs
    random_weights: str | None = None
    step_trace: str | None = None  # a file to write one JSON line a forward step to (engine/step_trace.py)

    def __post_init__(self) -> None:
        if self.kv_memory_gb is not None and self.kv_memory_gb <= 0:
            raise UserError("kv_memory_gb must be positive")
        if self.device not in DEVICES:
            raise UserError(f"device must be one of {', '.join(DEVICES)}, not {self.device!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise UserError(f"gpu_memory_utilization must be in (0, 1], not {self.gpu_memory_utilization}")
        if self.block_size < 1:
            raise UserError("block_size must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"threads must be at least 1, not {self.threads}")
        if self.cpu_bf16 not in CPU_BF16_MODES:
            raise UserError(f"cpu_bf16 must be one of {', '.join(CPU_BF16_MODES)}, not {self.cpu_bf16!r}")
        if self.kv_dtype not in KV_DTYPE_SETTINGS:
            raise UserError(f"kv_dtype must be one of {', '.join(KV_DTYPE_SETTINGS)}, not {self.kv_dtype!r}")
        if self.prompt_attention_dtype not in PROMPT_ATTENTION_DTYPE_SETTINGS:
            raise UserError(f"prompt_attention_dtype must be one of {', '.join(PROMPT_ATTENTION_DTYPE_SETTINGS)}, "
                            f"not {self.prompt_attention_dtype!r}")
        if self.prompt_attention_dtype != "auto" and self.device != "cpu":
            raise UserError(f"prompt_attention_dtype={self.prompt_attention_dtype} sets the CPU engine's prompt attention; on a "
                            f"{self.device} device attention runs in the model's dtype (--dtype): leave it at auto")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise UserError(f"dtype must be auto, float32, bfloat16 or float16, not {self.dtype!r}")
        if self.random_weights is not None:
            shape_named(self.random_weights)

    @property
    def torch_dtype(self) -> torch.dtype:
        return default_dtype(torch.device(self.device)) if self.dtype == "auto" else getattr(torch, self.dtype)
