"""OpenAI-compatible completions and chat: each request is a one-call app.

The request runs through the same manager path as semantic calls (a session of
the caller's tenant, a call, its output variable), so request-level clients and
app-level clients share engines, scheduling and metrics.
"""

from __future__ import annotations

import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from parrot.engine.tokenizer import ChatMessage
from parrot.errors import UserError
from parrot.errors import NotFoundError
from parrot.manager.manager import Manager
from parrot.protocol.openai_api import (
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatDelta,
    ChatMessageOut, CompletionChoice, CompletionRequest, CompletionResponse, ModelCard, ModelList, Usage,
)
from parrot.server.auth import KeyStore
from parrot.server.common import require

DEFAULT_MAX_TOKENS = 256
# A plain OpenAI request says nothing of its app, so it declares no objective: it runs at the
# engines' normal class, as request-level serving runs everything. Latency-critical treatment
# (small steps beside other work, placement on lightly loaded engines) is for what an app
# declares with get(perf=LATENCY); if every request claimed it, none would get it.
OPENAI_OBJECTIVE = None


def add_openai_routes(app: FastAPI, manager: Manager, keys: KeyStore, model: str, tokenizer) -> None:
    def check_model(name: str) -> None:
        if name != model:
            raise NotFoundError(f"model {name!r} is not served here; this server serves {model!r}")

    def count(text: str) -> int:
        return len(tokenizer.encode(text)) if tokenizer is not None else len(text.split())

    async def run_prompt(tenant: str, prompt: str, sampling, stream: bool, render):
        """render(delta, finish_reason) -> bytes of one SSE event, for streaming."""
        session = manager.create_session(tenant)
        try:
            var_id = manager.submit_prompt(session, prompt, sampling, tenant)
        except BaseException:
            manager.close_session(session, tenant)
            raise
        if not stream:
            try:
                text = await manager.get_variable(session, var_id, OPENAI_OBJECTIVE, tenant)
                var = manager.sessions[session].graph.variable(var_id)
                return text, var.finish_reason or "stop", var.num_tokens
            finally:
                manager.close_session(session, tenant)

        async def events():
            try:
                async for delta in manager.stream_variable(session, var_id, OPENAI_OBJECTIVE, tenant):
                    if delta:
                        yield render(delta, None)
                var = manager.sessions[session].graph.variable(var_id)
                yield render("", var.finish_reason or "stop")
                yield b"data: [DONE]\n\n"
            except Exception as exc:
                yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'server_error'}})}\n\n".encode()
            finally:
                manager.close_session(session, tenant)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/v1/models", response_model=ModelList)
    async def models(request: Request):
        require(keys, request)
        return ModelList(data=[ModelCard(id=model)])

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        tenant = require(keys, request).tenant
        check_model(body.model)
        prompt = body.prompt if isinstance(body.prompt, str) else "".join(body.prompt)
        if not prompt:
            raise UserError("prompt must not be empty")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def render(delta, reason):
            chunk = CompletionResponse(id=rid, created=created, model=model, choices=[CompletionChoice(text=delta, finish_reason=reason)])
            return f"data: {chunk.model_dump_json()}\n\n".encode()

        result = await run_prompt(tenant, prompt, body.sampling(DEFAULT_MAX_TOKENS), body.stream, render)
        if body.stream:
            return result
        text, reason, generated = result
        prompt_tokens = count(prompt)
        return CompletionResponse(
            id=rid, created=created, model=model, choices=[CompletionChoice(text=text, finish_reason=reason)],
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=generated, total_tokens=prompt_tokens + generated),
        )

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        tenant = require(keys, request).tenant
        check_model(body.model)
        if tokenizer is None:
            raise UserError("this server has no tokenizer with a chat template; use /v1/completions")
        messages = [ChatMessage("system" if m.role == "developer" else m.role, m.text()) for m in body.messages]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        sampling = body.sampling(DEFAULT_MAX_TOKENS)
        if body.max_completion_tokens and not body.max_tokens:
            sampling = type(sampling)(**{**sampling.__dict__, "max_tokens": body.max_completion_tokens})
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        first = [True]

        def render(delta, reason):
            role = "assistant" if first[0] else None
            first[0] = False
            chunk = ChatCompletionChunk(
                id=rid, created=created, model=model,
                choices=[ChatChunkChoice(delta=ChatDelta(role=role, content=delta or None), finish_reason=reason)],
            )
            return f"data: {chunk.model_dump_json()}\n\n".encode()

        result = await run_prompt(tenant, prompt, sampling, body.stream, render)
        if body.stream:
            return result
        text, reason, generated = result
        prompt_tokens = count(prompt)
        return ChatCompletionResponse(
            id=rid, created=created, model=model,
            choices=[ChatChoice(message=ChatMessageOut(content=text), finish_reason=reason)],
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=generated, total_tokens=prompt_tokens + generated),
        )
