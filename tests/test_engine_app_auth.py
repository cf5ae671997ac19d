"""Who may call an engine server's routes: only the manager's engine key, whatever the body."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest

from parrot.server.auth import KeyStore
from parrot.server.engine_app import create_engine_app

from loopback import serve_on_loopback

ENGINE_KEY, TENANT_KEY = "engine-secret", "alice-secret"


def test_an_engine_server_refuses_other_keys_before_it_reads_the_body():
    keys = KeyStore.load(env={"PARROT_API_KEYS": f"alice={TENANT_KEY}"}, engine_key=ENGINE_KEY)
    async def close() -> None:  # the server closes its backend as it stops
        pass

    backend = SimpleNamespace(name="engine-0", model="m", close=close)  # no route below reaches the backend
    bad_fill = {"context_id": 7}
    with serve_on_loopback(create_engine_app(backend, keys)) as url, httpx.Client(base_url=url, timeout=10) as http:
        assert http.get("/health").json()["name"] == "engine-0"  # open: liveness probes carry no key
        for path, body in (("/fill", bad_fill), ("/generate", {}), ("/free", {})):
            keyless = http.post(path, json=body)
            assert keyless.status_code == 401 and keyless.json()["error"]["type"] == "authentication_error"
            tenant = http.post(path, json=body, headers={"authorization": f"Bearer {TENANT_KEY}"})
            assert tenant.status_code == 403 and tenant.json()["error"]["type"] == "permission_error", path
        assert http.get("/stats", headers={"authorization": f"Bearer {TENANT_KEY}"}).status_code == 403
        engine = http.post("/fill", json=bad_fill, headers={"authorization": f"Bearer {ENGINE_KEY}"})
        assert engine.status_code == 400 and "context_id" in engine.json()["error"]["message"]


def test_a_key_file_that_names_no_usable_key_is_refused_with_what_to_write(tmp_path):
    import hashlib
    import json

    from parrot.errors import UserError

    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(UserError, match="lists no API keys"):
        KeyStore.load(str(empty), env={})
    short = tmp_path / "short.json"
    short.write_text(json.dumps([{"tenant": "alice", "key_sha256": "abc"}]))
    with pytest.raises(UserError, match="'abc' is no key_sha256: give the 64 hex digits"):
        KeyStore.load(str(short), env={})
    good = tmp_path / "good.json"
    good.write_text(json.dumps([{"tenant": "alice", "key_sha256": hashlib.sha256(b"k1").hexdigest().upper()}]))
    assert KeyStore.load(str(good), env={}).authenticate("k1").tenant == "alice"
