"""How much the CPU engine's precision settings change greedy answers, against float32 throughout.

Each setting gets an engine of its own; each prompt is answered greedily twice: whole, and
after its first half was cached, so that the rest is computed over cached KV (the path of a
prompt a served DAG fills in parts, or of a request sharing a cached prefix). Per setting it
prints how many answers equal the all-float32 engine's, how far they agree on average, how
many answers read the same both ways, and, per prompt, the top-two logit margin of the first
answer token: a margin under a bf16 rounding step (0.125 at this model's logits) is a coin
flip that any change of numerics may turn.

    python benchmarks/precision_probe.py                 # the table in RESULTS.md
    python benchmarks/precision_probe.py --max-tokens 8  # a quicker run
    python benchmarks/precision_probe.py --quick         # two settings, two prompts (a smoke run)
"""

from __future__ import annotations

import argparse
import asyncio
import os
from dataclasses import dataclass

import torch

from parrot.engine.llm_engine import EngineConfig, LLMEngine
from parrot.engine.model_runner import prompt_logits
from parrot.engine.sampler import SamplingParams
from parrot.engine.tokenizer import ChatMessage

CHAT_QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "How many legs does a spider have?",
    "What is the largest planet in our solar system?", "Who wrote Romeo and Juliet?", "What is 12 times 12?",
    "Give me a synonym for happy.", "What language is spoken in Brazil?", "How do I boil an egg?",
    "What is the boiling point of water in Celsius?", "Write a haiku about autumn.", "Why is the sky blue?",
]
COMPLETIONS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "Photosynthesis is the process by which plants",
    "The three laws of thermodynamics state that",
    "import numpy as np\n\ndef normalize(x):\n",
    "The French Revolution began in",
    "To make a cup of tea, first",
    "SELECT name, email FROM users WHERE",
    "The mitochondria is",
    "In 1969, Neil Armstrong",
    "The quick brown fox",
]
# name -> EngineConfig fields; the first is the reference
SETTINGS = {
    "float32 throughout": dict(cpu_bf16="off"),
    "default": dict(),
    "+ bf16 KV cache": dict(kv_dtype="bfloat16"),
    "+ bf16 KV and prompt attention (vLLM's)": dict(kv_dtype="bfloat16", prompt_attention_dtype="bfloat16"),
}


@dataclass(frozen=True)
class SettingResult:
    name: str
    precision: str  # what the engine computes in, as resolved on this machine
    answers: list[str]
    in_parts_equal: int  # answers that read the same when the prompt's first half was cached
    margins: list[float]  # top-two logit margin of each prompt's first answer token


def first_token_margin(engine: LLMEngine, ids: list[int]) -> float:
    """The top-two gap of the next-token logits after a fresh prefill of ids (blocks 0.. of the cache)."""
    top = prompt_logits(engine.model, engine.kv, ids)[-1].topk(2).values  # [2]
    return float(top[0] - top[1])


def run_setting(name: str, fields: dict, prompts: list[str], max_tokens: int) -> SettingResult:
    engine = LLMEngine(EngineConfig(kv_memory_gb=0.25, **fields))
    greedy = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    ids = [engine.tokenizer.encode(p) for p in prompts]
    margins = [first_token_margin(engine, i) for i in ids]  # before any request: blocks 0.. are free

    async def answers() -> list[str]:
        return [await engine.complete(i, greedy) for i in ids]

    async def answers_after_first_half() -> list[str]:
        # a prompt filled in parts, as a served DAG fills one: the first half is cached (its whole
        # blocks), so the prompt forks from it and only the rest is computed over cached KV
        engine.clear_prefix_cache()
        out = []
        for i in ids:
            await engine.complete(i[: len(i) // 2], SamplingParams(max_tokens=1))
            out.append(await engine.complete(i, greedy))
        return out

    first = asyncio.run(answers())
    in_parts = asyncio.run(answers_after_first_half())
    return SettingResult(name, engine.precision, first, sum(a == b for a, b in zip(first, in_parts)), margins)


def agreed_chars(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=24, help="tokens each greedy answer runs to (default 24)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--quick", action="store_true", help="the first two settings and one prompt of each kind, 4 tokens")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    questions, completions, settings = CHAT_QUESTIONS, COMPLETIONS, SETTINGS
    if args.quick:
        questions, completions, settings, args.max_tokens = questions[:1], completions[:1], dict(list(SETTINGS.items())[:2]), 4
    chat = LLMEngine(EngineConfig(kv_memory_gb=0.01)).tokenizer
    prompts = [chat.apply_chat_template([ChatMessage("user", q)]) for q in questions] + completions
    results = [run_setting(name, fields, prompts, args.max_tokens) for name, fields in settings.items()]
    reference = results[0].answers
    print(f"{len(prompts)} prompts, greedy, {args.max_tokens} tokens; reference: {results[0].name}\n")
    print("| setting | computes in | answers equal to float32 | chars agreed (mean) | same answer after a cached first half |")
    print("|---|---|---:|---:|---:|")
    for r in results:
        equal = sum(a == b for a, b in zip(r.answers, reference))
        agreed = sum(agreed_chars(a, b) / max(len(b), 1) for a, b in zip(r.answers, reference)) / len(prompts)
        print(f"| {r.name} | {r.precision} | {equal}/{len(prompts)} | {agreed:.0%} | {r.in_parts_equal}/{len(prompts)} |")
    print("\nfirst answer token's top-two logit margin, per prompt:\n")
    print("| prompt | " + " | ".join(r.name for r in results) + " | answer (float32) |")
    print("|---" * (len(results) + 2) + "|")
    for i, prompt in enumerate(questions + completions):
        margins = " | ".join(f"{r.margins[i]:.3f}" for r in results)
        print(f"| {prompt!r} | {margins} | {reference[i][:40]!r} |")


if __name__ == "__main__":
    main()
