"""Tool calls in chats: a call the request asks for, its arguments held to the function's schema.

A chat that names a function (tool_choice {"type": "function", "function": {"name": ...}}) or
asks for some call (tool_choice "required") gets one. Its text is structured output under a
grammar: the function's parameters as JSON, or, for "required", a JSON object naming one of the
tools and its parameters. The answer carries it as tool_calls. With "auto" (OpenAI's default
where tools are given) the grammar also takes an answer in words, which must not begin with
"{": the first character tells a call from text, whatever the model family's own format for
calls would have been. "none" is a plain chat.
"""

from __future__ import annotations

import functools
import json
import uuid
from dataclasses import dataclass, field
from enum import Enum

from parrot.engine.structured import StructuredOutput, StructureKind
from parrot.engine.tokenizer import ChatMessage
from parrot.errors import UserError
from parrot.protocol.openai_api import ChatCompletionRequest
from parrot.protocol.openai_tools import FunctionCall, FunctionCallDelta, NamedToolChoice, ToolCall, ToolCallDelta, ToolFunction


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolMode(Enum):
    NAMED = "named"  # the request names the function
    REQUIRED = "required"  # some call, of one of the tools
    AUTO = "auto"  # a call, or text that does not start with "{"


@dataclass(frozen=True)
class ToolPlan:
    mode: ToolMode
    tools: dict[str, ToolFunction]  # by name: the one named, or all the request offers

    @functools.cached_property
    def structured(self) -> StructuredOutput:
        """The grammar the answer's text is held to (built once: the request checks it, then samples under it)."""
        if self.mode is ToolMode.NAMED:
            [function] = self.tools.values()
            return StructuredOutput(StructureKind.JSON_SCHEMA, json.dumps(function.parameters))
        # a Lark grammar with each function's schema under its own %json: each keeps its own root,
        # so that its $refs ("#/$defs/...", as pydantic writes nested models) still resolve
        rules = [f"call_{i}: {json.dumps(json.dumps({'name': name, 'parameters': 0})[:-2])} params_{i} \"}}\"\n"
                 f"params_{i}: %json {json.dumps(f.parameters)}" for i, (name, f) in enumerate(self.tools.items())]
        alternatives = [f"call_{i}" for i in range(len(self.tools))]
        if self.mode is ToolMode.AUTO:  # or an answer in words: its first character tells which
            alternatives.append("text")
            rules.append("text: /[^{][\\s\\S]*/")
        return StructuredOutput(StructureKind.LARK, "\n".join(["start: " + " | ".join(alternatives), *rules]))

    @property
    def finish_reason(self) -> str:
        """OpenAI's: "stop" where the request named the function, "tool_calls" where the model chose."""
        return "stop" if self.mode is ToolMode.NAMED else "tool_calls"

    def call(self, text: str) -> ToolCall | None:
        """The call an answer's text makes. A named function's call is the text, whole or cut short
        by max_tokens, as a stream sends it. None where a call the model chose is not whole (its name
        may be what was cut), or, with tool_choice auto, where the model answered in words."""
        if self.mode is ToolMode.NAMED:
            [name] = self.tools
            return ToolCall(id=new_call_id(), function=FunctionCall(name=name, arguments=text))
        if self.mode is ToolMode.AUTO and not text.startswith("{"):
            return None
        try:
            value = json.loads(text)
            name, arguments = value["name"], json.dumps(value["parameters"])
        except (ValueError, KeyError, TypeError):
            return None
        return ToolCall(id=new_call_id(), function=FunctionCall(name=name, arguments=arguments))

    def call_finish_reason(self, reason: str | None) -> str | None:
        """A choice's finish_reason where it made a call: the plan's where the call is whole, "length"
        where max_tokens cut it."""
        return self.finish_reason if reason == "stop" else reason


def plan_tools(body: ChatCompletionRequest) -> ToolPlan | None:
    """The call the chat must make, if it must make one."""
    choice = body.tool_choice
    if not body.tools or choice == "none":
        if choice == "required" or isinstance(choice, NamedToolChoice):
            raise UserError("tool_choice asks for a tool call, but the request offers no tools: send them in tools")
        return None
    offered = {tool.function.name: tool.function for tool in body.tools}
    if len(offered) != len(body.tools):
        raise UserError("two tools have the same name: name each function once")
    if body.structured() is not None:
        raise UserError("a tool call's arguments are held to the function's schema already: drop response_format "
                        "(or structured_outputs) or tool_choice")
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in offered:
            raise UserError(f"tool_choice names {choice.function.name!r}, which is not among the tools: {', '.join(offered)}")
        return ToolPlan(ToolMode.NAMED, {choice.function.name: offered[choice.function.name]})
    return ToolPlan(ToolMode.REQUIRED if choice == "required" else ToolMode.AUTO, offered)


def with_tools_shown(messages: list[ChatMessage], plan: ToolPlan) -> list[ChatMessage]:
    """The messages with the tools described in the system message, for chat templates that do
    not render tools themselves: a model asked for a call should know what it calls."""
    described = json.dumps([{"name": name, "description": f.description or "", "parameters": f.parameters}
                            for name, f in plan.tools.items()])
    if plan.mode is ToolMode.NAMED:
        note = f"You can call these functions. Answer with the arguments of a call to {next(iter(plan.tools))} as JSON.\n{described}"
    elif plan.mode is ToolMode.REQUIRED:
        note = f'You can call these functions. Answer with a call as JSON: {{"name": ..., "parameters": {{...}}}}.\n{described}'
    else:
        note = (f'You can call these functions. To call one, answer with the call as JSON: {{"name": ..., "parameters": {{...}}}}; '
                f"otherwise answer in words.\n{described}")

    if messages and messages[0].role == "system":
        return [ChatMessage("system", f"{messages[0].content}\n\n{note}"), *messages[1:]]
    return [ChatMessage("system", note), *messages]


@dataclass(frozen=True)
class StreamedPart:
    """What one chunk of a streamed choice carries: text, or a piece of its tool call."""

    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


@dataclass
class ToolCallStream:
    """Turns a streamed chat's pieces into tool-call chunks, choice by choice. A named function's
    arguments stream as they come (the first chunk names the call); a call the model chose is
    sent whole when its text ends, since its name comes first inside the JSON."""

    plan: ToolPlan
    called: set[int] = field(default_factory=set)  # choices that sent a call: they finish with the plan's reason
    _ids: dict[int, str] = field(default_factory=dict)
    _held: dict[int, str] = field(default_factory=dict)
    _in_words: set[int] = field(default_factory=set)  # tool_choice auto: choices that answer in words

    def part(self, index: int, text: str, finished: bool) -> StreamedPart | None:
        """None: nothing to send for this piece yet."""
        if self.plan.mode is ToolMode.NAMED:
            first = index not in self._ids
            call_id = self._ids.setdefault(index, new_call_id())
            if not text and not first:
                return StreamedPart()
            self.called.add(index)
            name = next(iter(self.plan.tools)) if first else None
            return StreamedPart(tool_calls=[ToolCallDelta(id=call_id if first else None, type="function" if first else None,
                                                          function=FunctionCallDelta(name=name, arguments=text))])
        if index in self._in_words:
            return StreamedPart(content=text or None)
        held = self._held[index] = self._held.get(index, "") + text
        if self.plan.mode is ToolMode.AUTO and held and not held.startswith("{"):  # words, from here on as they come
            self._in_words.add(index)
            del self._held[index]
            return StreamedPart(content=held)
        if not finished:
            return None
        call = self.plan.call(self._held.pop(index))
        if call is None:  # cut short by max_tokens: the text as it is
            return StreamedPart(content=held or None)
        self.called.add(index)
        return StreamedPart(tool_calls=[ToolCallDelta(id=call.id, type="function",
                                                      function=FunctionCallDelta(name=call.function.name, arguments=call.function.arguments))])
