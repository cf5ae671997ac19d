"""Engine processes that die.

A real engine process killed mid-generation: its request completes on the other engine.
`parrot serve --engines 0` with two `parrot engine` processes on loopback; the test
kills the one generating, reads the stream to its end, and checks that the dead
engine is dropped and that a restarted one registers again and takes work.
And a manager whose own engine processes all fail to start stops with a message.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx

from test_http_api import ENGINE_KEY, MODEL, auth, start_server, stop, wait_for_engines

PROMPT = "You are an expert software engineer.\nWrite python code of a snake game.\nCode: "
TOKENS = 48


def start_engine(url: str, name: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "parrot.cli", "engine", "--manager", url, "--model", MODEL, "--name", name, "--kv-memory-gb", "0.25"],
        env={**os.environ, "PARROT_ENGINE_KEY": ENGINE_KEY}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def engines_of(url: str) -> list[str]:
    return httpx.get(f"{url}/health", timeout=5).json()["engines"]


def stream_completion(url: str, on_first_delta) -> tuple[str, str | None]:
    """Streams a completion; calls on_first_delta() once text arrives. Returns (text, finish_reason)."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True, "stream": True}
    text, finish, called = "", None, False
    with httpx.stream("POST", f"{url}/v1/completions", headers=auth("alice"), json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            assert "error" not in event, event
            choice = event["choices"][0]
            text += choice["text"]
            finish = choice.get("finish_reason") or finish
            if text and not called:
                called = True
                on_first_delta()
    return text, finish


def test_killed_engine_its_request_completes_elsewhere_and_a_restarted_one_rejoins(tokenizer):
    proc, url = start_server(["--engines", "0", "--heartbeat-timeout", "3"])
    first = second = restarted = None
    try:
        wait_for_engines(url, 0, proc)
        first = start_engine(url, "first")
        wait_for_engines(url, 1, proc)
        second = start_engine(url, "second")
        wait_for_engines(url, 2, proc)
        assert engines_of(url) == ["first", "second"]  # both idle: the first is picked

        reference = httpx.post(f"{url}/v1/completions", headers=auth("alice"), timeout=120,
                               json={"model": MODEL, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True})
        expected = reference.json()["choices"][0]["text"]

        text, finish = stream_completion(url, lambda: os.kill(first.pid, signal.SIGKILL))
        first.wait(timeout=10)
        # continued on the other engine after what the first streamed, for the tokens left: the stream
        # ends as it would have. Its words may differ from the reference's where a near tie fell the other
        # way (the first engine read its prompt's cached prefix; the text is pinned in test_engine_faults.py)
        assert finish == "length" and text.strip()
        assert abs(len(tokenizer.encode(text)) - TOKENS) <= 4
        deadline = time.monotonic() + 30
        while "first" in engines_of(url) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert engines_of(url) == ["second"]  # dropped after its missed heartbeats

        restarted = start_engine(url, "first")
        wait_for_engines(url, 2, proc)
        # the second dies too: a request placed on it before it is dropped runs on the restarted one
        os.kill(second.pid, signal.SIGKILL)
        second.wait(timeout=10)
        again = httpx.post(f"{url}/v1/completions", headers=auth("alice"), timeout=120,
                           json={"model": MODEL, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True})
        assert again.status_code == 200, again.text
        assert again.json()["choices"][0]["text"] == expected
        assert proc.poll() is None
    finally:
        for child in (first, second, restarted):
            if child is not None and child.poll() is None:
                stop(child)
        stop(proc)


def test_a_manager_whose_engines_all_fail_to_start_stops_with_a_message(tmp_path):
    """Its waiting client hears 503 (or a closed connection), not silence, and the manager exits."""
    import shutil
    import threading

    from parrot.engine.loader import resolve_model_dir

    # a model directory the manager can read (config, tokenizer) but whose engine cannot load: no weights
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(resolve_model_dir(MODEL) / name, tmp_path / name)
    proc = subprocess.Popen([sys.executable, "-m", "parrot.cli", "serve", "--model", str(tmp_path), "--engines", "1", "--port", "0"],
                            env={**os.environ, "PARROT_API_KEYS": "t=fail-key"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # "parrot manager on http://127.0.0.1:PORT (...)", printed before the engine loads
        url = line.split(" on ", 1)[1].split(" ", 1)[0]
        answer: list[object] = []

        def ask() -> None:
            try:
                answer.append(httpx.post(f"{url}/v1/completions", json={"model": str(tmp_path), "prompt": "Hi", "max_tokens": 4},
                                         headers={"Authorization": "Bearer fail-key"}, timeout=60).status_code)
            except httpx.HTTPError as exc:  # the manager stopped before or while it answered
                answer.append(type(exc).__name__)

        client = threading.Thread(target=ask)
        client.start()
        _, stderr = proc.communicate(timeout=60)
        client.join(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 2
    assert "has no *.safetensors file" in stderr  # the engine's own error, passed through
    assert "engine-0" in stderr and "every engine process of this manager exited" in stderr
    assert not client.is_alive() and answer and answer[0] in (503, "ConnectError", "RemoteProtocolError", "ReadError"), answer


def test_an_engine_heard_from_after_the_last_exit_keeps_the_manager_up():
    """An engine restarted by hand under a dead one's name ("engine-0"), or an --openai-backend
    (which never heartbeats), serves the manager: only when neither is left does it stop."""
    import asyncio
    from types import SimpleNamespace

    from parrot.server.launch import engine_serving_since, watch_engine_processes
    from parrot.server.manager_app import EngineLiveness

    def run_watch(restart_by_hand: bool = False, openai_backend: bool = False) -> bool:
        liveness = EngineLiveness(timeout_s=10)
        liveness.last_seen["engine-0"] = time.monotonic()  # the local engine registered, then dies
        engines = [SimpleNamespace(name="engine-0"), *([SimpleNamespace(name="openai-0")] if openai_backend else [])]
        serving = engine_serving_since(SimpleNamespace(engines=engines), liveness)
        child = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
        gone: list[bool] = []

        async def scenario() -> None:
            watch = asyncio.create_task(watch_engine_processes(
                [child], serving, lambda: gone.append(True), lambda: False, period_s=0.05, settle_s=0.5))
            if restart_by_hand:
                child.wait()
                await asyncio.sleep(0.2)
                liveness.last_seen["engine-0"] = time.monotonic()  # the replacement registers under the same name
            await watch

        asyncio.run(scenario())
        return bool(gone)

    assert run_watch()
    assert not run_watch(restart_by_hand=True)
    assert not run_watch(openai_backend=True)
