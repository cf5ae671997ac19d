"""Does the engine's latency class speed up a latency-critical chain beside background load?

One built-in engine in this process. A chain of 6 dependent calls (512-token prompt, 32
output tokens each) runs while background requests (512-token prompts, 32 output tokens,
normal class) arrive as a Poisson stream at --rate per second. The same chain runs at the
latency class (what `get(perf=LATENCY)` gives it) and at the normal class (what a
request-level client gets), with the same background arrivals (seeded), one after another
in this process. At the latency class it runs twice: with the engine's rule for the 128-token
step cap (StepBudget: normal-class work like this background keeps to the cap only where
the engine's fitted step cost says it pays, `step_profile.cap_pays`) and with no cap at all. Each round prints the chain's time in each setting, how much of it went
to its prompts and to its tokens, and how many requests were in flight (the background's
and the chain's) at each of the chain's tokens, on average.

    python benchmarks/latency_class_probe.py --rate 1.5 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_throughput import make_prompts  # noqa: E402

from parrot.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from parrot.engine.sampler import SamplingParams  # noqa: E402
from parrot.engine.scheduler import PRIORITY_LATENCY, PRIORITY_NORMAL  # noqa: E402

CHAIN_STEPS, PROMPT_TOKENS, OUTPUT_TOKENS = 6, 512, 32


@dataclass
class ChainRun:
    seconds: float
    fill_s: float  # waiting for its prompts' prefill
    decode_s: float  # waiting for its tokens
    in_flight: float  # requests in the engine at each chain token, on average
    share_at_cap: float  # the engine's fitted prompt rate in capped steps over that in full steps

    def __str__(self) -> str:
        per_token = self.decode_s / (CHAIN_STEPS * OUTPUT_TOKENS) * 1e3
        return (f"{self.seconds:.1f} s (prompts {self.fill_s:.1f} s, {per_token:.0f} ms a token, {self.in_flight:.1f} in flight, "
                f"capped steps prefill at {self.share_at_cap:.0%} of the full rate)")


def chain_run(args, priority: int, latency_cap: int, seed: int) -> ChainRun:
    engine = LLMEngine(EngineConfig(model=args.model, kv_memory_gb=1, latency_max_tokens_per_step=latency_cap, prefix_caching=False))
    prompts = make_prompts(engine.tokenizer, 60, PROMPT_TOKENS)
    sampling = SamplingParams(max_tokens=OUTPUT_TOKENS, ignore_eos=True)

    in_flight, seen, split = [0], [], [0.0, 0.0]

    async def call(context_id: str, tokens: list[int], call_priority: int, chain: bool = False) -> None:
        in_flight[0] += 1
        started = time.perf_counter()
        await engine.fill(context_id, None, tokens, priority=call_priority)
        filled = time.perf_counter()
        async for _ in engine.generate(context_id, sampling, priority=call_priority):
            if chain:
                seen.append(in_flight[0])
        engine.free_context(context_id)
        in_flight[0] -= 1
        if chain:
            split[0] += filled - started
            split[1] += time.perf_counter() - filled

    async def background(stop: asyncio.Event) -> None:
        arrivals, calls = random.Random(seed), []
        while not stop.is_set():
            await asyncio.sleep(arrivals.expovariate(args.rate))
            calls.append(asyncio.create_task(call(f"bg{len(calls)}", prompts[10 + len(calls) % 50], PRIORITY_NORMAL)))
        await asyncio.gather(*calls)

    async def main() -> ChainRun:
        await call("warm-up", prompts[0][:64], PRIORITY_NORMAL)
        stop = asyncio.Event()
        load = asyncio.create_task(background(stop))
        await asyncio.sleep(args.lead_s)  # the background reaches its steady state first
        started = time.perf_counter()
        for step in range(CHAIN_STEPS):
            await call(f"chain{step}", prompts[1 + step], priority, chain=True)
        elapsed = time.perf_counter() - started
        stop.set()
        await load
        return ChainRun(elapsed, split[0], split[1], sum(seen) / len(seen), engine.stats().prefill_share_beside_latency)

    return asyncio.run(main())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rate", type=float, default=1.5, help="background requests per second (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each with its own background seed (default %(default)s)")
    parser.add_argument("--lead-s", type=float, default=3.0, help="seconds of background before the chain starts")
    args = parser.parse_args()
    if args.rate <= 0 or args.rounds < 1:
        parser.error("--rate must be positive and --rounds at least 1")
    for seed in range(args.rounds):
        latency = chain_run(args, PRIORITY_LATENCY, 128, seed)
        uncapped = chain_run(args, PRIORITY_LATENCY, 512, seed)
        normal = chain_run(args, PRIORITY_NORMAL, 128, seed)
        print(f"round {seed}:\n  latency class, engine's cap rule: {latency}\n  latency class, no cap:            {uncapped}\n"
              f"  normal class:                     {normal}\n  latency class (engine's rule) {normal.seconds / latency.seconds:.2f}x faster",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
