"""P.connect(url, api_key): the same programs, against a parrot server."""

from __future__ import annotations

import time

import httpx

from parrot.errors import UserError
from parrot.frontend.runtime import Client
from parrot.manager.spec import CallSpec, Perf
from parrot.protocol.manager_api import CallSubmit, DagBody, VariableCreate, VariableFail, VariableSet, VariableValue

LONG_POLL_S = 30.0


class ServerError(UserError):
    """The server answered with an error; the message is the server's."""


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:500] or response.reason_phrase
    raise ServerError(f"{response.status_code}: {message}")


class HttpClient(Client):
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0):
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout, read=LONG_POLL_S + 30))
        self._headers = headers
        try:
            response = self._http.post("/api/v1/sessions")
        except httpx.HTTPError as exc:
            raise ServerError(f"cannot reach the parrot server at {self.url}: {exc}") from exc
        _raise_for(response)
        self.session_id = response.json()["session_id"]
        self._base = f"/api/v1/sessions/{self.session_id}"
        self.make_current()

    def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self._http.request(method, self._base + path, **kwargs)
        except httpx.HTTPError as exc:
            raise ServerError(f"the parrot server at {self.url} did not answer ({exc}); if it restarted, resubmit the program") from exc
        _raise_for(response)
        return response

    def create_variable(self, var_id, name, value):
        self._send("POST", "/variables", json=VariableCreate(var_id=var_id, name=name, value=value).model_dump())

    def set_variable(self, var_id, value):
        self._send("PUT", f"/variables/{var_id}", json=VariableSet(value=value).model_dump())

    def fail_variable(self, var_id, message):
        self._send("POST", f"/variables/{var_id}/fail", json=VariableFail(message=message[:10_000]).model_dump())

    def submit_call(self, call_id, spec: CallSpec):
        self._send("POST", "/calls", json=CallSubmit.of(call_id, spec).model_dump())

    def get_variable(self, var_id, perf: Perf | None, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = LONG_POLL_S if deadline is None else max(0.0, min(LONG_POLL_S, deadline - time.monotonic()))
            params = {"perf": perf.value if perf else "none", "timeout": wait}
            value = VariableValue.model_validate(self._send("GET", f"/variables/{var_id}", params=params).json())
            if value.ready:
                return value.value or ""
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"variable {var_id} was not ready within {timeout}s")

    async def aget_variable(self, var_id, perf):
        async with httpx.AsyncClient(base_url=self.url, headers=self._headers, timeout=LONG_POLL_S + 30) as http:
            while True:
                params = {"perf": perf.value if perf else "none", "timeout": LONG_POLL_S}
                response = await http.get(f"{self._base}/variables/{var_id}", params=params)
                _raise_for(response)
                value = VariableValue.model_validate(response.json())
                if value.ready:
                    return value.value or ""

    def dag(self) -> DagBody:
        return DagBody.model_validate(self._send("GET", "/dag").json())

    @property
    def client_calls(self) -> int:
        raise UserError("client_calls is counted on the embedded runtime only")

    def close(self) -> None:
        try:
            self._send("DELETE", "")
        except ServerError:
            pass  # the session is gone already (server restarted or expired)
        self._http.close()
        super().close()


def connect(url: str, api_key: str | None = None) -> HttpClient:
    """A session on a parrot server; it becomes the current runtime."""
    return HttpClient(url, api_key)
