"""The manager's API: sessions of semantic calls and variables over a set of engines.

Every method runs on the manager's event loop. Each session belongs to a tenant;
asking for another tenant's session looks exactly like asking for one that does
not exist.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field

from parrot.backends.base import EngineBackend
from parrot.engine.outputs import PromptLogprobs
from parrot.errors import EngineUnavailableError, LimitExceededError, NotFoundError, UserError
from parrot.engine.sampler import SamplingParams
from parrot.frontend.template import Placeholder, PlaceholderKind, TextSegment, check_placeholders, parse_template
from parrot.manager.executor import Executor
from parrot.manager.policy import SchedulingPolicy
from parrot.manager.graph import Call, CallState, Published, SVGraph, Variable, placeholder_kinds
from parrot.manager.objectives import deduce_objectives
from parrot.manager.spec import CallSpec, Perf

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionLimits:
    """What one client may hold in the manager, so that no tenant can exhaust it for the others."""

    idle_timeout_s: float | None = 600.0  # a session untouched this long, with nobody waiting on it, is closed
    max_sessions_per_tenant: int = 256
    max_calls_per_session: int = 4096
    max_variables_per_session: int = 16384

    def __post_init__(self) -> None:
        if self.idle_timeout_s is not None and self.idle_timeout_s <= 0:
            raise UserError(f"the session idle timeout must be positive, not {self.idle_timeout_s}")
        if min(self.max_sessions_per_tenant, self.max_calls_per_session, self.max_variables_per_session) < 1:
            raise UserError("session limits must be at least 1")


@dataclass(frozen=True)
class CallInfo:
    call_id: str
    function: str
    state: str
    objective: str
    task_group: str | None
    depth: int
    engine: str | None
    inputs: dict[str, str]  # placeholder -> variable id
    outputs: dict[str, str]


@dataclass(frozen=True)
class VariableInfo:
    var_id: str
    name: str
    ready: bool
    producer: str | None
    consumers: list[str]


@dataclass(frozen=True)
class DagInfo:
    session_id: str
    calls: list[CallInfo]
    variables: list[VariableInfo]


@dataclass(eq=False)
class Session:
    session_id: str
    tenant: str
    graph: SVGraph
    client_calls: int = 0  # API calls this session's client made (the tests count round trips)
    dispatched: list[str] = field(default_factory=list)  # call ids in the order they started
    last_active: float = field(default_factory=time.monotonic)
    waiters: int = 0  # readers waiting on its variables now (a long wait is not idleness)


@contextmanager
def _waiting(session: Session):
    """A reader waits on the session's variables: however long, the session is not idle."""
    session.waiters += 1
    try:
        yield
    finally:
        session.waiters -= 1
        session.last_active = time.monotonic()


class Manager:
    def __init__(self, engines: list[EngineBackend], policy: SchedulingPolicy | None = None, limits: SessionLimits | None = None):
        self.sessions: dict[str, Session] = {}
        # open sessions per tenant, kept in step by create_session and _close (the only places
        # sessions come and go): the limit check is O(1) for every OpenAI request
        self._tenant_sessions: Counter[str] = Counter()
        self.limits = limits or SessionLimits()
        self.expired_sessions = 0
        self._scoring: Counter[str] = Counter()  # prompts being scored (echo), per engine
        self.executor = Executor(engines, on_dispatch=self._record_dispatch, policy=policy)
        self.engines = self.executor.engines

    # ---- sessions ----------------------------------------------------------

    def create_session(self, tenant: str = "local") -> str:
        held = self._tenant_sessions[tenant]
        if held >= self.limits.max_sessions_per_tenant:
            raise LimitExceededError(f"tenant {tenant!r} has {held} open sessions, the most allowed; close some "
                                     f"(DELETE /api/v1/sessions/ID) or wait for idle ones to expire")
        session_id = "s-" + secrets.token_hex(8)
        self.sessions[session_id] = Session(session_id, tenant, SVGraph(session_id))
        self._tenant_sessions[tenant] += 1
        return session_id

    def session(self, session_id: str, tenant: str = "local") -> Session:
        session = self.sessions.get(session_id)
        if session is None or session.tenant != tenant:
            raise NotFoundError(f"no session {session_id!r}")
        session.client_calls += 1
        session.last_active = time.monotonic()
        return session

    def close_session(self, session_id: str, tenant: str = "local") -> None:
        self._close(self.session(session_id, tenant), "its session was closed")

    def _close(self, session: Session, reason: str) -> None:
        """Forgets the session; its unfinished calls stop and free what they hold on engines."""
        del self.sessions[session.session_id]
        self._tenant_sessions[session.tenant] -= 1
        if not self._tenant_sessions[session.tenant]:
            del self._tenant_sessions[session.tenant]
        unfinished = [c for c in session.graph.calls.values() if c.state not in (CallState.DONE, CallState.FAILED)]
        if unfinished:
            self.executor.cancel(unfinished, f"the call was stopped: {reason}")

    def expire_idle_sessions(self, now: float | None = None) -> list[str]:
        """Closes sessions idle past the limit (a client that went away); returns their ids."""
        if self.limits.idle_timeout_s is None:
            return []
        now = time.monotonic() if now is None else now
        idle = [s for s in self.sessions.values() if s.waiters == 0 and now - s.last_active > self.limits.idle_timeout_s]
        for session in idle:
            log.info("session %s of tenant %s was idle for %.0fs; closing it", session.session_id, session.tenant, now - session.last_active)
            self._close(session, f"its session was idle for more than {self.limits.idle_timeout_s:.0f}s")
        self.expired_sessions += len(idle)
        return [s.session_id for s in idle]

    def _check_room(self, graph: SVGraph, calls: int = 0, variables: int = 0) -> None:
        if len(graph.calls) + calls > self.limits.max_calls_per_session:
            raise LimitExceededError(f"this session has {len(graph.calls)} calls, the most allowed; start a new session")
        if len(graph.variables) + variables > self.limits.max_variables_per_session:
            raise LimitExceededError(f"this session has {len(graph.variables)} variables, the most allowed; start a new session")

    # ---- variables -----------------------------------------------------------

    def create_variable(self, session_id: str, var_id: str, name: str, value: str | None = None, tenant: str = "local") -> None:
        graph = self.session(session_id, tenant).graph
        self._check_room(graph, variables=1)
        var = graph.add_variable(var_id, name)
        if value is not None:
            self._set(graph, var, value)

    def set_variable(self, session_id: str, var_id: str, value: str, tenant: str = "local") -> None:
        graph = self.session(session_id, tenant).graph
        self._set(graph, graph.variable(var_id), value)

    def fail_variable(self, session_id: str, var_id: str, message: str, tenant: str = "local") -> None:
        """The client could not produce this variable (a native function raised); its consumers fail."""
        graph = self.session(session_id, tenant).graph
        var = graph.variable(var_id)
        if var.is_ready:
            raise UserError(f"variable {var.name!r} already has a value")
        var.error = UserError(message)
        var.mark_ready()
        self.executor.on_variable_ready(var)

    def _set(self, graph: SVGraph, var: Variable, value: str) -> None:
        graph.set_value(var, value)
        self.executor.on_variable_ready(var)

    async def get_variable(self, session_id: str, var_id: str, perf: Perf | None = Perf.LATENCY, tenant: str = "local") -> str:
        """Activates what the variable depends on (objectives deduced from perf) and waits for its value."""
        session = self.session(session_id, tenant)
        var = session.graph.variable(var_id)
        self.request(session_id, var, perf)
        with _waiting(session):
            await var.ready.wait()
        if var.error is not None:
            raise var.error
        return var.value or ""

    async def stream_variable(self, session_id: str, var_id: str, perf: Perf | None = Perf.LATENCY, tenant: str = "local"):
        """Yields the variable's text as it is generated (what exists already first)."""
        async with aclosing(self.stream_published(session_id, var_id, perf, tenant)) as pieces:
            async for piece in pieces:
                yield piece.text

    async def stream_published(self, session_id: str, var_id: str, perf: Perf | None = Perf.LATENCY, tenant: str = "local"):
        """stream_variable's pieces, each with the count of logged tokens whose text it completes."""
        session = self.session(session_id, tenant)
        var = session.graph.variable(var_id)
        queue: asyncio.Queue = asyncio.Queue()
        var.listeners.append(queue)
        with _waiting(session):
            try:
                self.request(session_id, var, perf)
                if var.is_ready:  # finished (or set by the client) before this reader came
                    if var.error is None and var.value:
                        yield Published(var.value, len(var.token_logprobs))
                else:
                    if var.text_so_far:
                        yield Published(var.text_so_far, var.published_tokens)
                    # every delta published from here on is queued, then None once it is ready;
                    # the queue is drained to the end, so a reader that falls behind loses nothing
                    while (delta := await queue.get()) is not None:
                        yield delta
                if var.error is not None:
                    raise var.error
            finally:
                var.listeners.remove(queue)

    def submit_prompt(self, session_id: str, prompt: str, sampling: SamplingParams, tenant: str = "local",
                      prompt_shared: bool = False) -> str:
        """A call from raw prompt text (the OpenAI API): returns the output variable's id.
        prompt_shared: other calls of the session have the same prompt (n choices of it), so it is
        prefilled once and each call forks from it."""
        graph = self.session(session_id, tenant).graph
        self._check_room(graph, calls=1, variables=1)
        index = len(graph.calls)
        out = graph.add_variable(f"completion-{index}", "completion")
        segments = [TextSegment(prompt), Placeholder("completion", PlaceholderKind.OUTPUT, len(prompt))]
        call = graph.add_call(f"{session_id}:prompt-{index}", "completion", segments, {}, {"completion": out.var_id}, {"completion": sampling})
        call.prompt_shared = prompt_shared
        return out.var_id

    def check_logits_computed(self, feature: str) -> None:
        """Refuses a request for a feature of the logits (log probabilities, structured output) up
        front where an engine it could land on computes none."""
        lacking = [e.name for e in self.engines if not e.reports_logprobs]
        if lacking:
            raise UserError(f"engine(s) {', '.join(lacking)} compute no logits, so this server cannot give {feature}: "
                            "ask without it, or serve the model on built-in engines only")

    async def score_prompt(self, text: str, top: int, token_ids: list[int] | None = None) -> PromptLogprobs:
        """The prompt's log probabilities (OpenAI's echo), from the engine with the fewest jobs and
        scorings running (a list of prompts spreads over the engines); the next one where an
        engine is lost meanwhile. Not a call of the DAG: nothing depends on it."""
        engines = sorted((e for e in self.engines if e.reports_logprobs), key=lambda e: e.stats().running_jobs + self._scoring[e.name])
        if not engines:
            raise EngineUnavailableError("no engine that computes logits is registered to score the prompt: start one")
        *others, last = engines
        for engine in others:
            try:
                return await self._score_on(engine, text, top, token_ids)
            except EngineUnavailableError as exc:
                log.warning("scoring a prompt lost engine %s; trying the next: %s", engine.name, exc)
        return await self._score_on(last, text, top, token_ids)

    async def _score_on(self, engine: EngineBackend, text: str, top: int, token_ids: list[int] | None) -> PromptLogprobs:
        self._scoring[engine.name] += 1
        try:
            return await engine.score_prompt(text, top, token_ids)
        finally:
            self._scoring[engine.name] -= 1

    def add_engine(self, engine: EngineBackend) -> None:
        self.executor.add_engine(engine)
        self.engines = self.executor.engines

    def remove_engine(self, name: str) -> EngineBackend | None:
        return self.executor.remove_engine(name)

    def request(self, session_id: str, var: Variable, perf: Perf | None) -> None:
        graph = self.sessions[session_id].graph
        if perf is not None:
            var.requested = perf
        calls = deduce_objectives(graph, var, perf or Perf.THROUGHPUT) if perf else graph.upstream_calls(var)
        # producers first, so that App-FIFO order holds within the session too
        self.executor.activate_together(sorted(calls, key=lambda c: (c.depth, c.arrival)))

    # ---- calls ---------------------------------------------------------------

    def submit_call(self, session_id: str, call_id: str, spec: CallSpec, tenant: str = "local") -> None:
        graph = self.session(session_id, tenant).graph
        self._check_room(graph, calls=1)
        call_id = f"{session_id}:{call_id}"
        if call_id in graph.calls:
            raise UserError(f"call {call_id!r} already exists in this session")
        inputs = {b.name: b.var_id for b in spec.inputs}
        outputs = {b.name: b.var_id for b in spec.outputs}
        if len(inputs) + len(outputs) != len(spec.inputs) + len(spec.outputs) or set(inputs) & set(outputs):
            raise UserError(f"{spec.function}: each parameter is bound once, as an input or as an output")
        segments = check_placeholders(
            parse_template(spec.template, spec.function), spec.template, spec.function, placeholder_kinds(inputs, outputs)
        )
        graph.add_call(call_id, spec.function, segments, inputs, outputs, {b.name: b.sampling for b in spec.outputs})

    def dag(self, session_id: str, tenant: str = "local") -> DagInfo:
        graph = self.session(session_id, tenant).graph
        calls = [
            CallInfo(
                c.call_id, c.function, c.state.value, c.objective.value, c.task_group, c.depth, c.engine,
                {n: v.var_id for n, v in c.inputs.items()}, {n: v.var_id for n, v in c.outputs.items()},
            )
            for c in graph.calls.values()
        ]
        variables = [
            VariableInfo(v.var_id, v.name, v.is_ready, v.producer.call_id if v.producer else None, [c.call_id for c in v.consumers])
            for v in graph.variables.values()
        ]
        return DagInfo(session_id, calls, variables)

    def _record_dispatch(self, call: Call) -> None:
        session = self.sessions.get(call.call_id.split(":", 1)[0])
        if session is not None:
            session.dispatched.append(call.call_id)

    async def shutdown(self) -> None:
        await self.executor.drain()
        await asyncio.gather(*(e.close() for e in self.engines))
