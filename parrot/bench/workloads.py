"""The workloads: their parameters (full and --quick) and one measured run of each."""

from __future__ import annotations

import logging
import random
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import parrot as P
from parrot.bench import apps
from parrot.bench.config import pick_size
from parrot.bench.documents import chunks as make_chunks
from parrot.bench.systems import CompletionClient, DelayedTransport, RunningServer
from parrot.errors import UserError


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkloadConfig:
    chunks: int
    chunk_tokens: int
    output_tokens: int
    apps: int = 1
    background_rate: float = 0.0  # background requests per second (chain-summary-bg)
    paper: str = ""  # the paper's figure and ratio, shown beside ours


WORKLOADS: dict[str, tuple[WorkloadConfig, WorkloadConfig]] = {  # name -> (full, quick)
    "chain-summary": (
        WorkloadConfig(chunks=6, chunk_tokens=512, output_tokens=32, paper="Fig. 11: 1.38-1.88x vs vLLM request-level"),
        WorkloadConfig(chunks=3, chunk_tokens=48, output_tokens=4),
    ),
    "chain-summary-bg": (
        WorkloadConfig(chunks=6, chunk_tokens=512, output_tokens=32, background_rate=0.5, paper="Fig. 12a: 1.14x (1 req/s) to 2.88x (3.5 req/s)"),
        WorkloadConfig(chunks=3, chunk_tokens=48, output_tokens=4, background_rate=2.0),
    ),
    "multi-chain": (
        WorkloadConfig(chunks=4, chunk_tokens=256, output_tokens=24, apps=8, paper="Fig. 12b: JCT 1.38-1.68x"),
        WorkloadConfig(chunks=2, chunk_tokens=48, output_tokens=4, apps=3),
    ),
    "map-reduce": (
        WorkloadConfig(chunks=8, chunk_tokens=512, output_tokens=32, paper="Fig. 13: 1.66-2.30x"),
        WorkloadConfig(chunks=3, chunk_tokens=48, output_tokens=4),
    ),
}

@dataclass(frozen=True)
class SizeOverrides:
    """Workload parameters given on the command line; None keeps the size's own."""

    apps: int | None = None
    chunks: int | None = None
    chunk_tokens: int | None = None
    output_tokens: int | None = None
    background_rate: float | None = None

    def apply(self, config: WorkloadConfig) -> WorkloadConfig:
        given = {name: value for name, value in vars(self).items() if value is not None}
        return replace(config, **given)


# The paper's sizes (DESIGN.md section 4: chunks of 512-2048 tokens, outputs of 25-100,
# 10-25 chain apps at once, background at 1-3.5 req/s), for engines that run them in
# minutes: simulated A100s or a GPU. On this machine's CPU one run would take hours.
PAPER_SIZES: dict[str, WorkloadConfig] = {
    name: replace(full, **sizes) for name, sizes in {
        "chain-summary": {"chunks": 16, "chunk_tokens": 1024, "output_tokens": 50},
        "chain-summary-bg": {"chunks": 16, "chunk_tokens": 1024, "output_tokens": 50, "background_rate": 4.0},
        "multi-chain": {"chunks": 8, "chunk_tokens": 1024, "output_tokens": 50, "apps": 20},
        "map-reduce": {"chunks": 32, "chunk_tokens": 1024, "output_tokens": 50},
    }.items() for full in [WORKLOADS[name][0]]
}


@dataclass
class Measurement:
    system: str
    rtt_ms: float
    latencies_s: list[float]  # one per app
    final_outputs: list[str]
    background_requests: int = 0
    background_latencies_s: list[float] = field(default_factory=list)
    background_failures: int = 0

    @property
    def mean_s(self) -> float:
        return statistics.fmean(self.latencies_s)

    @property
    def background_mean_s(self) -> float | None:
        """What the latency class costs the other clients: their requests' mean latency."""
        return statistics.fmean(self.background_latencies_s) if self.background_latencies_s else None

    @property
    def p90_s(self) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


def _run_parrot_app(server: RunningServer, rtt_s: float, build: Callable[[], P.SemanticVariable]) -> tuple[float, str]:
    # the session is opened before the clock starts, as the request-level client's connection is
    with P.connect(server.url, api_key=server.api_key, transport=DelayedTransport(rtt_s)):
        started = time.perf_counter()
        text = build().get(perf=P.LATENCY)
        elapsed = time.perf_counter() - started
    return elapsed, text


def _run_request_app(client: CompletionClient, run: Callable[[CompletionClient], str]) -> tuple[float, str]:
    started = time.perf_counter()
    text = run(client)
    return time.perf_counter() - started, text


@dataclass
class BackgroundLoad:
    """Poisson arrivals of plain completions, the same schedule for every system."""

    server: RunningServer
    rate: float
    prompt: str
    output_tokens: int
    seed: int = 7
    sent: int = 0
    latencies_s: list[float] = field(default_factory=list)  # each request's, once it is answered
    failures: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self):
        if self.rate > 0:
            self._threads.append(threading.Thread(target=self._loop, daemon=True))
            self._threads[0].start()
        return self

    def _loop(self) -> None:
        rng = random.Random(self.seed)
        client = CompletionClient(self.server, 0.0)
        with ThreadPoolExecutor(max_workers=64) as pool:
            while not self._stop.wait(rng.expovariate(self.rate)):
                pool.submit(self._timed, client)
                self.sent += 1
        client.close()

    def _timed(self, client: CompletionClient) -> None:
        started = time.perf_counter()
        try:
            client(self.prompt, self.output_tokens)
        except Exception:
            # counted, so that a mean over the answered ones cannot hide the failed ones
            log.exception("a background request failed")
            self.failures += 1
            return
        self.latencies_s.append(time.perf_counter() - started)

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join()


@dataclass(frozen=True)
class RunDocuments:
    """The text one measured run reads: each app's chunks, and the background requests' chunk."""

    apps: list[list[str]]
    background: str

    @staticmethod
    def chunks_per_run(config: WorkloadConfig) -> int:
        return config.apps * config.chunks + 1  # the background's chunk is the +1

    @classmethod
    def of(cls, tokenizer, config: WorkloadConfig, document_set: int) -> RunDocuments:
        # sets never overlap: a run whose first chunk was the run before's background prompt
        # would find it in the prefix cache and start a step ahead
        first = document_set * cls.chunks_per_run(config)
        apps = [make_chunks(tokenizer, config.chunks, config.chunk_tokens, offset_chunks=first + i * config.chunks)
                for i in range(config.apps)]
        background = make_chunks(tokenizer, 1, config.chunk_tokens, offset_chunks=first + config.apps * config.chunks)[0]
        return cls(apps, background)


def run_workload(name: str, config: WorkloadConfig, system: str, server: RunningServer, rtt_s: float, tokenizer,
                 document_set: int = 0) -> Measurement:
    """One measured run: `system` is parrot or request-level (an orchestrating client on server).

    Every measured run reads documents of its own (document_set): engines cache
    prompt prefixes, so a run on documents another run has read would be faster
    for a reason that is not the system's.
    """
    map_reduce = name == "map-reduce"
    run_documents = RunDocuments.of(tokenizer, config, document_set)
    documents = run_documents.apps
    client = CompletionClient(server, rtt_s) if system != "parrot" else None

    def one_app(index: int) -> tuple[float, str]:
        doc = documents[index]
        if client is None:
            program = apps.parrot_map_reduce if map_reduce else apps.parrot_chain
            return _run_parrot_app(server, rtt_s, lambda: program(doc, config.output_tokens))
        orchestrate = apps.request_map_reduce if map_reduce else apps.request_chain
        return _run_request_app(client, lambda c: orchestrate(c, doc, config.output_tokens))

    background_prompt = apps.render(apps.SUMMARIZE, {"chunk": run_documents.background})
    try:
        with BackgroundLoad(server, config.background_rate, background_prompt, config.output_tokens) as load:
            with ThreadPoolExecutor(max_workers=config.apps) as pool:
                results = list(pool.map(one_app, range(config.apps)))
    finally:
        if client is not None:
            client.close()
    return Measurement(system, rtt_s * 1e3, [r[0] for r in results], [r[1] for r in results], load.sent, load.latencies_s, load.failures)


def check_documents_suffice(tokenizer, config: WorkloadConfig, measured_runs: int) -> None:
    """Fails before any server starts when the measured runs (each on documents of its own,
    after the warm-up's set 0) would run out of document text part-way through."""
    chunks_per_run = RunDocuments.chunks_per_run(config)
    try:
        make_chunks(tokenizer, 1, config.chunk_tokens, offset_chunks=(measured_runs + 1) * chunks_per_run - 1)
    except UserError:
        raise UserError(f"{measured_runs} measured runs of {chunks_per_run * config.chunk_tokens} document tokens each do not fit "
                        "the benchmark's documents (about 1M tokens): use fewer --repeats") from None


def quick_or_full(name: str, quick: bool, paper_scale: bool = False) -> WorkloadConfig:
    """The workload's size: quick (smoke tests), full (this CPU; RESULTS.md) or the paper's."""
    return PAPER_SIZES[name] if paper_scale else pick_size(WORKLOADS, name, quick)
