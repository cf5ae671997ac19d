"""Prefix-sharing workloads: many requests behind a few long system prompts.

`shared-prompt` sends bursts of users behind one system prompt (the paper's Bing
Copilot shape, Figure 15); `gpts` sends four apps' requests in the paper's mix at
rising Poisson rates (Figure 16). Each system is its own server process, fed the
same requests, so nothing one system cached helps another.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum

import parrot as P
from parrot.bench import apps
from parrot.bench.config import pick_size
from parrot.bench.documents import passages
from parrot.bench.systems import CompletionClient, RunningServer


# a system whose latency per token passed this many times the SLO at one rate skips the higher ones
GIVE_UP_SLO_FACTOR = 2.0


class LoadKind(Enum):
    BURST = "concurrent users"  # that many requests at once
    RATE = "requests/s"  # Poisson arrivals at that rate


@dataclass(frozen=True)
class SharingConfig:
    load_kind: LoadKind
    system_prompt_tokens: tuple[int, ...]  # one system prompt per app
    app_mix: tuple[float, ...]  # fraction of requests going to each app
    loads: tuple[float, ...]  # concurrent users (BURST) or request rates (RATE), rising
    query_tokens: int
    output_tokens: int
    requests_per_load: int = 0  # RATE only; a burst sends one request per user
    # RATE only: a level sends at least load x this many requests, so that a high rate is held
    # long enough to be a rate (32 requests at 64 req/s are a half-second burst)
    seconds_per_load: float = 0.0
    kv_memory_gb: float = 2.0
    # the latency per output token under which a system "sustains" a rate (RATE only)
    slo_s_per_token: float = 0.0
    paper: str = ""


SHARING_WORKLOADS: dict[str, tuple[SharingConfig, SharingConfig]] = {  # name -> (full, quick)
    "shared-prompt": (
        SharingConfig(LoadKind.BURST, (2048,), (1.0,), loads=(4, 16, 32), query_tokens=32, output_tokens=64, kv_memory_gb=4.0,
                      paper="Fig. 15 (Bing Copilot, 5.5-7k-token prompt): batch 64 in 31.7 s vs 46.5 s for vLLM with prefix caching; up to 1.78x per-token latency"),
        SharingConfig(LoadKind.BURST, (256,), (1.0,), loads=(2, 4), query_tokens=8, output_tokens=4),
    ),
    "gpts": (
        # the paper's system prompts (7437/1116/1694/2031 tokens) scaled by 1/4, its 19/40/28/13 % mix
        # rates around this CPU's capacity (about 30 output tokens/s with sharing, 9 without); the SLO is
        # twice the unloaded latency per token measured here (170-280 ms)
        SharingConfig(LoadKind.RATE, (1859, 279, 424, 508), (0.19, 0.40, 0.28, 0.13), loads=(0.25, 0.5, 1, 2),
                      query_tokens=24, output_tokens=32, requests_per_load=16, slo_s_per_token=0.5,
                      paper="Fig. 16: 12x the request rate of no sharing, 2.4x of prefix caching (vLLM), at the same latency"),
        SharingConfig(LoadKind.RATE, (192, 48, 64, 80), (0.19, 0.40, 0.28, 0.13), loads=(2, 8), query_tokens=8,
                      output_tokens=4, requests_per_load=4, slo_s_per_token=1.0),
    ),
}


class ClientKind(Enum):
    PARROT = "parrot program (semantic function, static prefix known)"
    OPENAI = "OpenAI completions (prompt text only)"


@dataclass(frozen=True)
class SharingSystem:
    label: str
    client: ClientKind
    serve_flags: tuple[str, ...] = ()  # for our server; vllm is started on its own
    description: str = ""


SHARING_SYSTEMS = (
    SharingSystem("parrot", ClientKind.PARROT, (), "static prefixes forked, prefix cache, shared-prefix attention"),
    SharingSystem("parrot-no-sharing", ClientKind.PARROT, ("--no-prefix-caching", "--no-shared-attention"),
                  "every prompt prefilled in full, plain paged attention"),
    SharingSystem("prefix-caching", ClientKind.OPENAI, ("--no-shared-attention",),
                  "our engine as vLLM does it: block-level prefix cache, plain paged attention, no app knowledge"),
    SharingSystem("vllm", ClientKind.OPENAI, (), "vLLM's OpenAI server with automatic prefix caching"),
)


@dataclass(frozen=True)
class Request:
    app: int
    query: str
    arrival_s: float  # after the start of its load level


@dataclass
class LoadResult:
    load: float
    latencies_s: list[float]
    output_tokens: int
    wall_s: float  # first arrival to last completion
    peak_batch_blocks: int | None  # cumulative over the run so far; None where the system does not report it
    outputs: list[str]

    @property
    def s_per_output_token(self) -> float:
        return sum(self.latencies_s) / len(self.latencies_s) / self.output_tokens

    @property
    def throughput_tokens_s(self) -> float:
        return len(self.latencies_s) * self.output_tokens / self.wall_s


# the paper's sizes, for built-in engines on a GPU (--paper-scale --device cuda): its system prompts and
# rates that load a 7B model on one H100 (about 20k prompt tokens/s) past what unshared prefills sustain
PAPER_SIZES: dict[str, SharingConfig] = {
    "shared-prompt": SharingConfig(LoadKind.BURST, (6000,), (1.0,), loads=(16, 32, 64), query_tokens=64, output_tokens=64,
                                   kv_memory_gb=24.0, paper=SHARING_WORKLOADS["shared-prompt"][0].paper),
    "gpts": SharingConfig(LoadKind.RATE, (7437, 1116, 1694, 2031), (0.19, 0.40, 0.28, 0.13), loads=(2, 4, 8, 16, 32, 64), query_tokens=64,
                          output_tokens=50, requests_per_load=32, seconds_per_load=8.0, kv_memory_gb=24.0, slo_s_per_token=0.05,
                          paper=SHARING_WORKLOADS["gpts"][0].paper),
}


def quick_or_full(name: str, quick: bool, paper_scale: bool = False) -> SharingConfig:
    return PAPER_SIZES[name] if paper_scale else pick_size(SHARING_WORKLOADS, name, quick)


def system_prompts(config: SharingConfig, tokenizer) -> list[str]:
    # stripped: a semantic function's docstring loses leading and trailing whitespace, a raw prompt would not
    return [text.strip() for text in passages(tokenizer, list(config.system_prompt_tokens))]


def requests_at(config: SharingConfig, rate: float) -> int:
    """How many requests a RATE level sends."""
    return max(config.requests_per_load, math.ceil(rate * config.seconds_per_load))


def past_the_slo(config: SharingConfig, result: LoadResult) -> bool:
    """A RATE level this far over the SLO ends a system's climb: a higher rate only queues deeper."""
    return config.load_kind is LoadKind.RATE and result.s_per_output_token > GIVE_UP_SLO_FACTOR * config.slo_s_per_token


def plan_requests(config: SharingConfig, tokenizer) -> list[list[Request]]:
    """The requests of every load level, the same for every system (seeded)."""
    rng = random.Random(16)
    sizes = [int(load) if config.load_kind is LoadKind.BURST else requests_at(config, load) for load in config.loads]
    queries = passages(tokenizer, [config.query_tokens] * sum(sizes), skip_tokens=sum(config.system_prompt_tokens))
    levels, taken = [], 0
    for load, size in zip(config.loads, sizes):
        arrival, level = 0.0, []
        for query in queries[taken : taken + size]:
            app = rng.choices(range(len(config.app_mix)), weights=config.app_mix)[0]
            level.append(Request(app, query, arrival))
            if config.load_kind is LoadKind.RATE:
                arrival += rng.expovariate(load)
        levels.append(level)
        taken += size
    return levels


def template(system_prompt: str) -> str:
    return f"{system_prompt}\n\nUser: {{{{input:chunk}}}}\nAssistant:{{{{output:summary}}}}"


@dataclass(frozen=True)
class RequestSender:
    send: Callable[[Request], str]  # sends one request and waits for its text
    close: Callable[[], None]


def request_sender(system: SharingSystem, server: RunningServer, prompts: list[str], output_tokens: int) -> RequestSender:
    """The system's kind of client, one request at a time (callable from many threads)."""
    if system.client is ClientKind.OPENAI:
        client = CompletionClient(server, 0.0)
        templates = [template(p) for p in prompts]
        return RequestSender(lambda r: client(apps.render(templates[r.app], {"chunk": r.query}), output_tokens), client.close)
    functions = [apps.semantic(f"app{i}", template(p), ["chunk"], output_tokens) for i, p in enumerate(prompts)]

    def send(request: Request) -> str:
        # a session per request, as separate users have; opened inside the timing like a connection
        with P.connect(server.url, api_key=server.api_key):
            return functions[request.app](chunk=request.query).get(perf=P.LATENCY)

    return RequestSender(send, lambda: None)


def run_level(send: Callable[[Request], str], level: list[Request], load: float, output_tokens: int,
              read_peak_blocks: Callable[[], int | None]) -> LoadResult:
    """Sends one load level's requests at their arrival times and waits for every answer."""
    latencies = [0.0] * len(level)
    outputs = [""] * len(level)
    start = time.perf_counter()

    def one(index: int) -> None:
        request = level[index]
        delay = start + request.arrival_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        outputs[index] = send(request)
        latencies[index] = time.perf_counter() - start - request.arrival_s

    with ThreadPoolExecutor(max_workers=len(level)) as pool:
        list(pool.map(one, range(len(level))))
    wall = time.perf_counter() - start
    return LoadResult(load, latencies, output_tokens, wall, read_peak_blocks(), outputs)
