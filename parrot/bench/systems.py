"""The systems under test, each reached over HTTP as an application would reach it."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from parrot.backends.http_engine import uncapped_limits
from parrot.engine.loader import cache_dir, resolve_model_dir
from parrot.server.launch import free_port


class DelayedTransport(httpx.HTTPTransport):
    """Adds a client-server round trip to every request, in the benchmark's client only.

    It models a remote API (the paper recorded about 200-350 ms); the server's
    production path never sleeps.
    """

    def __init__(self, rtt_s: float, **options):
        super().__init__(**options)
        self.rtt_s = rtt_s

    def handle_request(self, request):
        if self.rtt_s:
            time.sleep(self.rtt_s)
        return super().handle_request(request)


@dataclass
class RunningServer:
    name: str
    url: str  # base URL; the OpenAI API is under /v1
    api_key: str
    model: str
    process: subprocess.Popen

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _wait_ready(url: str, process: subprocess.Popen, ready, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early; its log: {log}")
        try:
            if ready(httpx.get(url, timeout=2)):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise TimeoutError(f"server not ready within {timeout:.0f}s; its log: {log}")


# engine flags every `parrot serve` of this benchmark run gets (`parrot bench --device cuda
# --random-weights llama-7b`); set once by the command line, before any server starts
ENGINE_FLAGS: list[str] = []
_trace_steps = False  # `parrot bench --step-trace`: each server's built-in engines trace their steps


def use_engine_flags(flags: list[str], trace_steps: bool = False) -> None:
    global _trace_steps
    ENGINE_FLAGS[:] = flags
    _trace_steps = trace_steps


def start_parrot(model: str, engines: int, out_dir: Path, policy_args: list[str] | None = None,
                 log_name: str = "parrot-serve.log") -> RunningServer:
    key = secrets.token_urlsafe(16)
    port = free_port()
    log = out_dir / log_name
    # the command line refuses --step-trace for simulated engines, which `parrot serve` would refuse too
    trace = ["--step-trace", str(out_dir / f"{log.stem}-steps")] if _trace_steps else []
    process = subprocess.Popen(
        [sys.executable, "-m", "parrot.cli", "serve", "--model", model, "--engines", str(engines), "--port", str(port), *ENGINE_FLAGS,
         *trace, *(policy_args or [])],
        env={**os.environ, "PARROT_API_KEYS": f"bench={key}"}, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    _wait_ready(f"{url}/health", process, lambda r: len(r.json().get("engines", [])) >= engines, 300, log)
    return RunningServer("parrot", url, key, model, process)


def vllm_python() -> Path:
    return cache_dir() / "vllm-venv" / "bin" / "python"


def vllm_env(base: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment vLLM's CPU server starts in: `base`, with a 4 GiB KV space unless it sets one."""
    return {**base, "VLLM_CPU_KVCACHE_SPACE": base.get("VLLM_CPU_KVCACHE_SPACE", "4")}


def start_vllm(model: str, out_dir: Path) -> RunningServer | None:
    """The real vLLM OpenAI server on the same model, when its venv is installed."""
    python = vllm_python()
    if not python.exists():
        return None
    port = free_port()
    log = out_dir / "vllm.log"
    process = subprocess.Popen(
        [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(resolve_model_dir(model)),
         "--served-model-name", model, "--port", str(port), "--host", "127.0.0.1", "--enable-prefix-caching",
         "--dtype", "bfloat16", "--max-model-len", "8192"],
        env=vllm_env(),
        stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    _wait_ready(f"{url}/v1/models", process, lambda r: r.status_code == 200, 600, log)
    return RunningServer("vllm", url, "none", model, process)


HEARTBEAT_WAIT_S = 2.5  # engines report their stats to the manager every 2 s


def engine_metric(server: RunningServer, family: str) -> list[float] | None:
    """The values of one of the server's engine metrics (per engine; a counter's totals), read after
    the engines' next heartbeat; None where the server does not report it."""
    from prometheus_client.parser import text_string_to_metric_families

    if server.name != "parrot":
        return None
    time.sleep(HEARTBEAT_WAIT_S)
    response = httpx.get(f"{server.url}/metrics", timeout=10)
    response.raise_for_status()
    for found in text_string_to_metric_families(response.text):
        if found.name == family:  # the parser names a counter without its _total
            return [sample.value for sample in found.samples if found.type != "counter" or sample.name.endswith("_total")]
    return None


def peak_batch_blocks(server: RunningServer) -> int | None:
    """The most KV blocks one step's batch used on the server's engines, if the server reports them."""
    values = engine_metric(server, "parrot_engine_kv_blocks_peak_batch")
    return None if values is None else int(max(values, default=0))


class CompletionClient:
    """What a request-level app does per call: one OpenAI completion, waiting for the answer."""

    def __init__(self, server: RunningServer, rtt_s: float):
        self.server = server
        self._http = httpx.Client(
            base_url=server.url, headers={"authorization": f"Bearer {server.api_key}"},
            # limits go to the transport (a client given one ignores its own): no cap, so that every call
            # the app has in flight reaches the server, as separate users' calls would
            timeout=600, transport=DelayedTransport(rtt_s, limits=uncapped_limits()),
        )

    def __call__(self, prompt: str, max_tokens: int) -> str:
        body = {"model": self.server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        response = self._http.post("/v1/completions", json=body)
        response.raise_for_status()
        return response.json()["choices"][0]["text"]

    def close(self) -> None:
        self._http.close()
