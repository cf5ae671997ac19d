"""What one generate call promises: stops, lengths, streaming, and ending early."""

from __future__ import annotations

import asyncio

import pytest

from parrot.engine.llm_engine import FinishReason
from parrot.engine.sampler import SamplingParams
from parrot.engine.tokenizer import ChatMessage
from parrot.errors import ContextError, PromptTooLongError, SamplingError

from conftest import PROMPTS, collect, fill_and_generate, finish_of, greedy, run, text_of, token_ids

MAX_TOKENS = 16


@pytest.fixture(scope="module")
def baseline(exact_engine_session):
    """Greedy tokens of PROMPTS[1] with no stop condition."""
    ids = exact_engine_session.tokenizer.encode(PROMPTS[1])
    tokens = run(fill_and_generate(exact_engine_session, "baseline", ids, greedy(MAX_TOKENS)))
    return ids, tokens


def test_max_tokens_bounds_the_output(engine, baseline):
    ids, tokens = baseline
    assert len(tokens) == MAX_TOKENS and finish_of(tokens) is FinishReason.LENGTH
    short = run(fill_and_generate(engine, "short", ids, greedy(3)))
    assert token_ids(short) == token_ids(tokens)[:3] and finish_of(short) is FinishReason.LENGTH


def test_stop_string_split_across_tokens_cuts_the_text_before_it(engine, baseline):
    ids, tokens = baseline
    pieces = [engine.tokenizer.decode([t]) for t in token_ids(tokens)]
    text = text_of(tokens)
    # a stop string that begins inside one token and ends inside the next
    k = next(i for i in range(2, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    start = len("".join(pieces[:k])) + len(pieces[k]) - 1
    stop = text[start : start + 2]
    assert stop not in text[:start + 1], "the test needs the stop string's first occurrence to straddle two tokens"
    out = run(fill_and_generate(engine, "stop", ids, greedy(MAX_TOKENS, stop=("never appears", stop))))
    assert finish_of(out) is FinishReason.STOP
    assert text_of(out) == text[: text.index(stop)]
    assert token_ids(out) == token_ids(tokens)[: k + 2]


def test_stop_string_is_never_streamed_in_part(engine, baseline):
    ids, tokens = baseline
    text = text_of(tokens)
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    out = run(fill_and_generate(engine, "stop", ids, greedy(MAX_TOKENS, stop=(stop,))))
    streamed = text_of(out)
    assert streamed == text[: text.index(stop)]
    assert stop not in streamed


def test_stop_token_ids_end_generation_without_their_text(engine, baseline):
    ids, tokens = baseline
    stop_token = token_ids(tokens)[5]
    first = token_ids(tokens).index(stop_token)
    out = run(fill_and_generate(engine, "stop-id", ids, greedy(MAX_TOKENS, stop_token_ids=(stop_token,))))
    assert finish_of(out) is FinishReason.STOP
    assert token_ids(out) == token_ids(tokens)[: first + 1]
    assert text_of(out) == engine.tokenizer.decode(token_ids(tokens)[:first])


def test_eos_ends_generation_unless_ignored(engine):
    prompt = engine.tokenizer.apply_chat_template([ChatMessage("user", "What is 2+2? Answer with a number only.")])
    ids = engine.tokenizer.encode(prompt)
    eos = set(engine.model_config.eos_token_ids)
    stopped = run(fill_and_generate(engine, "eos", ids, greedy(24, ignore_eos=False)))
    assert finish_of(stopped) is FinishReason.STOP, "the instruct model answers this in a few tokens"
    assert stopped[-1].token_id in eos and not any(t.token_id in eos for t in stopped[:-1])
    ignored = run(fill_and_generate(engine, "eos", ids, greedy(len(stopped) + 2, ignore_eos=True)))
    assert token_ids(ignored)[: len(stopped)] == token_ids(stopped)
    assert len(ignored) == len(stopped) + 2 and finish_of(ignored) is FinishReason.LENGTH


def test_min_tokens_holds_back_the_end_tokens_until_that_many_are_out(engine, baseline):
    prompt = engine.tokenizer.apply_chat_template([ChatMessage("user", "What is 2+2? Answer with a number only.")])
    ids = engine.tokenizer.encode(prompt)
    eos = set(engine.model_config.eos_token_ids)
    short = run(fill_and_generate(engine, "min", ids, greedy(24, ignore_eos=False)))
    held = run(fill_and_generate(engine, "min", ids, greedy(24, ignore_eos=False, min_tokens=len(short) + 3)))
    assert len(held) >= len(short) + 3 and not any(t.token_id in eos for t in held[: len(short) + 2])
    assert token_ids(held)[: len(short) - 1] == token_ids(short)[:-1]  # the same text up to where it would have ended
    # a stop token id is held back as well, and ends the output once min_tokens are out
    base_ids, tokens = baseline
    stop_token = token_ids(tokens)[1]
    out = run(fill_and_generate(engine, "min-stop", base_ids, greedy(MAX_TOKENS, stop_token_ids=(stop_token,), min_tokens=4)))
    assert len(out) >= 5 and stop_token not in token_ids(out)[:4]
    with pytest.raises(SamplingError, match=r"token ids \(stop_token_ids, allowed_token_ids, logit_bias\) must be from 0 to"):
        run(fill_and_generate(engine, "bad-stop", base_ids, greedy(4, stop_token_ids=(10**7,))))
    with pytest.raises(SamplingError, match="min_tokens must be an integer from 0 to max_tokens"):
        greedy(4, min_tokens=5)


def test_logit_bias_and_allowed_token_ids_steer_the_tokens_and_min_p_keeps_the_likely(engine, baseline):
    base_ids, tokens = baseline
    first, second = token_ids(tokens)[:2]
    # a bias of -100 bans the greedy first token; +100 on another makes it come every time
    banned = run(fill_and_generate(engine, "bias-ban", base_ids, greedy(3, logit_bias={first: -100.0})))
    assert token_ids(banned)[0] != first
    forced = run(fill_and_generate(engine, "bias-force", base_ids, greedy(3, logit_bias={second: 100.0})))
    assert token_ids(forced) == [second] * 3
    # the reported logprob is the model's own: the forced token is far from likely before the bias
    logged = run(fill_and_generate(engine, "bias-logprobs", base_ids, greedy(1, logit_bias={second: 100.0}, logprobs=0)))
    assert logged[0].logprobs.logprob < -1.0
    # only the allowed tokens come, sampled or greedy
    allowed = (second, second + 1, second + 2)
    sampled = run(fill_and_generate(engine, "allowed", base_ids, SamplingParams(max_tokens=6, temperature=1.5, seed=3,
                                                                               ignore_eos=True, allowed_token_ids=allowed)))
    assert set(token_ids(sampled)) <= set(allowed)
    # min_p 1.0 keeps only the likeliest token: sampling at any temperature is then greedy
    hot = SamplingParams(max_tokens=MAX_TOKENS, temperature=2.0, seed=5, ignore_eos=True, min_p=1.0)
    assert token_ids(run(fill_and_generate(engine, "min-p", base_ids, hot))) == token_ids(tokens)
    with pytest.raises(SamplingError, match="must be from 0 to"):
        run(fill_and_generate(engine, "bad-bias", base_ids, greedy(4, logit_bias={10**7: 1.0})))


def test_closing_the_stream_early_stops_the_job(engine):
    """A consumer that stops reading (client gone) must not leave its job generating."""
    ids = engine.tokenizer.encode(PROMPTS[0])

    async def scenario():
        await engine.fill("early", None, ids)
        stream = engine.generate("early", greedy(200))
        received = [await anext(stream), await anext(stream)]
        await stream.aclose()
        assert engine.stats().num_jobs == 0
        grown = len(engine.contexts.get("early").token_ids)
        await asyncio.sleep(0.3)
        assert len(engine.contexts.get("early").token_ids) == grown, "tokens were still generated after close"
        # the context stays usable
        more = await collect(engine, "early", greedy(2))
        engine.free_context("early")
        return received, more

    received, more = run(scenario())
    assert len(received) == 2 and len(more) == 2


def test_freeing_a_context_while_it_generates_fails_that_stream_only(engine):
    async def scenario():
        await engine.fill("doomed", None, engine.tokenizer.encode(PROMPTS[0]))
        await engine.fill("other", None, engine.tokenizer.encode(PROMPTS[1]))

        async def doomed():
            received = []
            with pytest.raises(ContextError, match="freed"):
                async for token in engine.generate("doomed", greedy(200)):
                    received.append(token)
                    if len(received) == 2:
                        engine.free_context("doomed")
            return received

        _, other = await asyncio.gather(doomed(), collect(engine, "other", greedy(8)))
        engine.free_context("other")
        return other

    other = run(scenario())
    expected = run(fill_and_generate(engine, "other", engine.tokenizer.encode(PROMPTS[1]), greedy(8)))
    assert token_ids(other) == token_ids(expected)


def test_prompt_longer_than_the_model_is_rejected(engine):
    limit = engine.model_config.max_position_embeddings

    async def scenario():
        with pytest.raises(PromptTooLongError, match=str(limit)):
            await engine.fill("too-long", None, [1] * (limit + 1))
        assert "too-long" not in engine.contexts  # refused before it was created


    run(scenario())


def test_a_cancelled_fill_stops_its_job_and_leaves_a_usable_context(engine, small_engine):
    """A caller that gives up on a fill (timeout, client gone) stops its work; the tokens stay
    in the context and the next generate computes what is missing."""
    ids = small_engine.tokenizer.encode(PROMPTS[4])  # 37 tokens: three 16-token prefill steps

    async def scenario():
        steps = small_engine.stats().steps
        task = asyncio.create_task(small_engine.fill("cancelled", None, ids))
        while small_engine.stats().steps == steps:  # the first chunk is done, the next one is running
            await asyncio.sleep(0.002)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert small_engine.stats().num_jobs == 0, "the cancelled fill kept running"
        assert small_engine.contexts.get("cancelled").token_ids == ids
        tokens = await collect(small_engine, "cancelled", greedy(8))
        small_engine.free_context("cancelled")
        return tokens

    assert token_ids(run(scenario())) == token_ids(run(fill_and_generate(engine, "whole", ids, greedy(8))))


def test_text_after_a_stopped_output_follows_the_kept_text_not_the_stop_string(engine, baseline):
    """A stop string cut inside a token: the context keeps the prompt and the kept text only,
    so what is generated after more text equals a fresh context given that text in full."""
    ids, tokens = baseline
    pieces = [engine.tokenizer.decode([t]) for t in token_ids(tokens)]
    text = text_of(tokens)
    k = next(i for i in range(2, len(pieces)) if len(pieces[i]) >= 3)
    stop = text[len("".join(pieces[:k])) + 1 :][:2]  # starts one character into token k
    follow = engine.tokenizer.encode(" Next:")

    async def continued() -> tuple[str, list[int], list[int]]:
        kept = text_of(await fill_and_generate(engine, "cut", ids, greedy(MAX_TOKENS, stop=(stop,)), free=False))
        try:
            context_tokens = list(engine.contexts.get("cut").token_ids)
            await engine.fill("cut", None, follow)
            return kept, context_tokens, token_ids(await collect(engine, "cut", greedy(6)))
        finally:
            engine.free_context("cut")

    kept, context_tokens, after = run(continued())
    assert kept == text[: text.index(stop)] and stop not in kept
    assert engine.tokenizer.decode(context_tokens) == engine.tokenizer.decode(ids) + kept
    rendered = engine.tokenizer.encode(engine.tokenizer.decode(ids) + kept + " Next:")
    fresh = run(fill_and_generate(engine, "fresh", rendered, greedy(6)))
    assert after == token_ids(fresh)


def test_a_closed_engine_refuses_work_and_leaves_no_thread_behind():
    import threading

    from parrot.engine.llm_engine import EngineConfig, LLMEngine

    def step_threads() -> int:
        return sum(t.name.startswith("parrot-step") for t in threading.enumerate())

    before = step_threads()
    fresh = LLMEngine(EngineConfig(dtype="float32", cpu_bf16="off", kv_memory_gb=0.05))
    ids = fresh.tokenizer.encode(PROMPTS[1])
    assert len(run(fill_and_generate(fresh, "before-close", ids, greedy(4)))) == 4
    run(fresh.close())
    assert step_threads() == before
    with pytest.raises(ContextError, match="shut down"):
        run(fill_and_generate(fresh, "after-close", ids, greedy(4)))


def test_a_prompt_filled_for_its_generate_samples_in_its_last_prompt_step(engine, baseline):
    """`fill(then_generate=True)` leaves the prompt to the generate: the same tokens, one step
    fewer (the last prompt step samples the first token instead of a step that computes that
    token again), and no step in which other work could run between prompt and first token."""
    ids, tokens = baseline

    async def steps_of(context_id: str, then_generate: bool) -> tuple[list[int], int]:
        before = engine.stats().steps
        await engine.fill(context_id, None, ids, then_generate=then_generate)
        try:
            out = await collect(engine, context_id, greedy(MAX_TOKENS))
        finally:
            engine.free_context(context_id)
        return token_ids(out), engine.stats().steps - before

    eager_tokens, eager_steps = run(steps_of("eager", False))
    deferred_tokens, deferred_steps = run(steps_of("deferred", True))
    assert eager_tokens == deferred_tokens == token_ids(tokens)
    assert deferred_steps == eager_steps - 1


def test_a_prompt_filled_for_its_generate_is_not_computed_before_it(engine, baseline):
    ids, _ = baseline

    async def main() -> None:
        await engine.fill("deferred", None, ids, then_generate=True)
        try:
            assert engine.contexts.get("deferred").num_pending == len(ids)
            assert engine.stats().num_jobs == 0
        finally:
            engine.free_context("deferred")

    run(main())


def test_a_fault_after_one_jobs_step_fails_that_job_alone_and_the_engine_goes_on(engine, monkeypatch):
    """A job whose token cannot be handled (here its stop check raises) ends with the error; the
    step's other job finishes, and the engine serves the next request: the step loop lives on."""
    from parrot.engine.sampler import StopChecker

    original = StopChecker.feed

    def feed(self: StopChecker, delta: str) -> str:
        if self.stops == ("boom",):
            raise RuntimeError("a fault in this job's stop check")
        return original(self, delta)

    monkeypatch.setattr(StopChecker, "feed", feed)
    ids = engine.tokenizer.encode("one two three four")

    async def side_by_side():
        return await asyncio.gather(fill_and_generate(engine, "faulty", ids, greedy(6, stop=("boom",))),
                                    fill_and_generate(engine, "healthy", ids, greedy(6)), return_exceptions=True)

    faulty, healthy = run(side_by_side())
    assert isinstance(faulty, RuntimeError) and "stop check" in str(faulty)
    assert len(token_ids(healthy)) == 6
    assert token_ids(run(fill_and_generate(engine, "after", ids, greedy(6)))) == token_ids(healthy)


def test_a_fault_outside_any_step_fails_the_jobs_waiting_and_the_next_request_runs(engine, monkeypatch):
    """The scheduler itself raising once (a fault of no one job) ends the waiting job with the error
    instead of leaving it to wait for ever."""
    scheduler = type(engine.scheduler)
    original = scheduler.schedule
    faults = iter([RuntimeError("the scheduler fell over")])

    def schedule(self):
        fault = next(faults, None)
        if fault is not None:
            raise fault
        return original(self)

    monkeypatch.setattr(scheduler, "schedule", schedule)
    ids = engine.tokenizer.encode("one two three four")
    with pytest.raises(RuntimeError, match="the scheduler fell over"):
        run(fill_and_generate(engine, "first", ids, greedy(4)))  # the fill's step meets the fault
    engine.free_context("first")  # its owner frees a context whose fill failed
    assert len(token_ids(run(fill_and_generate(engine, "second", ids, greedy(4))))) == 4
