"""OpenAI-compatible completions and chat: each request is a one-call app.

The request runs through the same manager path as semantic calls (a session of
the caller's tenant, a call, its output variable), so request-level clients and
app-level clients share engines, scheduling and metrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from parrot.engine.sampler import SamplingParams
from parrot.engine.tokenizer import ChatMessage
from parrot.errors import UserError
from parrot.errors import NotFoundError
from parrot.manager.graph import LoggedToken
from parrot.manager.manager import Manager
from parrot.protocol.openai_api import (
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatDelta,
    ChatMessageOut, CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, ModelCard, ModelList,
    SamplingFields, Usage,
)
from parrot.server.openai_logprobs import LogprobsWriter, prompt_tokens
from parrot.server.auth import KeyStore
from parrot.server.common import tenant_key_required

DEFAULT_MAX_TOKENS = 256
# A plain OpenAI request says nothing of its app, so it declares no objective: it runs at the
# engines' normal class, as request-level serving runs everything. Latency-critical treatment
# (small steps beside other work, placement on lightly loaded engines) is for what an app
# declares with get(perf=LATENCY); if every request claimed it, none would get it.
OPENAI_OBJECTIVE = None
DISCONNECT_POLL_S = 1.0  # how often a waiting non-streamed request checks that its client is still there
MAX_PROMPTS_PER_REQUEST = 64
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that hung up: nobody reads it
T = TypeVar("T")


class ClientGone(Exception):
    """The client hung up before its answer was ready."""


async def unless_client_gone(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work`; raises ClientGone (and cancels it) when the client hangs up first, so that
    a request nobody waits for stops generating."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone
    finally:
        task.cancel()


@dataclasses.dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str
    completion_tokens: int
    tokens: list[LoggedToken]  # with their log probabilities, where the sampling asked for them


def add_openai_routes(app: FastAPI, manager: Manager, keys: KeyStore, model: str, tokenizer, max_context: int | None = None) -> None:
    """max_context: the model's context in tokens, when known; prompt + max_tokens past it is refused up front."""

    def check_model(name: str) -> None:
        if name != model:
            raise NotFoundError(f"model {name!r} is not served here; this server serves {model!r}")

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

    async def answer(request: Request, tenant: str, prompt: str, sampling: SamplingParams) -> Answer:
        """The whole answer to one prompt; its session closes (and its call stops) whatever happens."""
        session = manager.create_session(tenant)
        try:
            var_id = manager.submit_prompt(session, prompt, sampling, tenant)
            text = await unless_client_gone(request, manager.get_variable(session, var_id, OPENAI_OBJECTIVE, tenant))
            var = manager.sessions[session].graph.variable(var_id)
            return Answer(text, var.finish_reason or "stop", var.num_tokens, var.token_logprobs)
        finally:
            manager.close_session(session, tenant)

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
        check_model(body.model)
        asked = body.unsupported()
        if asked:
            them = "it" if len(asked) == 1 else "them"
            raise UserError(f"this server does not implement {', '.join(asked)}: leave {them} out of the request "
                            f"(parrot-serve returns the sampled text, its log probabilities where asked, and its usage; "
                            f"docs/api.md lists what it takes)")
        if body.wanted_logprobs() is not None:
            if tokenizer is None:
                raise UserError("this server has no tokenizer to name tokens with: ask without logprobs")
            manager.check_logprobs_reported()

    def stream_prompt(tenant: str, prompt: str, sampling: SamplingParams, render, usage_event=None, lead: bytes | None = None) -> StreamingResponse:
        """render(delta, finish_reason, tokens) -> bytes of one SSE event, tokens: those logged since
        the last event (where the sampling asked for log probabilities); usage_event(completion_tokens)
        -> bytes of the last event before [DONE], where the client asked for its usage; lead: the
        first event (the prompt, where echo asks for it)."""
        session = manager.create_session(tenant)
        try:
            var_id = manager.submit_prompt(session, prompt, sampling, tenant)
            var = manager.sessions[session].graph.variable(var_id)
        except BaseException:
            manager.close_session(session, tenant)
            raise

        async def events():
            sent = 0  # of var.token_logprobs
            try:
                if lead is not None:
                    yield lead
                async for piece in manager.stream_published(session, var_id, OPENAI_OBJECTIVE, tenant):
                    if piece.text:
                        # the tokens whose text this piece completes: one whose text is held back goes with a later one
                        yield render(piece.text, None, var.token_logprobs[sent : piece.logged_tokens])
                        sent = max(sent, piece.logged_tokens)
                yield render("", var.finish_reason or "stop", var.token_logprobs[sent:])
                if usage_event is not None:
                    yield usage_event(var.num_tokens)
                yield b"data: [DONE]\n\n"
            except Exception as exc:
                kind = "invalid_request_error" if isinstance(exc, UserError) else "server_error"
                yield f"data: {json.dumps({'error': {'message': str(exc), 'type': kind}})}\n\n".encode()
            finally:
                manager.close_session(session, tenant)

        return StreamingResponse(events(), media_type="text/event-stream")

    def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)

    Tenant = tenant_key_required(keys)

    @app.get("/v1/models", response_model=ModelList)
    async def models(tenant: str = Tenant):
        return ModelList(data=[ModelCard(id=model)])

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, tenant: str = Tenant):
        check_supported(body)
        given = body.prompt_list()
        if not given or not all(given):
            raise UserError("prompt must not be empty (nor hold an empty string or list of token ids)")
        if len(given) > MAX_PROMPTS_PER_REQUEST:
            raise UserError(f"a completion takes at most {MAX_PROMPTS_PER_REQUEST} prompts, not {len(given)}: split the list")
        if body.stream and len(given) > 1:
            raise UserError(f"a streamed completion takes one prompt, not a list of {len(given)}: send one request per prompt")
        # token ids are generated from as their text (the manager's calls are text), and scored as given
        ids_given = [p if isinstance(p, list) else None for p in given]
        prompts = [p if isinstance(p, str) else text_of_ids(p) for p in given]
        counts = [len(ids) if ids else count(prompt) for ids, prompt in zip(ids_given, prompts)]
        generates = body.max_tokens != 0  # 0: the prompt alone, with echo
        samplings = [within_context(n, body.sampling(DEFAULT_MAX_TOKENS), body.max_tokens is not None) for n in counts] if generates else []
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        top = body.wanted_logprobs()
        wants_logprobs = top is not None
        # echo: the prompt comes back before the completion, with its own logprobs where asked
        echoed = [prompt if body.echo else "" for prompt in prompts]
        try:
            echoed_tokens = (await asyncio.gather(*[scored_prompt(request, tenant, p, top, ids)
                                                    for p, ids in zip(prompts, ids_given)])
                             if body.echo and wants_logprobs else [[] for _ in prompts])
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED_REQUEST)

        def logprobs(tokens: list[LoggedToken], writer: LogprobsWriter | None = None) -> CompletionLogprobs | None:
            return (writer or LogprobsWriter(tokenizer)).completion(tokens) if wants_logprobs else None

        stream_writer = LogprobsWriter(tokenizer) if wants_logprobs else None

        def render(delta, reason, tokens):
            choice = CompletionChoice(text=delta, finish_reason=reason, logprobs=logprobs(tokens, stream_writer))
            chunk = CompletionResponse(id=rid, created=created, model=model, choices=[choice])
            return f"data: {chunk.model_dump_json()}\n\n".encode()

        def usage_event(completion_tokens: int) -> bytes:
            last = CompletionResponse(id=rid, created=created, model=model, choices=[],
                                      usage=usage(counts[0], completion_tokens))
            return f"data: {last.model_dump_json()}\n\n".encode()

        if body.stream:
            lead = render(echoed[0], None, echoed_tokens[0]) if body.echo else None
            if generates:
                return stream_prompt(tenant, prompts[0], samplings[0], render, usage_event if body.include_usage else None, lead)
            events = [lead, render("", "length", []), *([usage_event(0)] if body.include_usage else []), b"data: [DONE]\n\n"]
            return StreamingResponse(iter(events), media_type="text/event-stream")
        if not generates:
            return CompletionResponse(id=rid, created=created, model=model, usage=usage(sum(counts), 0), choices=[
                CompletionChoice(index=i, text=text, finish_reason="length", logprobs=logprobs(tokens))
                for i, (text, tokens) in enumerate(zip(echoed, echoed_tokens))])
        # a list of prompts: one call each, side by side, one choice each in the list's order
        calls = [asyncio.ensure_future(answer(request, tenant, p, s)) for p, s in zip(prompts, samplings)]
        try:
            answers = await asyncio.gather(*calls)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        finally:
            for call in calls:  # one failed: the others' answers would go nowhere
                call.cancel()
        return CompletionResponse(
            id=rid, created=created, model=model,
            choices=[CompletionChoice(index=i, text=echoed[i] + a.text, finish_reason=a.finish_reason,
                                      logprobs=logprobs(echoed_tokens[i] + a.tokens)) for i, a in enumerate(answers)],
            usage=usage(sum(counts), sum(a.completion_tokens for a in answers)),
        )

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request, tenant: str = Tenant):
        check_supported(body)
        if tokenizer is None:
            raise UserError("this server has no tokenizer with a chat template; use /v1/completions")
        messages = [ChatMessage("system" if m.role == "developer" else m.role, m.text()) for m in body.messages]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        sampling = body.sampling(DEFAULT_MAX_TOKENS)
        if body.max_completion_tokens and not body.max_tokens:
            sampling = dataclasses.replace(sampling, max_tokens=body.max_completion_tokens)
        prompt_tokens = count(prompt)
        sampling = within_context(prompt_tokens, sampling, body.max_tokens is not None or body.max_completion_tokens is not None)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        first = [True]
        writer = LogprobsWriter(tokenizer) if body.logprobs else None

        def render(delta, reason, tokens):
            role = "assistant" if first[0] else None
            first[0] = False
            logprobs = writer.chat(tokens) if writer is not None else None
            chunk = ChatCompletionChunk(
                id=rid, created=created, model=model,
                choices=[ChatChunkChoice(delta=ChatDelta(role=role, content=delta or None), finish_reason=reason, logprobs=logprobs)],
            )
            return f"data: {chunk.model_dump_json()}\n\n".encode()

        def usage_event(completion_tokens: int) -> bytes:
            last = ChatCompletionChunk(id=rid, created=created, model=model, choices=[],
                                       usage=usage(prompt_tokens, completion_tokens))
            return f"data: {last.model_dump_json()}\n\n".encode()

        if body.stream:
            return stream_prompt(tenant, prompt, sampling, render, usage_event if body.include_usage else None)
        try:
            reply = await answer(request, tenant, prompt, sampling)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return ChatCompletionResponse(
            id=rid, created=created, model=model,
            choices=[ChatChoice(message=ChatMessageOut(content=reply.text), finish_reason=reply.finish_reason,
                                logprobs=writer.chat(reply.tokens) if writer is not None else None)],
            usage=usage(prompt_tokens, reply.completion_tokens),
        )
