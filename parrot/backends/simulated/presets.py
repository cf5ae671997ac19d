"""Named simulated engines ("sim:a100-13b"), calibrated from published GPU figures or measured.

GPU presets are derived, not fitted: a LLaMA model on one A100-80GB is priced from
its byte and FLOP counts at achieved (not peak) hardware rates:
- weights: 2 bytes x params, read once per step at the achieved HBM bandwidth;
- a token's matmuls: 2 x params FLOPs at 60 % of the 312 TFLOP/s bf16 peak;
- KV: 2 (K and V) x layers x hidden x 2 bytes per token, read at that bandwidth;
- capacity: 90 % of 80 GiB (vLLM's default gpu_memory_utilization) minus weights
  minus a 3 GB activation reserve, divided by the KV bytes per token.
"""

from __future__ import annotations

from dataclasses import dataclass

from parrot.backends.simulated.cost import CostModel
from parrot.errors import UserError

# A100-80GB SXM: 2.039 TB/s HBM2e, 312 TFLOP/s dense bf16 (NVIDIA A100 datasheet).
A100_BANDWIDTH = 0.77 * 2.039e12  # vLLM decodes Llama-3.1-8B at batch 1 at ~77 % of the HBM roofline
A100_FLOPS = 0.60 * 312e12  # large prefill GEMMs reach ~60 % of peak
A100_USABLE_BYTES = 0.90 * 80 * 2**30
ACTIVATION_RESERVE_BYTES = 3e9
# per layer and step: ~12 kernel launches plus Python in an eager (no CUDA graph) engine of
# the paper's era; puts batch-1 decode at ~15 ms (7B) and ~25 ms (13B)
LAUNCH_SECONDS_PER_LAYER = 0.2e-3


@dataclass(frozen=True)
class EngineProfile:
    """A named simulated engine: what it costs, how much KV it holds, how big a step may be."""

    name: str
    model: str
    cost: CostModel
    kv_capacity_tokens: int | None  # None: unlimited
    max_tokens_per_step: int  # prefill chunk budget per step (a decode counts one token)
    max_seqs_per_step: int
    shared_prefix_attention: bool  # a batch reads a shared prefix's KV once (Parrot's kernel), not per sequence
    source: str  # where the numbers come from

    def __post_init__(self) -> None:
        if self.max_tokens_per_step < 1 or self.max_seqs_per_step < 1:
            raise UserError("a step needs room for at least one token and one sequence")
        if self.kv_capacity_tokens is not None and self.kv_capacity_tokens < 1:
            raise UserError("kv_capacity_tokens must be positive (or None for unlimited)")


def llama_on_a100(name: str, model: str, params: float, layers: int, hidden: int) -> EngineProfile:
    """A LLaMA-1/2 model (multi-head attention: KV width = hidden) in fp16 on one A100-80GB."""
    weight_bytes = 2 * params
    kv_bytes_per_token = 2 * layers * hidden * 2
    flops_seconds_per_token = 2 * params / A100_FLOPS
    cost = CostModel(
        seconds_per_step=weight_bytes / A100_BANDWIDTH + LAUNCH_SECONDS_PER_LAYER * layers,
        seconds_per_prefill_token=flops_seconds_per_token,
        seconds_per_decode_seq=flops_seconds_per_token,
        seconds_per_kv_token=kv_bytes_per_token / A100_BANDWIDTH,
    )
    capacity = int((A100_USABLE_BYTES - weight_bytes - ACTIVATION_RESERVE_BYTES) // kv_bytes_per_token)
    # 2048-token chunks and 256 sequences: vLLM's defaults (max_num_batched_tokens with
    # chunked prefill, max_num_seqs)
    source = f"derived from A100-80GB rates and {model}'s sizes ({params / 1e9:.2f}B params, {layers} layers, hidden {hidden})"
    return EngineProfile(name, model, cost, capacity, 2048, 256, True, source)


# The built-in engine (EngineConfig() defaults: float32 weights with a bf16 copy for batches of
# at most 3 rows, 1 GB of KV = 1456 blocks of 16 tokens, 512-token steps, 64 sequences) running
# SmolLM2-135M on this project's 2-core AMD EPYC VM, measured with
# `python -m parrot.backends.simulated.calibrate` (calibrate.py): 166 timed forward steps,
# prefills of 64-1024 tokens and decodes at batch 1-32 over contexts of 64-1024 tokens, CPU
# time / 2 threads (the VM was shared: wall times were 2-4x longer). Fit error: median 9 %,
# max 41 % (decodes at batch 2-8; batch <= 3 runs bf16, larger batches float32). A second
# run gave 23 ms, 2.2 ms, 6.5 ms, 5 us: trust these to ~20 %. Prefill ~480 tokens/s; decode
# ~28 ms a step at batch 1, ~200 ms at batch 32.
CPU_SMOLLM2 = EngineProfile(
    name="cpu-smollm2",
    model="smollm2-135m",
    cost=CostModel(
        seconds_per_step=22.3e-3,
        seconds_per_prefill_token=2.08e-3,
        seconds_per_decode_seq=5.26e-3,
        seconds_per_kv_token=8.73e-6,
    ),
    kv_capacity_tokens=1456 * 16,
    max_tokens_per_step=512,
    max_seqs_per_step=64,
    shared_prefix_attention=False,  # the built-in CPU attention reads each sequence's KV separately
    source="measured: parrot's built-in engine, SmolLM2-135M, 2-core CPU (calibrate.py)",
)

PRESETS: dict[str, EngineProfile] = {
    p.name: p
    for p in (
        llama_on_a100("a100-7b", "llama-7b", params=6.74e9, layers=32, hidden=4096),
        llama_on_a100("a100-13b", "llama-13b", params=13.02e9, layers=40, hidden=5120),
        CPU_SMOLLM2,
    )
}


def parse_engine_spec(spec: str) -> EngineProfile:
    """"sim:<preset>" -> that preset's profile; anything else is a UserError naming the presets."""
    names = ", ".join(f"sim:{n}" for n in PRESETS)
    kind, sep, preset = spec.strip().partition(":")
    if not sep or kind != "sim":
        raise UserError(f"engine spec {spec!r} is not a simulated engine; expected sim:<preset>, one of {names}")
    if preset not in PRESETS:
        raise UserError(f"unknown simulated engine preset {preset!r}; presets: {names}")
    return PRESETS[preset]
