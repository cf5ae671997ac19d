"""The subset of the OpenAI completions and chat API the manager speaks."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from parrot.engine.sampler import (
    MAX_ALLOWED_TOKENS, MAX_BIASED_TOKENS, MAX_LOGPROBS, MAX_PENALTY, MAX_REPETITION_PENALTY, MAX_TOKENS_LIMIT, SamplingParams,
)
from parrot.engine.structured import StructuredOutput, StructureKind
from parrot.engine.tokenizer import ChatMessage
from parrot.errors import UserError
from parrot.protocol.manager_api import MAX_VALUE_CHARS
from parrot.protocol.openai_tools import NamedToolChoice, Tool, ToolCall, ToolCallDelta

# choices in one answer: prompts (a completion may take a list) times n
MAX_CHOICES_PER_REQUEST = 64


# vLLM's structured_outputs options that tune its grammar backends rather than say what the text is
VLLM_STRUCTURE_OPTIONS = ("disable_fallback", "disable_any_whitespace", "disable_additional_properties", "whitespace_pattern")


def _json_schema(schema: object) -> StructuredOutput:
    if not isinstance(schema, dict):
        raise UserError(f"a JSON schema for structured output is a JSON object, not {type(schema).__name__}")
    return StructuredOutput(StructureKind.JSON_SCHEMA, json.dumps(schema))


class Lenient(BaseModel):
    # fields no server acts on (user, metadata, store, ...) and other servers' extensions are
    # ignored; the OpenAI fields that would change the answer are named below
    model_config = ConfigDict(extra="ignore")


class StreamOptions(Lenient):
    include_usage: bool = False  # a last chunk, with no choices, carries the request's usage


class SamplingFields(Lenient):
    model: str
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension; -1 or 0 keep every token
    n: int | None = Field(None, ge=1, le=MAX_CHOICES_PER_REQUEST)  # choices per prompt, sampled apart from one prefill
    stop: str | list[str] | None = None
    # choice j of n samples with seed + j: room for every choice within the generator's 64-bit seed
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1 - MAX_CHOICES_PER_REQUEST)
    stream: bool | None = False  # null, as some clients send it, is false
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens
    presence_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    repetition_penalty: float | None = Field(None, gt=0.0, le=MAX_REPETITION_PENALTY)  # vLLM's extension
    # vLLM's extensions: token ids that end the output (not in its text), and the tokens generated
    # before the end-of-sequence token or a stop token id may come
    stop_token_ids: list[int] | None = Field(None, max_length=64)
    min_tokens: int = Field(0, ge=0, le=MAX_TOKENS_LIMIT)
    # token ids (strings, as JSON keys are) -> a bias from -100 to 100 added to the token's logit
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_BIASED_TOKENS)
    min_p: float | None = Field(None, ge=0.0, le=1.0)  # vLLM's extension
    allowed_token_ids: list[int] | None = Field(None, max_length=MAX_ALLOWED_TOKENS)  # vLLM's extension
    # OpenAI fields this server does not implement: taken at their neutral values (clients send
    # those), refused otherwise (`unsupported`), since an answer that ignored them would be wrong
    # without saying so
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None
    response_format: dict | None = None  # text, json_object, or json_schema with its schema
    # vLLM's extensions for structured output: one of json (a schema), regex, choice, grammar (Lark)
    structured_outputs: dict | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None

    @model_validator(mode="after")
    def _fields_that_need_another(self) -> "SamplingFields":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only taken with stream: true")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ValueError("allowed_token_ids is empty: list the token ids that may come, or leave it out")
        return self

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=self.asked_max_tokens or default_max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0),
            seed=self.seed,
            stop=tuple(s for s in stops if s),
            ignore_eos=self.ignore_eos,
            logprobs=self.wanted_logprobs(),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            structured=self.structured(),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            min_tokens=self.min_tokens,
            logit_bias=self.logit_bias or {},
            min_p=self.min_p or 0.0,
            allowed_token_ids=tuple(self.allowed_token_ids or ()),
        )

    def structured(self) -> StructuredOutput | None:
        """What the text must match, from response_format or vLLM's fields; None: free text."""
        asked: dict[str, StructuredOutput] = {}
        if self.response_format is not None and (kind := self.response_format.get("type", "text")) != "text":
            if kind == "json_object":
                asked["response_format"] = StructuredOutput.json_object()
            elif kind == "json_schema":
                spec = self.response_format.get("json_schema")
                schema = spec.get("schema") if isinstance(spec, dict) else None
                if not isinstance(schema, dict):
                    raise UserError('response_format json_schema takes {"json_schema": {"name": ..., "schema": {...}}}: give its schema')
                asked["response_format"] = _json_schema(schema)
            else:
                raise UserError(f"response_format type {kind!r} is not one this server takes: use text, json_object or json_schema")
        vllm = dict(self.structured_outputs or {})
        for field, value in (("json", self.guided_json), ("regex", self.guided_regex), ("choice", self.guided_choice),
                             ("grammar", self.guided_grammar)):
            if value is not None:
                vllm[field] = value
        for field, value in vllm.items():
            if value is None or value is False:
                continue
            if field in VLLM_STRUCTURE_OPTIONS:  # how vLLM's backends go about it: nothing to hold the text to
                continue
            if field == "json_object":
                asked["structured_outputs.json_object"] = StructuredOutput.json_object()
            elif field == "json":
                try:
                    schema = json.loads(value) if isinstance(value, str) else value
                except ValueError as exc:
                    raise UserError(f"structured_outputs.json is not JSON: {exc}") from exc
                asked["structured_outputs.json"] = _json_schema(schema)
            elif field in ("regex", "grammar"):
                if not isinstance(value, str):
                    raise UserError(f"structured_outputs.{field} is a string, not {type(value).__name__}")
                kind = StructureKind.REGEX if field == "regex" else StructureKind.LARK
                asked[f"structured_outputs.{field}"] = StructuredOutput(kind, value)
            elif field == "choice":
                if not isinstance(value, list) or not all(isinstance(option, str) for option in value):
                    raise UserError("structured_outputs.choice is a list of strings, the answers allowed")
                asked["structured_outputs.choice"] = StructuredOutput.choice(value)
            else:
                raise UserError(f"structured_outputs.{field} is not one this server takes: use json, json_object, regex, "
                                "choice or grammar")
        if len(asked) > 1:
            raise UserError(f"give one structure for the output, not {len(asked)}: {', '.join(asked)}")
        return next(iter(asked.values()), None)

    def wanted_logprobs(self) -> int | None:
        """How many alternatives each generated token's log probability comes with; None: no log probabilities."""
        return None

    @property
    def asked_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def unsupported(self) -> list[str]:
        """The fields asked for at a value this server cannot honour."""
        asked = {
            "echo": bool(self.echo),
            "best_of": self.best_of not in (None, 1),
            "suffix": bool(self.suffix),
            "tools": bool(self.tools) or bool(self.functions),
            "tool_choice": self.tool_choice not in (None, "none", "auto"),
        }
        return [name for name, is_asked in asked.items() if is_asked]


class CompletionRequest(SamplingFields):
    # text, a list of texts, or (vLLM's extension, what lm-eval sends by default) token ids or a list of them
    prompt: str | list[str] | list[int] | list[list[int]] = Field(max_length=MAX_VALUE_CHARS)
    # each generated token's log probability, with this many most likely alternatives (0: none);
    # false, which clients send for none, is none
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | bool | None = None
    max_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS_LIMIT)  # 0: the prompt alone, with echo

    @model_validator(mode="after")
    def _nothing_to_generate_only_with_echo(self) -> "CompletionRequest":
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 generates nothing: it takes echo: true (the prompt and its logprobs back)")
        return self

    def wanted_logprobs(self) -> int | None:
        return None if self.logprobs is None or self.logprobs is False else int(self.logprobs)

    def unsupported(self) -> list[str]:
        return [name for name in super().unsupported() if name != "echo"]  # the prompt back, and its logprobs

    def prompt_list(self) -> list[str | list[int]]:
        """One entry per prompt: its text, or its token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


class ChatMessageBody(Lenient):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = Field(None, max_length=MAX_VALUE_CHARS)
    tool_calls: list[ToolCall] | None = Field(None, max_length=128)  # an assistant's earlier calls

    def text(self) -> str:
        """What the chat template shows of the message: its text, and an assistant's tool calls as JSON."""
        if self.content is None:
            text = ""
        elif isinstance(self.content, str):
            text = self.content
        else:
            others = sorted({str(part.get("type")) for part in self.content if part.get("type") != "text"})
            if others:
                # an answer that left them out would be wrong without saying so
                raise UserError(f"this model reads text only: a {self.role} message's parts of type {', '.join(others)} "
                                "cannot be taken; send text parts")
            text = "".join(part.get("text", "") for part in self.content)
        if self.tool_calls:
            # in the shape the model is asked to write a call in (server/openai_tools.py), one a line
            calls = [json.dumps({"name": c.function.name, "parameters": _arguments(c.function.arguments)}) for c in self.tool_calls]
            text += ("\n" if text else "") + "\n".join(calls)
        return text

    def as_chat_message(self) -> ChatMessage:
        """The message as the chat template takes it (a developer message is a system message)."""
        return ChatMessage("system" if self.role == "developer" else self.role, self.text())


def _arguments(text: str) -> object:
    """A call's arguments as the JSON they hold; their text where they hold none."""
    try:
        return json.loads(text)
    except ValueError:
        return text


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageBody] = Field(min_length=1, max_length=1000)
    tools: list[Tool] | None = Field(None, max_length=128)  # type: ignore[assignment]
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # type: ignore[assignment]
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool | None = None  # each generated token's log probability
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # with this many most likely alternatives

    @model_validator(mode="after")
    def _top_logprobs_with_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def wanted_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def asked_max_tokens(self) -> int | None:
        return self.max_tokens or self.max_completion_tokens  # the newer name, where the older is not given

    def unsupported(self) -> list[str]:
        # tools and tool_choice are taken (server/openai_tools.py); the legacy functions are not
        return [name for name in super().unsupported() if name not in ("tools", "tool_choice")] + (["functions"] if self.functions else [])


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: one entry per generated token in each list; text_offset counts
    characters from the completion's start."""

    tokens: list[str]
    token_logprobs: list[float | None]  # None: a prompt's first token (echo), which nothing precedes
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None where the answer is a tool call
    tool_calls: list[ToolCall] | None = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]  # the token's text in UTF-8 (a token may hold part of a character)


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None  # the tokens generated since the last chunk, where asked


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None  # on the last chunk only, where stream_options.include_usage asks


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "parrot-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
