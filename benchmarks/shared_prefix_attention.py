"""Shared-prefix vs plain paged decode attention on the CPU, SmolLM2-135M shapes.

A batch of decode sequences forked from one (or several) long shared prompts, each with
its own suffix of generated tokens (suffix blocks interleaved, as decode allocates them).
Each step builds the metadata once and runs every layer over its own KV cache, as the
engine does; the table reports the time per layer and the speedup.

    python benchmarks/shared_prefix_attention.py            # prefixes 1k-8k, batch 8-64
    python benchmarks/shared_prefix_attention.py --quick
    python benchmarks/shared_prefix_attention.py --groups 4 --prefix-lens 2048 --batches 64
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table

from parrot.engine.attention import AttentionBackend, AttentionMetadata, CpuPagedAttention, SequenceSlice
from parrot.engine.shared_prefix_attention import SharedPrefixCpuAttention

KV_HEADS, GROUP, HEAD_DIM, MODEL_LAYERS = 3, 3, 64, 30  # SmolLM2-135M


@dataclass(frozen=True)
class Case:
    prefix_len: int
    batch: int
    plain_ms: float  # per layer
    shared_ms: float
    max_diff: float

    @property
    def speedup(self) -> float:
        return self.plain_ms / self.shared_ms


def decode_step(prefix_len: int, batch: int, groups: int, suffix: int, block_size: int, seed: int) -> tuple[list[SequenceSlice], list[int]]:
    """Sequences of `groups` families (each its own prompt of prefix_len tokens, consecutive blocks),
    suffixes of 1..2*suffix tokens in blocks handed out round-robin, the new token last."""
    rng = random.Random(seed)
    next_block = 0
    prompts = []
    for _ in range(groups):
        n = -(-prefix_len // block_size)
        prompts.append(list(range(next_block, next_block + n)))
        next_block += n
    full = prefix_len // block_size  # a partly filled last prompt block is copied on write: the suffix starts there
    lens = [rng.randint(1, 2 * suffix) for _ in range(batch)]
    tables = [list(prompts[i % groups][:full]) for i in range(batch)]
    for length in range(max(lens) + prefix_len - full * block_size):  # round-robin: one block per sequence at a time
        for i in range(batch):
            if length % block_size == 0 and length < lens[i] + prefix_len - full * block_size:
                tables[i].append(next_block)
                next_block += 1
    sequences, slots = [], []
    for i, table in enumerate(tables):
        n = prefix_len + lens[i]
        sequences.append(SequenceSlice(i, 1, n, table))
        slots.append(table[(n - 1) // block_size] * block_size + (n - 1) % block_size)
    return sequences, slots


def time_step(backend: AttentionBackend, caches, sequences, slots, qkv, block_size: int, layers: int) -> tuple[float, torch.Tensor]:
    """Seconds per layer of one decode step (metadata built once, then every layer), and the last output."""
    q, k, v = qkv
    started = time.perf_counter()
    meta = AttentionMetadata.build(sequences, slots)
    for layer in range(layers):
        k_cache, v_cache = caches[layer % len(caches)]
        out = backend.forward(q, k, v, k_cache, v_cache, meta)
    return (time.perf_counter() - started) / layers, out


def run_case(prefix_len: int, batch: int, args: argparse.Namespace) -> Case:
    sequences, slots = decode_step(prefix_len, batch, args.groups, args.suffix, args.block_size, args.seed)
    num_blocks = max(max(s.block_table) for s in sequences) + 1
    gen = torch.Generator().manual_seed(args.seed)
    shape = (KV_HEADS, num_blocks, args.block_size, HEAD_DIM)
    caches = [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)) for _ in range(min(args.layers, args.caches))]
    qkv = (torch.randn(batch, KV_HEADS * GROUP, HEAD_DIM, generator=gen), torch.randn(batch, KV_HEADS, HEAD_DIM, generator=gen), torch.randn(batch, KV_HEADS, HEAD_DIM, generator=gen))
    plain, shared = CpuPagedAttention(), SharedPrefixCpuAttention(args.min_shared_tokens)
    times: dict[str, list[float]] = {"plain": [], "shared": []}
    outs = {}
    for rep in range(args.reps + 1):  # the first rep warms up
        for name, backend in (("plain", plain), ("shared", shared)):
            seconds, outs[name] = time_step(backend, caches, sequences, slots, qkv, args.block_size, args.layers)
            if rep:
                times[name].append(seconds)
    diff = (outs["plain"] - outs["shared"]).abs().max().item()
    return Case(prefix_len, batch, statistics.median(times["plain"]) * 1e3, statistics.median(times["shared"]) * 1e3, diff)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefix-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="shared prompt tokens")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64], help="decode sequences per step")
    parser.add_argument("--groups", type=int, default=1, help="prefix families in the batch, each its own prompt (default 1)")
    parser.add_argument("--suffix", type=int, default=64, help="mean own tokens per sequence, drawn from 1..2x (default 64)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--layers", type=int, default=MODEL_LAYERS, help=f"layers per step (default {MODEL_LAYERS})")
    parser.add_argument("--caches", type=int, default=MODEL_LAYERS, help="distinct per-layer KV caches, cycled (default: one per layer)")
    parser.add_argument("--reps", type=int, default=3, help="timed steps per case, median reported (default 3)")
    parser.add_argument("--min-shared-tokens", type=int, default=128, help="shorter shared runs are not grouped (default 128)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="prefixes 1k and 4k, batches 8 and 32, 6 layers, 2 reps")
    args = parser.parse_args()
    if args.quick:
        args.prefix_lens, args.batches, args.layers, args.caches, args.reps = [1024, 4096], [8, 32], 6, 6, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    cases = []
    with console.status("timing") as status:
        for prefix_len in args.prefix_lens:
            for batch in args.batches:
                status.update(f"prefix {prefix_len}, batch {batch}")
                cases.append(run_case(prefix_len, batch, args))
    title = (
        f"decode attention per layer (Hkv={KV_HEADS}, G={GROUP}, D={HEAD_DIM}; {args.groups} prefix group(s), "
        f"suffix 1-{2 * args.suffix} tokens, block {args.block_size}; {torch.get_num_threads()} threads)"
    )
    table = Table(title=title)
    for column in ("prefix", "batch", "plain ms", "shared ms", "speedup", f"step x{MODEL_LAYERS} plain/shared ms", "max |diff|"):
        table.add_column(column, justify="right")
    for c in cases:
        step = f"{c.plain_ms * MODEL_LAYERS:.0f} / {c.shared_ms * MODEL_LAYERS:.0f}"
        table.add_row(str(c.prefix_len), str(c.batch), f"{c.plain_ms:.2f}", f"{c.shared_ms:.2f}", f"{c.speedup:.2f}x", step, f"{c.max_diff:.1e}")
    console.print(table)
    best = max(cases, key=lambda c: c.speedup)
    worst = min(cases, key=lambda c: c.speedup)
    print(
        f"shared-prefix-attention: {worst.speedup:.2f}x-{best.speedup:.2f}x faster per layer than plain paged decode "
        f"(best {best.speedup:.2f}x at prefix {best.prefix_len}, batch {best.batch}; worst at prefix {worst.prefix_len}, "
        f"batch {worst.batch}); max |diff| {max(c.max_diff for c in cases):.1e}"
    )


if __name__ == "__main__":
    main()
