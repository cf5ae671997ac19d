"""What sampling costs a decode: the built-in engine decoding the same tokens greedily, sampled
the batched way (engine/batch_sampling.py: each row's nucleus among its likeliest tokens, one
uniform draw a row), and sampled the plain way it replaced (each row's vocabulary sorted for
top_p, torch.multinomial over all of it), at several batch sizes, in one run.

Each sequence decodes `--tokens` tokens (ignore_eos) from its own prompt, at temperature 0.8 and
top_p 0.95 (a common chat setting; --top-p 1 for temperature alone). The table gives tokens a
second and each sampler's time over the greedy time.

    python benchmarks/sampling_cost.py               # batches 1, 8, 32
    python benchmarks/sampling_cost.py --quick
"""

from __future__ import annotations

import asyncio
from contextlib import contextmanager

import torch

from parrot.engine import batch_sampling
from parrot.engine.llm_engine import EngineConfig, LLMEngine
from parrot.engine.sampler import SamplingParams, apply_min_p, apply_top_k, apply_top_p
from side_by_side import ThreeWays, decode_arguments, decode_side_by_side, parse_decode_arguments, report_three_ways, time_three_ways


def plain_sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """The sampler before batch_sampling: each row on its own, its vocabulary sorted, drawn by multinomial."""
    tokens = []
    for row, (p, generator) in enumerate(zip(params, generators)):
        scaled = apply_top_p(apply_top_k(apply_min_p(logits[row] / p.temperature, p.min_p), p.top_k), p.top_p)
        probs = torch.softmax(scaled, dim=-1)
        if generator is not None:
            probs = probs.to(generator.device)
        tokens.append(int(torch.multinomial(probs, 1, generator=generator)))
    return tokens


@contextmanager
def plain_sampler():
    batched = batch_sampling.sample_rows
    batch_sampling.sample_rows = plain_sample_rows
    try:
        yield
    finally:
        batch_sampling.sample_rows = batched


async def decode(engine: LLMEngine, batch: int, tokens: int, sampling: SamplingParams, tag: str) -> float:
    """Seconds for `batch` sequences to decode `tokens` tokens each, side by side."""
    return await decode_side_by_side(
        engine, batch, tag, lambda i: f"Story {i}: once upon a time, in a town by the sea,",
        lambda i: SamplingParams(max_tokens=tokens, temperature=sampling.temperature, top_p=sampling.top_p, seed=i, ignore_eos=True))


async def measure(batches: list[int], tokens: int, repeats: int, temperature: float, top_p: float) -> list[ThreeWays]:
    engine = LLMEngine(EngineConfig(kv_memory_gb=0.5))
    greedy, sampled = SamplingParams(), SamplingParams(temperature=temperature, top_p=top_p)
    try:
        await decode(engine, 2, 8, sampled, "warm")
        return await time_three_ways(batches, tokens, repeats, lambda batch, way, tag: decode(
            engine, batch, tokens, greedy if way == "reference" else sampled, tag), plain_sampler)
    finally:
        await engine.close()


def main() -> None:
    parser = decode_arguments(__doc__)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    args = parse_decode_arguments(parser)
    rows = asyncio.run(measure(args.batches, args.tokens, args.repeats, args.temperature, args.top_p))
    report_three_ways(rows, f"sampling at temperature {args.temperature}, top_p {args.top_p}: {args.tokens} tokens a sequence "
                            f"(best of {args.repeats})", ("greedy", "batched", "plain"), "sampling")


if __name__ == "__main__":
    main()
