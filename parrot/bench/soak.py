"""The `soak` workload: many concurrent clients run mixed apps against `parrot serve`
(two engines) for minutes; nothing may fail and nothing may leak.

Each client loops over four kinds of app: a two-call chain (`get(perf=LATENCY)`), a
map-reduce (`get(perf=THROUGHPUT)`), an OpenAI-SDK chat completion streamed to its end,
and an abandoned app (the client submits and requests a call, then goes away without
closing its session: the server must expire the session and free what it held). The
report compares the server before and after: engine contexts, KV blocks held by live
contexts (cached prefixes are reclaimable and counted apart), and process memory.
"""

from __future__ import annotations

import itertools
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

import parrot as P
from parrot.bench import apps
from parrot.bench.config import pick_size
from parrot.bench.systems import RunningServer

APP_KINDS = ("chain", "map-reduce", "openai-stream", "abandoned")
HEARTBEAT_WAIT_S = 2.5  # engines report their stats to the manager every 2 s


@dataclass(frozen=True)
class SoakConfig:
    clients: int  # concurrent client threads, each with its own sessions
    duration_s: float  # no app starts after this
    max_apps: int  # nor after this many in all
    output_tokens: int
    session_idle_timeout_s: float  # short, so abandoned sessions expire within the run
    engines: int = 2
    paper: str = "issue 8's soak (no figure in the paper)"


SOAK_WORKLOADS: dict[str, tuple[SoakConfig, SoakConfig]] = {
    "soak": (
        SoakConfig(clients=16, duration_s=300, max_apps=5000, output_tokens=12, session_idle_timeout_s=10),
        SoakConfig(clients=4, duration_s=15, max_apps=16, output_tokens=4, session_idle_timeout_s=2),
    ),
}


@dataclass(frozen=True)
class AppRun:
    kind: str
    started_s: float  # from the start of the run
    latency_s: float
    error: str | None


@dataclass(frozen=True)
class ServerSnapshot:
    sessions: int
    engine_contexts: int  # live contexts on all engines (cached prefixes not counted)
    kv_blocks_live: int  # blocks in use less those held only by cached prefixes
    kv_blocks_cached: int
    running_jobs: int
    rss_mib: float  # the manager and its engine processes


@dataclass
class SoakResult:
    config: SoakConfig
    runs: list[AppRun] = field(default_factory=list)
    before: ServerSnapshot | None = None
    after: ServerSnapshot | None = None
    wall_s: float = 0.0

    @property
    def errors(self) -> list[AppRun]:
        return [r for r in self.runs if r.error is not None]

    def latency_percentiles(self, kind: str) -> dict[str, float]:
        latencies = sorted(r.latency_s for r in self.runs if r.kind == kind and r.error is None)
        if len(latencies) < 2:
            return {"p50": latencies[0] if latencies else float("nan"), "p90": float("nan"), "p99": float("nan")}
        cuts = statistics.quantiles(latencies, n=100, method="inclusive")
        return {"p50": cuts[49], "p90": cuts[89], "p99": cuts[98]}


def quick_or_full(name: str, quick: bool) -> SoakConfig:
    return pick_size(SOAK_WORKLOADS, name, quick)


def snapshot(server: RunningServer) -> ServerSnapshot:
    metrics: dict[str, float] = {}
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            metrics[sample.name] = metrics.get(sample.name, 0.0) + sample.value
    used, cached = metrics.get("parrot_engine_kv_blocks_used", 0), metrics.get("parrot_engine_kv_blocks_cached", 0)
    return ServerSnapshot(int(metrics.get("parrot_sessions", 0)), int(metrics.get("parrot_engine_contexts", 0)), int(used - cached),
                          int(cached), int(metrics.get("parrot_engine_running_jobs", 0)), process_tree_rss_mib(server.process.pid))


def process_tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and its descendants (Linux /proc)."""
    total_kib, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/status") as status:
                total_kib += next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
            with open(f"/proc/{current}/task/{current}/children") as children:
                stack.extend(int(child) for child in children.read().split())
        except (FileNotFoundError, StopIteration, ProcessLookupError):
            continue  # it exited between the listing and the read
    return total_kib / 1024


def settle(server: RunningServer, config: SoakConfig, timeout_s: float = 120) -> ServerSnapshot:
    """Waits until abandoned sessions have expired and the engines' stats are fresh."""
    deadline = time.monotonic() + timeout_s
    time.sleep(config.session_idle_timeout_s + HEARTBEAT_WAIT_S)
    current = snapshot(server)
    while (current.sessions or current.running_jobs or current.engine_contexts) and time.monotonic() < deadline:
        time.sleep(1.0)
        current = snapshot(server)
    return current


def run_soak(config: SoakConfig, server: RunningServer, progress: Callable[[int], None] | None = None) -> SoakResult:
    result = SoakResult(config)
    lock = threading.Lock()
    counter = itertools.count()
    chat = apps.semantic("chat", "Answer in one sentence.\nQuestion: {{input:chunk}}\nAnswer:{{output:summary}}", ["chunk"],
                         config.output_tokens)
    refine = apps.semantic("refine", "Make this answer shorter.\nAnswer: {{input:chunk}}\nShorter:{{output:summary}}", ["chunk"],
                           config.output_tokens)
    start = time.perf_counter()

    def one_app(kind: str, index: int) -> None:
        question = f"What is fact number {index} about parrots?"
        if kind == "chain":
            with P.connect(server.url, api_key=server.api_key):
                refine(chunk=chat(chunk=question)).get(perf=P.LATENCY)
        elif kind == "map-reduce":
            with P.connect(server.url, api_key=server.api_key):
                apps.parrot_map_reduce([f"{question} Part {part}." for part in range(3)], config.output_tokens).get(perf=P.THROUGHPUT)
        elif kind == "openai-stream":
            from openai import OpenAI

            client = OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0)
            stream = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": question}],
                                                    max_tokens=config.output_tokens, stream=True)
            if not "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices):
                raise RuntimeError("the stream carried no text")
        else:  # abandoned: the session is never closed and its call is never waited for
            headers = {"authorization": f"Bearer {server.api_key}"}
            with httpx.Client(base_url=server.url, headers=headers, timeout=30) as http:
                session = http.post("/api/v1/sessions").raise_for_status().json()["session_id"]
                http.post(f"/api/v1/sessions/{session}/batch", json={"ops": [
                    {"create_variable": {"var_id": "q", "value": question}}, {"create_variable": {"var_id": "a"}},
                    {"submit_call": {"call_id": "c", "function": "chat", "template": "Q: {{input:q}}\nA:{{output:a}}",
                                     "inputs": [{"name": "q", "var_id": "q"}],
                                     "outputs": [{"name": "a", "var_id": "a", "sampling": {"max_tokens": 64}}]}},
                ]}).raise_for_status()
                http.get(f"/api/v1/sessions/{session}/variables/a", params={"timeout": 0}).raise_for_status()

    def client(client_index: int) -> None:
        for round_index in itertools.count():
            index = next(counter)
            if index >= config.max_apps or time.perf_counter() - start > config.duration_s:
                return
            kind = APP_KINDS[(client_index + round_index) % len(APP_KINDS)]
            began = time.perf_counter()
            error = None
            try:
                one_app(kind, index)
            except Exception as exc:  # counted and reported: the soak's goal is that none happen
                error = f"{type(exc).__name__}: {exc}"
            with lock:
                result.runs.append(AppRun(kind, began - start, time.perf_counter() - began, error))
                if progress is not None:
                    progress(len(result.runs))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(config.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.wall_s = time.perf_counter() - start
    return result
