"""What penalties cost a decode: the built-in engine decoding the same tokens greedily without
penalties, with them counted as tokens come (engine/penalties.py), and with them the way this
replaced (each row's history rebuilt from its context every step and penalized row by row), at
several batch sizes, in one run.

Each sequence decodes `--tokens` tokens (ignore_eos) after its own prompt of about
`--prompt-tokens` tokens, greedily, with repetition_penalty 1.1, frequency_penalty 0.3 and
presence_penalty 0.3 (the prompt matters: repetition_penalty reads it). The table gives tokens a
second and each way's time over the unpenalized time.

    python benchmarks/penalty_cost.py               # batches 1, 8, 32
    python benchmarks/penalty_cost.py --quick
"""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from parrot.engine import batch_sampling, model_runner
from parrot.engine.llm_engine import EngineConfig, LLMEngine
from parrot.engine.sampler import SamplingParams
from side_by_side import ThreeWays, decode_arguments, decode_side_by_side, parse_decode_arguments, report_three_ways, time_three_ways

PENALTIES = dict(repetition_penalty=1.1, frequency_penalty=0.3, presence_penalty=0.3)


@dataclass(frozen=True)
class RebuiltHistory:
    """The way before TokenCounts: a row's prompt and output ids, taken from its context every step."""

    prompt_ids: list[int]
    output_ids: list[int]

    @classmethod
    def of_context(cls, token_ids: list[int], num_generated: int, vocab: int, device: torch.device) -> RebuiltHistory:
        return cls(token_ids[: len(token_ids) - num_generated], token_ids[len(token_ids) - num_generated :])

    def catch_up(self, token_ids: list[int], num_generated: int) -> RebuiltHistory:
        return RebuiltHistory.of_context(token_ids, num_generated, 0, torch.device("cpu"))


def penalties_row_by_row(logits: torch.Tensor, histories: list[RebuiltHistory], params: list[SamplingParams]) -> torch.Tensor:
    """The penalties before engine/penalties.py: each row's seen ids sorted from sets, its output counted by bincount."""
    rows = []
    for row, history, p in zip(logits, histories, params):
        vocab = row.shape[-1]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(t for t in set(history.prompt_ids) | set(history.output_ids) if t < vocab), dtype=torch.int64)
            values = row[seen]
            row = row.clone()
            row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if history.output_ids and (p.presence_penalty or p.frequency_penalty):
            counts = torch.bincount(torch.tensor(history.output_ids, dtype=torch.int64), minlength=vocab)[:vocab]
            row = row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)
        rows.append(row)
    return torch.stack(rows)


@contextmanager
def penalties_as_before():
    counted, applied = model_runner.TokenCounts, batch_sampling.apply_penalties
    model_runner.TokenCounts, batch_sampling.apply_penalties = RebuiltHistory, penalties_row_by_row
    try:
        yield
    finally:
        model_runner.TokenCounts, batch_sampling.apply_penalties = counted, applied


def prompt(i: int, words: int) -> str:
    """About `words` tokens of numbered lines: distinct tokens for repetition_penalty to read."""
    return f"Log {i}:\n" + "\n".join(f"line {n}: value {n * 37 % 1000}" for n in range(words // 8)) + "\nSummary:"


async def decode(engine: LLMEngine, batch: int, tokens: int, prompt_tokens: int, penalized: bool, tag: str) -> float:
    """Seconds for `batch` sequences to decode `tokens` tokens each, side by side."""
    settings = PENALTIES if penalized else {}
    return await decode_side_by_side(engine, batch, tag, lambda i: prompt(i, prompt_tokens),
                                     lambda i: SamplingParams(max_tokens=tokens, ignore_eos=True, **settings))


async def penalized_text(engine: LLMEngine, prompt_tokens: int, tag: str) -> str:
    context = f"check-{tag}"
    await engine.fill(context, None, engine.tokenizer.encode(prompt(0, prompt_tokens)))
    try:
        return "".join([t.text async for t in engine.generate(context, SamplingParams(max_tokens=24, **PENALTIES))])
    finally:
        engine.free_context(context)


async def measure(batches: list[int], tokens: int, prompt_tokens: int, repeats: int) -> list[ThreeWays]:
    engine = LLMEngine(EngineConfig(kv_memory_gb=1.0))
    try:
        counted = await penalized_text(engine, prompt_tokens, "counted")
        with penalties_as_before():
            rebuilt = await penalized_text(engine, prompt_tokens, "rebuilt")
        if counted != rebuilt:
            raise RuntimeError(f"the two ways of penalizing chose different tokens: {counted!r} against {rebuilt!r}")
        await decode(engine, 2, 8, prompt_tokens, True, "warm")
        return await time_three_ways(batches, tokens, repeats, lambda batch, way, tag: decode(
            engine, batch, tokens, prompt_tokens, way != "reference", tag), penalties_as_before)
    finally:
        await engine.close()


def main() -> None:
    parser = decode_arguments(__doc__)
    parser.add_argument("--prompt-tokens", type=int, default=512, help="about how long each sequence's prompt is (default 512)")
    args = parse_decode_arguments(parser)
    if args.quick:
        args.prompt_tokens = 128
    rows = asyncio.run(measure(args.batches, args.tokens, args.prompt_tokens, args.repeats))
    report_three_ways(rows, f"greedy decode with penalties: {args.tokens} tokens after ~{args.prompt_tokens}-token prompts "
                            f"(best of {args.repeats})", ("unpenalized", "counted", "rebuilt"), "penalties")


if __name__ == "__main__":
    main()
