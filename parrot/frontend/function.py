"""Semantic functions (prompt templates whose outputs are variables) and native functions."""

from __future__ import annotations

import difflib
import inspect
import logging
import sys
import threading
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, fields

from parrot.engine.sampler import SamplingParams
from parrot.errors import UserError
from parrot.frontend import runtime as runtime_module
from parrot.frontend.template import Placeholder, PlaceholderKind, check_placeholders, parse_template
from parrot.frontend.variable import LATENCY, SemanticVariable
from parrot.manager.spec import CallSpec, InputBinding, OutputBinding, Perf

log = logging.getLogger(__name__)


class Input:
    """Annotation of a parameter that takes text in."""


@dataclass(frozen=True)
class Output(SamplingParams):
    """Annotation of a parameter the model generates: its sampling settings
    (max_tokens, temperature, top_p, top_k, seed, stop, ignore_eos, presence_penalty,
    frequency_penalty, repetition_penalty, stop_token_ids, min_tokens, logit_bias, min_p,
    allowed_token_ids, structured), checked at once."""

    def __new__(cls, *args, **settings):
        known = [f.name for f in fields(cls)]
        for name in settings:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise UserError(f"P.Output has no setting {name!r}: {hint}it takes {', '.join(known)}")
        return super().__new__(cls)

    def sampling(self) -> SamplingParams:
        return SamplingParams(**{f.name: getattr(self, f.name) for f in fields(self)})


def _kind_of(annotation) -> tuple[PlaceholderKind | None, Output | None]:
    if annotation is Input or isinstance(annotation, Input):
        return PlaceholderKind.INPUT, None
    if annotation is Output:
        return PlaceholderKind.OUTPUT, Output()
    if isinstance(annotation, Output):
        return PlaceholderKind.OUTPUT, annotation
    return None, None  # P.SemanticVariable, unannotated: the template says


def _as_variable(client, name: str, value) -> SemanticVariable:
    if isinstance(value, SemanticVariable):
        if value.client is not client:
            raise UserError(f"variable {value.name!r} belongs to another runtime")
        return value
    var = SemanticVariable(client, name)
    client.create_variable(var.var_id, name, str(value))
    return var


class SemanticFunction:
    def __init__(self, fn, name: str | None = None, scope: dict | None = None):
        """`scope`: the names visible where the function was defined, for annotations written as
        text (`from __future__ import annotations`) that name a local, such as a `P.Output(...)`
        built inside a function."""
        self.name = name or fn.__name__
        self.template = inspect.cleandoc(fn.__doc__ or "")
        if not self.template:
            raise UserError(f"semantic function {self.name} needs a docstring: it is the prompt template")
        try:
            self.signature = inspect.signature(fn, locals=scope, eval_str=True)
        except NameError as exc:
            raise UserError(f"semantic function {self.name}: an annotation names something not defined where the "
                            f"function is: {exc}") from exc
        declared = {p: _kind_of(param.annotation) for p, param in self.signature.parameters.items()}
        segments = check_placeholders(
            parse_template(self.template, self.name), self.template, self.name, {p: k for p, (k, _) in declared.items()}
        )
        self.kinds = {s.name: s.kind for s in segments if isinstance(s, Placeholder)}
        self.output_settings = {p: out or Output() for p, (_, out) in declared.items() if self.kinds.get(p) is PlaceholderKind.OUTPUT}
        self.output_order = [p for p in self.kinds if self.kinds[p] is PlaceholderKind.OUTPUT]

    def __call__(self, *args, **kwargs):
        client = runtime_module.current()
        try:
            bound = self.signature.bind_partial(*args, **kwargs)
        except TypeError as exc:
            raise UserError(f"{self.name}: {exc}") from None
        inputs, outputs = [], []
        for param, kind in self.kinds.items():
            given = bound.arguments.get(param)
            if kind is PlaceholderKind.INPUT:
                default = self.signature.parameters[param].default
                if param not in bound.arguments:
                    if default is inspect.Parameter.empty:
                        raise UserError(f"{self.name}: missing input {param!r}")
                    given = default  # an input with a default takes it where the call leaves it out
                inputs.append(InputBinding(param, _as_variable(client, param, given).var_id))
        result: list[SemanticVariable] = []
        for param in self.output_order:
            given = bound.arguments.get(param)
            if given is not None and not isinstance(given, SemanticVariable):
                raise UserError(f"{self.name}: output {param!r} takes a variable to fill or nothing, not {type(given).__name__}")
            var = given or SemanticVariable(client, param)
            if given is None:
                client.create_variable(var.var_id, param, None)
            outputs.append(OutputBinding(param, var.var_id, self.output_settings[param].sampling()))
            result.append(var)
        spec = CallSpec(self.name, self.template, tuple(inputs), tuple(outputs))
        client.submit_call(f"c-{uuid.uuid4().hex[:16]}", spec)
        return result[0] if len(result) == 1 else tuple(result)


def semantic_function(name: str | None = None):
    """Decorator: the function's docstring is a prompt template with input and output placeholders."""
    # the decorator's caller is where the function is defined: its locals may name annotations
    scope = dict(sys._getframe(1).f_locals)
    if callable(name):
        return SemanticFunction(name, scope=scope)
    return lambda fn: SemanticFunction(fn, name, scope)


class NativeFunction:
    """A Python function over semantic variables, run in this process when its inputs are ready."""

    def __init__(self, fn, perf: Perf):
        self.fn = fn
        self.name = fn.__name__
        self.perf = perf
        self.signature = inspect.signature(fn, eval_str=True)
        self.outputs = [p for p, param in self.signature.parameters.items() if _kind_of(param.annotation)[0] is PlaceholderKind.OUTPUT]
        if not self.outputs:
            raise UserError(f"native function {self.name} needs at least one parameter annotated P.Output")

    def __call__(self, *args, **kwargs):
        client = runtime_module.current()
        try:
            bound = self.signature.bind_partial(*args, **kwargs)
        except TypeError as exc:
            raise UserError(f"{self.name}: {exc}") from None
        for param, spec in self.signature.parameters.items():  # inputs' defaults, where the call leaves them out
            if param not in self.outputs and param not in bound.arguments and spec.default is not inspect.Parameter.empty:
                bound.arguments[param] = spec.default
        inputs = {p: _as_variable(client, p, v) for p, v in bound.arguments.items() if p not in self.outputs}
        missing = [p for p in self.signature.parameters if p not in self.outputs and p not in inputs]
        if missing:
            raise UserError(f"{self.name}: missing input(s) {', '.join(missing)}")
        outs = []
        for param in self.outputs:
            var = SemanticVariable(client, param)
            client.create_variable(var.var_id, param, None)
            outs.append(var)
        done: Future = Future()
        for var in outs:
            var.native_result = done
        threading.Thread(target=self._run, args=(client, inputs, outs, done), name=f"native-{self.name}", daemon=True).start()
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _run(self, client, inputs: dict[str, SemanticVariable], outs: list[SemanticVariable], done: Future) -> None:
        try:
            values = {p: v.get(perf=self.perf) for p, v in inputs.items()}
            # output parameters only declare the outputs: the function returns their values
            unset = {p: None for p in self.outputs if self.signature.parameters[p].default is inspect.Parameter.empty}
            result = self.fn(**values, **unset)
            results = result if isinstance(result, tuple) else (result,)
            if len(results) != len(outs):
                raise UserError(f"native function {self.name} returned {len(results)} value(s) for {len(outs)} output(s)")
            for var, value in zip(outs, results):
                client.set_variable(var.var_id, str(value))
            client.flush()  # the program may be waiting on a consumer of these values, not on them
            done.set_result(None)
        except BaseException as exc:
            for var in outs:
                try:
                    client.fail_variable(var.var_id, f"native function {self.name} failed: {exc!r}")
                except UserError as closed:  # the program closed its runtime while this ran: nobody waits on the value
                    log.info("native function %s ended after its runtime: %s", self.name, closed)
                    break
                except Exception:
                    log.exception("could not mark %s as failed", var.name)
            done.set_exception(exc)


def native_function(fn=None, *, perf: Perf = LATENCY):
    """Decorator: parameters annotated P.Output are returned (in order) as variables."""
    if fn is None:
        return lambda f: NativeFunction(f, perf)
    return NativeFunction(fn, perf)
