"""Session lifetime and limits: idle sessions expire and free what they hold; no tenant crowds out another."""

from __future__ import annotations

import asyncio
import time

import pytest

from parrot.backends.simulated import CostModel, SimulatedEngineBackend
from parrot.engine.sampler import SamplingParams
from parrot.errors import LimitExceededError, UserError
from parrot.manager.graph import CallState
from parrot.manager.manager import Manager, SessionLimits
from parrot.manager.spec import CallSpec, InputBinding, OutputBinding


def start_long_call(manager: Manager, tenant: str = "local") -> str:
    session = manager.create_session(tenant)
    manager.create_variable(session, "task", "task", "a snake game", tenant=tenant)
    manager.create_variable(session, "code", "code", None, tenant=tenant)
    spec = CallSpec("code", "Write {{task}}: {{code}}", (InputBinding("task", "task"),),
                    (OutputBinding("code", "code", SamplingParams(max_tokens=500)),))
    manager.submit_call(session, "c", spec, tenant=tenant)
    return session


async def until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def slow_engine() -> SimulatedEngineBackend:
    return SimulatedEngineBackend("sim", cost=CostModel(seconds_per_decode_step=0.01))


def test_a_session_whose_client_went_away_expires_and_its_call_frees_the_engine() -> None:
    async def main() -> None:
        engine = slow_engine()
        manager = Manager([engine], limits=SessionLimits(idle_timeout_s=60))
        session = start_long_call(manager)
        reader = asyncio.ensure_future(manager.get_variable(session, "code"))
        await until(lambda: engine.stats().running_jobs == 1)
        assert manager.expire_idle_sessions(time.monotonic() + 120) == []  # someone waits on it: not idle
        reader.cancel()  # the client disappears
        await asyncio.sleep(0)
        assert manager.expire_idle_sessions(time.monotonic() + 30) == []  # not idle long enough
        assert manager.expire_idle_sessions(time.monotonic() + 120) == [session]
        await until(lambda: not engine.tree.live)
        engine.check_integrity()
        assert manager.expired_sessions == 1 and session not in manager.sessions
        with pytest.raises(UserError, match="no session"):
            manager.session(session)
        await manager.shutdown()

    asyncio.run(main())


def test_closing_a_session_stops_its_running_call() -> None:
    async def main() -> None:
        engine = slow_engine()
        manager = Manager([engine])
        session = start_long_call(manager)
        graph = manager.sessions[session].graph
        manager.request(session, graph.variable("code"), None)
        await until(lambda: engine.stats().running_jobs == 1)
        manager.close_session(session)
        await until(lambda: not engine.tree.live)
        call = graph.calls[f"{session}:c"]
        assert call.state is CallState.FAILED and "session was closed" in str(call.error)
        engine.check_integrity()
        await manager.shutdown()

    asyncio.run(main())


def test_sessions_per_tenant_are_bounded_and_other_tenants_are_not_affected() -> None:
    manager = Manager([SimulatedEngineBackend("sim")], limits=SessionLimits(max_sessions_per_tenant=2))
    first = manager.create_session("alice")
    manager.create_session("alice")
    with pytest.raises(LimitExceededError, match="tenant 'alice' has 2 open sessions"):
        manager.create_session("alice")
    manager.create_session("bob")
    manager.close_session(first, "alice")
    manager.create_session("alice")  # room again


def test_an_expired_session_makes_room_for_its_tenant() -> None:
    manager = Manager([SimulatedEngineBackend("sim")], limits=SessionLimits(max_sessions_per_tenant=1, idle_timeout_s=60))
    first = manager.create_session("alice")
    with pytest.raises(LimitExceededError):
        manager.create_session("alice")
    assert manager.expire_idle_sessions(time.monotonic() + 120) == [first]
    manager.create_session("alice")


def test_calls_and_variables_per_session_are_bounded() -> None:
    manager = Manager([SimulatedEngineBackend("sim")], limits=SessionLimits(max_calls_per_session=1, max_variables_per_session=3))
    session = manager.create_session()
    for name in ("a", "b", "c"):
        manager.create_variable(session, name, name, None)
    with pytest.raises(LimitExceededError, match="3 variables"):
        manager.create_variable(session, "d", "d", None)
    spec = CallSpec("f", "{{a}} {{b}}", (InputBinding("a", "a"),), (OutputBinding("b", "b"),))
    manager.submit_call(session, "one", spec)
    with pytest.raises(LimitExceededError, match="1 calls"):
        manager.submit_call(session, "two", spec)


def test_limits_are_checked() -> None:
    with pytest.raises(UserError, match="idle timeout must be positive"):
        SessionLimits(idle_timeout_s=-1)
    with pytest.raises(UserError, match="at least 1"):
        SessionLimits(max_sessions_per_tenant=0)


def test_over_http_a_limit_answers_429_and_an_engine_outage_503() -> None:
    from starlette.testclient import TestClient
    from test_engine_faults import DyingBackend

    from parrot.server.auth import KeyStore
    from parrot.server.manager_app import create_manager_app

    keys = KeyStore.load(env={}, engine_key="engine-key")
    keys.add("t", "k")
    manager = Manager([DyingBackend("only")], limits=SessionLimits(max_sessions_per_tenant=1))
    headers = {"authorization": "Bearer k"}
    with TestClient(create_manager_app(manager, keys, "simulated")) as client:
        session = client.post("/api/v1/sessions", headers=headers).json()["session_id"]
        refused = client.post("/api/v1/sessions", headers=headers)
        assert refused.status_code == 429 and "open sessions" in refused.json()["error"]["message"]
        ops = [{"create_variable": {"var_id": "q", "value": "hi"}}, {"create_variable": {"var_id": "a"}},
               {"submit_call": {"call_id": "c", "function": "f", "template": "{{input:q}} {{output:a}}",
                                "inputs": [{"name": "q", "var_id": "q"}], "outputs": [{"name": "a", "var_id": "a"}]}}]
        lost = client.post(f"/api/v1/sessions/{session}/wait", headers=headers, json={"ops": ops, "var_id": "a", "timeout": 10})
        assert lost.status_code == 503 and "resubmit" in lost.json()["error"]["message"]
