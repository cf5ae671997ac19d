"""OpenAI-compatible completions and chat: each request is an app of one call per choice.

The request runs through the same manager path as semantic calls (a session of the
caller's tenant, calls, their output variables; openai_runs.py), so request-level clients
and app-level clients share engines, scheduling and metrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from parrot.backends.base import LOGPROBS_FEATURE, STRUCTURED_FEATURE
from parrot.engine.sampler import SamplingParams
from parrot.engine.structured import check_compiles
from parrot.errors import NotFoundError, UserError
from parrot.manager.graph import LoggedToken
from parrot.manager.manager import Manager
from parrot.protocol.openai_api import (
    MAX_CHOICES_PER_REQUEST, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
    ChatDelta, ChatMessageOut, CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, ModelCard,
    ModelList, SamplingFields, Usage,
)
from parrot.server.auth import KeyStore
from parrot.server.common import CLIENT_CLOSED_REQUEST, ClientGone, tenant_key_required, unless_client_gone
from parrot.server.openai_logprobs import LogprobsWriter, prompt_tokens
from parrot.server.openai_runs import Answer, answer_choices, choice_specs, stream_choices
from parrot.server.openai_tools import StreamedPart, ToolCallStream, plan_tools, with_tools_shown

DEFAULT_MAX_TOKENS = 256


def check_model_served(name: str, model: str) -> None:
    """A request's model name against the one model this server serves."""
    if name != model:
        raise NotFoundError(f"model {name!r} is not served here; this server serves {model!r}")


def add_openai_routes(app: FastAPI, manager: Manager, keys: KeyStore, model: str, tokenizer, max_context: int | None = None) -> None:
    """max_context: the model's context in tokens, when known; prompt + max_tokens past it is refused up front."""

    def count(text: str) -> int:
        return len(tokenizer.encode(text)) if tokenizer is not None else len(text.split())

    def within_context(prompt_tokens: int, sampling: SamplingParams, asked: bool) -> SamplingParams:
        """The sampling, checked against the context before any work starts (a stream cannot turn
        into a 400 later): an asked-for max_tokens past it is refused, as vLLM refuses it; the
        default one is shortened to fit."""
        if max_context is None:
            return sampling
        room = max_context - prompt_tokens
        if room < 1:
            raise UserError(f"the prompt has {prompt_tokens} tokens; this model takes at most {max_context} in all: shorten the prompt")
        if sampling.max_tokens <= room:
            return sampling
        if asked:
            raise UserError(f"the prompt has {prompt_tokens} tokens and max_tokens asks for {sampling.max_tokens} more; this model "
                            f"takes at most {max_context} in all: lower max_tokens to {room} or less, or shorten the prompt")
        return dataclasses.replace(sampling, max_tokens=room)

    def text_of_ids(token_ids: list[int]) -> str:
        if tokenizer is None:
            raise UserError("this server has no tokenizer to read token ids with: send the prompt as text")
        if any(not 0 <= t < tokenizer.vocab_size for t in token_ids):
            raise UserError(f"a prompt's token ids must be from 0 to {tokenizer.vocab_size - 1}, this model's vocabulary")
        return tokenizer.decode(token_ids)

    async def scored_prompt(request: Request, tenant: str, prompt: str, top: int, token_ids: list[int] | None) -> list[LoggedToken]:
        """The prompt's tokens with their log probabilities (echo), in a session of the tenant's
        for the while (its limits hold), stopped when the client hangs up."""
        session = manager.create_session(tenant)
        try:
            return prompt_tokens(await unless_client_gone(request, manager.score_prompt(prompt, top, token_ids)))
        finally:
            manager.close_session(session, tenant)

    def check_supported(body: SamplingFields) -> None:
        check_model_served(body.model, model)
        asked = body.unsupported()
        if asked:
            them = "it" if len(asked) == 1 else "them"
            raise UserError(f"this server does not implement {', '.join(asked)}: leave {them} out of the request "
                            f"(parrot-serve returns the sampled text, held to a structure and with its log probabilities where asked, and its usage; "
                            f"docs/api.md lists what it takes)")
        if body.wanted_logprobs() is not None:
            if tokenizer is None:
                raise UserError("this server has no tokenizer to name tokens with: ask without logprobs")
            manager.check_logits_computed(LOGPROBS_FEATURE)
        if (structured := body.structured()) is not None:
            manager.check_logits_computed(STRUCTURED_FEATURE)
            check_compiles(structured)  # a 400 now, not an error event in a stream that began

    def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)

    Tenant = tenant_key_required(keys)

    @app.get("/v1/models", response_model=ModelList)
    async def models(tenant: str = Tenant):
        return ModelList(data=[ModelCard(id=model)])

    @app.get("/v1/models/{name:path}", response_model=ModelCard)
    async def one_model(name: str, tenant: str = Tenant):
        check_model_served(name, model)
        return ModelCard(id=model)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, tenant: str = Tenant):
        check_supported(body)
        given = body.prompt_list()
        if not given or not all(given):
            raise UserError("prompt must not be empty (nor hold an empty string or list of token ids)")
        n = body.choices_per_prompt
        if len(given) * n > MAX_CHOICES_PER_REQUEST:
            raise UserError(f"a completion gives at most {MAX_CHOICES_PER_REQUEST} choices (prompts times n), not "
                            f"{len(given)} x {n}: split the request")
        # token ids are generated from as their text (the manager's calls are text), and scored as given
        ids_given = [p if isinstance(p, list) else None for p in given]
        prompts = [p if isinstance(p, str) else text_of_ids(p) for p in given]
        counts = [len(ids) if ids else count(prompt) for ids, prompt in zip(ids_given, prompts)]
        generates = body.max_tokens != 0  # 0: the prompt alone, with echo
        asked = body.sampling(DEFAULT_MAX_TOKENS) if generates else None  # the same for every prompt, but for its room
        samplings = [within_context(c, asked, body.max_tokens is not None) for c in counts] if generates else []
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        wants_logprobs = body.wanted_logprobs() is not None
        # echo: the prompt comes back before each of its choices, with its own logprobs where asked
        echoed = [prompt if body.echo else "" for prompt in prompts]
        try:
            echoed_tokens = (await asyncio.gather(*[scored_prompt(request, tenant, p, body.wanted_logprobs(), ids)
                                                    for p, ids in zip(prompts, ids_given)])
                             if body.echo and wants_logprobs else [[] for _ in prompts])
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        indices = range(len(prompts) * n)  # choice i is prompt i // n's

        def logprobs(tokens: list[LoggedToken], writer: LogprobsWriter | None = None) -> CompletionLogprobs | None:
            return (writer or LogprobsWriter(tokenizer)).completion(tokens) if wants_logprobs else None

        stream_writers = {i: LogprobsWriter(tokenizer) for i in indices} if wants_logprobs else {}

        def render(index: int, delta: str, reason: str | None, tokens: list[LoggedToken]) -> bytes:
            choice = CompletionChoice(index=index, text=delta, finish_reason=reason, logprobs=logprobs(tokens, stream_writers.get(index)))
            chunk = CompletionResponse(id=rid, created=created, model=model, choices=[choice])
            return f"data: {chunk.model_dump_json()}\n\n".encode()

        def usage_event(completion_tokens: int) -> bytes:
            last = CompletionResponse(id=rid, created=created, model=model, choices=[], usage=usage(sum(counts), completion_tokens))
            return f"data: {last.model_dump_json()}\n\n".encode()

        if body.stream:
            leads = [render(i, echoed[i // n], None, echoed_tokens[i // n]) for i in indices] if body.echo else []
            if generates:
                return stream_choices(manager, tenant, choice_specs(prompts, samplings, n), render,
                                      usage_event if body.include_usage else None, leads)
            events = [*leads, *(render(i, "", "length", []) for i in indices), *([usage_event(0)] if body.include_usage else []),
                      b"data: [DONE]\n\n"]
            return StreamingResponse(iter(events), media_type="text/event-stream")
        if not generates:
            return CompletionResponse(id=rid, created=created, model=model, usage=usage(sum(counts), 0), choices=[
                CompletionChoice(index=i, text=echoed[i // n], finish_reason="length", logprobs=logprobs(echoed_tokens[i // n]))
                for i in indices])
        try:
            answers = await answer_choices(manager, request, tenant, choice_specs(prompts, samplings, n))
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return CompletionResponse(
            id=rid, created=created, model=model,
            choices=[CompletionChoice(index=i, text=echoed[i // n] + a.text, finish_reason=a.finish_reason,
                                      logprobs=logprobs(echoed_tokens[i // n] + a.tokens)) for i, a in enumerate(answers)],
            usage=usage(sum(counts), sum(a.completion_tokens for a in answers)),
        )

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request, tenant: str = Tenant):
        check_supported(body)
        if tokenizer is None:
            raise UserError("this server has no tokenizer with a chat template; use /v1/completions")
        tools = plan_tools(body)
        if tools is not None:
            manager.check_logits_computed(STRUCTURED_FEATURE)
            check_compiles(tools.structured)
        messages = [m.as_chat_message() for m in body.messages]
        if tools is not None and not tokenizer.template_shows_tools:
            messages = with_tools_shown(messages, tools)
        offered = [tool.model_dump() for tool in body.tools] if tools is not None else None
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=offered)
        sampling = body.sampling(DEFAULT_MAX_TOKENS)
        if tools is not None:
            sampling = dataclasses.replace(sampling, structured=tools.structured)
        prompt_tokens = count(prompt)
        sampling = within_context(prompt_tokens, sampling, body.asked_max_tokens is not None)
        specs = choice_specs([prompt], [sampling], body.choices_per_prompt)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        started: set[int] = set()  # choices whose first chunk (the one naming the role) went out
        writers = {s.index: LogprobsWriter(tokenizer) for s in specs} if body.logprobs else {}
        calls = ToolCallStream(tools) if tools is not None else None
        held_tokens: dict[int, list[LoggedToken]] = {}  # logged while a tool call's text is held back

        def render(index: int, delta: str, reason: str | None, tokens: list[LoggedToken]) -> bytes:
            part = StreamedPart(content=delta or None)
            if calls is not None:
                part = calls.part(index, delta, reason is not None)
                if part is None:
                    held_tokens.setdefault(index, []).extend(tokens)
                    return b""
                tokens = held_tokens.pop(index, []) + tokens
                reason = tools.call_finish_reason(reason) if index in calls.called else reason
            role = None if index in started else "assistant"
            started.add(index)
            logprobs = writers[index].chat(tokens) if writers else None
            choice = ChatChunkChoice(index=index, delta=ChatDelta(role=role, content=part.content, tool_calls=part.tool_calls),
                                     finish_reason=reason, logprobs=logprobs)
            chunk = ChatCompletionChunk(id=rid, created=created, model=model, choices=[choice])
            return f"data: {chunk.model_dump_json()}\n\n".encode()

        def usage_event(completion_tokens: int) -> bytes:
            last = ChatCompletionChunk(id=rid, created=created, model=model, choices=[],
                                       usage=usage(prompt_tokens, completion_tokens))
            return f"data: {last.model_dump_json()}\n\n".encode()

        if body.stream:
            return stream_choices(manager, tenant, specs, render, usage_event if body.include_usage else None)
        try:
            answers = await answer_choices(manager, request, tenant, specs)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED_REQUEST)

        def choice(index: int, answer: Answer) -> ChatChoice:
            call = tools.call(answer.text) if tools is not None else None
            message = ChatMessageOut(content=None, tool_calls=[call]) if call is not None else ChatMessageOut(content=answer.text)
            return ChatChoice(index=index, message=message,
                              finish_reason=tools.call_finish_reason(answer.finish_reason) if call is not None else answer.finish_reason,
                              logprobs=writers[index].chat(answer.tokens) if writers else None)

        return ChatCompletionResponse(id=rid, created=created, model=model, choices=[choice(i, a) for i, a in enumerate(answers)],
                                      usage=usage(prompt_tokens, sum(a.completion_tokens for a in answers)))
