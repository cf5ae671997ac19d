"""P.connect(url, api_key): the same programs, against a parrot server."""

from __future__ import annotations

import logging
import threading
import time

import httpx

from parrot.errors import UserError
from parrot.frontend.runtime import Client
from parrot.manager.spec import CallSpec, Perf
from parrot.protocol import error_message
from parrot.protocol.manager_api import (
    Batch, BatchOp, BatchResult, CallSubmit, DagBody, VariableCreate, VariableFail, VariableSet, VariableValue, WaitRequest,
)

log = logging.getLogger(__name__)

LONG_POLL_S = 30.0
MAX_BUFFERED_OPS = 1000


class ServerError(UserError):
    """The server answered with an error; the message is the server's."""


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    message = error_message(response)
    raise ServerError(f"{response.status_code}: {message}")


class HttpClient(Client):
    """Creating variables, setting them and submitting calls are buffered and sent
    as one batch when the program next waits on the server (get, dag, close): a
    whole app costs one round trip to submit, like the paper's asynchronous calls.
    """

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None, async_transport: httpx.AsyncBaseTransport | None = None):
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout, read=LONG_POLL_S + 30), transport=transport)
        self._async_transport = async_transport
        self._headers = headers
        self._pending: list[BatchOp] = []
        self._lock = threading.Lock()
        self._closed = False
        try:
            response = self._http.post("/api/v1/sessions")
        except httpx.HTTPError as exc:
            raise ServerError(f"cannot reach the parrot server at {self.url}: {exc}") from exc
        _raise_for(response)
        self.session_id = response.json()["session_id"]
        self._base = f"/api/v1/sessions/{self.session_id}"
        self.make_current()

    def _check_open(self) -> None:
        if self._closed:
            raise UserError("this session is closed: connect again with P.connect")

    def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        self._check_open()
        try:
            response = self._http.request(method, self._base + path, **kwargs)
        except httpx.HTTPError as exc:
            raise ServerError(f"the parrot server at {self.url} did not answer ({exc}); if it restarted, resubmit the program") from exc
        _raise_for(response)
        return response

    def _buffer(self, op: BatchOp) -> None:
        self._check_open()
        with self._lock:
            self._pending.append(op)
            full = len(self._pending) >= MAX_BUFFERED_OPS
        if full:
            self.flush()

    def flush(self) -> None:
        """Sends buffered operations; raises the server's message if one was refused."""
        with self._lock:
            ops, self._pending = self._pending, []
            if not ops:
                return
            result = BatchResult.model_validate(self._send("POST", "/batch", json=Batch(ops=ops).model_dump(exclude_none=True)).json())
        if result.error is not None:
            raise ServerError(f"the server refused a submitted operation ({result.applied} of {len(ops)} applied): {result.error}")

    def create_variable(self, var_id, name, value):
        self._buffer(BatchOp(create_variable=VariableCreate(var_id=var_id, name=name, value=value)))

    def set_variable(self, var_id, value):
        self._buffer(BatchOp(set_variable=(var_id, VariableSet(value=value))))

    def fail_variable(self, var_id, message):
        self.flush()
        self._send("POST", f"/variables/{var_id}/fail", json=VariableFail(message=message[:10_000]).model_dump())

    def submit_call(self, call_id, spec: CallSpec):
        self._buffer(BatchOp(submit_call=CallSubmit.of(call_id, spec)))

    def get_variable(self, var_id, perf: Perf | None, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        perf_name = perf.value if perf else "none"
        with self._lock:
            ops, self._pending = self._pending, []
        first = True
        while True:
            wait = LONG_POLL_S if deadline is None else max(0.0, min(LONG_POLL_S, deadline - time.monotonic()))
            if first:
                # buffered operations ride along with the first wait: one round trip in all
                body = WaitRequest(ops=ops, var_id=var_id, perf=perf_name, timeout=wait)
                response = self._send("POST", "/wait", json=body.model_dump(exclude_none=True))
                first = False
            else:
                response = self._send("GET", f"/variables/{var_id}", params={"perf": perf_name, "timeout": wait})
            value = VariableValue.model_validate(response.json())
            if value.ready:
                return value.value or ""
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"variable {var_id} was not ready within {timeout}s")

    async def aget_variable(self, var_id, perf):
        self._check_open()
        self.flush()
        async with httpx.AsyncClient(base_url=self.url, headers=self._headers, timeout=LONG_POLL_S + 30, transport=self._async_transport) as http:
            while True:
                params = {"perf": perf.value if perf else "none", "timeout": LONG_POLL_S}
                response = await http.get(f"{self._base}/variables/{var_id}", params=params)
                _raise_for(response)
                value = VariableValue.model_validate(response.json())
                if value.ready:
                    return value.value or ""

    def dag(self) -> DagBody:
        self.flush()
        return DagBody.model_validate(self._send("GET", "/dag").json())

    @property
    def client_calls(self) -> int:
        raise UserError("client_calls is counted on the embedded runtime only")

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
            self._send("DELETE", "")
        except ServerError as exc:
            log.warning("closing session %s: %s", self.session_id, exc)
        self._closed = True
        self._http.close()
        super().close()


def connect(url: str, api_key: str | None = None, **options) -> HttpClient:
    """A session on a parrot server; it becomes the current runtime."""
    return HttpClient(url, api_key, **options)
