"""The semantic-variable graph of one session: variables, calls, and their edges.

GetProducer(sv) and GetConsumers(sv) are the graph's edges; a call is a node whose
inputs and outputs are variables.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from enum import Enum

from parrot.engine.outputs import TokenLogprobs
from parrot.engine.sampler import SamplingParams
from parrot.errors import NotFoundError, UserError
from parrot.frontend.template import Placeholder, PlaceholderKind, Segment
from parrot.manager.spec import Perf


class CallState(Enum):
    SUBMITTED = "submitted"  # known, not requested by anyone yet (lazy)
    WAITING = "waiting"  # requested; some input is not ready
    READY = "ready"  # all inputs ready, queued for an engine
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class Objective(Enum):
    """What the scheduler optimizes a call for, deduced from the DAG."""

    UNKNOWN = "unknown"
    LATENCY = "latency"
    THROUGHPUT = "throughput"


@dataclass(frozen=True)
class LoggedToken:
    token_id: int
    logprobs: TokenLogprobs | None  # None: a prompt's first token (OpenAI's echo), which nothing precedes


@dataclass(frozen=True)
class Published:
    """A piece of a variable's text as a streaming reader gets it."""

    text: str
    # token_logprobs entries whose text is in this piece or an earlier one: a reader sends a token's
    # log probabilities with its text, never before (a token whose text is held back may be
    # generated again by another engine, after its own engine is lost)
    logged_tokens: int


@dataclass(eq=False)
class Variable:
    var_id: str
    name: str
    value: str | None = None
    error: BaseException | None = None
    producer: Call | None = None
    consumers: list[Call] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    requested: Perf | None = None
    text_so_far: str = ""  # streamed while the producer generates
    num_tokens: int = 0
    # the last of those tokens whose text is not in text_so_far yet (an engine holds back the
    # start of a possible stop string, or a partial UTF-8 character): lost with their engine
    unstreamed_tokens: int = 0
    finish_reason: str | None = None
    # each generated token's id and log probabilities, where the call's sampling asked for them
    # (the OpenAI API's logprobs): one entry per token counted in num_tokens
    token_logprobs: list[LoggedToken] = field(default_factory=list)
    listeners: list[asyncio.Queue] = field(default_factory=list)  # streaming readers: Published deltas, then None
    published_tokens: int = 0  # token_logprobs entries whose text is in text_so_far

    def publish(self, delta: str) -> None:
        self.text_so_far += delta
        self.published_tokens = len(self.token_logprobs)
        for queue in self.listeners:
            queue.put_nowait(Published(delta, self.published_tokens))

    def mark_ready(self) -> None:
        self.ready.set()
        for queue in self.listeners:
            queue.put_nowait(None)

    @property
    def is_ready(self) -> bool:
        return self.ready.is_set()


@dataclass(eq=False)
class Call:
    call_id: str
    function: str
    segments: list[Segment]
    inputs: dict[str, Variable]  # placeholder name -> variable
    outputs: dict[str, Variable]
    sampling: dict[str, SamplingParams]  # output name -> settings
    arrival: int
    state: CallState = CallState.SUBMITTED
    objective: Objective = Objective.UNKNOWN
    task_group: str | None = None  # id of the consumer this call feeds together with its siblings
    depth: int = 0  # calls on the longest path from a source to here
    app_order: int = 0  # when the program first asked for it (calls asked for together share it): App-FIFO
    engine: str | None = None
    error: BaseException | None = None
    # its whole prompt is other calls' prompt too (n choices of one OpenAI prompt): the engine
    # prefills it once as a prefix and forks each call from it
    prompt_shared: bool = False

    @property
    def input_vars(self) -> list[Variable]:
        return list(self.inputs.values())

    @property
    def producers(self) -> list[Call]:
        return [v.producer for v in self.inputs.values() if v.producer is not None]

    @property
    def inputs_ready(self) -> bool:
        return all(v.is_ready for v in self.inputs.values())

    def placeholders(self) -> list[Placeholder]:
        return [s for s in self.segments if isinstance(s, Placeholder)]


class SVGraph:
    def __init__(self, session_id: str):
        self.session_id = session_id
        self.variables: dict[str, Variable] = {}
        self.calls: dict[str, Call] = {}
        self._arrivals = itertools.count()

    def variable(self, var_id: str) -> Variable:
        try:
            return self.variables[var_id]
        except KeyError:
            raise NotFoundError(f"unknown variable {var_id!r} in this session") from None

    def add_variable(self, var_id: str, name: str, value: str | None = None) -> Variable:
        if var_id in self.variables:
            raise UserError(f"variable {var_id!r} already exists")
        var = Variable(var_id, name)
        self.variables[var_id] = var
        if value is not None:
            self.set_value(var, value)
        return var

    def set_value(self, var: Variable, value: str) -> None:
        if var.is_ready:
            raise UserError(f"variable {var.name!r} already has a value; variables are set once")
        if var.producer is not None:
            raise UserError(f"variable {var.name!r} is produced by {var.producer.function}; it cannot be set")
        var.value = value
        var.mark_ready()

    def get_producer(self, var: Variable) -> Call | None:
        return var.producer

    def get_consumers(self, var: Variable) -> list[Call]:
        return list(var.consumers)

    def add_call(self, call_id: str, function: str, segments: list[Segment], inputs: dict[str, str], outputs: dict[str, str], sampling: dict[str, SamplingParams]) -> Call:
        in_vars = {name: self.variable(var_id) for name, var_id in inputs.items()}
        out_vars = {name: self.variable(var_id) for name, var_id in outputs.items()}
        if len(set(outputs.values())) != len(outputs):
            raise UserError(f"{function}: two outputs are bound to the same variable; a variable is produced once")
        for name, var in out_vars.items():
            if var.producer is not None:
                raise UserError(f"variable {var.name!r} is already the output of {var.producer.function}; a variable has one producer")
            if var.is_ready:
                raise UserError(f"variable {var.name!r} already has a value and cannot be an output of {function}")
        # only an output that something already consumes can close a cycle
        if any(var.consumers or var in in_vars.values() for var in out_vars.values()):
            ancestors = self._ancestor_vars(in_vars.values())
            for var in out_vars.values():
                if var in ancestors:
                    raise UserError(f"this call of {function} would make a cycle: its output {var.name!r} feeds its own inputs")
        call = Call(call_id, function, segments, in_vars, out_vars, sampling, next(self._arrivals))
        call.depth = 1 + max((p.depth for p in call.producers), default=0)
        for var in in_vars.values():
            var.consumers.append(call)
        for var in out_vars.values():
            var.producer = call
        self.calls[call_id] = call
        return call

    @staticmethod
    def _ancestor_vars(start) -> set[Variable]:
        seen: set[Variable] = set()
        stack = list(start)
        while stack:
            var = stack.pop()
            if var in seen:
                continue
            seen.add(var)
            if var.producer is not None:
                stack.extend(var.producer.input_vars)
        return seen

    def upstream_calls(self, var: Variable) -> list[Call]:
        """Every call the variable transitively depends on (iterative: chains can be long)."""
        found: list[Call] = []
        seen: set[str] = set()
        stack = [var]
        while stack:
            call = stack.pop().producer
            if call is None or call.call_id in seen:
                continue
            seen.add(call.call_id)
            found.append(call)
            stack.extend(call.input_vars)
        return found


def placeholder_kinds(inputs: dict[str, str], outputs: dict[str, str]) -> dict[str, PlaceholderKind]:
    kinds = {name: PlaceholderKind.INPUT for name in inputs}
    kinds.update({name: PlaceholderKind.OUTPUT for name in outputs})
    return kinds
