"""Decoding sequences side by side on one engine, for the decode benchmarks (structured_output.py,
sampling_cost.py): each sequence fills its own prompt, decodes exactly its tokens, and is freed."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

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


@dataclass(frozen=True)
class ThreeWays:
    """Tokens a second at one batch size, decoded three ways: a reference without the work
    measured, the work as the code does it now, and as the code it replaced did it."""

    batch: int
    reference: float
    new: float
    old: float


async def time_three_ways(batches: list[int], tokens: int, repeats: int, decode: Callable[[int, str, str], Awaitable[float]],
                          old_code: Callable[[], AbstractContextManager]) -> list[ThreeWays]:
    """decode(batch, way, tag) -> seconds for `batch` sequences of `tokens` tokens, way one of
    "reference", "new", "old"; the old way runs inside old_code(). The ways alternate, so that drift
    on a noisy machine hits all three; the best of `repeats` is kept."""
    rows = []
    for batch in batches:
        times: dict[str, list[float]] = {"reference": [], "new": [], "old": []}
        for repeat in range(repeats):
            for way in ("reference", "new"):
                times[way].append(await decode(batch, way, f"{way}-{batch}-{repeat}"))
            with old_code():
                times["old"].append(await decode(batch, "old", f"old-{batch}-{repeat}"))
        rate = {way: batch * tokens / min(seconds) for way, seconds in times.items()}
        rows.append(ThreeWays(batch, rate["reference"], rate["new"], rate["old"]))
    return rows


def report_three_ways(rows: list[ThreeWays], title: str, names: tuple[str, str, str], label: str) -> None:
    """A table of the three ways' rates, then one line `label: batch B: OLD Rx slower than NEW, NEW
    Rx REFERENCE's time, ...` (names: the reference's, the new way's and the old way's)."""
    reference, new, old = names
    table = Table(title=title)
    for column in ("batch", f"{reference} tok/s", f"{new} tok/s", f"{old} tok/s", f"{old} slower than {new}"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row.batch), f"{row.reference:.0f}", f"{row.new:.0f}", f"{row.old:.0f}", f"{row.new / row.old:.2f}x")
    Console().print(table)
    print(f"{label}: " + ", ".join(f"batch {r.batch}: {old} {r.new / r.old:.2f}x slower than {new}, "
                                   f"{new} {r.reference / r.new:.2f}x {reference}'s time" for r in rows))
