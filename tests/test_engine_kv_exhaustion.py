"""A small KV pool: requests wait or are preempted, and get the same text as with a big pool.

small_engine has 16 blocks of 4 tokens (64 tokens of KV) and 16-token steps, so
prompts are prefilled in chunks and block boundaries come every few tokens.
"""

from __future__ import annotations

import asyncio

import pytest

from parrot.engine.scheduler import PRIORITY_LATENCY, PRIORITY_THROUGHPUT
from parrot.errors import KVCacheExhaustedError

from conftest import PROMPTS, SMALL_POOL_BLOCKS, collect, fill_and_generate, greedy, run, text_of, token_ids

MAX_TOKENS = 14


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def test_concurrent_requests_over_the_pool_all_complete(engine, small_engine):
    prompts = PROMPTS[:4]
    lengths = [len(small_engine.tokenizer.encode(p)) + MAX_TOKENS for p in prompts]
    assert sum(blocks_for(n, small_engine.config.block_size) for n in lengths) > SMALL_POOL_BLOCKS, "the pool must be too small for all at once"

    async def all_of(eng):
        return await asyncio.gather(*[eng.complete(p, greedy(MAX_TOKENS)) for p in prompts])

    expected = run(all_of(engine))
    assert run(all_of(small_engine)) == expected


def test_raw_contexts_over_the_pool_all_complete(engine, small_engine):
    """The same with fill/generate/free_context: a context freed right after its generation makes room."""
    prompts = [small_engine.tokenizer.encode(p) for p in PROMPTS[:4]]

    async def all_of(eng):
        return await asyncio.gather(*[fill_and_generate(eng, f"raw-{i}", ids, greedy(MAX_TOKENS)) for i, ids in enumerate(prompts)])

    expected = [token_ids(t) for t in run(all_of(engine))]
    assert [token_ids(t) for t in run(all_of(small_engine))] == expected


def test_request_waits_for_a_context_that_is_being_freed(engine, small_engine):
    """A long request ends with the whole pool in its context; a shorter one, preempted to make
    room for it, runs once that context is freed (by complete(), a turn of the event loop after
    the last token) instead of failing."""
    long_prompt = small_engine.tokenizer.encode(PROMPTS[4])
    long_tokens = SMALL_POOL_BLOCKS * small_engine.config.block_size + 1 - len(long_prompt)  # KV of 64 tokens at the end

    async def both(eng):
        return await asyncio.gather(eng.complete(long_prompt, greedy(long_tokens)), eng.complete(PROMPTS[3], greedy(24)))

    before = small_engine.stats().preemptions
    assert run(both(small_engine)) == run(both(engine))
    assert small_engine.stats().preemptions > before


def test_latency_request_preempts_a_throughput_request(engine, small_engine):
    background = small_engine.tokenizer.encode(PROMPTS[4])  # 37 tokens + 16 generated: 14 of 16 blocks
    urgent = small_engine.tokenizer.encode(PROMPTS[1])  # 5 tokens + 16 generated: 6 blocks

    async def scenario():
        started = asyncio.Event()

        async def low():
            await small_engine.fill("low", None, background, PRIORITY_THROUGHPUT)
            out = []
            async for token in small_engine.generate("low", greedy(16), PRIORITY_THROUGHPUT):
                out.append(token)
                if len(out) == 2:
                    started.set()  # the urgent request arrives while this one decodes
            small_engine.free_context("low")
            return out

        async def high():
            await started.wait()
            await small_engine.fill("high", None, urgent, PRIORITY_LATENCY)
            out = await collect(small_engine, "high", greedy(16), PRIORITY_LATENCY)
            small_engine.free_context("high")
            return out

        return await asyncio.gather(low(), high())

    before = small_engine.stats().preemptions
    low, high = run(scenario())
    assert small_engine.stats().preemptions > before, "the urgent request should have preempted the background one"
    assert token_ids(high) == token_ids(run(fill_and_generate(engine, "high", urgent, greedy(16))))
    assert token_ids(low) == token_ids(run(fill_and_generate(engine, "low", background, greedy(16))))


def test_prompt_larger_than_the_pool_fails_clearly_and_the_engine_keeps_serving(engine, small_engine):
    huge = small_engine.tokenizer.encode(" ".join(PROMPTS))
    assert blocks_for(len(huge), small_engine.config.block_size) > SMALL_POOL_BLOCKS

    async def scenario():
        with pytest.raises(KVCacheExhaustedError, match="kv"):
            await small_engine.fill("huge", None, huge)
        small_engine.check_integrity()
        assert "huge" not in small_engine.contexts  # refused before it was created: nothing to free
        with pytest.raises(KVCacheExhaustedError):
            await small_engine.complete(huge, greedy(4))  # complete() cleans up after itself
        return await small_engine.complete(PROMPTS[0], greedy(MAX_TOKENS))

    after = run(scenario())
    assert after == run(engine.complete(PROMPTS[0], greedy(MAX_TOKENS)))


def test_generation_outgrowing_the_pool_fails_after_its_tokens(engine, small_engine):
    prompt = small_engine.tokenizer.encode(PROMPTS[4])  # 37 tokens: 10 blocks; 27 more fit after it
    assert blocks_for(len(prompt) + 40, small_engine.config.block_size) > SMALL_POOL_BLOCKS

    async def scenario():
        await small_engine.fill("long", None, prompt)
        received = []
        with pytest.raises(KVCacheExhaustedError):
            async for token in small_engine.generate("long", greedy(40)):
                received.append(token)
        small_engine.check_integrity()
        small_engine.free_context("long")
        return received

    received = run(scenario())
    expected = run(fill_and_generate(engine, "long", prompt, greedy(40)))
    assert len(received) >= 20
    assert token_ids(received) == token_ids(expected)[: len(received)]
    assert text_of(received) == text_of(expected[: len(received)])


def test_a_prompt_longer_than_the_model_takes_leaves_no_context_behind(engine):
    from parrot.errors import PromptTooLongError

    with pytest.raises(PromptTooLongError):
        run(engine.fill("long", None, [1] * (engine.model_config.max_position_embeddings + 1)))
    assert "long" not in engine.contexts and engine.stats().num_contexts == 0
    engine.check_integrity()
