"""The simulated engine: continuous batching on a cost model, KV capacity, forks, priorities.

Time is asserted on the clock the backend keeps (simulated_seconds), never on wall
time; time_scale is tiny so each test runs in well under a second.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest

from parrot.backends.simulated import PRESETS, CostModel, SimulatedEngineBackend, StepShape, parse_engine_spec
from parrot.engine.sampler import SamplingParams
from parrot.engine.structured import StructuredOutput
from parrot.engine.scheduler import PRIORITY_LATENCY, PRIORITY_NORMAL, PRIORITY_THROUGHPUT
from parrot.errors import ContextError, KVCacheExhaustedError, UserError
from parrot.manager.manager import Manager
from parrot.manager.spec import CallSpec, InputBinding, OutputBinding, Perf

STEP = CostModel(seconds_per_step=0.02, seconds_per_prefill_token=1e-5, seconds_per_decode_seq=1e-4)


def sim(time_scale: float = 0.001, cost: CostModel = STEP, **limits) -> SimulatedEngineBackend:
    return SimulatedEngineBackend("sim-t", "test", cost, time_scale=time_scale, **limits)


@dataclass(frozen=True)
class Done:
    text: str
    filled_at: float  # the simulated clock when fill returned
    finished_at: float


async def request(b: SimulatedEngineBackend, cid: str, tokens: int, max_tokens: int, priority: int = PRIORITY_NORMAL,
                  parent: str | None = None, shared_chars: int = 0, char: str = "x") -> Done:
    await b.fill(cid, parent, char * (4 * tokens), priority, shared_prefix_chars=shared_chars)  # 4 characters a token
    filled = b.simulated_seconds
    text = "".join([t.text async for t in b.generate(cid, SamplingParams(max_tokens=max_tokens), priority)])
    finished = b.simulated_seconds
    await b.free_context(cid)
    b.check_integrity()
    return Done(text, filled, finished)


def run(coro):
    return asyncio.run(coro)


def test_one_request_costs_what_the_model_says() -> None:
    b = sim()
    run(request(b, "a", tokens=100, max_tokens=20))
    # one prefill step of 100 tokens, then 20 decode steps of one sequence
    assert b.simulated_seconds == pytest.approx((0.02 + 100 * 1e-5) + 20 * (0.02 + 1e-4))
    s = b.sim_stats()
    assert (s.steps, s.prefill_tokens, s.decode_tokens, s.max_batch) == (21, 100, 20, 1)


def test_a_prompt_filled_for_its_generate_samples_in_its_last_prompt_step() -> None:
    """As on the built-in engine: the prompt's step gives the first token, one step fewer."""
    b = sim()

    async def main() -> str:
        await b.fill("a", None, "x" * 400, PRIORITY_NORMAL, then_generate=True)
        assert b.simulated_seconds == 0  # nothing computed yet
        text = "".join([t.text async for t in b.generate("a", SamplingParams(max_tokens=20), PRIORITY_NORMAL)])
        await b.free_context("a")
        b.check_integrity()
        return text

    assert len(run(main()).split()) == 20
    assert b.simulated_seconds == pytest.approx((0.02 + 100 * 1e-5) + 19 * (0.02 + 1e-4))
    s = b.sim_stats()
    assert (s.steps, s.prefill_tokens, s.decode_tokens) == (20, 100, 19)


def test_batching_makes_concurrent_requests_share_steps() -> None:
    alone = sim()
    run(request(alone, "a", tokens=100, max_tokens=20))
    together = sim()

    async def many():
        return await asyncio.gather(*(request(together, f"r{i}", 100, 20) for i in range(16)))

    run(many())
    assert together.sim_stats().max_batch == 16
    assert together.simulated_seconds < 0.2 * 16 * alone.simulated_seconds  # 16 requests, about 1.3x the time of one


def test_time_scale_sleeps_real_time() -> None:
    b = sim(time_scale=0.05)
    started = time.perf_counter()
    run(request(b, "a", tokens=10, max_tokens=10))
    wall = time.perf_counter() - started
    assert b.simulated_seconds * 0.05 * 0.9 <= wall < b.simulated_seconds * 0.05 + 0.5


def test_kv_capacity_makes_jobs_wait() -> None:
    b = sim(kv_capacity_tokens=1000)

    async def three():
        return await asyncio.gather(*(request(b, f"r{i}", 400, 10) for i in range(3)))

    first, second, third = run(three())
    assert third.filled_at >= min(first.finished_at, second.finished_at)  # its prompt waited for room
    assert second.filled_at < first.finished_at  # the first two fit together
    s = b.sim_stats()
    assert s.kv_peak <= 1000 and s.preemptions == 0 and s.kv_used == 0
    with pytest.raises(KVCacheExhaustedError, match="holds 1000"):
        run(b.fill("huge", None, "x" * 4 * 1001, 1))


def test_a_job_no_room_can_be_made_for_fails_instead_of_waiting_for_ever() -> None:
    b = sim(kv_capacity_tokens=100)

    async def scenario():
        await b.fill("idle", None, "x" * 4 * 80, 1)  # held, with no job to preempt
        with pytest.raises(KVCacheExhaustedError, match="other contexts hold 80 of 100"):
            await b.fill("late", None, "x" * 4 * 50, 1)
        await b.free_context("idle")
        await b.free_context("late")

    run(scenario())
    b.check_integrity()


def test_higher_priority_preempts_when_kv_is_full() -> None:
    b = sim(kv_capacity_tokens=500)

    async def scenario():
        await b.fill("low", None, "x" * 4 * 300, PRIORITY_THROUGHPUT)
        words, high = [], None
        async for token in b.generate("low", SamplingParams(max_tokens=30), PRIORITY_THROUGHPUT):
            words.append(token.text)
            if high is None:  # low holds 301 of 500 tokens and decodes: a prompt of 300 needs its room
                high = asyncio.ensure_future(request(b, "high", 300, 5, priority=PRIORITY_LATENCY))
        low_finished = b.simulated_seconds
        # its recompute took in the token it had sampled last, as the engine's would: the same length as unpreempted
        assert b.tree.get("low").own_tokens == 300 + 30
        await b.free_context("low")
        return await high, low_finished, "".join(words)

    high, low_finished, low_text = run(scenario())
    assert b.sim_stats().preemptions == 1
    assert high.finished_at < low_finished
    assert low_text == run(request(sim(), "low", 300, 30)).text  # recomputed, same words
    b.check_integrity()


def test_priorities_order_work_when_the_batch_is_full() -> None:
    b = sim(max_seqs_per_step=1)

    async def both():
        return await asyncio.gather(request(b, "low", 10, 10, priority=PRIORITY_THROUGHPUT), request(b, "high", 10, 10, priority=PRIORITY_LATENCY))

    low, high = run(both())
    assert high.finished_at < low.finished_at
    assert low.filled_at < high.finished_at  # low's prompt went in a step high's decodes did not need
    assert low.finished_at == pytest.approx(high.finished_at + 10 * (0.02 + 1e-4))  # its decodes all came after high's


def test_forked_children_share_the_prefix() -> None:
    b = sim(kv_capacity_tokens=10_000)

    async def forks():
        await b.fill("doc", None, "d" * 4 * 400, 1)
        children = await asyncio.gather(*(request(b, f"q{i}", 40, 5, parent="doc", char="q") for i in range(4)))
        return children

    children = run(forks())
    s = b.sim_stats()
    assert s.prefill_tokens == 400 + 4 * 40  # the 400 shared tokens were computed once
    assert s.kv_peak == 400 + 4 * (40 + 5)  # and held once
    assert all(c.text == children[0].text for c in children)
    b.check_integrity()


def test_a_freed_parent_keeps_its_kv_for_live_children() -> None:
    b = sim(kv_capacity_tokens=10_000)

    async def scenario():
        await b.fill("doc", None, "d" * 4 * 100, 1)
        await b.fill("child", "doc", "q" * 4 * 10, 1)
        await b.free_context("doc")
        assert b.tree.kv_used == 110 and b.stats().contexts == 1
        text = "".join([t.text async for t in b.generate("child", SamplingParams(max_tokens=3), 1)])
        await b.free_context("child")
        return text

    assert len(run(scenario()).split()) == 3
    assert b.tree.kv_used == 0
    b.check_integrity()


def test_shared_prefix_chars_prefill_once_and_read_once() -> None:
    def workload(shared_attention: bool) -> SimulatedEngineBackend:
        b = sim(shared_prefix_attention=shared_attention)

        async def eight():
            await asyncio.gather(*(request(b, f"r{i}", 500, 10, shared_chars=4 * 400) for i in range(8)))

        run(eight())
        return b

    paged, cascade = workload(False), workload(True)
    assert paged.sim_stats().prefill_tokens == 400 + 8 * 100
    assert paged.stats().contexts == 0  # the shared prefix went with its last user
    assert cascade.sim_stats().kv_tokens_read < paged.sim_stats().kv_tokens_read / 2.5  # 400 tokens once, not 8 times
    # STEP prices no KV reads; the batches may differ by a step where the two runs' requests join at other moments
    assert cascade.simulated_seconds == pytest.approx(paged.simulated_seconds, rel=0.1)


def test_outputs_are_deterministic_across_costs_and_modes() -> None:
    async def texts(b: SimulatedEngineBackend):
        return await asyncio.gather(*(request(b, f"r{i}", 20 + i, 8) for i in range(5)))

    instant = [d.text for d in run(texts(SimulatedEngineBackend()))]
    stepped = [d.text for d in run(texts(sim(max_seqs_per_step=2)))]
    slow = [d.text for d in run(texts(sim(cost=PRESETS["cpu-smollm2"].cost, time_scale=1e-5)))]
    assert instant == stepped == slow
    expected = ""  # each word names the length of the text before it: 80 characters of prompt, then the words
    for _ in range(8):
        expected += f" w{(80 + len(expected)) % 97}"
    assert instant[0] == expected


def test_stats_while_running_and_after() -> None:
    b = sim(kv_capacity_tokens=1600)

    async def scenario():
        await b.fill("a", None, "x" * 4 * 160, 1)
        stream = b.generate("a", SamplingParams(max_tokens=5), 1)
        await stream.__anext__()
        during = b.stats()
        async for _ in stream:
            pass
        await b.free_context("a")
        return during

    during = run(scenario())
    assert (during.running_jobs, during.contexts, during.kv_blocks_total) == (1, 1, 100)
    assert during.kv_blocks_free == (1600 - 161) // 16
    after = b.stats()
    assert (after.running_jobs, after.contexts, after.kv_blocks_free, after.tokens_processed) == (0, 0, 100, 165)


def test_freeing_a_context_fails_its_running_generate() -> None:
    b = sim()

    async def scenario():
        await b.fill("a", None, "x" * 40, 1)
        stream = b.generate("a", SamplingParams(max_tokens=50), 1)
        await stream.__anext__()
        await b.free_context("a")
        with pytest.raises(ContextError, match="freed"):
            async for _ in stream:
                pass
        with pytest.raises(ContextError, match="unknown context"):
            await b.fill("b", "a", "x", 1)

    run(scenario())
    b.check_integrity()


def test_default_backend_is_instant_and_the_old_cost_spelling_works() -> None:
    assert CostModel(seconds_per_decode_step=0.005).seconds_per_step == 0.005
    b = SimulatedEngineBackend()
    run(request(b, "a", 10, 4))
    assert b.simulated_seconds == 0 and b.sim_stats().steps == 0 and b.stats().tokens_processed == 14


def test_presets_are_parsed_and_plausible() -> None:
    assert parse_engine_spec("sim:a100-13b") is PRESETS["a100-13b"]
    with pytest.raises(UserError, match="sim:a100-7b, sim:a100-13b, sim:cpu-smollm2"):
        parse_engine_spec("sim:h100-70b")
    with pytest.raises(UserError, match="expected sim:<preset>"):
        parse_engine_spec("a100-7b")
    for name, small, big in (("a100-7b", 0.010, 0.020), ("a100-13b", 0.020, 0.030)):
        cost = PRESETS[name].cost
        one = cost.step_seconds(StepShape(decode_seqs=1, kv_tokens_read=1000))
        assert small < one < big  # batch-1 decode in the published 10-30 ms range
        assert cost.step_seconds(StepShape(decode_seqs=64, kv_tokens_read=64_000)) < 3 * one  # memory-bound
        assert cost.step_seconds(StepShape(prefill_tokens=2048, kv_tokens_read=2048)) < 0.4
    assert 100_000 < PRESETS["a100-7b"].kv_capacity_tokens < 130_000
    assert 50_000 < PRESETS["a100-13b"].kv_capacity_tokens < 65_000


def test_the_real_manager_runs_map_reduce_on_simulated_engines() -> None:
    async def main():
        engines = [SimulatedEngineBackend.from_profile("sim:a100-7b", name=f"sim-{i}", time_scale=0.01) for i in range(2)]
        manager = Manager(engines)
        session = manager.create_session()
        sampling = SamplingParams(max_tokens=8)
        manager.create_variable(session, "doc", "doc", "text " * 200)
        for i in range(4):
            manager.create_variable(session, f"s{i}", "summary")
            spec = CallSpec("map", "Summarize part {{input:doc}}\nSummary: {{output:summary}}", (InputBinding("doc", "doc"),),
                            (OutputBinding("summary", f"s{i}", sampling),))
            manager.submit_call(session, f"m{i}", spec)
        manager.create_variable(session, "final", "final")
        inputs = tuple(InputBinding(n, f"s{i}") for i, n in enumerate("abcd"))
        template = "Combine {{input:a}} {{input:b}} {{input:c}} {{input:d}}: {{output:final}}"
        manager.submit_call(session, "reduce", CallSpec("reduce", template, inputs, (OutputBinding("final", "final", sampling),)))
        final = await manager.get_variable(session, "final", Perf.LATENCY)
        await manager.shutdown()
        return final, engines

    final, engines = run(main())
    assert len(final.split()) == 8
    # each call's first token comes from its prompt's last step (the manager fills for the generate)
    assert sum(e.sim_stats().decode_tokens for e in engines) == 5 * (8 - 1)
    assert all(e.stats().contexts == 0 for e in engines)


def test_steps_shrink_while_a_latency_job_waits_beside_other_work() -> None:
    """As in the built-in engine: a latency-class job beside a long prefill gets small steps."""
    from parrot.backends.simulated.contexts import ContextTree
    from parrot.backends.simulated.scheduler import JobKind as SimJobKind, SimScheduler

    tree = ContextTree(None)
    scheduler = SimScheduler(tree, max_tokens_per_step=512, max_seqs_per_step=8, shared_prefix_attention=False,
                             latency_max_tokens_per_step=128)
    bulk = tree.create("bulk", None)
    bulk.own_tokens = 2000
    scheduler.submit(SimJobKind.FILL, bulk, PRIORITY_THROUGHPUT)  # throughput work: the cap holds however much waits
    assert scheduler.schedule().chunks[0].length == 512  # alone: the full budget
    chat = tree.create("chat", None)
    chat.own_tokens = 40
    chat_job = scheduler.submit(SimJobKind.FILL, chat, 0)
    plan = scheduler.schedule()
    assert [c.length for c in plan.chunks] == [40, 88]  # the chat first, the bulk fills the rest of 128
    scheduler.remove(chat_job)  # its prompt is in
    long_prompt = tree.create("long", None)
    long_prompt.own_tokens = 300
    scheduler.submit(SimJobKind.FILL, long_prompt, 0)
    plan = scheduler.schedule()
    assert [c.length for c in plan.chunks] == [300]  # a latency prompt whole; the bulk is past the cap


def test_a_request_for_logprobs_or_structure_fails_with_a_message_instead_of_an_answer_without_them() -> None:
    b = sim()

    async def main() -> None:
        await b.fill("a", None, "x" * 40, PRIORITY_NORMAL)
        with pytest.raises(UserError, match="cannot give log probabilities .logprobs, echo.: ask without it"):
            [t async for t in b.generate("a", SamplingParams(max_tokens=3, logprobs=2), PRIORITY_NORMAL)]
        with pytest.raises(UserError, match="cannot give structured output"):
            [t async for t in b.generate("a", SamplingParams(max_tokens=3, structured=StructuredOutput.json_object()), PRIORITY_NORMAL)]
        await b.free_context("a")
        b.check_integrity()

    run(main())
