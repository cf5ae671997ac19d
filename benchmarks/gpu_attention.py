"""Shared-prefix decode attention against plain paged attention on one batch, kernel level.

B sequences share a P-token prefix (the same KV blocks) and each has its own S-token suffix,
LLaMA-7B's attention shape (32 heads of 128, bf16). Both sides are the engine's own CUDA
backend, TritonSharedPrefixAttention: with sharing, each shared segment is read once for all
its members; without (min_shared_tokens past any prefix), every sequence reads its whole KV.
Reported per (P, B): the GPU time of the kernels one layer call launches (the profiler's sum,
what the engine pays inside its CUDA graphs), the wall time of a call launched from Python
(kernels plus launch overhead), the speedup on kernel time, and the bandwidth each side
achieves (bytes of KV it must read / kernel time) against the read rate measured in the same
run (a sum over 1 GiB: each byte read once). Plain attention reads the prefix's blocks once per
sequence, so the L2 cache serves some of them: it can pass the read rate.

    python benchmarks/gpu_attention.py                   # on a CUDA GPU (the numbers of RESULTS.md)
    python benchmarks/gpu_attention.py --quick --device cpu   # smoke run of the harness (torch items)

Writes --out/gpu_attention.json, .md and .png; the last line printed sums up the speedups.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from parrot.engine.attention import AttentionMetadata, SequenceSlice
from parrot.engine.triton_attention import TritonSharedPrefixAttention


@dataclass(frozen=True)
class Case:
    prefix_tokens: int
    batch: int
    shared_ms: float  # kernel time of one call
    plain_ms: float
    shared_gbps: float  # KV bytes the shared side must read / its kernel time
    plain_gbps: float
    shared_wall_ms: float  # one call launched from Python, launch overhead included
    plain_wall_ms: float

    @property
    def speedup(self) -> float:
        return self.plain_ms / self.shared_ms


def _timed_ms(fn, device: torch.device, reps: int) -> float:
    """Median milliseconds of fn after two warm-up calls (the first compiles the kernel)."""
    fn(), fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - began))
    return sorted(times)[len(times) // 2]


def _kernel_ms(fn, device: torch.device, reps: int) -> float:
    """GPU milliseconds of the kernels (and copies) one call of fn launches, from the profiler;
    on the CPU, the wall time."""
    if device.type != "cuda":
        return _timed_ms(fn, device, reps)
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize(device)
    total_us = sum(e.self_device_time_total for e in prof.key_averages())
    if total_us <= 0:  # a profiler that saw no kernels (no CUPTI): wall time, launch overhead included
        print("the profiler recorded no kernel time; timing calls instead", flush=True)
        return _timed_ms(fn, device, reps)
    return total_us / reps / 1e3


def read_gbps(device: torch.device, reps: int) -> float:
    """Read-only rate (GB/s): a sum over a tensor far larger than the L2 cache reads each byte once."""
    src = torch.ones(2**28 if device.type == "cuda" else 2**22, dtype=torch.float32, device=device)
    ms = _timed_ms(lambda: src.sum(), device, reps)
    return src.numel() * src.element_size() / ms / 1e6


def copy_gbps(device: torch.device, reps: int) -> float:
    """Device-to-device copy rate, bytes read plus written per second (GB/s)."""
    src = torch.empty(2**28 if device.type == "cuda" else 2**24, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _timed_ms(lambda: dst.copy_(src), device, reps)
    return 2 * src.numel() / ms / 1e6


def run_case(prefix: int, batch: int, suffix: int, heads: int, head_dim: int, block: int, dtype, device, reps: int) -> Case:
    prefix_blocks, suffix_blocks = prefix // block, -(-suffix // block)
    num_blocks = prefix_blocks + batch * suffix_blocks + 1
    gen = torch.Generator(device=device).manual_seed(0)
    k_cache = torch.randn((heads, num_blocks, block, head_dim), generator=gen, device=device).to(dtype)
    v_cache = torch.randn((heads, num_blocks, block, head_dim), generator=gen, device=device).to(dtype)
    shared = list(range(prefix_blocks))
    sequences, slots = [], []
    for i in range(batch):
        own = list(range(prefix_blocks + i * suffix_blocks, prefix_blocks + (i + 1) * suffix_blocks))
        length = prefix + suffix
        sequences.append(SequenceSlice(i, 1, length, shared + own))
        slots.append(own[(suffix - 1) // block] * block + (suffix - 1) % block)
    q = torch.randn((batch, heads, head_dim), generator=gen, device=device).to(dtype)
    k = torch.randn((batch, heads, head_dim), generator=gen, device=device).to(dtype)
    v = torch.randn((batch, heads, head_dim), generator=gen, device=device).to(dtype)

    def call(backend):
        meta = AttentionMetadata.build(sequences, slots)  # one step: its plan is made once, reused below
        backend.forward(q, k, v, k_cache, v_cache, meta)
        return lambda: backend.forward(q, k, v, k_cache, v_cache, meta)

    shared, plain = call(TritonSharedPrefixAttention(min_shared_tokens=block)), call(TritonSharedPrefixAttention(min_shared_tokens=2**62))
    shared_ms, plain_ms = _kernel_ms(shared, device, reps), _kernel_ms(plain, device, reps)
    token_bytes = 2 * heads * head_dim * k_cache.element_size()  # K and V of one token
    shared_bytes = (prefix + batch * suffix) * token_bytes
    plain_bytes = batch * (prefix + suffix) * token_bytes
    return Case(prefix, batch, shared_ms, plain_ms, shared_bytes / shared_ms / 1e6, plain_bytes / plain_ms / 1e6,
                _timed_ms(shared, device, reps), _timed_ms(plain, device, reps))


def plot(cases: list[Case], read_rate: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for prefix in sorted({c.prefix_tokens for c in cases}):
        row = [c for c in cases if c.prefix_tokens == prefix]
        left.plot([c.batch for c in row], [c.speedup for c in row], marker="o", label=f"prefix {prefix}")
        right.plot([c.batch for c in row], [c.plain_gbps for c in row], marker="o", label=f"plain, prefix {prefix}")
    right.axhline(read_rate, color="gray", linestyle="--", label="device read rate")
    left.set(xlabel="batch", ylabel="speedup over plain paged (kernel time)", title="shared-prefix attention")
    right.set(xlabel="batch", ylabel="GB/s of KV read", title="plain paged: bandwidth achieved")
    for ax in (left, right):
        ax.legend(fontsize=7)
        ax.set_xscale("log", base=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--prefixes", default="1024,2048,4096,8192", help="shared prefix lengths in tokens")
    parser.add_argument("--batches", default="8,16,32,64", help="sequences per batch")
    parser.add_argument("--suffix", type=int, default=64, help="tokens of each sequence's own (default %(default)s)")
    parser.add_argument("--reps", type=int, default=20, help="timed calls per case; the median counts")
    parser.add_argument("--quick", action="store_true", help="small sizes (prefix 64/128, batch 2/4, 8 heads of 16)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU (use --quick --device cpu for a smoke run)")
    prefixes, batches = [int(x) for x in args.prefixes.split(",")], [int(x) for x in args.batches.split(",")]
    heads, head_dim, suffix, dtype = 32, 128, args.suffix, torch.bfloat16
    if args.quick:
        prefixes, batches, heads, head_dim, suffix, args.reps = [64, 128], [2, 4], 8, 16, 8, 3
    if device.type == "cpu":
        dtype = torch.float32
    copy_rate, read_rate = copy_gbps(device, args.reps), read_gbps(device, args.reps)
    print(f"device copy {copy_rate:.0f} GB/s (read + written), read {read_rate:.0f} GB/s", flush=True)
    cases = []
    for prefix in prefixes:
        for batch in batches:
            case = run_case(prefix, batch, suffix, heads, head_dim, 16, dtype, device, args.reps)
            cases.append(case)
            print(f"prefix {prefix:5d} batch {batch:3d}: kernels shared {case.shared_ms:.3f} ms, plain {case.plain_ms:.3f} ms, "
                  f"{case.speedup:.2f}x; reads shared {case.shared_gbps:.0f}, plain {case.plain_gbps:.0f} GB/s; "
                  f"wall {case.shared_wall_ms:.3f} / {case.plain_wall_ms:.3f} ms", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result = {"device": name, "dtype": str(dtype), "heads": heads, "head_dim": head_dim, "suffix": suffix,
              "copy_gbps": copy_rate, "read_gbps": read_rate, "cases": [asdict(c) | {"speedup": c.speedup} for c in cases]}
    (args.out / "gpu_attention.json").write_text(json.dumps(result, indent=2))
    lines = [f"Device {name}, {dtype}, {heads} heads of {head_dim}, own suffix {suffix} tokens; read rate {read_rate:.0f} GB/s, "
             f"copy {copy_rate:.0f} GB/s (read + written). Times are the kernels' GPU time per layer call; wall adds the launch "
             "from Python.", "",
             "| prefix | batch | shared ms | plain ms | speedup | shared GB/s | plain GB/s | wall shared ms | wall plain ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {c.prefix_tokens} | {c.batch} | {c.shared_ms:.3f} | {c.plain_ms:.3f} | {c.speedup:.2f}x | {c.shared_gbps:.0f} | "
              f"{c.plain_gbps:.0f} | {c.shared_wall_ms:.3f} | {c.plain_wall_ms:.3f} |" for c in cases]
    (args.out / "gpu_attention.md").write_text("\n".join(lines) + "\n")
    plot(cases, read_rate, args.out / "gpu_attention.png")
    speedups = [c.speedup for c in cases]
    print(f"gpu-attention: shared-prefix {min(speedups):.2f}x to {max(speedups):.2f}x over plain paged on {name}; "
          f"(kernel time); shared reads up to {max(c.shared_gbps for c in cases) / read_rate:.0%} of the read rate")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
