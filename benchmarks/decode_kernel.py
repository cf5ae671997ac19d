"""The CPU decode-attention kernel against the machine's memory read rate, in one run.

Decode attention reads each sequence's whole KV once a layer, so its speed is bytes read a
second; the ceiling is the rate at which this machine reads memory (timed here as a sum over
1 GiB). Each layer has a cache of its own, as in a model, so the KV comes from memory, not
from the last call's cache lines; block tables run in order (as a fresh engine allocates).

    python benchmarks/decode_kernel.py            # 32 rows of 576 tokens, 30 layers
    python benchmarks/decode_kernel.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from parrot.engine.cpu_kernels import cpu_kernels_available, paged_decode


def read_rate(gib: float) -> float:
    """Bytes a second a sum over `gib` GiB reads (the quickest of 3)."""
    data = torch.ones(int(gib * 2**30) // 4)
    best = min(_timed(data.sum) for _ in range(3))
    return data.numel() * 4 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32, help="decode rows (sequences) a step (default 32)")
    parser.add_argument("--context", type=int, default=576, help="tokens of KV each row reads (default 576)")
    parser.add_argument("--layers", type=int, default=30, help="layers, each with a cache of its own (default 30)")
    parser.add_argument("--heads", type=int, default=9, help="query heads (default 9)")
    parser.add_argument("--kv-heads", type=int, default=3, help="KV heads (default 3)")
    parser.add_argument("--head-dim", type=int, default=64, help="head size (default 64)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens a KV block (default 16)")
    parser.add_argument("--quick", action="store_true", help="4 rows of 64 tokens, 2 layers")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.context, args.layers = 4, 64, 2
    if not cpu_kernels_available():
        sys.exit("the CPU kernels could not be built here (see the log above); nothing to measure")
    blocks = -(-args.context // args.block_size)
    tables = torch.arange(args.rows * blocks, dtype=torch.int64).view(args.rows, blocks)
    lens = torch.full((args.rows,), args.context, dtype=torch.int64)
    q = torch.randn(args.rows, args.heads, args.head_dim)
    machine = read_rate(0.05 if args.quick else 1.0)
    print(f"threads {torch.get_num_threads()}, {args.rows} rows of {args.context} tokens, {args.layers} layers, "
          f"heads {args.heads}/{args.kv_heads} of {args.head_dim}; memory read rate {machine / 1e9:.1f} GB/s")
    print("| KV cache | ms a layer | GB/s | share of the read rate |")
    print("|---|---:|---:|---:|")
    shares = []
    for dtype in (torch.float32, torch.bfloat16):
        shape = (args.kv_heads, args.rows * blocks, args.block_size, args.head_dim)
        caches = [(torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)) for _ in range(args.layers)]
        paged_decode(q, *caches[0], tables, lens)
        per_layer = min(_timed(lambda: [paged_decode(q, k, v, tables, lens) for k, v in caches]) for _ in range(3)) / args.layers
        rate = 2 * args.rows * args.context * args.kv_heads * args.head_dim * caches[0][0].element_size() / per_layer
        shares.append(rate / machine)
        print(f"| {str(dtype).removeprefix('torch.')} | {per_layer * 1000:.2f} | {rate / 1e9:.1f} | {rate / machine:.0%} |")
    print(f"decode-kernel: float32 KV at {shares[0]:.0%} of the memory read rate, bfloat16 at {shares[1]:.0%}")


if __name__ == "__main__":
    main()
