"""Runs calls on engines the moment their inputs are ready, inside the manager.

A call is lowered to engine primitives on a fresh context: fill the text before
an output (constant text and input values), generate the output, and so on for
each output. When an output is set, its consumers are checked at once; no client
round trip sits between a producer and its consumer.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass, replace

from parrot.backends.base import EngineBackend
from parrot.engine.llm_engine import FinishReason
from parrot.engine.sampler import StopChecker
from parrot.errors import EngineUnavailableError, UserError
from parrot.frontend.template import Placeholder, TextSegment
from parrot.manager.graph import Call, CallState, LoggedToken, Objective, Variable
from parrot.manager.objectives import parallel_producers
from parrot.manager.policy import (
    CHARS_PER_TOKEN, CallDemand, ClusterView, EngineLoad, ParrotPolicy, SchedulingPolicy, held_prompt_tokens,
)
from parrot.manager.prefix_index import PrefixIndex, prefix_hashes

log = logging.getLogger(__name__)


class UpstreamError(UserError):
    """A call could not run because a call it depends on failed."""


# A constant prefix shorter than this is not worth a context of its own (about 64 tokens)
MIN_SHARED_PREFIX_CHARS = 256
# A call whose engine fails is re-run elsewhere, but not for ever: a prompt that kills
# every engine it reaches must not take the cluster down one engine at a time
MAX_ENGINE_FAULTS = 2


@dataclass
class RunningCall:
    call: Call
    engine: EngineBackend
    task: asyncio.Task
    engine_lost: bool = False  # the engine was dropped while the call ran: re-run it elsewhere
    cancel_reason: str | None = None  # the manager cancelled it (its session closed or expired)


def known_text(call: Call, placeholder: Placeholder) -> str:
    """What a placeholder puts into the prompt before the call generates anything for it: an
    input's value, an output's value once done, else what a failed engine streamed of the
    output (generation continues after it; empty on a first run)."""
    output = call.outputs.get(placeholder.name)
    if output is None:
        return call.inputs[placeholder.name].value or ""
    return (output.value or "") if output.is_ready else output.text_so_far


def to_generate(output: Variable | None) -> bool:
    """An output the call still generates: not done, and its last token not come yet."""
    return output is not None and not output.is_ready and output.finish_reason is None


def first_fill_text(call: Call) -> str:
    """The prompt text the call's first fill sends (its inputs are ready): up to its first output
    still to generate. A call run again after its engine failed sends more (Executor._run): the
    outputs that engine finished, and what it streamed of the next, which generation continues."""
    text = ""
    for segment in call.segments:
        if isinstance(segment, TextSegment):
            text += segment.text
            continue
        text += known_text(call, segment)
        if to_generate(call.outputs.get(segment.name)):
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
    prompt_tokens = len(text) // CHARS_PER_TOKEN
    # a call run again after its engine failed generates only what is left of its outputs
    # (the rest is in its prompt now)
    outputs = [(call.outputs[name], sampling.max_tokens) for name, sampling in call.sampling.items()]
    left = [max(most - (out.num_tokens - out.unstreamed_tokens), 0) for out, most in outputs if to_generate(out)]
    tokens = prompt_tokens + sum(left)
    group_size = 1
    if call.task_group is not None:
        consumer = next((c for out in call.outputs.values() for c in out.consumers if c.call_id == call.task_group), None)
        if consumer is not None:
            group_size = max(1, len(parallel_producers(consumer)))
    return CallDemand(prefix_hashes(text), tokens, group_size, prompt_tokens=prompt_tokens)


class Executor:
    def __init__(self, engines: list[EngineBackend], on_dispatch: Callable[[Call], None] | None = None,
                 policy: SchedulingPolicy | None = None):
        self.policy = policy or ParrotPolicy()
        self.prefixes = PrefixIndex()
        self.engines: list[EngineBackend] = []
        self.view = ClusterView(self.engines, {}, self.prefixes)
        self._held: list[Call] = []  # ready calls the policy holds back (or no engine has registered)
        # a held call's demand, kept: held calls are offered again at every first token and call end
        self._held_demands: dict[str, CallDemand] = {}
        self._tokens: dict[str, int] = {}  # running call -> the KV tokens counted for it
        self._unfilled: dict[str, int] = {}  # running call before its first token -> its prompt tokens
        self._tasks: set[asyncio.Task] = set()
        self._running: dict[str, RunningCall] = {}
        self._failed_on: dict[str, list[EngineBackend]] = {}  # call -> engines that failed it
        self._on_dispatch = on_dispatch
        self._app_orders = itertools.count(1)
        self._app_places: dict[int, int] = {}  # app order -> its place among the throughput apps in flight
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
            groups = self.view.group_engines
            for group in [g for g, names in groups.items() if name in names]:
                groups[group] = [n for n in groups[group] if n != name]
                if not groups[group]:
                    del groups[group]
            for running in self._running.values():
                if running.engine is engine:
                    running.engine_lost = True
                    running.task.cancel()
        return engine

    def activate_together(self, calls: list[Call]) -> None:
        """Activates calls one request of the program asked for: they share an app order
        (App-FIFO between the apps' throughput work), unless asked for before."""
        order = next(self._app_orders)
        for call in calls:
            if not call.app_order:
                call.app_order = order
            self.activate(call)

    def _app_place(self, call: Call) -> int:
        """The place of the call's app among the apps with throughput work placed or held. An app
        keeps its place while it has work in flight, so an engine's running jobs never see a
        later app overtake an earlier one; a new app comes after every earlier one still in flight."""
        if call.objective is not Objective.THROUGHPUT:
            return 0
        waiting = itertools.chain((r.call for r in self._running.values()), self._held)
        in_flight = {c.app_order for c in waiting if c.objective is Objective.THROUGHPUT}
        for order in [o for o in self._app_places if o not in in_flight and o != call.app_order]:
            del self._app_places[order]
        if call.app_order not in self._app_places:
            earlier = [place for order, place in self._app_places.items() if order < call.app_order]
            self._app_places[call.app_order] = max(earlier) + 1 if earlier else 0
        return self._app_places[call.app_order]

    def activate(self, call: Call) -> None:
        """The call's outputs are wanted: run it as soon as its inputs are ready."""
        if call.state is CallState.SUBMITTED:
            call.state = CallState.WAITING
        elif call in self._held:
            # asked for again (its objective may have changed: a throughput call now latency-critical): placed anew
            self._held.remove(call)
            self._held_demands.pop(call.call_id, None)
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
            # an engine outage stays one (503: resubmit later) through the calls that depend on it
            kind = EngineUnavailableError if isinstance(failed[0].error, EngineUnavailableError) else UpstreamError
            self._fail(call, kind(f"{call.function} cannot run: its input {failed[0].name!r} failed: {failed[0].error}"))
            return
        if not call.inputs_ready:
            return
        call.state = CallState.READY
        failed_on = self._failed_on.get(call.call_id, [])
        engines = [e for e in self.engines if e not in failed_on]
        if failed_on and not engines:
            self._fail(call, EngineUnavailableError(
                f"{call.function} cannot run: engine {failed_on[-1].name} failed while running it and no other engine "
                "serves the model; resubmit once an engine is back"))
            return
        view = self.view if len(engines) == len(self.engines) else replace(self.view, engines=engines)
        demand = self._held_demands.pop(call.call_id, None) or call_demand(call)
        engine = self.policy.place(call, demand, view) if engines else None
        if engine is None:
            self._held.append(call)
            self._held_demands[call.call_id] = demand
            return
        # a choice whose prompt another choice already brought to this engine forks from it: its
        # prompt is neither computed nor held again
        held = min(held_prompt_tokens(self.prefixes.longest_match(demand.prompt_hashes), engine), demand.prompt_tokens) \
            if call.prompt_shared else 0
        self.prefixes.record(engine.name, demand.prompt_hashes)
        self.view.group_engines.pop(call.call_id, None)  # a consumer that starts ends the task group it named
        self._tokens[call.call_id] = demand.tokens - held
        self._unfilled[call.call_id] = demand.prompt_tokens - held
        call.engine = engine.name
        call.state = CallState.RUNNING
        self._count(engine.name, call, +1)
        if self._on_dispatch is not None:
            self._on_dispatch(call)
        task = asyncio.get_running_loop().create_task(self._run(call, engine))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._running[call.call_id] = RunningCall(call, engine, task)

    def _count(self, engine_name: str, call: Call, sign: int) -> None:
        tokens = self._tokens[call.call_id] if sign > 0 else self._tokens.pop(call.call_id, 0)
        load = self.view.load[engine_name]  # kept after an engine is removed: its calls still finish
        load.calls += sign
        load.tokens += sign * tokens
        if sign > 0:
            load.unfilled_tokens += self._unfilled[call.call_id]
        else:
            self._prefilled(engine_name, call)
        if call.objective is Objective.LATENCY:
            load.latency_calls += sign

    def _prefilled(self, engine_name: str, call: Call) -> None:
        """The call's first token came (or it ended without one): its prompt left the engine's queue."""
        self.view.load[engine_name].unfilled_tokens -= self._unfilled.pop(call.call_id, 0)

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
        priority = self.policy.priority(call, self._app_place(call))
        started = time.perf_counter()
        created = filling = False
        rerun = False
        try:
            pending_text = ""
            for segment in call.segments:
                if isinstance(segment, TextSegment):
                    pending_text += segment.text
                    continue
                assert isinstance(segment, Placeholder)
                output = call.outputs.get(segment.name)
                # an input, an output a failed engine finished, or what it streamed of this one
                # (kept: generation continues after it)
                pending_text += known_text(call, segment)
                if not to_generate(output):
                    if output is not None and not output.is_ready:  # its last token came, then its engine was lost
                        self._output_done(output, output.text_so_far)
                    continue
                streamed = output.text_so_far
                if pending_text:
                    # a prompt without inputs (a raw OpenAI prompt) has no constant part shared by other
                    # calls, unless other calls have the same prompt; what an output streamed is its own
                    prompt_chars = len(pending_text) - len(streamed)
                    prefix_chars = prompt_chars if call.prompt_shared else len(static_prefix(call))
                    wanted = (self.policy.shares_static_prefixes and not created and prefix_chars >= MIN_SHARED_PREFIX_CHARS
                              and (call.prompt_shared or prefix_chars < prompt_chars))
                    shared = prefix_chars if wanted else 0
                    filling = True  # a fill cut short by a cancel may have created the context: free it then
                    # the output's generate comes next: an engine may compute the prompt in its steps
                    await engine.fill(context_id, None, pending_text, priority, shared_prefix_chars=shared, then_generate=True)
                    created, filling = True, False
                    pending_text = ""
                await self._generate(call, segment.name, engine, context_id, priority)
            call.state = CallState.DONE
            for hook in self.on_complete:
                hook(call, time.perf_counter() - started)
        except EngineUnavailableError as exc:
            created = False  # nothing to free on an engine that is gone
            rerun = self._engine_fault(call, engine, exc)
        except Exception as exc:
            if not isinstance(exc, UserError):
                log.exception("call %s (%s) failed on %s", call.call_id, call.function, engine.name)
            self._fail(call, exc)
            created = created or filling  # a fill that failed part-way may have left its context
        except asyncio.CancelledError:
            running = self._running.get(call.call_id)
            if running is not None and running.engine_lost:
                created = False
                rerun = self._engine_fault(call, engine, EngineUnavailableError(f"engine {engine.name} was dropped: it missed its heartbeats"))
            elif running is not None and running.cancel_reason is not None:
                self._fail(call, UserError(running.cancel_reason))  # our own cancel: the task ends here
                created = created or filling
            else:
                self._fail(call, UserError(f"{call.function} was cancelled: the server is shutting down"))
                raise
        finally:
            self._running.pop(call.call_id, None)
            if created:
                try:
                    await engine.free_context(context_id)
                except UserError as exc:  # a failed or cancelled fill that had not created it yet
                    log.info("context %s on %s was not there to free: %s", context_id, engine.name, exc)
                except Exception:
                    log.exception("freeing context %s on %s failed", context_id, engine.name)
            self._count(engine.name, call, -1)
            if not rerun:
                self._failed_on.pop(call.call_id, None)
            if self._held:
                self._offer_held()
        if rerun:
            self._try_start(call)

    async def _generate(self, call: Call, name: str, engine: EngineBackend, context_id: str, priority: int) -> None:
        output = call.outputs[name]
        # after an engine fault the output continues from what the failed engine streamed (the
        # context holds it): readers already have it, and a generation from the start could
        # differ from it (a near tie sampled apart by another engine's numerics)
        text = output.text_so_far
        sampling = call.sampling[name]
        stops = None
        # tokens whose text the lost engine held back are generated again after the streamed text
        output.num_tokens -= output.unstreamed_tokens
        output.unstreamed_tokens = 0
        del output.token_logprobs[output.num_tokens :]
        if output.num_tokens:
            if output.num_tokens >= sampling.max_tokens:
                output.finish_reason = FinishReason.LENGTH.value
                self._output_done(output, text)
                return
            sampling = replace(sampling, max_tokens=sampling.max_tokens - output.num_tokens,
                               min_tokens=max(0, sampling.min_tokens - output.num_tokens))
            if sampling.structured is not None:  # the new engine's grammar takes in what the output holds
                sampling = replace(sampling, structured=replace(sampling.structured, resume_text=text))
            if sampling.stop:
                # the streamed text may end in the start of a stop string (the failed engine held back
                # only the longest such tail), which the new engine, seeing it as prompt, never checks
                stops = StopChecker(sampling.stop, text=text, emitted=len(text))
        async with aclosing(engine.generate(context_id, sampling, priority)) as tokens:
            async for token in tokens:
                if call.call_id in self._unfilled:  # the first token: the prompt was computed
                    self._prefilled(engine.name, call)
                    if self._held:
                        self._offer_held()  # throughput work may wait for this engine's queue to drain
                output.num_tokens += 1
                if token.logprobs is not None:
                    output.token_logprobs.append(LoggedToken(token.token_id, token.logprobs))
                delta = token.text if stops is None else stops.feed(token.text)
                if delta:
                    text += delta
                    output.publish(delta)
                    output.unstreamed_tokens = 0
                else:
                    output.unstreamed_tokens += 1
                if token.finish_reason is not None:
                    output.finish_reason = token.finish_reason.value
                if stops is not None and stops.stopped:
                    output.finish_reason = FinishReason.STOP.value
                    break
        if stops is not None and (rest := stops.flush()):
            text += rest
            output.publish(rest)
        self._output_done(output, text)

    def _output_done(self, output: Variable, text: str) -> None:
        output.value = text
        output.mark_ready()
        self.on_variable_ready(output)

    def _engine_fault(self, call: Call, engine: EngineBackend, error: EngineUnavailableError) -> bool:
        """Records that the engine failed the call; True when the call should run again elsewhere."""
        failed_on = self._failed_on.setdefault(call.call_id, [])
        failed_on.append(engine)
        if len(failed_on) > MAX_ENGINE_FAULTS:
            log.error("call %s (%s) failed on %d engines; giving up: %s", call.call_id, call.function, len(failed_on), error)
            self._fail(call, EngineUnavailableError(f"{call.function} failed on {len(failed_on)} engines in turn; the last: {error}"))
            return False
        log.warning("call %s (%s) lost its engine; running it again elsewhere: %s", call.call_id, call.function, error)
        call.state = CallState.WAITING
        return True

    def cancel(self, calls: list[Call], reason: str) -> None:
        """Stops the calls (their engine contexts are freed) and fails their outputs with reason."""
        ids = {call.call_id for call in calls}
        self._held = [call for call in self._held if call.call_id not in ids]  # failed below: _fail drops their demands
        for call in calls:
            running = self._running.get(call.call_id)
            if running is not None:
                running.cancel_reason = reason
                running.task.cancel()
            elif call.state not in (CallState.DONE, CallState.FAILED):
                self._fail(call, UserError(reason))

    def fail_held(self, error: BaseException) -> None:
        """Fails every call held back (no engine to take it, or the policy waits): they would
        wait for an engine that will not come."""
        held, self._held = self._held, []
        for call in held:
            self._fail(call, error)

    def _fail(self, call: Call, error: BaseException) -> None:
        self._held_demands.pop(call.call_id, None)
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
