"""Continuous batching gives each request what it would get alone."""

from __future__ import annotations

import asyncio

from parrot.engine.llm_engine import FinishReason
from parrot.engine.sampler import SamplingParams

from conftest import PROMPTS, collect, fill_and_generate, finish_of, greedy, run, text_of, token_ids

MAX_TOKENS = 12


def encode_all(engine) -> list[list[int]]:
    return [engine.tokenizer.encode(p) for p in PROMPTS]


def test_concurrent_greedy_equals_one_at_a_time(engine):
    prompts = encode_all(engine)
    assert len({len(p) for p in prompts}) == len(prompts), "prompts of different lengths"

    async def sequential():
        return [await fill_and_generate(engine, f"seq-{i}", ids, greedy(MAX_TOKENS)) for i, ids in enumerate(prompts)]

    async def concurrent():
        return await asyncio.gather(*[fill_and_generate(engine, f"bat-{i}", ids, greedy(MAX_TOKENS)) for i, ids in enumerate(prompts)])

    alone = run(sequential())
    together = run(concurrent())
    for ids, a, b in zip(prompts, alone, together):
        assert token_ids(b) == token_ids(a), f"batched output differs for a prompt of {len(ids)} tokens"
        assert text_of(b) == text_of(a)
        assert len(a) == MAX_TOKENS and finish_of(a) is FinishReason.LENGTH and finish_of(b) is FinishReason.LENGTH


def test_requests_joining_mid_flight_equal_one_at_a_time(engine):
    """Requests that arrive while others decode share steps (prefill next to decodes) and still agree."""
    prompts = encode_all(engine)[:3]
    alone = run(_sequential(engine, prompts))

    async def staggered():
        async def request(i: int, ids: list[int], start: asyncio.Event, started_next: asyncio.Event):
            await start.wait()
            await engine.fill(f"stag-{i}", None, ids)
            out = []
            async for token in engine.generate(f"stag-{i}", greedy(MAX_TOKENS)):
                out.append(token)
                if len(out) == 3:
                    started_next.set()  # the next request joins while this one still decodes
            started_next.set()
            engine.free_context(f"stag-{i}")
            return out

        events = [asyncio.Event() for _ in range(len(prompts) + 1)]
        events[0].set()
        return await asyncio.gather(*[request(i, ids, events[i], events[i + 1]) for i, ids in enumerate(prompts)])

    together = run(staggered())
    assert [token_ids(t) for t in together] == [token_ids(a) for a in alone]


async def _sequential(engine, prompts):
    return [await fill_and_generate(engine, f"one-{i}", ids, greedy(MAX_TOKENS)) for i, ids in enumerate(prompts)]


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(engine):
    ids = engine.tokenizer.encode(PROMPTS[0])
    params = SamplingParams(max_tokens=8, temperature=1.0, top_k=50, top_p=0.95, seed=1234, ignore_eos=True)

    async def alone():
        return await fill_and_generate(engine, "seed-a", ids, params)

    async def in_batch():
        others = [
            fill_and_generate(engine, f"seed-o{i}", engine.tokenizer.encode(p), SamplingParams(max_tokens=8, temperature=1.0, seed=i, ignore_eos=True))
            for i, p in enumerate(PROMPTS[1:3])
        ]
        results = await asyncio.gather(fill_and_generate(engine, "seed-b", ids, params), *others)
        return results[0]

    first, second, batched = run(alone()), run(alone()), run(in_batch())
    assert token_ids(first) == token_ids(second)
    assert token_ids(batched) == token_ids(first)


def test_generation_continues_a_context(engine):
    """Two generate calls of 6 tokens on one context give the 12 tokens of one call."""
    ids = engine.tokenizer.encode(PROMPTS[1])

    async def in_two_calls():
        await engine.fill("cont", None, ids)
        try:
            return await collect(engine, "cont", greedy(6)) + await collect(engine, "cont", greedy(6))
        finally:
            engine.free_context("cont")

    whole = run(fill_and_generate(engine, "whole", ids, greedy(12)))
    assert token_ids(run(in_two_calls())) == token_ids(whole)


def test_generated_text_is_the_decoded_tokens(engine):
    tokens = run(fill_and_generate(engine, "text", engine.tokenizer.encode(PROMPTS[2]), greedy(MAX_TOKENS)))
    assert text_of(tokens) == engine.tokenizer.decode(token_ids(tokens))
    completion = run(engine.complete(PROMPTS[2], greedy(MAX_TOKENS)))
    assert completion == text_of(tokens)


def test_every_forward_step_runs_in_the_engines_own_thread(engine):
    """One thread for the model's loading and every step: a second thread running torch work
    starts a second OpenMP team, and then every step's matmuls wait for their threads to wake."""
    import threading

    seen = set()
    step = engine.runner.run

    def recording(plan):
        seen.add(threading.current_thread().name)
        return step(plan)

    engine.runner.run = recording
    try:
        async def two_at_once():
            prompts = encode_all(engine)[:2]
            await asyncio.gather(*[fill_and_generate(engine, f"thr-{i}", ids, greedy(4)) for i, ids in enumerate(prompts)])

        run(two_at_once())
        run(two_at_once())  # a second event loop, as a restarted server would have
    finally:
        engine.runner.run = step
    assert len(seen) == 1 and seen.pop().startswith("parrot-step")
