"""Payloads of the manager's session API (/api/v1)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from parrot.engine.sampler import (
    MAX_ALLOWED_TOKENS, MAX_BIASED_TOKENS, MAX_PENALTY, MAX_REPETITION_PENALTY, MAX_TOKENS_LIMIT, SamplingParams,
)
from parrot.engine.structured import MAX_SPEC_CHARS, StructuredOutput, StructureKind
from parrot.frontend.template import MAX_TEMPLATE_CHARS
from parrot.manager.spec import CallSpec, InputBinding, OutputBinding

MAX_VALUE_CHARS = 1_000_000
Id = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StructuredBody(Strict):
    """A JSON schema, regular expression or Lark grammar the output's text must match."""

    kind: Literal["json_schema", "regex", "lark"]
    spec: str = Field(min_length=1, max_length=MAX_SPEC_CHARS)
    resume_text: str = Field("", max_length=MAX_VALUE_CHARS)

    def to_structured(self) -> StructuredOutput:
        return StructuredOutput(StructureKind(self.kind), self.spec, self.resume_text)

    @classmethod
    def of(cls, structured: StructuredOutput | None) -> "StructuredBody | None":
        if structured is None:
            return None
        return cls(kind=structured.kind.value, spec=structured.spec, resume_text=structured.resume_text)


class SamplingBody(Strict):
    max_tokens: int = Field(128, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(0.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list, max_length=16)
    ignore_eos: bool = False
    presence_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    repetition_penalty: float = Field(1.0, gt=0.0, le=MAX_REPETITION_PENALTY)
    structured: StructuredBody | None = None
    stop_token_ids: list[int] = Field(default_factory=list, max_length=64)
    min_tokens: int = Field(0, ge=0, le=MAX_TOKENS_LIMIT)
    logit_bias: dict[int, float] = Field(default_factory=dict, max_length=MAX_BIASED_TOKENS)  # token id -> bias
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    allowed_token_ids: list[int] = Field(default_factory=list, max_length=MAX_ALLOWED_TOKENS)

    def to_params(self) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            seed=self.seed, stop=tuple(self.stop), ignore_eos=self.ignore_eos, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
            structured=self.structured.to_structured() if self.structured is not None else None,
            stop_token_ids=tuple(self.stop_token_ids), min_tokens=self.min_tokens, logit_bias=self.logit_bias,
            min_p=self.min_p, allowed_token_ids=tuple(self.allowed_token_ids),
        )

    @classmethod
    def of(cls, params: SamplingParams) -> "SamplingBody":
        return cls(
            max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
            seed=params.seed, stop=list(params.stop), ignore_eos=params.ignore_eos, presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty, repetition_penalty=params.repetition_penalty,
            structured=StructuredBody.of(params.structured), stop_token_ids=list(params.stop_token_ids), min_tokens=params.min_tokens,
            logit_bias=dict(params.logit_bias), min_p=params.min_p, allowed_token_ids=list(params.allowed_token_ids),
        )


class SessionCreated(Strict):
    session_id: str


class VariableCreate(Strict):
    var_id: str = Id
    name: str = Field("var", max_length=256)
    value: str | None = Field(None, max_length=MAX_VALUE_CHARS)


class VariableSet(Strict):
    value: str = Field(max_length=MAX_VALUE_CHARS)


class VariableFail(Strict):
    message: str = Field(max_length=10_000)


class VariableValue(Strict):
    var_id: str
    ready: bool
    value: str | None = None


class InputBody(Strict):
    name: str = Field(max_length=256)
    var_id: str = Id


class OutputBody(Strict):
    name: str = Field(max_length=256)
    var_id: str = Id
    sampling: SamplingBody = Field(default_factory=SamplingBody)


class CallSubmit(Strict):
    call_id: str = Id
    function: str = Field(max_length=256)
    template: str = Field(max_length=MAX_TEMPLATE_CHARS)
    inputs: list[InputBody] = Field(default_factory=list, max_length=1000)
    outputs: list[OutputBody] = Field(min_length=1, max_length=1000)

    def to_spec(self) -> CallSpec:
        return CallSpec(
            self.function,
            self.template,
            tuple(InputBinding(i.name, i.var_id) for i in self.inputs),
            tuple(OutputBinding(o.name, o.var_id, o.sampling.to_params()) for o in self.outputs),
        )

    @classmethod
    def of(cls, call_id: str, spec: CallSpec) -> "CallSubmit":
        return cls(
            call_id=call_id, function=spec.function, template=spec.template,
            inputs=[InputBody(name=i.name, var_id=i.var_id) for i in spec.inputs],
            outputs=[OutputBody(name=o.name, var_id=o.var_id, sampling=SamplingBody.of(o.sampling)) for o in spec.outputs],
        )


class CallInfoBody(Strict):
    call_id: str
    function: str
    state: str
    objective: str
    task_group: str | None
    depth: int
    engine: str | None
    inputs: dict[str, str]
    outputs: dict[str, str]


class VariableInfoBody(Strict):
    var_id: str
    name: str
    ready: bool
    producer: str | None
    consumers: list[str]


class DagBody(Strict):
    session_id: str
    calls: list[CallInfoBody]
    variables: list[VariableInfoBody]


class ErrorBody(BaseModel):
    message: str
    type: Literal["invalid_request_error", "not_found_error", "authentication_error", "server_error"]


class ErrorResponse(BaseModel):
    error: ErrorBody


class BatchOp(Strict):
    """One step of a batch: exactly one of its fields is set."""

    create_variable: VariableCreate | None = None
    set_variable: tuple[str, VariableSet] | None = None
    submit_call: CallSubmit | None = None


class Batch(Strict):
    """Operations applied in order in one request: a program's calls cost one round trip."""

    ops: list[BatchOp] = Field(min_length=1, max_length=10_000)


class BatchResult(Strict):
    applied: int
    error: str | None = None  # the first failing op's message; ops after it are not applied


class WaitRequest(Strict):
    """Apply buffered operations, then long-poll one variable: a program's only blocking round trip."""

    ops: list[BatchOp] = Field(default_factory=list, max_length=10_000)
    var_id: str = Id
    perf: Literal["latency", "throughput", "none"] = "latency"
    timeout: float = Field(30.0, ge=0, le=300)
