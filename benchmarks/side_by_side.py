"""Decoding sequences side by side on one engine, for the decode benchmarks (structured_output.py,
sampling_cost.py): each sequence fills its own prompt, decodes exactly its tokens, and is freed."""

from __future__ import annotations

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
