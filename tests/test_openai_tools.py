"""Tool calling's pieces without a model: which grammar a request gets, how an answer's text
becomes a call, and how a streamed answer turns into chunks."""

from __future__ import annotations

import json

import pytest

from parrot.engine.structured import StructureKind, check_compiles
from parrot.errors import UserError
from parrot.protocol.openai_api import ChatCompletionRequest
from parrot.server.openai_tools import ToolCallStream, ToolMode, plan_tools

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER, TIME], **fields)


def test_each_tool_choice_gets_its_grammar_and_every_grammar_compiles():
    assert plan_tools(request(tool_choice="none")) is None
    assert plan_tools(ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])) is None
    named = plan_tools(request(tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    assert named.mode is ToolMode.NAMED and named.structured.kind is StructureKind.JSON_SCHEMA
    assert [plan_tools(request(tool_choice=c)).mode for c in ("required", "auto", None)] == [ToolMode.REQUIRED, ToolMode.AUTO, ToolMode.AUTO]
    for choice in ("required", "auto", {"type": "function", "function": {"name": "get_time"}}):
        check_compiles(plan_tools(request(tool_choice=choice)).structured)
    with pytest.raises(UserError, match="offers no tools"):
        plan_tools(ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tool_choice="required"))


def test_auto_streams_words_as_text_and_a_call_whole_at_its_end():
    plan = plan_tools(request(tool_choice="auto"))
    stream = ToolCallStream(plan)
    # choice 0 answers in words, which may contain braces after their first character
    assert stream.part(0, "Hello", False).content == "Hello"
    assert stream.part(0, " {there}", False).content == " {there}"
    assert stream.part(0, "", True).content is None and 0 not in stream.called
    # choice 1 calls: held until its text ends, then sent whole
    assert stream.part(1, '{"name": "get_time", ', False) is None
    whole = stream.part(1, '"parameters": {"zone": "UTC"}}', True).tool_calls[0]
    assert (whole.function.name, json.loads(whole.function.arguments)) == ("get_time", {"zone": "UTC"}) and 1 in stream.called
    assert plan.call("Hello") is None and plan.call('{"name": "get_time", "parameters": {}}').function.name == "get_time"
    # a call cut short by max_tokens comes back as the text it is
    assert stream.part(2, '{"name": "get_ti', True).content == '{"name": "get_ti' and 2 not in stream.called


def test_a_named_calls_pieces_name_it_once_and_leave_unset_fields_out():
    stream = ToolCallStream(plan_tools(request(tool_choice={"type": "function", "function": {"name": "get_weather"}})))
    first, second = stream.part(0, '{"city": ', False), stream.part(0, '"Paris"}', False)
    assert first.tool_calls[0].model_dump() == {"index": 0, "id": first.tool_calls[0].id, "type": "function",
                                                "function": {"name": "get_weather", "arguments": '{"city": '}}
    assert second.tool_calls[0].model_dump() == {"index": 0, "function": {"arguments": '"Paris"}'}}


def test_a_named_call_cut_by_max_tokens_is_a_call_streamed_or_not_and_finishes_by_length():
    plan = plan_tools(request(tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    cut = plan.call('{"city": "Par')
    assert (cut.function.name, cut.function.arguments) == ("get_weather", '{"city": "Par')
    assert plan.call_finish_reason("length") == "length" and plan.call_finish_reason("stop") == "stop"
    chosen = plan_tools(request(tool_choice="required"))
    assert chosen.call('{"name": "get_ti') is None and chosen.call_finish_reason("stop") == "tool_calls"


def test_earlier_calls_in_the_history_are_shown_as_the_model_is_asked_to_write_them():
    """An assistant's earlier calls reach the chat template as the JSON a call is asked in, one a line,
    so that the model sees its own calls in the shape its next one must take."""
    body = ChatCompletionRequest(model="m", messages=[
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "not json"}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
        {"role": "developer", "content": "Be brief."}])
    shown = [m.as_chat_message() for m in body.messages]
    assert [json.loads(line) for line in shown[1].content.splitlines()] == [
        {"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_weather", "parameters": "not json"}]
    assert (shown[2].role, shown[2].content) == ("tool", "sunny")
    assert (shown[3].role, shown[3].content) == ("system", "Be brief.")
