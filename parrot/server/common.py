"""What every server shares: error responses, body limits, authentication."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Depends, FastAPI, HTTPException, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from parrot.errors import EngineUnavailableError, LimitExceededError, UserError
from parrot.server.auth import KeyStore, Principal

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 8 * 2**20
DISCONNECT_POLL_S = 1.0  # how often a waiting non-streamed request checks that its client is still there
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that hung up: nobody reads it
T = TypeVar("T")
# seconds between an engine's heartbeats to its manager
HEARTBEAT_S = 2.0


def error_json(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind}})


class BodyTooLargeError(StarletteHTTPException):
    """A request body over the server's limit. An HTTP exception, so that FastAPI's body
    reader passes it on as it is (it turns other errors into "error parsing the body")."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"request body is over the limit of {max_bytes} bytes")


class BodyLimit:
    """Rejects bodies over the limit: by their declared length before any is read, and by the
    bytes received for chunked bodies that declare none (they are never read whole)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", ())).get(b"content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > self.max_bytes:
            response = error_json(413, f"request body of {length} bytes is over the limit of {self.max_bytes}", "invalid_request_error")
            return await response(scope, receive, send)
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLargeError(self.max_bytes)
            return message

        await self.app(scope, counted_receive, send)


def _responder(status: int, kind: str):
    async def respond(_: Request, exc: Exception) -> JSONResponse:
        return error_json(status, str(exc), kind)

    return respond


def install_error_handlers(app: FastAPI, keys: KeyStore, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
    from parrot.errors import ConflictError, NotFoundError

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    # the most specific class matches first, whatever the order here
    statuses: dict[type[Exception], tuple[int, str]] = {
        UserError: (400, "invalid_request_error"),
        NotFoundError: (404, "not_found_error"),
        ConflictError: (409, "conflict_error"),
        LimitExceededError: (429, "rate_limit_error"),
        EngineUnavailableError: (503, "service_unavailable_error"),
    }
    for error_class, (status, kind) in statuses.items():
        app.add_exception_handler(error_class, _responder(status, kind))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        # routes check keys in dependencies, which run after the body parses but before it is
        # validated; a body that is not JSON at all fails first and lands here: a caller
        # without a key still hears about the key first, not about the body
        if keys.authenticate(bearer_key(request)) is None:
            return error_json(401, MISSING_KEY, "authentication_error")
        content_type = request.headers.get("content-type", "")
        if request.method in ("POST", "PUT", "PATCH") and content_type and "json" not in content_type:
            # what `curl -d` sends: the body may be JSON, but it was not sent as JSON
            return error_json(415, f"the body is read as JSON: send it with 'Content-Type: application/json', not {content_type!r}",
                              "invalid_request_error")
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body') or 'body'}: {err.get('msg')}" for err in exc.errors()
        )
        # 400 as OpenAI and vLLM answer it (FastAPI's own is 422), so that clients' BadRequestError catches it
        return error_json(400, f"invalid request: {problems}", "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        kind = {401: "authentication_error", 403: "permission_error"}.get(exc.status_code, "invalid_request_error")
        message = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:
            message = "invalid request body: it must be JSON encoded as UTF-8"
        return error_json(exc.status_code, message, kind)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_json(500, f"internal error: {type(exc).__name__}; the server logged the details", "server_error")


MISSING_KEY = "missing or unknown API key: send 'Authorization: Bearer <key>'"


def bearer_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    return key.strip() if scheme.lower() == "bearer" else None


def engine_key_required(keys: KeyStore):
    """A route dependency: only an engine's key may call it. FastAPI resolves dependencies
    before it validates the body, so a tenant's key hears 403, whatever the body."""

    def check(request: Request) -> None:
        require(keys, request, engine=True)

    return Depends(check)


def tenant_key_required(keys: KeyStore):
    """A route parameter's default: the calling tenant's name, from its key. Dependencies are
    resolved before the body is validated, so a request without a tenant's key hears 401 (or
    403 for an engine's key), whatever its body, and learns nothing of the body's schema."""

    def tenant(request: Request) -> str:
        return require(keys, request).tenant

    return Depends(tenant)


def require(keys: KeyStore, request: Request, engine: bool = False) -> Principal:
    principal = keys.authenticate(bearer_key(request))
    if principal is None:
        raise HTTPException(401, MISSING_KEY)
    if principal.is_engine != engine:
        raise HTTPException(403, "this key is not allowed here" if engine else "engine keys cannot use the session API")
    return principal


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
        if not task.done():
            task.cancel()
            # a cancelled gather ends with a CancelledError set as its exception: read it, so that
            # asyncio does not log it as never retrieved (the work was stopped on purpose)
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
