"""Scheduling policies on simulated engines with a cost model: which engine each call
goes to, how many run together, in what order and at what priority. No timing is
asserted; the engines are slow enough that calls overlap."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass

import pytest

import parrot as P
from parrot.backends.base import BackendStats, StepLimits
from parrot.backends.simulated import CostModel
from parrot.backends.simulated.presets import PRESETS
from parrot.engine.scheduler import PRIORITY_NORMAL
from parrot.engine.step_profile import LATENCY_SEQS_FLOOR, StepCost, latency_seqs_bound
from parrot.errors import UserError
from parrot.manager.graph import Call, Objective
from parrot.manager.policy import SMALL_BATCH, CallDemand, ClusterView, EngineLoad, ParrotPolicy
from parrot.manager.prefix_index import PrefixIndex, prefix_hashes
from test_manager import RecordingBackend

SLOW = CostModel(seconds_per_step=0.01)


class CountingBackend(RecordingBackend):
    """Records the most calls generating at once."""

    def __init__(self, name: str, kv_capacity_tokens: int | None = None, cost: CostModel = SLOW):
        super().__init__(name, cost=cost, kv_capacity_tokens=kv_capacity_tokens)
        self.running = 0
        self.most_running = 0
        self.shared_prefix_chars: list[int] = []

    async def fill(self, context_id, parent_context_id, text, priority, shared_prefix_chars=0, then_generate=False):
        self.shared_prefix_chars.append(shared_prefix_chars)
        await super().fill(context_id, parent_context_id, text, priority, shared_prefix_chars, then_generate)

    async def generate(self, context_id, sampling, priority):
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            async for token in super().generate(context_id, sampling, priority):
                yield token
        finally:
            self.running -= 1


@P.semantic_function()
def summarize(chunk: P.Input, summary: P.Output(max_tokens=8)):
    """Summarize: {{chunk}} Summary: {{summary}}"""


@P.semantic_function()
def combine(a: P.Input, b: P.Input, c: P.Input, d: P.Input, e: P.Input, f: P.Input, summary: P.Output(max_tokens=4)):
    """Combine {{a}} {{b}} {{c}} {{d}} {{e}} {{f}}: {{summary}}"""


@P.semantic_function()
def chat(question: P.Input, answer: P.Output(max_tokens=4)):
    """Q: {{question}} A: {{answer}}"""


def map_reduce(tag: str) -> tuple[list[P.SemanticVariable], P.SemanticVariable]:
    parts = [summarize(P.variable("chunk", f"{tag} part {i}")) for i in range(6)]
    return parts, combine(*parts)


def engine_of(backends: list[CountingBackend], var: P.SemanticVariable, runtime: P.Runtime) -> str:
    call_id = next(c.call_id for c in runtime.dag().calls if var.var_id in c.outputs.values())
    return next(b.name for b in backends if call_id in b.contexts_seen)


def run_with(policy: str, engines: int, program, cost: CostModel = SLOW):
    backends = [CountingBackend(f"sim-{i}", cost=cost) for i in range(engines)]
    with P.Runtime(backends=backends, policy=policy) as runtime:
        result = program(runtime, backends)
    return backends, result


def start_map_reduce(backends: list[CountingBackend], tag: str, engines_running: int) -> tuple[list[P.SemanticVariable], threading.Thread]:
    """Gets a map-reduce in a thread; returns once that many engines run its maps."""
    parts, reduced = map_reduce(tag)
    worker = threading.Thread(target=reduced.get, kwargs={"perf": P.LATENCY})
    worker.start()
    wait_for_engines_running(backends, engines_running, worker)
    return parts, worker


def wait_for_engines_running(backends: list[CountingBackend], engines_running: int, worker: threading.Thread) -> None:
    """Returns once that many engines generate at once; fails after 10 s or if the worker ends first."""
    deadline = time.monotonic() + 10
    while sum(1 for b in backends if b.running) < engines_running:
        if time.monotonic() > deadline or not worker.is_alive():
            raise AssertionError(f"the calls never ran on {engines_running} engines at once")
        time.sleep(0.005)


@pytest.mark.parametrize("policy", ["parrot", "fifo"])
def test_parrot_keeps_a_task_group_on_one_engine_while_fifo_spreads_it(policy):
    def program(runtime, backends):
        parts, reduced = map_reduce("doc")
        reduced.get(perf=P.LATENCY)
        return {engine_of(backends, part, runtime) for part in parts}

    _, engines_used = run_with(policy, 2, program)
    assert len(engines_used) == (1 if policy == "parrot" else 2)


@dataclass
class ChatBesideMapReduce:
    backends: list[CountingBackend]
    chat_engine: str
    map_engines: list[str]  # the engine of each map call


def chat_beside_map_reduce(engines: int, engines_running: int, chat_before: bool = False) -> ChatBesideMapReduce:
    """A latency-critical chat asked once a map-reduce's maps run on that many engines
    (and, with chat_before, one answered before the map-reduce starts)."""
    def program(runtime, backends):
        if chat_before:
            chat(P.variable("question", "are you there?")).get(perf=P.LATENCY)
        parts, worker = start_map_reduce(backends, "doc", engines_running)
        answer = chat(P.variable("question", "hello?"))
        answer.get(perf=P.LATENCY)
        worker.join()
        return engine_of(backends, answer, runtime), [engine_of(backends, p, runtime) for p in parts]

    backends, (chat_engine, map_engines) = run_with("parrot", engines, program)
    return ChatBesideMapReduce(backends, chat_engine, map_engines)


def test_parrot_sends_latency_work_to_the_engine_without_throughput_work():
    run = chat_beside_map_reduce(engines=2, engines_running=1)
    assert set(run.map_engines) == {"sim-0"} and run.chat_engine == "sim-1"


@pytest.mark.parametrize("policy,most", [("latency-centric", SMALL_BATCH), ("parrot", 6), ("throughput-centric", 6)])
def test_latency_centric_holds_what_exceeds_a_small_batch(policy, most):
    def program(runtime, backends):
        _, reduced = map_reduce("doc")
        return reduced.get(perf=P.LATENCY)

    backends, text = run_with(policy, 1, program)
    assert text.strip() and backends[0].most_running == most


def test_latency_centric_releases_held_calls_in_arrival_order():
    def program(runtime, backends):
        parts, reduced = map_reduce("doc")
        reduced.get(perf=P.LATENCY)
        return [c.call_id for c in runtime.dag().calls][:6]

    backends, map_calls = run_with("latency-centric", 1, program)
    started = [context for context in backends[0].generated if context in map_calls]
    assert started == map_calls


def test_throughput_centric_spreads_work_in_batches_as_large_as_they_go():
    def program(runtime, backends):
        parts, reduced = map_reduce("doc")
        reduced.get(perf=P.THROUGHPUT)
        return {engine_of(backends, part, runtime) for part in parts}

    backends, engines_used = run_with("throughput-centric", 2, program)
    assert engines_used == {"sim-0", "sim-1"} and backends[0].most_running == backends[1].most_running == 3


@pytest.mark.parametrize("policy", ["fifo", "latency-centric", "throughput-centric"])
def test_baselines_ignore_objectives_at_the_engine(policy):
    def program(runtime, backends):
        _, reduced = map_reduce("doc")
        reduced.get(perf=P.LATENCY)

    backends, _ = run_with(policy, 1, program)
    assert {fill.priority for fill in backends[0].fills} == {PRIORITY_NORMAL}


def test_parrot_gives_the_engine_objective_priorities():
    backends, _ = run_with("parrot", 1, lambda runtime, backends: map_reduce("doc")[1].get(perf=P.LATENCY))
    priorities = [fill.priority for fill in backends[0].fills]
    assert len(set(priorities)) == 2 and priorities[-1] < priorities[0]  # the reduce outranks its maps


def test_an_unknown_policy_is_a_clear_error():
    with pytest.raises(UserError, match="choose one of parrot, fifo, latency-centric, throughput-centric"):
        P.Runtime(backends=[CountingBackend("sim-0")], policy="fastest")


GUIDELINES = "Team guidelines: " + "write small functions, name things plainly, test every branch. " * 6


@P.semantic_function()
def with_guidelines(part: P.Input, code: P.Output(max_tokens=2)):
    """Team guidelines: write small functions, name things plainly, test every branch. write small functions, name things plainly, test every branch. write small functions, name things plainly, test every branch. write small functions, name things plainly, test every branch. write small functions, name things plainly, test every branch. write small functions, name things plainly, test every branch. Write {{part}}: {{code}}"""


@pytest.mark.parametrize("policy,hinted", [("parrot", True), ("fifo", False), ("throughput-centric", False)])
def test_only_parrot_tells_engines_about_static_prefixes(policy, hinted):
    def program(runtime, backends):
        with_guidelines(P.variable("part", "board.py")).get(perf=P.LATENCY)

    backends, _ = run_with(policy, 1, program)
    prefix = len(GUIDELINES.rstrip()) + 1
    assert backends[0].shared_prefix_chars == ([prefix + len("Write ")] if hinted else [0])


@pytest.mark.parametrize("capacity,engines_for_the_group", [(None, 1), (64, 2)])
def test_a_task_group_goes_whole_to_one_engine_only_where_it_fits(capacity, engines_for_the_group):
    """Six map calls of about 15 KV tokens each (prompt and outputs): about 90 as a group.
    Engines of 64 tokens take single calls but not the whole group, so it is spread."""
    backends = [CountingBackend(f"sim-{i}", kv_capacity_tokens=capacity) for i in range(2)]
    with P.Runtime(backends=backends, policy="parrot") as runtime:
        parts, reduced = map_reduce("doc")
        assert reduced.get(perf=P.LATENCY).strip()
        engines_used = {engine_of(backends, part, runtime) for part in parts}
    assert len(engines_used) == engines_for_the_group


def test_a_task_group_spreads_over_every_idle_engine_when_no_latency_work_came_lately():
    run = chat_beside_map_reduce(engines=4, engines_running=4)
    assert sorted(run.map_engines.count(b.name) for b in run.backends) == [1, 1, 2, 2]


def test_a_task_group_leaves_one_idle_engine_free_while_latency_work_comes():
    run = chat_beside_map_reduce(engines=4, engines_running=3, chat_before=True)
    assert sorted(run.map_engines.count(b.name) for b in run.backends) == [0, 2, 2, 2]
    assert run.chat_engine not in run.map_engines


def test_a_map_reduce_own_reduce_does_not_make_the_next_group_keep_an_engine_free():
    def program(runtime, backends):
        _, first = map_reduce("first")
        first.get(perf=P.LATENCY)  # its reduce is latency-critical
        parts, worker = start_map_reduce(backends, "second", engines_running=4)
        worker.join()
        return [engine_of(backends, p, runtime) for p in parts]

    backends, map_engines = run_with("parrot", 4, program)
    assert {b.name for b in backends} == set(map_engines)


def test_a_second_task_group_arriving_at_busy_engines_stays_on_one():
    def program(runtime, backends):
        _, worker = start_map_reduce(backends, "first", engines_running=3)
        second_parts, second = map_reduce("second")
        second.get(perf=P.LATENCY)
        worker.join()
        return {engine_of(backends, p, runtime) for p in second_parts}

    _, engines_used = run_with("parrot", 4, program)
    assert len(engines_used) == 1


@P.semantic_function()
def long_answer(question: P.Input, answer: P.Output(max_tokens=300)):
    """Q: {{question}} A long answer: {{answer}}"""


def test_throughput_work_avoids_a_chat_engine_but_not_by_piling_onto_a_busy_one():
    """Two engines: maps run on one, a long chat on the other. A second map-reduce (throughput
    work, as mixed asks for it) goes beside the chat too (the latency class keeps its steps
    short) rather than all onto the first engine, doubling its load."""
    def program(runtime, backends):
        first_parts = [long_answer(P.variable("question", f"part {i}")) for i in range(6)]  # maps that run for a while
        first = threading.Thread(target=combine(*first_parts).get, kwargs={"perf": P.LATENCY})
        first.start()
        answer = long_answer(P.variable("question", "why?"))
        asker = threading.Thread(target=answer.get, kwargs={"perf": P.LATENCY})
        asker.start()
        wait_for_engines_running(backends, 2, asker)
        second_parts, second = map_reduce("second")
        second.get(perf=P.THROUGHPUT)
        first.join()
        asker.join()
        return ({engine_of(backends, p, runtime) for p in first_parts}, engine_of(backends, answer, runtime),
                {engine_of(backends, p, runtime) for p in second_parts})

    _, (first_engines, chat_engine, second_engines) = run_with("parrot", 2, program)
    assert chat_engine not in first_engines
    assert chat_engine in second_engines


@P.semantic_function()
def combine_eight(a: P.Input, b: P.Input, c: P.Input, d: P.Input, e: P.Input, f: P.Input, g: P.Input, h: P.Input,
                  summary: P.Output(max_tokens=4)):
    """Combine {{a}} {{b}} {{c}} {{d}} {{e}} {{f}} {{g}} {{h}}: {{summary}}"""


def test_latency_work_gathers_on_the_engine_already_serving_it():
    """Two engines busy with four long throughput calls each: a first chat goes to one of them,
    and a second chat joins it though it runs a call more than the other, so the latency
    class (which caps the other work's steps) slows one engine's throughput work, not both."""
    def program(runtime, backends):
        parts = [long_answer(P.variable("question", f"part {i}")) for i in range(8)]
        mapper = threading.Thread(target=combine_eight(*parts).get, kwargs={"perf": P.THROUGHPUT})
        mapper.start()
        wait_for_engines_running(backends, 2, mapper)
        first = long_answer(P.variable("question", "why?"))
        asker = threading.Thread(target=first.get, kwargs={"perf": P.LATENCY})
        asker.start()
        deadline = time.monotonic() + 10
        while sum(b.running for b in backends) < 9:
            assert time.monotonic() < deadline and asker.is_alive(), "the first chat never ran"
            time.sleep(0.005)
        second = long_answer(P.variable("question", "how?"))
        second.get(perf=P.LATENCY)
        asker.join()
        mapper.join()
        return sorted(engine_of(backends, p, runtime) for p in parts), engine_of(backends, first, runtime), engine_of(backends, second, runtime)

    _, (map_engines, first_chat, second_chat) = run_with("parrot", 2, program)
    assert map_engines == ["sim-0"] * 4 + ["sim-1"] * 4
    assert second_chat == first_chat


# Engines of 512-token steps whose prompt rate in 128-token steps (beside latency work) is half
# the full one (a GPU-like fixed cost per step), or all of it (a CPU-like cost per token).
HALF_RATE_BESIDE_LATENCY = CostModel(seconds_per_step=0.01, seconds_per_prefill_token=0.01 / 256)
FULL_RATE_BESIDE_LATENCY = CostModel(seconds_per_prefill_token=1e-4, seconds_per_decode_seq=0.01)


@pytest.mark.parametrize("cost,share,maps_on_chat_engine", [(HALF_RATE_BESIDE_LATENCY, 0.5, 4), (FULL_RATE_BESIDE_LATENCY, 1.0, 8)])
def test_an_engine_serving_a_chat_takes_throughput_work_in_proportion_to_its_prompt_rate_beside_it(cost, share, maps_on_chat_engine):
    """Four engines, a long chat on one; 36 maps of a map-reduce asked with THROUGHPUT are placed
    one by one: the quiet engines take up to the chat engine's calls over its prompt-rate share
    beside latency work (twice its calls, the chat counted, at half the rate; at the full rate,
    as many)."""
    def program(runtime, backends):
        answer = long_answer(P.variable("question", "why?"))
        asker = threading.Thread(target=answer.get, kwargs={"perf": P.LATENCY})
        asker.start()
        wait_for_engines_running(backends, 1, asker)
        parts = [summarize(P.variable("chunk", f"part {i}")) for i in range(36)]
        partials = [combine(*parts[i:i + 6]) for i in range(0, 36, 6)]
        combine(*partials).get(perf=P.THROUGHPUT)
        asker.join()
        return engine_of(backends, answer, runtime), Counter(engine_of(backends, p, runtime) for p in parts)

    backends, (chat_engine, maps_per_engine) = run_with("parrot", 4, program, cost=cost)
    assert backends[0].stats().prefill_share_beside_latency == pytest.approx(share)
    assert chat_engine == "sim-0"
    assert maps_per_engine["sim-0"] == maps_on_chat_engine
    assert sum(maps_per_engine.values()) == 36 and max(maps_per_engine.values()) - min(maps_per_engine[f"sim-{i}"] for i in (1, 2, 3)) <= 1


@P.semantic_function()
def combine_two(a: P.Input, b: P.Input, summary: P.Output(max_tokens=4)):
    """Combine {{a}} {{b}}: {{summary}}"""


class FillCountingBackend(RecordingBackend):
    """Records the most prompts in flight at once (placed, not yet prefilled: filled, and no
    token generated after them yet, since the manager's fill leaves its prompt to the generate)."""

    def __init__(self, name: str, cost: CostModel):
        super().__init__(name, cost=cost)
        self.prefilling: set[str] = set()
        self.most_filling = 0

    async def fill(self, context_id, parent_context_id, text, priority, shared_prefix_chars=0, then_generate=False):
        self.prefilling.add(context_id)
        self.most_filling = max(self.most_filling, len(self.prefilling))
        await super().fill(context_id, parent_context_id, text, priority, shared_prefix_chars, then_generate)

    async def generate(self, context_id, sampling, priority):
        try:
            async for token in super().generate(context_id, sampling, priority):
                self.prefilling.discard(context_id)
                yield token
        finally:
            self.prefilling.discard(context_id)


def test_throughput_work_is_handed_to_engines_as_they_prefill_it():
    """Twelve maps of about 600 prompt tokens, asked with THROUGHPUT, on two engines of
    512-token steps: each engine is given calls only while its prompts not yet prefilled fill
    less than two steps, so at most two fills wait on it at once; the rest wait in the manager
    and every map still runs."""
    backends = [FillCountingBackend(f"sim-{i}", HALF_RATE_BESIDE_LATENCY) for i in range(2)]
    with P.Runtime(backends=backends, policy="parrot"):
        parts = [summarize(P.variable("chunk", f"part {i} " + "word " * 480)) for i in range(12)]
        partials = [combine(*parts[i:i + 6]) for i in range(0, 12, 6)]
        assert combine_two(*partials).get(perf=P.THROUGHPUT).strip()
    assert backends[0].stats().max_tokens_per_step == 512
    assert [b.most_filling for b in backends] == [2, 2]
    assert sum(len([f for f in b.fills if f.text.startswith("Summarize")]) for b in backends) == 12


@pytest.mark.parametrize("policy", ["throughput-centric", "fifo"])
def test_baselines_hand_out_throughput_work_at_once(policy):
    backends = [FillCountingBackend(f"sim-{i}", HALF_RATE_BESIDE_LATENCY) for i in range(2)]
    with P.Runtime(backends=backends, policy=policy):
        parts = [summarize(P.variable("chunk", f"part {i} " + "word " * 480)) for i in range(12)]
        combine(*parts[:6]).get(perf=P.THROUGHPUT)
        combine(*parts[6:]).get(perf=P.THROUGHPUT)
    assert max(b.most_filling for b in backends) > 2



def test_engines_report_their_step_limits_as_their_stats_do(engine):
    """Throughput work is weighed by each engine's step budget, read at every placement from
    `step_limits` (cheap); it must say what `stats` says, whatever the backend."""
    from parrot.backends.base import StepLimits
    from parrot.backends.builtin import BuiltinEngineBackend

    sim = RecordingBackend("sim-0", max_tokens_per_step=256, max_seqs_per_step=8)
    builtin = BuiltinEngineBackend(engine)
    for backend, expected in ((sim, StepLimits(256, 8)), (builtin, StepLimits(512, 64))):
        stats = backend.stats()
        assert backend.step_limits() == StepLimits(stats.max_tokens_per_step, stats.max_seqs_per_step) == expected


def test_throughput_apps_run_in_the_order_they_asked_with_engine_priorities_to_match():
    """App-FIFO between throughput apps: a second map-reduce asked while the first runs has its
    maps placed after all of the first's, at engine priorities no more urgent than the first's
    (a later app's prompts keep to the cap beside the first app's decodes)."""
    backends = [FillCountingBackend("sim-0", HALF_RATE_BESIDE_LATENCY)]
    with P.Runtime(backends=backends, policy="parrot"):
        first = [summarize(P.variable("chunk", f"first {i} " + "word " * 480)) for i in range(6)]
        second = [summarize(P.variable("chunk", f"second {i} " + "word " * 480)) for i in range(6)]
        asker = threading.Thread(target=combine(*first).get, kwargs={"perf": P.THROUGHPUT})
        asker.start()
        deadline = time.monotonic() + 10
        while not backends[0].fills:
            assert time.monotonic() < deadline and asker.is_alive(), "the first app never ran"
            time.sleep(0.005)
        combine(*second).get(perf=P.THROUGHPUT)
        asker.join()
    maps = [f for f in backends[0].fills if f.text.startswith("Summarize")]
    apps = ["first" if "first" in f.text else "second" for f in maps]
    assert apps == ["first"] * 6 + ["second"] * 6
    first_priorities, second_priorities = [f.priority for f in maps[:6]], [f.priority for f in maps[6:]]
    assert max(first_priorities) <= min(second_priorities) and max(second_priorities) > max(first_priorities)


def test_an_app_keeps_its_place_while_it_runs_and_a_new_app_comes_after_every_earlier_one():
    """Engine priorities are fixed as each call starts, so an app's place among the throughput
    apps in flight must not shift when an earlier app ends: otherwise a later app could tie
    with or overtake one that started before it."""
    from parrot.manager.executor import Executor

    executor = Executor([])

    def call(app: int) -> Call:
        made = Call(f"c-{app}", "f", [], {}, {}, {}, 0, objective=Objective.THROUGHPUT, app_order=app)
        executor._held.append(made)  # in flight: held in the manager
        return made

    first, second = call(1), call(2)
    assert [executor._app_place(c) for c in (first, second)] == [0, 1]
    executor._held.remove(first)  # the first app ends
    third = call(3)
    assert executor._app_place(third) == 2 and executor._app_place(second) == 1  # after the second, which keeps its place
    executor._held.remove(second)
    executor._held.remove(third)
    assert executor._app_place(call(4)) == 0  # nothing in flight: the first place again


@dataclass
class StatsOnlyEngine:
    """An engine as the policy sees it: a name, its stats and its step limits."""

    name: str
    latency_seqs_bound: int = 0  # 0: not reported
    max_seqs_per_step: int = 0

    def stats(self):
        return BackendStats(self.name, "m", 0, 0, 0, 0, 0, latency_seqs_bound=self.latency_seqs_bound, max_seqs_per_step=self.max_seqs_per_step)

    def step_limits(self):
        return StepLimits()


def place_chat(engines: list[StatsOnlyEngine], loads: dict[str, tuple[int, int]], prefix_holder: str | None = None) -> str:
    """Where parrot places a latency-critical call on engines running (calls, latency calls),
    one of them perhaps holding the chat's prompt prefix."""
    view = ClusterView(engines, {name: EngineLoad(calls=c, latency_calls=lat) for name, (c, lat) in loads.items()}, PrefixIndex())
    hashes = prefix_hashes("You are a helpful assistant. " * 20)
    if prefix_holder is not None:
        view.prefixes.record(prefix_holder, hashes)
    call = Call("chat-1", "chat", [], {}, {}, {}, 0, objective=Objective.LATENCY)
    return ParrotPolicy().place(call, CallDemand(prompt_hashes=hashes, tokens=64), view).name


def test_a_chat_joins_the_engine_serving_most_chats_not_an_idle_or_less_loaded_one():
    """Each engine serving latency work caps its other work's steps, so chats gather: on the
    engine serving two chats beside throughput work, not on the one serving one chat with fewer
    calls, nor on an idle engine."""
    engines = [StatsOnlyEngine("a", 8), StatsOnlyEngine("b", 8), StatsOnlyEngine("idle", 8)]
    assert place_chat(engines, {"a": (12, 2), "b": (3, 1), "idle": (0, 0)}) == "a"


def test_chats_gather_on_the_engine_serving_most_before_one_holding_their_prefix():
    """Splitting chats over two engines would cap both engines' other work: the one serving
    three chats takes the fourth, not the one serving one that holds its prefix; between
    engines serving as many, the prefix holder."""
    engines = [StatsOnlyEngine("a", 8), StatsOnlyEngine("holder", 8)]
    assert place_chat(engines, {"a": (5, 3), "holder": (2, 1)}, prefix_holder="holder") == "a"
    assert place_chat(engines, {"a": (5, 2), "holder": (6, 2)}, prefix_holder="holder") == "holder"


def test_an_engine_takes_no_more_chats_than_one_step_batches():
    """A bound above the engine's sequences per step is held to them."""
    engines = [StatsOnlyEngine("a", 100, max_seqs_per_step=8), StatsOnlyEngine("idle", 100, max_seqs_per_step=8)]
    assert place_chat(engines, {"a": (8, 7), "idle": (0, 0)}) == "a"
    assert place_chat(engines, {"a": (9, 8), "idle": (0, 0)}) == "idle"


@pytest.mark.parametrize("bound,engine", [(0, "idle"), (4, "idle"), (8, "a")])
def test_an_engine_serves_as_many_chats_at_once_as_its_step_cost_affords(bound, engine):
    """The engine serving four chats takes a fifth only where it reports room for more (its
    decodes cost little beside its steps' fixed cost); unreported, four is its bound."""
    engines = [StatsOnlyEngine("a", bound), StatsOnlyEngine("idle", bound)]
    assert place_chat(engines, {"a": (10, 4), "idle": (0, 0)}) == engine


def test_latency_seqs_bound_follows_the_step_cost():
    def bound(preset: str, cap: int) -> int:
        cost = PRESETS[preset].cost
        return latency_seqs_bound(StepCost(cost.seconds_per_step, cost.seconds_per_prefill_token), cap, 128)

    assert bound("a100-7b", 128) == 33  # a step's fixed cost dominates: many chats ride it
    assert bound("cpu-smollm2", 16) == LATENCY_SEQS_FLOOR  # tokens are dear: the small batch
    # a cheaper CPU token (the Intel AMX machine's fit: 40 ms a step, 0.8 ms a token) still keeps the floor
    assert latency_seqs_bound(StepCost(0.040, 0.0008), 32, 128) == LATENCY_SEQS_FLOOR
    assert latency_seqs_bound(None, 128, 128) == LATENCY_SEQS_FLOOR
