"""The engine's HTTP API: fill, generate (streamed as JSON lines), free, stats; it
registers with a manager and sends heartbeats with its stats."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from parrot.backends.builtin import BuiltinEngineBackend
from parrot.protocol.engine_api import (
    EngineRegister, EngineStatsBody, FillBody, FreeBody, GenerateBody, Heartbeat, PromptLogprobsBody, ScoreBody, TokenEvent,
)
from parrot.server.auth import KeyStore
from parrot.server.background import on_stop, run_while_up, server_app
from parrot.server.common import CLIENT_CLOSED_REQUEST, HEARTBEAT_S, ClientGone, engine_key_required, install_error_handlers, unless_client_gone

log = logging.getLogger(__name__)


def _stats_body(backend: BuiltinEngineBackend) -> EngineStatsBody:
    s = backend.stats()
    return EngineStatsBody(
        name=s.name, model=s.model, running_jobs=s.running_jobs, contexts=s.contexts,
        kv_blocks_total=s.kv_blocks_total, kv_blocks_free=s.kv_blocks_free, tokens_processed=s.tokens_processed,
        peak_batch_blocks=s.peak_batch_blocks, kv_block_size=s.kv_block_size, kv_blocks_cached=s.kv_blocks_cached,
        prefill_share_beside_latency=s.prefill_share_beside_latency,
        max_tokens_per_step=s.max_tokens_per_step, max_seqs_per_step=s.max_seqs_per_step, latency_seqs_bound=s.latency_seqs_bound,
    )


def create_engine_app(backend: BuiltinEngineBackend, keys: KeyStore, manager_url: str | None = None,
                      public_url: str | None = None, engine_key: str | None = None, heartbeat_s: float = HEARTBEAT_S,
                      parent_pid: int | None = None) -> FastAPI:
    app = server_app(title="parrot-serve engine", description="Primitives of one built-in engine.")
    app.state.refusal = None  # set where the manager refuses this engine: why it stopped
    # how the engine stops itself (its launcher sets the server's own way, so that it can say why after)
    app.state.request_stop = lambda: os.kill(os.getpid(), signal.SIGTERM)
    install_error_handlers(app, keys)
    engine_only = [engine_key_required(keys)]

    @app.get("/health")
    async def health():
        return {"status": "ok", "name": backend.name, "model": backend.model}

    @app.get("/stats", response_model=EngineStatsBody, dependencies=engine_only)
    async def stats():
        return _stats_body(backend)

    @app.post("/fill", dependencies=engine_only)
    async def fill(body: FillBody):
        await backend.fill(body.context_id, body.parent_context_id, body.text, body.priority, body.shared_prefix_chars,
                           body.then_generate)
        return {"ok": True}

    @app.post("/score", response_model=PromptLogprobsBody, dependencies=engine_only)
    async def score(body: ScoreBody, request: Request):
        try:  # a manager whose client hung up drops the request: the scoring stops with it
            return PromptLogprobsBody.of(await unless_client_gone(request, backend.score_prompt(body.text, body.top, body.token_ids)))
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.post("/generate", dependencies=engine_only)
    async def generate(body: GenerateBody):
        stream = backend.generate(body.context_id, body.sampling.to_params(), body.priority)
        first = await anext(stream)  # errors before the first token become a proper HTTP error

        async def lines():
            token = first
            try:
                while True:
                    yield TokenEvent.of(token).model_dump_json() + "\n"
                    if token.finish_reason is not None:
                        return
                    token = await anext(stream)
            except Exception as exc:
                log.exception("generation of %s failed", body.context_id)
                yield json.dumps({"error": str(exc)}) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.post("/free", dependencies=engine_only)
    async def free(body: FreeBody):
        await backend.free_context(body.context_id)
        return {"ok": True}

    if manager_url is not None:
        run_while_up(app, "register and heartbeat",
                     lambda: _keep_registered(app, backend, manager_url, public_url, engine_key, heartbeat_s, parent_pid))
    on_stop(app, backend.close)

    return app


async def _keep_registered(app: FastAPI, backend, manager_url: str, public_url: str, engine_key: str, period: float,
                           parent_pid: int | None) -> None:
    """Registers, then heartbeats; registers again whenever the manager forgot us.

    An engine started by `parrot serve` stops when that process is gone, so a
    killed manager never leaves engine processes behind. A manager that refuses the engine key
    stops the engine too (app.state.refusal says why): trying again would never succeed.
    """
    headers = {"authorization": f"Bearer {engine_key}"}
    registered = False
    async with httpx.AsyncClient(base_url=manager_url.rstrip("/"), headers=headers, timeout=10.0) as http:
        while True:
            if parent_pid is not None and os.getppid() != parent_pid:
                log.warning("the process that started this engine (pid %d) is gone; stopping", parent_pid)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            try:
                if not registered:
                    registration = EngineRegister(name=backend.name, url=public_url, model=backend.model, stats=_stats_body(backend))
                    response = await http.post("/api/v1/engines/register", json=registration.model_dump())
                    if response.status_code in (401, 403):
                        app.state.refusal = (f"the manager at {manager_url} refused this engine's key ({response.status_code}): "
                                             "give it the manager's engine key (PARROT_ENGINE_KEY or --engine-key)")
                        log.error("%s; stopping", app.state.refusal)
                        app.state.request_stop()
                        return
                    if response.status_code >= 400:
                        log.error("the manager refused registration: %s", response.text)
                    registered = response.status_code < 400
                else:
                    beat = Heartbeat(stats=_stats_body(backend))
                    response = await http.post(f"/api/v1/engines/{backend.name}/heartbeat", json=beat.model_dump())
                    registered = response.status_code < 400
            except httpx.HTTPError as exc:
                log.warning("manager %s unreachable: %s", manager_url, exc)
                registered = False
            await asyncio.sleep(period)
