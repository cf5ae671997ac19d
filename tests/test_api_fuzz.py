"""The manager's HTTP API fuzzed from its own OpenAPI schema (schemathesis).

Generated requests, valid and invalid, go to the real app in process (on a simulated
engine, so calls that do get through finish at once). Whatever arrives, the answer
is never a server error, every error carries a message, and the server keeps serving.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from starlette.testclient import TestClient

from parrot.backends.simulated import SimulatedEngineBackend
from parrot.manager.manager import Manager, SessionLimits
from parrot.server.auth import KeyStore
from parrot.server.manager_app import create_manager_app

KEY = "fuzz-key"
ENGINE_KEY = "fuzz-engine-key"


KEYS = KeyStore.load(env={}, engine_key=ENGINE_KEY)
KEYS.add("fuzzer", KEY)
MANAGER = Manager([SimulatedEngineBackend("sim-0")], limits=SessionLimits(max_sessions_per_tenant=10_000))
APP = create_manager_app(MANAGER, KEYS, "simulated")
# requests name this session, so that they reach past the session lookup into variables and calls
SESSION = MANAGER.create_session("fuzzer")
READY = "fuzz-ready"
MANAGER.create_variable(SESSION, READY, READY, "a value", tenant="fuzzer")
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_input_makes_a_server_error(case) -> None:
    path, method = case.operation.path, case.method.upper()
    if "session_id" in (case.path_parameters or {}) and method != "DELETE":
        case.path_parameters["session_id"] = SESSION
    if path.endswith("/stream"):
        case.path_parameters["var_id"] = READY  # a stream of a variable nobody sets rightly waits for ever
    # long polls would wait out their timeouts on variables that never complete
    if method == "GET" and path.endswith("{var_id}"):
        case.query = {**(case.query or {}), "timeout": 0}
    if path.endswith("/wait") and isinstance(case.body, dict):
        case.body["timeout"] = 0
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = "simulated"  # past the model check, into the prompt and sampling
    response = case.call(headers={"authorization": f"Bearer {KEY}"})
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.json()["error"]["message"], response.text


@pytest.mark.parametrize("path", ["/health", "/api/v1/sessions"])
def test_the_fuzzed_server_still_serves(path: str) -> None:
    with TestClient(APP) as client:
        method = client.get if path == "/health" else client.post
        response = method(path, headers={"authorization": f"Bearer {KEY}"})
        assert response.status_code == 200, response.text
