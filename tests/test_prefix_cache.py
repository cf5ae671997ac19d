"""Prefix sharing in the built-in engine: static prefixes and the dynamic prefix cache.

Sharing must never change what is generated: the same tokens come out with the
cache on as with it off (float32, every matmul in float32).
"""

from __future__ import annotations

import asyncio

import pytest

from parrot.backends.builtin import BuiltinEngineBackend
from parrot.engine.llm_engine import EngineConfig, LLMEngine
from conftest import greedy, run

SYSTEM = (
    "You are a careful assistant for a library. You answer questions about books, authors and opening hours. "
    "Be brief and polite, and never invent a book that does not exist. The library opens at nine and closes at six. "
)
QUESTIONS = ["Who wrote Hamlet?", "When do you open?", "Do you have books about parrots?", "Can I renew a loan online?"]


@pytest.fixture(scope="module")
def caching_engine():
    engine = LLMEngine(EngineConfig(dtype="float32", cpu_bf16="off", kv_memory_gb=0.1, prefix_caching=True))
    yield engine
    run(engine.close())


def answers(backend: BuiltinEngineBackend, shared_chars: int, tag: str) -> list[str]:
    async def one(i: int, question: str) -> str:
        context_id = f"{tag}-{i}"
        await backend.fill(context_id, None, SYSTEM + question + "\nAnswer:", 1, shared_prefix_chars=shared_chars)
        try:
            return "".join([t.text async for t in backend.generate(context_id, greedy(8), 1)])
        finally:
            await backend.free_context(context_id)

    async def main():
        return await asyncio.gather(*(one(i, q) for i, q in enumerate(QUESTIONS)))

    return run(main())


def test_static_prefix_is_prefilled_once_and_changes_nothing(caching_engine, engine):
    caching_engine.clear_prefix_cache()
    before = caching_engine.stats().tokens_processed
    shared = answers(BuiltinEngineBackend(caching_engine), len(SYSTEM), "static")
    computed_with_sharing = caching_engine.stats().tokens_processed - before
    plain_before = engine.stats().tokens_processed
    plain = answers(BuiltinEngineBackend(engine), 0, "plain")
    computed_without = engine.stats().tokens_processed - plain_before
    assert shared == plain and all(a.strip() for a in shared)
    system_tokens = len(caching_engine.tokenizer.encode(SYSTEM))
    # the system prompt's whole blocks were computed once instead of four times
    saved = computed_without - computed_with_sharing
    assert saved >= 3 * (system_tokens // caching_engine.config.block_size) * caching_engine.config.block_size - 4
    assert caching_engine.stats().num_contexts == 0 and caching_engine.stats().cached_prefixes >= 1
    caching_engine.check_integrity()


def test_dynamic_cache_reuses_a_finished_prompt_across_requests(caching_engine):
    caching_engine.clear_prefix_cache()
    backend = BuiltinEngineBackend(caching_engine)
    first = answers(backend, 0, "first")
    hits_before = caching_engine.prefix_cache.hits_tokens
    again = answers(backend, 0, "again")
    assert again == first
    assert caching_engine.prefix_cache.hits_tokens - hits_before >= len(QUESTIONS) * caching_engine.config.block_size
    caching_engine.check_integrity()


def test_idle_prefixes_are_evicted_under_memory_pressure_and_every_block_comes_back(caching_engine):
    caching_engine.clear_prefix_cache()
    backend = BuiltinEngineBackend(caching_engine)
    pool = caching_engine.contexts.pool
    # distinct long prompts, far more than the pool holds if all were kept
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()
    prompt_tokens = 200

    async def one(i: int) -> None:
        text = " ".join(words[(i + j) % len(words)] + str(i) for j in range(prompt_tokens // 3))
        await backend.fill(f"p{i}", None, text, 1)
        async for _ in backend.generate(f"p{i}", greedy(2), 1):
            pass
        await backend.free_context(f"p{i}")

    rounds = pool.num_blocks * pool.block_size // prompt_tokens + 8
    for i in range(rounds):
        run(one(i))
        caching_engine.check_integrity()
    assert caching_engine.stats().num_contexts == 0
    caching_engine.clear_prefix_cache()
    assert pool.num_free == pool.num_blocks and len(caching_engine.prefix_cache) == 0


def test_generation_with_shared_prefix_attention_equals_without(caching_engine, engine):
    """Four users of one long system prompt decode as one prefix group: same tokens as the plain engine."""
    assert type(caching_engine.model.attention).__name__ == "SharedPrefixCpuAttention"
    long_system = SYSTEM * 3  # past the shared-attention threshold (128 tokens)
    backend = BuiltinEngineBackend(caching_engine)

    async def one(b, i, question, shared):
        await b.fill(f"sp-{shared}-{i}", None, long_system + question, 1, shared_prefix_chars=len(long_system) if shared else 0)
        try:
            return [t.token_id async for t in b.generate(f"sp-{shared}-{i}", greedy(6), 1)]
        finally:
            await b.free_context(f"sp-{shared}-{i}")

    async def all_of(b, shared):
        return await asyncio.gather(*(one(b, i, q, shared) for i, q in enumerate(QUESTIONS)))

    assert run(all_of(backend, True)) == run(all_of(BuiltinEngineBackend(engine), False))


def test_a_batch_behind_a_shared_prefix_reads_its_blocks_once():
    """The engine's peak batch KV blocks (what the benchmarks report) count a shared prefix once."""
    peaks, system_blocks = {}, 0
    for sharing in (True, False):
        fresh = LLMEngine(EngineConfig(dtype="float32", cpu_bf16="off", kv_memory_gb=0.1, prefix_caching=sharing))
        try:
            answers(BuiltinEngineBackend(fresh), len(SYSTEM), f"peak-{sharing}")
            peaks[sharing] = fresh.stats().peak_batch_blocks
            system_blocks = len(fresh.tokenizer.encode(SYSTEM)) // fresh.config.block_size
        finally:
            run(fresh.close())
    # four sequences each holding their own copy of the system prompt, against one copy plus their own tails
    assert peaks[False] >= 2 * system_blocks
    assert peaks[True] <= system_blocks + len(QUESTIONS) * 3
    assert peaks[True] < peaks[False]


def test_a_prompt_is_cached_as_soon_as_it_is_computed(caching_engine):
    """Identical prompts that come while the first still generates fork from its prefilled
    prompt: cached once computed, not when the request ends. Under a stream of such requests
    each miss prefilled the prompt again and lengthened the steps that delayed the first
    one's end (benchmarks/RESULTS.md, chain-summary-bg on the CPU)."""
    caching_engine.clear_prefix_cache()
    backend = BuiltinEngineBackend(caching_engine)
    prompt = SYSTEM + QUESTIONS[0] + "\nAnswer:"
    prompt_blocks = len(caching_engine.tokenizer.encode(prompt)) // caching_engine.config.block_size

    async def one(i: int, first_generating: asyncio.Event, then_generate: bool) -> str:
        if i > 0:
            await first_generating.wait()
        await backend.fill(f"same-{i}", None, prompt, 1, then_generate=then_generate)
        try:
            text = ""
            async for token in backend.generate(f"same-{i}", greedy(8), 1):
                first_generating.set()  # its prompt is computed: it has a token
                text += token.text
            return text
        finally:
            await backend.free_context(f"same-{i}")

    async def main(then_generate: bool) -> list[str]:
        generating = asyncio.Event()
        return await asyncio.gather(*(one(i, generating, then_generate) for i in range(4)))

    for then_generate in (False, True):  # computed by the fill, or by the generate after it
        caching_engine.clear_prefix_cache()
        hits_before = caching_engine.prefix_cache.hits_tokens
        outputs = run(main(then_generate))
        assert len(set(outputs)) == 1 and outputs[0].strip()
        assert caching_engine.prefix_cache.hits_tokens - hits_before >= 3 * prompt_blocks * caching_engine.config.block_size
        assert caching_engine.stats().num_contexts == 0
        caching_engine.check_integrity()


def test_a_prompt_cached_while_its_request_runs_is_kept_under_memory_pressure(caching_engine):
    """Dropping it would free nothing (the running request holds every block of it) and lose it
    for the requests after; once the request ends it is idle and evictable like any other."""
    caching_engine.clear_prefix_cache()
    cache = caching_engine.prefix_cache
    prompt = caching_engine.tokenizer.encode(SYSTEM + QUESTIONS[2] + "\\nAnswer:")

    async def main() -> None:
        await caching_engine.fill("running", None, prompt)
        assert len(cache) == 1
        assert cache.evict(caching_engine.contexts.pool.num_blocks) == 0 and len(cache) == 1
        caching_engine.free_context("running")

    run(main())
    block = caching_engine.config.block_size
    assert cache.longest(prompt).num_tokens == len(prompt) // block * block  # its whole prompt once it ended
    assert cache.evict(caching_engine.contexts.pool.num_blocks) > 0 and len(cache) == 0
    caching_engine.check_integrity()


def test_a_stop_string_is_cut_from_a_context_whose_prompt_is_cached(caching_engine):
    """The prompt cached while the request runs forks from its context; the cut after a stop
    string lies past that fork, so the context still forgets the stop string."""
    caching_engine.clear_prefix_cache()
    tokenizer = caching_engine.tokenizer
    prompt = tokenizer.encode(SYSTEM + QUESTIONS[3] + "\\nAnswer:")

    async def main() -> tuple[str, str, list[int]]:
        await caching_engine.fill("free-run", None, prompt)
        text = "".join([t.text async for t in caching_engine.generate("free-run", greedy(16))])
        caching_engine.free_context("free-run")
        caching_engine.clear_prefix_cache()  # "cut" computes its prompt itself, and caches it while it runs
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        await caching_engine.fill("cut", None, prompt)
        assert caching_engine.contexts.get("cut").children, "its prompt is cached from it while it runs"
        kept = "".join([t.text async for t in caching_engine.generate("cut", greedy(16, stop=(stop,)))])
        tokens = list(caching_engine.contexts.get("cut").token_ids[len(prompt):])
        caching_engine.free_context("cut")
        return stop, kept, tokens

    stop, kept, tokens = run(main())
    assert kept and stop not in kept
    held = tokenizer.decode(tokens)  # the context holds the kept text, not the stop string
    assert stop not in held and held.strip() == kept.strip()
    caching_engine.check_integrity()


def test_a_prompt_its_generate_computed_is_cached_whole_while_it_runs(caching_engine):
    """Its last token was sampled from in the prompt's own step and is never computed again, so
    even the block that holds it is shared at once (a plain fill's generate recomputes it)."""
    caching_engine.clear_prefix_cache()
    block = caching_engine.config.block_size
    prompt = caching_engine.tokenizer.encode(SYSTEM + QUESTIONS[1] + "\nAnswer:")
    prompt = prompt[: len(prompt) // block * block]

    async def main() -> int:
        await caching_engine.fill("aligned", None, prompt, then_generate=True)
        async for _ in caching_engine.generate("aligned", greedy(4)):
            break  # the first token: the prompt is computed
        cached = caching_engine.prefix_cache.longest(prompt).num_tokens
        caching_engine.free_context("aligned")
        return cached

    assert run(main()) == len(prompt)
    caching_engine.check_integrity()


def test_a_cached_prompt_is_scored_in_full_and_leaves_the_cache_as_it_was(caching_engine, engine):
    """Scoring (a prompt's log probabilities) computes every position, even where the prefix cache
    holds the prompt (its positions there were never computed here), and adds nothing to the cache."""
    caching_engine.clear_prefix_cache()
    ids = caching_engine.tokenizer.encode(SYSTEM + QUESTIONS[0])
    run(caching_engine.complete(ids, greedy(2)))  # now cached
    cached_before = caching_engine.stats().cached_blocks
    scored = run(caching_engine.score(ids, top=2))
    assert [round(s.logprob, 4) for s in scored] == [round(s.logprob, 4) for s in run(engine.score(ids, top=2))]
    assert caching_engine.stats().cached_blocks == cached_before
    caching_engine.check_integrity()


def test_choices_of_one_prompt_prefill_it_once_and_fork_from_it(caching_engine, engine):
    """n choices of one OpenAI prompt are calls that say they share it: the engine computes the
    prompt's whole blocks once, where four identical prompts arriving together would each be
    computed, and the choices come out as without sharing."""
    from parrot.manager.manager import Manager

    prompt = SYSTEM * 2 + QUESTIONS[2] + "\nAnswer:"
    prompt_tokens = len(caching_engine.tokenizer.encode(prompt))
    choices, max_tokens = 4, 6

    async def ask(backend: BuiltinEngineBackend, shared: bool) -> list[str]:
        manager = Manager([backend])
        session = manager.create_session()
        var_ids = [manager.submit_prompt(session, prompt, greedy(max_tokens, ignore_eos=True), prompt_shared=shared)
                   for _ in range(choices)]
        try:
            return await asyncio.gather(*(manager.get_variable(session, v, None) for v in var_ids))
        finally:
            manager.close_session(session)

    computed = {}
    for shared in (True, False):
        caching_engine.clear_prefix_cache()
        before = caching_engine.stats().tokens_processed
        texts = run(ask(BuiltinEngineBackend(caching_engine), shared))
        computed[shared] = caching_engine.stats().tokens_processed - before
        assert texts == run(ask(BuiltinEngineBackend(engine), False))
        assert len(set(texts)) == 1 and texts[0].strip()
        assert caching_engine.stats().num_contexts == 0
        caching_engine.check_integrity()
    block = caching_engine.config.block_size
    # shared: the prompt once, then each choice its last part-block and its tokens
    assert computed[True] <= prompt_tokens + choices * (block + max_tokens)
    assert computed[False] >= choices * (prompt_tokens // block) * block


def test_a_request_cancelled_while_prefilling_a_shared_prefix_leaves_it_computed_for_the_others(caching_engine):
    """The first of n choices starts the prefix's prefill; if it hangs up meanwhile, the prefill
    still ends in the cache (where it can be evicted), nothing is left holding blocks for good,
    and the choice waiting behind it forks from it."""
    caching_engine.clear_prefix_cache()
    backend = BuiltinEngineBackend(caching_engine)
    prompt = SYSTEM * 2 + QUESTIONS[1] + "\nAnswer:"

    async def main() -> str:
        first = asyncio.ensure_future(backend.fill("gone", None, prompt, 1, shared_prefix_chars=len(prompt), then_generate=True))
        await asyncio.sleep(0)  # it has started the prefix's fill
        second = asyncio.ensure_future(backend.fill("stays", None, prompt, 1, shared_prefix_chars=len(prompt), then_generate=True))
        await asyncio.sleep(0)
        first.cancel()
        await second
        try:
            return "".join([t.text async for t in backend.generate("stays", greedy(4), 1)])
        finally:
            await backend.free_context("stays")

    hits_before = caching_engine.prefix_cache.hits_tokens
    assert run(main()).strip()
    assert caching_engine.prefix_cache.hits_tokens - hits_before >= 2 * len(SYSTEM) // 8  # the second forked from the prefix
    assert caching_engine.stats().num_contexts == 0 and caching_engine.stats().cached_prefixes >= 1
    caching_engine.check_integrity()
