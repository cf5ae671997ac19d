"""Decoding sequences side by side on one engine, for the decode benchmarks (structured_output.py,
sampling_cost.py): each sequence fills its own prompt, decodes exactly its tokens, and is freed."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable

from parrot.engine.llm_engine import LLMEngine
from parrot.engine.sampler import SamplingParams


async def decode_side_by_side(engine: LLMEngine, batch: int, tag: str, prompt: Callable[[int], str],
                              sampling: Callable[[int], SamplingParams]) -> float:
    """Seconds for `batch` sequences (i = 0..batch-1: prompt(i), sampling(i), which sets
    ignore_eos) to decode their max_tokens each, side by side."""
    async def one(i: int) -> int:
        context = f"{tag}-{i}"
        await engine.fill(context, None, engine.tokenizer.encode(prompt(i)))
        try:
            return len([t async for t in engine.generate(context, sampling(i))])
        finally:
            engine.free_context(context)

    started = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(batch)))
    elapsed = time.perf_counter() - started
    wanted = [sampling(i).max_tokens for i in range(batch)]
    if counts != wanted:
        raise RuntimeError(f"every sequence should decode its max_tokens ({wanted[0]}); they decoded {counts}")
    return elapsed


def decode_arguments(description: str) -> argparse.ArgumentParser:
    """The decode benchmarks' common flags: --batches, --tokens, --repeats, --quick."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--tokens", type=int, default=64, help="tokens each sequence decodes (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, the best kept (default 3)")
    parser.add_argument("--quick", action="store_true", help="batch 1 and 4, 16 tokens, one run")
    return parser


def parse_decode_arguments(parser: argparse.ArgumentParser) -> argparse.Namespace:
    args = parser.parse_args()
    if args.quick:
        args.batches, args.tokens, args.repeats = [1, 4], 16, 1
    return args
