"""The OpenAI chat API's tool calling, as far as this server takes it: the tools a request
offers, and the calls an answer makes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

EMPTY_PARAMETERS = {"type": "object", "properties": {}}


class ToolFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")
    description: str | None = Field(None, max_length=100_000)
    parameters: dict = Field(default_factory=lambda: dict(EMPTY_PARAMETERS))  # a JSON schema of the arguments


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"] = "function"
    function: ToolFunction


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    class Name(BaseModel):
        name: str

    type: Literal["function"] = "function"
    function: Name


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class WithoutNones(BaseModel):
    """Leaves unset fields out of the JSON, as OpenAI does in streamed tool calls: the openai SDK's
    stream helper takes a null type in a later piece for a new call of another type."""

    @model_serializer(mode="wrap")
    def _without_nones(self, handler):
        return {key: value for key, value in handler(self).items() if value is not None}


class FunctionCallDelta(WithoutNones):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(WithoutNones):
    """A streamed piece of a tool call: the first names it, the later ones add to its arguments."""

    index: int = 0
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta
