"""The manager's HTTP API: sessions, calls, variables (long-poll and SSE), engines, metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import asdict, dataclass, field

from fastapi import FastAPI, Query, Response
from sse_starlette.sse import EventSourceResponse

from parrot.backends.http_engine import HttpEngineBackend
from parrot.errors import ConflictError, UserError
from parrot.manager.manager import Manager
from parrot.manager.spec import Perf
from parrot.protocol.engine_api import EngineRegister, Heartbeat
from parrot.protocol.manager_api import (
    Batch, BatchResult, CallSubmit, DagBody, WaitRequest, SessionCreated, VariableCreate, VariableFail, VariableSet, VariableValue,
)
from parrot.server.background import run_while_up, server_app
from parrot.server.auth import KeyStore
from parrot.server.common import DEFAULT_MAX_BODY_BYTES, engine_key_required, install_error_handlers, tenant_key_required
from parrot.server.metrics import ManagerMetrics

log = logging.getLogger(__name__)


@dataclass
class EngineLiveness:
    """Heartbeats of registered engines; one that stays silent too long is dropped."""

    timeout_s: float
    last_seen: dict[str, float] = field(default_factory=dict)

    def any_seen_since(self, moment: float) -> bool:
        """Whether an engine registered or sent a heartbeat after `moment` (time.monotonic())."""
        return any(seen > moment for seen in self.last_seen.values())


def _perf(value: str | None) -> Perf | None:
    return None if value in (None, "", "none") else Perf(value)


PerfQuery = Query("latency", pattern="^(latency|throughput|none)$", description="what matters for this variable")


def create_manager_app(
    manager: Manager, keys: KeyStore, model: str, tokenizer=None, max_context: int | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, heartbeat_timeout_s: float = 10.0, engine_key: str | None = None,
) -> FastAPI:
    app = server_app(title="parrot-serve manager", description="Sessions of semantic calls over engines; OpenAI-compatible API under /v1.")
    install_error_handlers(app, keys, max_body_bytes)
    metrics = ManagerMetrics(manager)
    liveness = EngineLiveness(heartbeat_timeout_s)
    app.state.manager = manager
    app.state.liveness = liveness

    @app.get("/health")
    async def health():
        return {"status": "ok", "engines": [e.name for e in manager.engines], "model": model}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    # ---- sessions, variables, calls ----------------------------------------

    Tenant = tenant_key_required(keys)

    @app.post("/api/v1/sessions", response_model=SessionCreated)
    async def create_session(tenant: str = Tenant):
        return SessionCreated(session_id=manager.create_session(tenant))

    @app.delete("/api/v1/sessions/{session_id}")
    async def close_session(session_id: str, tenant: str = Tenant):
        manager.close_session(session_id, tenant)
        return {"closed": session_id}

    @app.post("/api/v1/sessions/{session_id}/variables")
    async def create_variable(session_id: str, body: VariableCreate, tenant: str = Tenant):
        manager.create_variable(session_id, body.var_id, body.name, body.value, tenant=tenant)
        return {"var_id": body.var_id}

    @app.put("/api/v1/sessions/{session_id}/variables/{var_id}")
    async def set_variable(session_id: str, var_id: str, body: VariableSet, tenant: str = Tenant):
        manager.set_variable(session_id, var_id, body.value, tenant=tenant)
        return {"var_id": var_id}

    @app.post("/api/v1/sessions/{session_id}/variables/{var_id}/fail")
    async def fail_variable(session_id: str, var_id: str, body: VariableFail, tenant: str = Tenant):
        manager.fail_variable(session_id, var_id, body.message, tenant=tenant)
        return {"var_id": var_id}

    @app.get("/api/v1/sessions/{session_id}/variables/{var_id}", response_model=VariableValue)
    async def get_variable(session_id: str, var_id: str, perf: str = PerfQuery, tenant: str = Tenant,
                           timeout: float = Query(30.0, ge=0, le=300, description="long-poll seconds")):
        return await long_poll(session_id, var_id, perf, timeout, tenant)

    @app.get("/api/v1/sessions/{session_id}/variables/{var_id}/stream")
    async def stream_variable(session_id: str, var_id: str, perf: str = PerfQuery, tenant: str = Tenant):
        manager.session(session_id, tenant).graph.variable(var_id)  # 404 now, not inside the stream

        async def events():
            try:
                async for delta in manager.stream_variable(session_id, var_id, _perf(perf), tenant):
                    yield {"event": "delta", "data": json.dumps({"text": delta})}
                yield {"event": "done", "data": "{}"}
            except Exception as exc:
                yield {"event": "error", "data": json.dumps({"message": str(exc)})}

        return EventSourceResponse(events())

    @app.post("/api/v1/sessions/{session_id}/calls")
    async def submit_call(session_id: str, body: CallSubmit, tenant: str = Tenant):
        manager.submit_call(session_id, body.call_id, body.to_spec(), tenant=tenant)
        return {"call_id": body.call_id}

    @app.post("/api/v1/sessions/{session_id}/batch", response_model=BatchResult)
    async def batch(session_id: str, body: Batch, tenant: str = Tenant):
        manager.session(session_id, tenant)
        return apply_ops(session_id, body.ops, tenant)

    @app.post("/api/v1/sessions/{session_id}/wait", response_model=VariableValue)
    async def wait(session_id: str, body: WaitRequest, tenant: str = Tenant):
        manager.session(session_id, tenant)
        applied = apply_ops(session_id, body.ops, tenant)
        if applied.error is not None:
            raise UserError(f"the server refused a submitted operation ({applied.applied} of {len(body.ops)} applied): {applied.error}")
        return await long_poll(session_id, body.var_id, body.perf, body.timeout, tenant)

    async def long_poll(session_id: str, var_id: str, perf: str, timeout: float, tenant: str) -> VariableValue:
        manager.session(session_id, tenant).graph.variable(var_id)  # 404 before any waiting
        try:
            value = await asyncio.wait_for(manager.get_variable(session_id, var_id, _perf(perf), tenant), timeout)
        except TimeoutError:
            return VariableValue(var_id=var_id, ready=False)
        return VariableValue(var_id=var_id, ready=True, value=value)

    def apply_ops(session_id: str, ops: list, tenant: str) -> BatchResult:
        for index, op in enumerate(ops):
            try:
                if op.create_variable is not None:
                    v = op.create_variable
                    manager.create_variable(session_id, v.var_id, v.name, v.value, tenant=tenant)
                elif op.set_variable is not None:
                    manager.set_variable(session_id, op.set_variable[0], op.set_variable[1].value, tenant=tenant)
                elif op.submit_call is not None:
                    manager.submit_call(session_id, op.submit_call.call_id, op.submit_call.to_spec(), tenant=tenant)
            except UserError as exc:
                return BatchResult(applied=index, error=str(exc))
        return BatchResult(applied=len(ops))

    @app.get("/api/v1/sessions/{session_id}/dag", response_model=DagBody)
    async def dag(session_id: str, tenant: str = Tenant):
        return DagBody.model_validate(asdict(manager.dag(session_id, tenant)))

    # ---- engines -------------------------------------------------------------

    @app.post("/api/v1/engines/register", dependencies=[engine_key_required(keys)])
    async def register_engine(body: EngineRegister):
        if body.model != model:
            from parrot.errors import UserError

            raise UserError(f"this manager serves model {model!r}; engine {body.name!r} serves {body.model!r}")
        current = next((e for e in manager.engines if e.name == body.name), None)
        heard = liveness.last_seen.get(body.name)
        if current is not None and getattr(current, "url", body.url) != body.url.rstrip("/") and heard is not None \
                and time.monotonic() - heard < liveness.timeout_s:
            # a restarted engine registers again under its name; a second engine under a live one's
            # name would take its place while the first goes on heartbeating for it
            raise ConflictError(f"an engine named {body.name!r} serves at {current.url} (heard from "
                                f"{time.monotonic() - heard:.0f}s ago): give this engine another --name")
        old = manager.remove_engine(body.name)
        if old is not None:
            await old.close()
        engine = HttpEngineBackend(body.name, body.url, body.model, engine_key)
        if body.stats is not None:
            engine.update_stats(body.stats)
        manager.add_engine(engine)
        liveness.last_seen[body.name] = time.monotonic()
        log.info("engine %s registered at %s", body.name, body.url)
        return {"registered": body.name}

    @app.post("/api/v1/engines/{name}/heartbeat", dependencies=[engine_key_required(keys)])
    async def heartbeat(name: str, body: Heartbeat):
        engine = next((e for e in manager.engines if e.name == name), None)
        if engine is None:
            from parrot.errors import NotFoundError

            raise NotFoundError(f"engine {name!r} is not registered; register again")
        engine.update_stats(body.stats)
        liveness.last_seen[name] = time.monotonic()
        return {"ok": True}

    async def reap():
        while True:
            await asyncio.sleep(max(liveness.timeout_s / 4, 0.2))
            now = time.monotonic()
            for name, seen in list(liveness.last_seen.items()):
                if now - seen > liveness.timeout_s:
                    log.warning("engine %s missed its heartbeats for %.0fs; dropping it", name, now - seen)
                    del liveness.last_seen[name]
                    engine = manager.remove_engine(name)
                    if engine is not None:
                        await engine.close()

    async def expire_sessions():
        period = min(max((manager.limits.idle_timeout_s or 0) / 4, 0.5), 30.0)
        while manager.limits.idle_timeout_s is not None:
            await asyncio.sleep(period)
            try:
                manager.expire_idle_sessions()
            except Exception:
                log.exception("expiring idle sessions failed; trying again in %.0fs", period)

    run_while_up(app, "drop silent engines", reap)
    run_while_up(app, "expire idle sessions", expire_sessions)

    from parrot.server.openai_routes import add_openai_routes
    from parrot.server.tokenize_routes import add_tokenize_routes

    add_openai_routes(app, manager, keys, model, tokenizer, max_context)
    add_tokenize_routes(app, keys, model, tokenizer, max_context)
    return app
