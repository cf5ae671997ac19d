"""What structured output costs a decode: the built-in engine generating the same number of
tokens with and without a grammar, at several batch sizes, in one run.

Each sequence decodes `--tokens` tokens (ignore_eos) from its own prompt. The structured runs
hold every sequence to a JSON schema of an array of strings long enough that the grammar
never completes first, so both runs decode the same token count; the table gives tokens a
second and the grammar's cost (structured time over free time).

    python benchmarks/structured_output.py               # batches 1, 8, 32
    python benchmarks/structured_output.py --quick
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from parrot.engine.llm_engine import EngineConfig, LLMEngine
from parrot.engine.sampler import SamplingParams
from parrot.engine.structured import StructuredOutput, StructureKind
from side_by_side import decode_arguments, decode_side_by_side, parse_decode_arguments

# an array of many strings: a grammar that stays open for as long as the run decodes
SCHEMA = json.dumps({"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 200})


@dataclass(frozen=True)
class Row:
    batch: int
    free_tokens_s: float
    structured_tokens_s: float

    @property
    def cost(self) -> float:
        return self.free_tokens_s / self.structured_tokens_s


async def decode(engine: LLMEngine, batch: int, tokens: int, structured: StructuredOutput | None, tag: str) -> float:
    """Seconds for `batch` sequences to decode `tokens` tokens each, side by side."""
    return await decode_side_by_side(
        engine, batch, tag, lambda i: f"List {i + 3} words about the sea, as JSON:",
        lambda i: SamplingParams(max_tokens=tokens, temperature=0.8, seed=i, ignore_eos=True, structured=structured))


async def measure(batches: list[int], tokens: int, repeats: int) -> list[Row]:
    engine = LLMEngine(EngineConfig(kv_memory_gb=0.5))
    structured = StructuredOutput(StructureKind.JSON_SCHEMA, SCHEMA)
    try:
        await decode(engine, 2, 8, structured, "warm")  # builds the grammar's tokenizer, warms the kernels
        rows = []
        for batch in batches:
            free, held = [], []
            for repeat in range(repeats):  # alternated, so drift on a noisy machine hits both
                free.append(await decode(engine, batch, tokens, None, f"free-{batch}-{repeat}"))
                held.append(await decode(engine, batch, tokens, structured, f"held-{batch}-{repeat}"))
            rows.append(Row(batch, batch * tokens / min(free), batch * tokens / min(held)))
        return rows
    finally:
        await engine.close()


def main() -> None:
    parser = decode_arguments(__doc__)
    args = parse_decode_arguments(parser)
    rows = asyncio.run(measure(args.batches, args.tokens, args.repeats))
    table = Table(title=f"structured output: {args.tokens} tokens a sequence, JSON schema against free text (best of {args.repeats})")
    for column in ("batch", "free tokens/s", "structured tokens/s", "structured slower by"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row.batch), f"{row.free_tokens_s:.0f}", f"{row.structured_tokens_s:.0f}", f"{row.cost:.2f}x")
    Console().print(table)
    print("structured output: " + ", ".join(f"batch {r.batch} {r.cost:.2f}x slower" for r in rows))


if __name__ == "__main__":
    main()
