"""Prompt attention over cached KV on the CPU: the engine's call against the 3-D form it replaced.

A prompt chunk that follows cached KV (a later chunk of a long prompt, a capped chunk beside
latency work, a prompt forked from a cached prefix) attends with a boolean mask. The engine
passes 4-D [1, H, L, D] queries with GQA done by PyTorch's fused CPU kernel
(`CpuPagedAttention._prefill`); the baseline folds each KV head's G query heads into rows of
[Hkv, G*L, D], which takes the unfused path. Both run in this process on the same tensors,
checked equal; the best of --repeats times counts.

    python benchmarks/prefill_attention.py            # the shapes in RESULTS.md
    python benchmarks/prefill_attention.py --quick    # one small shape (a smoke run)
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = [(1, 600), (48, 1100), (128, 600), (512, 1024), (512, 2048)]  # (queries, keys)


def folded_heads(q, keys, values, mask):
    """q: [L, H, D], keys/values: [Hkv, T, D], mask: [L, T] -> [L, H, D], G heads as rows"""
    L, h, d = q.shape
    hkv = keys.shape[0]
    g = h // hkv
    queries = q.reshape(L, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * L, d)
    rows = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask.repeat(g, 1))
    return rows.view(hkv, g, L, d).permute(2, 0, 1, 3).reshape(L, h, d)


def heads_as_batch(q, keys, values, mask):
    """The engine's form: the same inputs as 4-D tensors, GQA by the kernel"""
    rows = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
                                          attn_mask=mask, enable_gqa=True)
    return rows[0].transpose(0, 1)


def best_ms(fn, args, repeats: int) -> float:
    fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return min(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=9, help="query heads (default 9, the default model's)")
    parser.add_argument("--kv-heads", type=int, default=3, help="KV heads (default 3)")
    parser.add_argument("--head-dim", type=int, default=64, help="head size (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per form and shape; the quickest counts (default 5)")
    parser.add_argument("--quick", action="store_true", help="one small shape")
    args = parser.parse_args()
    torch.manual_seed(0)
    shapes = [(16, 64)] if args.quick else SHAPES
    print(f"threads {torch.get_num_threads()}, heads {args.heads}/{args.kv_heads}, head size {args.head_dim}, float32")
    print("| queries x keys | 3-D, heads folded (ms) | 4-D, the engine's (ms) | speedup |")
    print("|---|---:|---:|---:|")
    ratios = []
    for L, T in shapes:
        q = torch.randn(L, args.heads, args.head_dim)
        keys, values = torch.randn(args.kv_heads, T, args.head_dim), torch.randn(args.kv_heads, T, args.head_dim)
        mask = torch.ones(L, T, dtype=torch.bool).tril(T - L)  # query i sits at T - L + i
        inputs = (q, keys, values, mask)
        torch.testing.assert_close(heads_as_batch(*inputs), folded_heads(*inputs), atol=1e-4, rtol=1e-4)
        old, new = best_ms(folded_heads, inputs, args.repeats), best_ms(heads_as_batch, inputs, args.repeats)
        ratios.append(old / new)
        print(f"| {L} x {T} | {old:.2f} | {new:.2f} | {old / new:.2f}x |")
    print(f"prefill-attention: the engine's form {min(ratios):.2f}x-{max(ratios):.2f}x faster than heads folded into rows")


if __name__ == "__main__":
    main()
