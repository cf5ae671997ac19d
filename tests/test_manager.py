"""The serve core on the simulated engine: DAG shapes, objectives, laziness, server-side execution.

The simulated engine keeps contexts as text and "generates" deterministic words, so
these tests check the manager alone, fast and exactly: which prompts reach the engine,
in what order, with which priority, and what the program sees.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import pytest

import parrot as P
from parrot.backends.base import LOGPROBS_FEATURE
from parrot.backends.simulated import CostModel, SimulatedEngineBackend
from parrot.engine.outputs import TokenLogprobs
from parrot.engine.sampler import SamplingParams
from parrot.errors import EngineUnavailableError, UserError
from parrot.manager.executor import UpstreamError
from parrot.manager.graph import LoggedToken, Published, Variable
from parrot.manager.manager import Manager
from parrot.manager.objectives import engine_priority
from parrot.manager.spec import CallSpec, InputBinding, OutputBinding

# ---- a recording engine ----------------------------------------------------------


@dataclass(frozen=True)
class Fill:
    context_id: str
    text: str
    priority: int


class RecordingBackend(SimulatedEngineBackend):
    """The simulated engine, recording every fill and generate it is asked for."""

    def __init__(self, name: str = "sim-0", cost: CostModel = CostModel(), **options):
        super().__init__(name, cost=cost, **options)
        self.fills: list[Fill] = []
        self.generated: list[str] = []

    async def fill(self, context_id, parent_context_id, text, priority, shared_prefix_chars=0, then_generate=False):
        self.fills.append(Fill(context_id, text, priority))
        await super().fill(context_id, parent_context_id, text, priority, shared_prefix_chars, then_generate)

    async def generate(self, context_id, sampling, priority):
        self.generated.append(context_id)
        async for token in super().generate(context_id, sampling, priority):
            yield token

    @property
    def contexts_seen(self) -> set[str]:
        return {f.context_id for f in self.fills} | set(self.generated)


class FailingBackend(RecordingBackend):
    """Fails (as an engine would, not as a user error) on prompts that contain EXPLODE."""

    async def generate(self, context_id, sampling, priority):
        if "EXPLODE" in self._contexts[context_id]:
            raise RuntimeError("the engine fell over")
        async for token in super().generate(context_id, sampling, priority):
            yield token


@pytest.fixture
def backend() -> RecordingBackend:
    return RecordingBackend()


@pytest.fixture
def runtime(backend: RecordingBackend):
    with P.Runtime(backends=[backend]) as rt:
        yield rt


# ---- the app's functions -------------------------------------------------------


@P.semantic_function()
def summarize(chunk: P.Input, summary: P.Output(max_tokens=3)):
    """Summarize the text.
    Text: {{chunk}}
    Summary: {{summary}}"""


@P.semantic_function()
def refine(previous: P.Input, chunk: P.Input, summary: P.Output(max_tokens=3)):
    """Refine the summary with more text.
    Summary so far: {{previous}}
    More text: {{chunk}}
    Refined summary: {{summary}}"""


@P.semantic_function()
def combine(a: P.Input, b: P.Input, c: P.Input, d: P.Input, summary: P.Output(max_tokens=4)):
    """Combine these summaries into one.
    1. {{a}}
    2. {{b}}
    3. {{c}}
    4. {{d}}
    Summary: {{summary}}"""


@P.semantic_function()
def plan(task: P.Input, design: P.Output(max_tokens=3)):
    """Design {{task}}. Design: {{design}}"""


@P.semantic_function()
def implement(design: P.Input, part: P.Input, code: P.Output(max_tokens=3)):
    """Implement the {{part}} of this design: {{design}}. Code: {{code}}"""


@P.semantic_function()
def review(left: P.Input, right: P.Input, verdict: P.Output(max_tokens=2)):
    """Review {{left}} and {{right}}. Verdict: {{verdict}}"""


def render_summarize(chunk: str) -> str:
    return f"Summarize the text.\nText: {chunk}\nSummary: "


def render_refine(previous: str, chunk: str) -> str:
    return f"Refine the summary with more text.\nSummary so far: {previous}\nMore text: {chunk}\nRefined summary: "


def render_combine(a: str, b: str, c: str, d: str) -> str:
    return f"Combine these summaries into one.\n1. {a}\n2. {b}\n3. {c}\n4. {d}\nSummary: "


CHUNKS = [f"chunk number {i} of the document" for i in range(5)]


def build_chain(chunks=CHUNKS):
    summaries = [summarize(P.variable("chunk0", chunks[0]))]
    for i, chunk in enumerate(chunks[1:], 1):
        summaries.append(refine(summaries[-1], P.variable(f"chunk{i}", chunk)))
    return summaries


def build_map_reduce(chunks=CHUNKS[:4]):
    maps = [summarize(P.variable(f"chunk{i}", c)) for i, c in enumerate(chunks)]
    return maps, combine(*maps)


def build_diamond(task: str = "a snake game"):
    design = plan(P.variable("task", task))
    left = implement(design, P.variable("part", "board"))
    right = implement(design, P.variable("part", "snake"))
    return design, left, right, review(left, right)


def calls_of(runtime):
    return {c.call_id: c for c in runtime.dag().calls}


def call_making(runtime, var) -> object:
    return next(c for c in runtime.dag().calls if var.var_id in c.outputs.values())


def graph_of(runtime):
    return runtime.manager.sessions[runtime.session_id].graph


# ---- DAG shapes: objectives, task groups, edges, depth ---------------------------


def test_chain(runtime, backend: RecordingBackend) -> None:
    summaries = build_chain()
    dag = runtime.dag()
    assert [c.function for c in dag.calls] == ["summarize"] + ["refine"] * 4
    assert all(c.state == "submitted" and c.objective == "unknown" for c in dag.calls)
    assert [c.depth for c in dag.calls] == [1, 2, 3, 4, 5]
    assert backend.fills == []  # nothing runs before something is asked for

    final = summaries[-1].get(perf=P.LATENCY)
    dag = runtime.dag()
    assert all(c.state == "done" and c.objective == "latency" and c.task_group is None for c in dag.calls)
    # edges: each summary is produced by step i and consumed by step i+1 only
    variables = {v.var_id: v for v in dag.variables}
    for i, var in enumerate(summaries):
        info = variables[var.var_id]
        assert info.producer == dag.calls[i].call_id
        assert info.consumers == ([dag.calls[i + 1].call_id] if i + 1 < len(summaries) else [])
    # the engine saw each step's prompt with the previous step's output in it, in order
    values = [s.get() for s in summaries]
    assert final == values[-1]
    expected = [render_summarize(CHUNKS[0])] + [render_refine(values[i - 1], CHUNKS[i]) for i in range(1, 5)]
    assert [f.text for f in backend.fills] == expected
    assert [f.context_id for f in backend.fills] == [c.call_id for c in dag.calls]
    assert runtime.manager.sessions[runtime.session_id].dispatched == [c.call_id for c in dag.calls]
    # App-FIFO inside the app: latency work, deeper stages first (lower runs first)
    priorities = [f.priority for f in backend.fills]
    assert priorities == sorted(priorities, reverse=True) and len(set(priorities)) == 5


def test_map_reduce() -> None:
    engines = [RecordingBackend("sim-0"), RecordingBackend("sim-1")]
    with P.Runtime(backends=engines) as runtime:
        maps, reduced = build_map_reduce()
        assert [c.depth for c in runtime.dag().calls] == [1, 1, 1, 1, 2]
        result = reduced.get(perf=P.LATENCY)
        dag = runtime.dag()
        *map_calls, reduce_call = dag.calls
        assert reduce_call.function == "combine"
        assert reduce_call.objective == "latency" and reduce_call.task_group is None
        # the map stage is one task group: throughput work, on one engine together
        assert all(c.objective == "throughput" and c.task_group == reduce_call.call_id for c in map_calls)
        assert len({c.engine for c in map_calls}) == 1
        assert all(c.state == "done" for c in dag.calls)
        # edges
        graph = graph_of(runtime)
        reduce_node = graph.calls[reduce_call.call_id]
        assert [graph.get_producer(v).call_id for v in reduce_node.input_vars] == [c.call_id for c in map_calls]
        for m in maps:
            assert [c.call_id for c in graph.get_consumers(graph.variable(m.var_id))] == [reduce_call.call_id]
        values = [m.get() for m in maps]
        # asking for a map's output afterwards does not rewrite the objective it ran with
        assert [(c.objective, c.task_group) for c in runtime.dag().calls] == [(c.objective, c.task_group) for c in dag.calls]
        fills = {f.context_id: f for e in engines for f in e.fills}
        assert fills[reduce_call.call_id].text == render_combine(*values)
        assert result == reduced.get()
        # the reduce (latency) outranks the maps (throughput) at the engine
        assert all(fills[reduce_call.call_id].priority < fills[c.call_id].priority for c in map_calls)


def test_diamond(runtime, backend: RecordingBackend) -> None:
    design, left, right, verdict = build_diamond()
    verdict.get(perf=P.LATENCY)
    a, b, c, d = runtime.dag().calls
    assert [x.function for x in (a, b, c, d)] == ["plan", "implement", "implement", "review"]
    assert [x.depth for x in (a, b, c, d)] == [1, 2, 2, 3]
    # the design feeds two consumers that each have one producer: no task group, on the critical path
    assert a.objective == "latency" and a.task_group is None
    # the two implementations both feed the review: a task group
    assert b.objective == c.objective == "throughput" and b.task_group == c.task_group == d.call_id
    assert d.objective == "latency" and d.task_group is None
    graph = graph_of(runtime)
    assert [x.call_id for x in graph.get_consumers(graph.variable(design.var_id))] == [b.call_id, c.call_id]
    assert graph.get_producer(graph.variable(left.var_id)).call_id == b.call_id
    assert graph.get_producer(graph.variable(right.var_id)).call_id == c.call_id
    assert graph.get_producer(graph.variable(verdict.var_id)).call_id == d.call_id
    assert graph.get_consumers(graph.variable(verdict.var_id)) == []
    # both implementations start from the same design text
    texts = {f.context_id: f.text for f in backend.fills}
    assert design.get() in texts[b.call_id] and design.get() in texts[c.call_id]
    assert texts[d.call_id] == f"Review {left.get()} and {right.get()}. Verdict: "


@P.semantic_function()
def review_with_design(design: P.Input, left: P.Input, right: P.Input, verdict: P.Output(max_tokens=2)):
    """Design: {{design}}. Review {{left}} and {{right}}. Verdict: {{verdict}}"""


def test_a_stage_before_the_parallel_ones_is_not_in_their_task_group(runtime) -> None:
    """The multi-agent shape: the reviewer reads the design too. The architect still gates the
    programmers, so it stays on the critical path; only the programmers form the group."""
    design = plan(P.variable("task", "a snake game"))
    left = implement(design, P.variable("part", "board"))
    right = implement(design, P.variable("part", "snake"))
    verdict = review_with_design(design, left, right)
    verdict.get(perf=P.LATENCY)
    a, b, c, d = runtime.dag().calls
    assert (a.objective, a.task_group) == ("latency", None)
    assert b.objective == c.objective == "throughput" and b.task_group == c.task_group == d.call_id
    assert (d.objective, d.task_group) == ("latency", None)


def test_only_requested_consumers_make_task_groups(runtime, backend: RecordingBackend) -> None:
    """A reduce nobody asked for does not turn its producers into throughput work."""
    maps, reduced = build_map_reduce()
    follow_up = refine(maps[0], P.variable("chunk", "more"))  # the program wants only this
    follow_up.get(perf=P.LATENCY)
    calls = runtime.dag().calls
    first_map, reduce_call, refine_call = calls[0], calls[4], calls[5]
    assert (first_map.objective, first_map.task_group, first_map.state) == ("latency", None, "done")
    assert (refine_call.objective, refine_call.state) == ("latency", "done")
    assert reduce_call.state == "submitted" and all(c.state == "submitted" for c in calls[1:4])
    # asking for the reduce later groups the maps that still have to run
    reduced.get(perf=P.LATENCY)
    calls = runtime.dag().calls
    assert all(c.objective == "throughput" and c.task_group == reduce_call.call_id for c in calls[1:4])
    assert (calls[0].objective, calls[0].task_group) == ("latency", None)  # it ran as latency work


def test_throughput_marks_the_sub_dag(runtime, backend: RecordingBackend) -> None:
    design, left, right, verdict = build_diamond()
    unrelated = summarize(P.variable("chunk", "something else"))
    verdict.get(perf=P.THROUGHPUT)
    calls = runtime.dag().calls
    diamond, other = calls[:4], calls[4]
    assert all(c.objective == "throughput" and c.state == "done" for c in diamond)
    assert other.objective == "unknown" and other.state == "submitted"
    assert other.call_id not in backend.contexts_seen
    assert {f.priority for f in backend.fills} == {engine_priority(graph_of(runtime).calls[c.call_id]) for c in diamond}
    assert all(f.priority > 0 for f in backend.fills)
    unrelated.get(perf=P.LATENCY)
    assert runtime.dag().calls[4].objective == "latency"


# ---- laziness and server-side execution ------------------------------------------


def test_an_unrequested_output_is_never_generated(runtime, backend: RecordingBackend) -> None:
    summaries = build_chain()
    side = summarize(P.variable("chunk", "a side document nobody reads"))
    # ask for the middle of the chain: only its upstream runs
    summaries[2].get()
    dag = runtime.dag()
    assert [c.state for c in dag.calls] == ["done", "done", "done", "submitted", "submitted", "submitted"]
    assert backend.contexts_seen == {c.call_id for c in dag.calls[:3]}
    # then the end: the rest of the chain runs, what already ran is not run again
    summaries[-1].get()
    dag = runtime.dag()
    assert [c.state for c in dag.calls] == ["done"] * 5 + ["submitted"]
    assert len(backend.fills) == 5 and len(backend.generated) == 5
    side_call = call_making(runtime, side)
    assert side_call.state == "submitted" and side_call.call_id not in backend.contexts_seen
    assert not graph_of(runtime).variable(side.var_id).is_ready


def test_consumers_start_without_a_client_round_trip() -> None:
    # a slow engine: the chain takes a while, and the program makes no call while it runs
    backend = RecordingBackend(cost=CostModel(seconds_per_decode_step=0.005))
    with P.Runtime(backends=[backend]) as runtime:
        summaries = build_chain()
        before = runtime.client_calls
        final = summaries[-1].get(perf=P.LATENCY)  # one API call for the whole chain
        assert runtime.client_calls == before + 1
        assert len(backend.fills) == 5 and final
        session = runtime.manager.sessions[runtime.session_id]
        assert len(session.dispatched) == 5


def test_consumer_is_dispatched_when_its_producer_finishes() -> None:
    """On the manager itself: the consumer starts from the producer's completion, in the server."""

    async def main() -> None:
        backend = RecordingBackend(cost=CostModel(seconds_per_decode_step=0.002))
        manager = Manager([backend])
        session = manager.create_session()
        manager.create_variable(session, "task", "task", "a snake game")
        for name in ("design", "code", "test"):
            manager.create_variable(session, name, name, None)
        sampling = SamplingParams(max_tokens=4)
        manager.submit_call(session, "c1", CallSpec("plan", "Design {{task}}: {{design}}", (InputBinding("task", "task"),), (OutputBinding("design", "design", sampling),)))
        manager.submit_call(session, "c2", CallSpec("code", "Code for {{design}}: {{code}}", (InputBinding("design", "design"),), (OutputBinding("code", "code", sampling),)))
        manager.submit_call(session, "c3", CallSpec("test", "Tests for {{code}}: {{test}}", (InputBinding("code", "code"),), (OutputBinding("test", "test", sampling),)))
        before = manager.sessions[session].client_calls
        graph = manager.sessions[session].graph
        code_ready = asyncio.ensure_future(graph.variable("code").ready.wait())
        test = await manager.get_variable(session, "test")
        assert code_ready.done()
        assert manager.sessions[session].client_calls == before + 1
        assert [c.split(":")[-1].split("/")[-1] for c in manager.sessions[session].dispatched] == ["c1", "c2", "c3"]
        assert [f.text for f in backend.fills] == [
            "Design a snake game: ",
            f"Code for {graph.variable('design').value}: ",
            f"Tests for {graph.variable('code').value}: ",
        ]
        assert test == graph.variable("test").value
        await manager.shutdown()

    asyncio.run(main())


# ---- native functions ------------------------------------------------------------


@P.native_function
def count_words(text, count: P.Output):
    return len(text.split())


@P.native_function
def explode(text, out: P.Output):
    raise ValueError(f"cannot handle {text!r}")


@P.semantic_function()
def describe(count: P.Input, description: P.Output(max_tokens=2)):
    """The text has {{count}} words. Describe it: {{description}}"""


def test_native_output_feeds_a_semantic_function(runtime, backend: RecordingBackend) -> None:
    summary = summarize(P.variable("chunk", "one two three"))
    count = count_words(summary)  # semantic -> native (runs in this process) -> semantic
    description = describe(count)
    result = description.get()
    assert count.get() == "3"  # the simulated summary has max_tokens=3 words
    assert backend.fills[-1].text == "The text has 3 words. Describe it: "
    assert len(result.split()) == 2
    assert call_making(runtime, description).state == "done"


def test_native_exception_reaches_the_caller_and_the_session_goes_on(runtime, backend: RecordingBackend) -> None:
    bad = explode(P.variable("text", "poison"))
    downstream = describe(bad)
    with pytest.raises(ValueError, match="cannot handle 'poison'"):
        bad.get()
    with pytest.raises(UpstreamError, match=r"describe cannot run: its input 'out' failed: native function explode failed: ValueError"):
        downstream.get()
    assert call_making(runtime, downstream).state == "failed"
    assert backend.fills == []  # the failed call never reached the engine
    # the session is still usable
    assert len(summarize(P.variable("chunk", "fine text")).get().split()) == 3
    assert describe(count_words(P.variable("text", "a b c d"))).get()
    assert backend.fills[-1].text == "The text has 4 words. Describe it: "


@P.native_function
def split_words(text, first: P.Output, rest: P.Output):
    head, _, tail = text.partition(" ")
    return head, tail


@P.native_function
def too_few(text, a: P.Output, b: P.Output):
    return text


def test_native_functions_with_several_outputs_and_their_misuse(runtime) -> None:
    first, rest = split_words(P.variable("text", "alpha beta gamma"))
    assert (first.get(), rest.get()) == ("alpha", "beta gamma")
    a, b = too_few(P.variable("text", "x"))
    with pytest.raises(UserError, match=r"native function too_few returned 1 value\(s\) for 2 output\(s\)"):
        a.get()
    with pytest.raises(UserError, match="count_words: got an unexpected keyword argument 'txt'"):
        count_words(txt="a b")
    with pytest.raises(UserError, match=r"count_words: missing input\(s\) text"):
        count_words()
    with pytest.raises(UserError, match="native function nothing_out needs at least one parameter annotated P.Output"):

        @P.native_function
        def nothing_out(text):
            return text


def test_engine_failure_reaches_the_caller_and_the_session_goes_on() -> None:
    backend = FailingBackend()
    with P.Runtime(backends=[backend]) as runtime:
        bad = summarize(P.variable("chunk", "EXPLODE"))
        after = refine(bad, P.variable("chunk", "more"))
        with pytest.raises(UpstreamError, match="refine cannot run: its input 'summary' failed: the engine fell over"):
            after.get()
        with pytest.raises(RuntimeError, match="the engine fell over"):
            bad.get()
        assert [c.state for c in runtime.dag().calls] == ["failed", "failed"]
        assert backend.stats().contexts == 0  # the failed call's context was freed
        assert summarize(P.variable("chunk", "calm")).get()
        load = runtime.manager.executor.view.load[backend.name]  # what the policy weighs returns to nothing
        assert (load.calls, load.tokens, load.unfilled_tokens) == (0, 0, 0)


# ---- what the server rejects -------------------------------------------------------


def test_server_rejects_a_cycle(runtime) -> None:
    pending = P.variable("pending")  # no value yet
    first = summarize(pending)
    with pytest.raises(UserError, match=r"would make a cycle: its output 'pending' feeds its own inputs"):
        refine(first, P.variable("chunk", "x"), summary=pending)
    with pytest.raises(UserError, match="would make a cycle"):
        summarize(pending, summary=pending)
    graph = graph_of(runtime)
    assert len(graph.calls) == 1 and graph.variable(pending.var_id).producer is None
    # the session goes on: the variable can still be set, and the call runs
    pending.set("late text")
    assert first.get()


def test_server_rejects_a_variable_set_twice(runtime) -> None:
    chunk = P.variable("chunk", "first value")
    with pytest.raises(UserError, match="variable 'chunk' already has a value; variables are set once"):
        chunk.set("second value")
    summary = summarize(chunk)
    with pytest.raises(UserError, match="variable 'summary' is produced by summarize; it cannot be set"):
        summary.set("forged")
    assert summary.get() != "forged"


def test_server_rejects_an_output_variable_reused(runtime) -> None:
    summary = summarize(P.variable("chunk", "a"))
    with pytest.raises(UserError, match=r"variable 'summary' is already the output of summarize; a variable has one producer"):
        summarize(P.variable("chunk", "b"), summary=summary)
    with pytest.raises(UserError, match=r"variable 'given' already has a value and cannot be an output of summarize"):
        summarize(P.variable("chunk", "c"), summary=P.variable("given", "set by the program"))
    with pytest.raises(UserError, match="output 'summary' takes a variable to fill or nothing, not str"):
        summarize(P.variable("chunk", "d"), summary="text")
    assert len(graph_of(runtime).calls) == 1
    assert summary.get()


def test_server_rejects_one_variable_for_two_outputs() -> None:
    """Two outputs of one call bound to one variable would set it twice (a consumer could read either)."""

    async def main() -> None:
        manager = Manager([RecordingBackend()])
        session = manager.create_session()
        manager.create_variable(session, "x", "x", "hello")
        manager.create_variable(session, "v", "v", None)
        spec = CallSpec(
            "f",
            "Q {{x}} A {{a}} B {{b}}",
            (InputBinding("x", "x"),),
            (OutputBinding("a", "v", SamplingParams(max_tokens=2)), OutputBinding("b", "v", SamplingParams(max_tokens=2))),
        )
        with pytest.raises(UserError, match="two outputs are bound to the same variable"):
            manager.submit_call(session, "c1", spec)
        assert manager.sessions[session].graph.calls == {}
        await manager.shutdown()

    asyncio.run(main())


def test_a_call_with_two_outputs_fills_both_and_feeds_consumers(runtime, backend: RecordingBackend) -> None:
    @P.semantic_function()
    def code_and_test(task: P.Input, code: P.Output(max_tokens=2), test: P.Output(max_tokens=3)):
        """Task: {{task}}. Code: {{code}}. Tests: {{test}}. End."""

    code, test = code_and_test(P.variable("task", "sort a list"))
    verdict = review(code, test)
    verdict.get()
    assert len(code.get().split()) == 2 and len(test.get().split()) == 3
    producer = call_making(runtime, code)
    fills = [f for f in backend.fills if f.context_id == producer.call_id]
    assert [f.text for f in fills] == ["Task: sort a list. Code: ", ". Tests: "]
    assert backend.fills[-1].text == f"Review {code.get()} and {test.get()}. Verdict: "
    assert backend.stats().contexts == 0


def test_many_apps_at_once_from_threads(runtime, backend: RecordingBackend) -> None:
    """Programs in threads share one runtime; each gets its own app's answer."""
    results: dict[int, str] = {}

    def app(i: int) -> None:
        summaries = build_chain([f"app {i} part {j}" for j in range(3)])
        results[i] = summaries[-1].get()

    threads = [threading.Thread(target=app, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(results) == [0, 1, 2, 3]
    assert len(backend.fills) == 12
    for i in range(4):
        assert any(f"app {i} part 2" in f.text for f in backend.fills)


def test_a_streamed_piece_carries_only_the_logged_tokens_whose_text_it_completes():
    """A token whose text is held back (part of a character, the start of a stop string) is sent
    with the piece that completes it, never before: its engine may be lost and the token made again."""
    var = Variable("v", "v")
    pieces: asyncio.Queue = asyncio.Queue()
    var.listeners.append(pieces)
    var.token_logprobs.append(LoggedToken(1, TokenLogprobs(-0.1)))
    var.publish("a")
    var.token_logprobs.append(LoggedToken(2, TokenLogprobs(-0.2)))  # its text held back
    assert pieces.get_nowait() == Published("a", 1) and var.published_tokens == 1
    var.token_logprobs.append(LoggedToken(3, TokenLogprobs(-0.3)))
    var.publish("bc")
    assert pieces.get_nowait() == Published("bc", 3)


def test_logprobs_are_refused_up_front_where_an_engine_computes_no_logits():
    manager = Manager([SimulatedEngineBackend("sim-0", time_scale=0.0)])
    with pytest.raises(UserError, match="sim-0 compute no logits, so this server cannot give log probabilities"):
        manager.check_logits_computed(LOGPROBS_FEATURE)
    with pytest.raises(EngineUnavailableError, match="no engine that computes logits"):
        asyncio.run(manager.score_prompt("The capital of France is", 1))


def test_choices_of_one_prompt_count_its_tokens_once_on_their_engine():
    """n choices of one prompt fork from one copy of it: the engine's load counts the prompt once
    (so they do not crowd out other work), and once per choice where they do not say they share it."""
    prompt = "Summarize the following report. " * 80  # about 640 tokens by the manager's estimate

    async def load_while_running(shared: bool) -> tuple[int, int]:
        manager = Manager([SimulatedEngineBackend("sim-0", time_scale=0.0)])
        session = manager.create_session()
        var_ids = [manager.submit_prompt(session, prompt, SamplingParams(max_tokens=8), prompt_shared=shared) for _ in range(4)]
        graph = manager.sessions[session].graph
        for var_id in var_ids:
            manager.request(session, graph.variable(var_id), None)
        load = manager.executor.view.load["sim-0"]
        seen = (load.tokens, load.unfilled_tokens)
        await asyncio.gather(*(manager.get_variable(session, v, None) for v in var_ids))
        return seen

    prompt_tokens = len(prompt) // 4
    shared_tokens, shared_unfilled = asyncio.run(load_while_running(True))
    apart_tokens, apart_unfilled = asyncio.run(load_while_running(False))
    assert apart_tokens == 4 * (prompt_tokens + 8) and apart_unfilled == 4 * prompt_tokens
    assert shared_tokens <= prompt_tokens + 4 * (8 + 32) and shared_unfilled <= prompt_tokens + 3 * 32


def test_closing_a_nested_runtime_makes_the_outer_one_current_again() -> None:
    outer = P.Runtime(backends=[RecordingBackend("outer")])
    try:
        with P.Runtime(backends=[RecordingBackend("inner")]) as inner:
            assert describe("2").get() and inner.dag().calls[0].engine == "inner"
        assert describe("3").get() and outer.dag().calls[0].engine == "outer"
    finally:
        outer.close()
    with pytest.raises(UserError, match="no runtime"):
        describe("4")


def test_an_embedded_runtime_takes_more_calls_than_a_servers_session_may_hold(runtime) -> None:
    """A server limits each session (4096 calls) for its tenants' sake; the embedded runtime's
    program is the process's own."""
    from parrot.manager.manager import SessionLimits

    limit = SessionLimits().max_calls_per_session
    outputs = [describe(str(i)) for i in range(limit + 1)]
    assert outputs[-1].get()


def test_inputs_take_their_defaults_perf_its_name_and_a_timeout_names_its_variable(runtime) -> None:
    @P.semantic_function()
    def ask(answer: P.Output(max_tokens=2), question: P.Input() = "why?"):
        """Q: {{question}} A: {{answer}}"""

    assert ask().get(perf="throughput")

    @P.semantic_function()
    def reply(question: P.Input, answer: P.Output(max_tokens=2) = None):
        """Q: {{question}} A: {{answer}}"""

    assert reply("how?").get()  # an output's default is no value to fill
    with pytest.raises(UserError, match="perf is P.LATENCY or P.THROUGHPUT"):
        ask().get(perf="fast")
    never = P.variable("never")
    with pytest.raises(TimeoutError, match=f"variable {never.var_id} was not ready within 0.2s"):
        never.get(timeout=0.2)


def test_a_misspelt_output_setting_is_named_with_the_closest_one() -> None:
    with pytest.raises(UserError, match="P.Output has no setting 'max_token': did you mean 'max_tokens'"):
        P.Output(max_token=10)
