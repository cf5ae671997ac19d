"""Runs calls on engines the moment their inputs are ready, inside the manager.

A call is lowered to engine primitives on a fresh context: fill the text before
an output (constant text and input values), generate the output, and so on for
each output. When an output is set, its consumers are checked at once; no client
round trip sits between a producer and its consumer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from parrot.backends.base import EngineBackend
from parrot.errors import UserError
from parrot.frontend.template import Placeholder, PlaceholderKind, TextSegment
from parrot.manager.graph import Call, CallState, Objective, Variable
from parrot.manager.objectives import parallel_producers
from parrot.manager.policy import CHARS_PER_TOKEN, CallDemand, ClusterView, EngineLoad, ParrotPolicy, SchedulingPolicy
from parrot.manager.prefix_index import PrefixIndex, prefix_hashes

log = logging.getLogger(__name__)


class UpstreamError(UserError):
    """A call could not run because a call it depends on failed."""


# A constant prefix shorter than this is not worth a context of its own (about 64 tokens)
MIN_SHARED_PREFIX_CHARS = 256


def first_fill_text(call: Call) -> str:
    """The prompt text up to the call's first output (its inputs are ready)."""
    text = ""
    for segment in call.segments:
        if isinstance(segment, TextSegment):
            text += segment.text
        elif segment.kind is PlaceholderKind.INPUT:
            text += call.inputs[segment.name].value or ""
        else:
            break
    return text


def static_prefix(call: Call) -> str:
    """The function's constant text before its first placeholder: the same for every call."""
    prefix = ""
    for segment in call.segments:
        if not isinstance(segment, TextSegment):
            break
        prefix += segment.text
    return prefix


def call_demand(call: Call) -> CallDemand:
    text = first_fill_text(call)
    tokens = len(text) // CHARS_PER_TOKEN + sum(sampling.max_tokens for sampling in call.sampling.values())
    group_size = 1
    if call.task_group is not None:
        consumer = next((c for out in call.outputs.values() for c in out.consumers if c.call_id == call.task_group), None)
        if consumer is not None:
            group_size = max(1, len(parallel_producers(consumer)))
    return CallDemand(prefix_hashes(text), tokens, group_size)


class Executor:
    def __init__(self, engines: list[EngineBackend], on_dispatch: Callable[[Call], None] | None = None,
                 policy: SchedulingPolicy | None = None):
        self.policy = policy or ParrotPolicy()
        self.prefixes = PrefixIndex()
        self.engines: list[EngineBackend] = []
        self.view = ClusterView(self.engines, {}, self.prefixes)
        self._held: list[Call] = []  # ready calls the policy holds back (or no engine has registered)
        self._tokens: dict[str, int] = {}  # running call -> the KV tokens counted for it
        self._tasks: set[asyncio.Task] = set()
        self._on_dispatch = on_dispatch
        self.on_complete: list[Callable[[Call, float], None]] = []  # (call, seconds from start to end)

        for engine in engines:
            self.add_engine(engine)

    def add_engine(self, engine: EngineBackend) -> None:
        if any(e.name == engine.name for e in self.engines):
            raise UserError(f"an engine named {engine.name!r} is already registered")
        self.engines.append(engine)
        self.view.load.setdefault(engine.name, EngineLoad())  # kept across a re-registration: calls may still finish
        self._offer_held()

    def remove_engine(self, name: str) -> EngineBackend | None:
        engine = next((e for e in self.engines if e.name == name), None)
        if engine is not None:
            self.engines.remove(engine)
            self.prefixes.forget_engine(name)
            groups = self.view.group_engine
            for group in [g for g, e in groups.items() if e == name]:
                del groups[group]
        return engine

    def activate(self, call: Call) -> None:
        """The call's outputs are wanted: run it as soon as its inputs are ready."""
        if call.state is CallState.SUBMITTED:
            call.state = CallState.WAITING
        self._try_start(call)

    def on_variable_ready(self, var: Variable) -> None:
        for consumer in var.consumers:
            self._try_start(consumer)

    def _try_start(self, call: Call) -> None:
        if call.state is not CallState.WAITING:
            return
        failed = [v for v in call.input_vars if v.is_ready and v.error is not None]
        if failed:
            self._fail(call, UpstreamError(f"{call.function} cannot run: its input {failed[0].name!r} failed: {failed[0].error}"))
            return
        if not call.inputs_ready:
            return
        call.state = CallState.READY
        demand = call_demand(call)
        engine = self.policy.place(call, demand, self.view) if self.engines else None
        if engine is None:
            self._held.append(call)
            return
        self.prefixes.record(engine.name, demand.prompt_hashes)
        self.view.group_engine.pop(call.call_id, None)  # a consumer that starts ends the task group it named
        self._tokens[call.call_id] = demand.tokens
        call.engine = engine.name
        call.state = CallState.RUNNING
        self._count(engine.name, call, +1)
        if self._on_dispatch is not None:
            self._on_dispatch(call)
        task = asyncio.get_running_loop().create_task(self._run(call, engine))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _count(self, engine_name: str, call: Call, sign: int) -> None:
        tokens = self._tokens[call.call_id] if sign > 0 else self._tokens.pop(call.call_id, 0)
        load = self.view.load[engine_name]  # kept after an engine is removed: its calls still finish
        load.calls += sign
        load.tokens += sign * tokens
        if call.objective is Objective.LATENCY:
            load.latency_calls += sign

    def _offer_held(self) -> None:
        """Offers the held calls to the policy again (an engine joined or a call finished)."""
        held, self._held = self.policy.order(self._held), []
        for call in held:
            call.state = CallState.WAITING
            try:
                self._try_start(call)
            except Exception as exc:  # one call's failure must not strand the others
                log.exception("placing call %s (%s) failed", call.call_id, call.function)
                self._fail(call, exc)

    async def _run(self, call: Call, engine: EngineBackend) -> None:
        context_id = f"{call.call_id}"
        priority = self.policy.priority(call)
        started = time.perf_counter()
        created = False
        try:
            pending_text = ""
            for segment in call.segments:
                if isinstance(segment, TextSegment):
                    pending_text += segment.text
                    continue
                assert isinstance(segment, Placeholder)
                if segment.kind is PlaceholderKind.INPUT:
                    pending_text += call.inputs[segment.name].value or ""
                    continue
                if pending_text:
                    # a prompt without inputs (a raw OpenAI prompt) has no constant part shared by other calls
                    prefix_chars = len(static_prefix(call))
                    wanted = (self.policy.shares_static_prefixes and not created and prefix_chars < len(pending_text)
                              and prefix_chars >= MIN_SHARED_PREFIX_CHARS)
                    shared = prefix_chars if wanted else 0
                    await engine.fill(context_id, None, pending_text, priority, shared_prefix_chars=shared)
                    created = True
                    pending_text = ""
                output = call.outputs[segment.name]
                pieces: list[str] = []
                async for token in engine.generate(context_id, call.sampling[segment.name], priority):
                    pieces.append(token.text)
                    output.num_tokens += 1
                    output.publish(token.text)
                    if token.finish_reason is not None:
                        output.finish_reason = token.finish_reason.value
                output.value = "".join(pieces)
                output.mark_ready()
                self.on_variable_ready(output)
            call.state = CallState.DONE
            for hook in self.on_complete:
                hook(call, time.perf_counter() - started)
        except Exception as exc:
            if not isinstance(exc, UserError):
                log.exception("call %s (%s) failed on %s", call.call_id, call.function, engine.name)
            self._fail(call, exc)
        except asyncio.CancelledError:
            self._fail(call, UserError(f"{call.function} was cancelled: the server is shutting down"))
            raise
        finally:
            if created:
                try:
                    await engine.free_context(context_id)
                except Exception:
                    log.exception("freeing context %s on %s failed", context_id, engine.name)
            self._count(engine.name, call, -1)
            if self._held:
                self._offer_held()

    def _fail(self, call: Call, error: BaseException) -> None:
        call.state = CallState.FAILED
        call.error = error
        for output in call.outputs.values():
            if not output.is_ready:
                output.error = error
                output.mark_ready()
                self.on_variable_ready(output)

    async def drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
