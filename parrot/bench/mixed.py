"""The `mixed` workload (the paper's Figure 18): chat requests (latency-critical) arrive
while map-reduce jobs (throughput work) run on the same engines.

Every system is our own server with one scheduling policy, so the difference
measured is the use of app knowledge alone: `parrot` against `latency-centric`
(small batches) and `throughput-centric` (batches as large as they go). With
`--peers`, vLLM serves the same jobs and chats through its OpenAI API, driven the
request-level way (each job's maps sent at once, its reduce once they are back).
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import parrot as P
from parrot.bench import apps
from parrot.bench.config import pick_size
from parrot.bench.documents import chunks as make_chunks
from parrot.bench.documents import passages
from parrot.bench.systems import CompletionClient, RunningServer

CHAT = "Answer the question in one sentence.\nQuestion: {{input:chunk}}\nAnswer:{{output:summary}}"
MIXED_POLICIES = ("parrot", "latency-centric", "throughput-centric")


@dataclass(frozen=True)
class MixedConfig:
    map_reduce_apps: int
    chunks: int
    chunk_tokens: int
    map_output_tokens: int
    chats: int
    chat_rate: float  # chat requests per second, Poisson, starting with the map-reduce jobs
    chat_tokens: int
    chat_output_tokens: int
    engines: int = 2
    threads_per_engine: int = 1  # two engines on two cores
    engine: str = "builtin"  # or sim:PRESET: simulated engines, for the scale of the paper's cluster
    paper: str = ""


MIXED_WORKLOADS: dict[str, tuple[MixedConfig, MixedConfig]] = {
    # jobs that last as long as the chats keep arriving (about 15 s on an AVX512-BF16 core each), so that
    # most chats meet them: with 2 jobs of 8 chunks they were done in 4 s and the chats after met idle engines
    "mixed": (
        MixedConfig(map_reduce_apps=6, chunks=12, chunk_tokens=256, map_output_tokens=32, chats=24, chat_rate=1.0,
                    chat_tokens=48, chat_output_tokens=24,
                    paper="Fig. 18: chat 149 ms/token vs 185 (throughput-centric) and 828 (latency-centric); "
                          "map-reduce 23.2 s vs 24.5 and 86.4 s"),
        MixedConfig(map_reduce_apps=1, chunks=3, chunk_tokens=48, map_output_tokens=4, chats=3, chat_rate=4.0,
                    chat_tokens=8, chat_output_tokens=4),
    ),
    # one engine, as on one GPU, with more map calls in flight than a client's default connection pool (100)
    # holds: placement cannot keep chats apart, only the engine's priorities and the manager's link can
    "mixed-one-engine": (
        MixedConfig(map_reduce_apps=8, chunks=16, chunk_tokens=64, map_output_tokens=8, chats=12, chat_rate=2.0,
                    chat_tokens=32, chat_output_tokens=16, engines=1, threads_per_engine=2,
                    paper="Fig. 18's mix on one engine (the paper had 4 GPUs): 128 map calls at once"),
        MixedConfig(map_reduce_apps=1, chunks=3, chunk_tokens=48, map_output_tokens=4, chats=3, chat_rate=4.0,
                    chat_tokens=8, chat_output_tokens=4, engines=1, threads_per_engine=2),
    ),
    # the paper's scale (4 GPUs) on SIMULATED A100/LLaMA-7B engines: the real manager and policies, modelled steps
    "mixed-sim": (
        MixedConfig(map_reduce_apps=8, chunks=16, chunk_tokens=1024, map_output_tokens=50, chats=64, chat_rate=2.0,
                    chat_tokens=64, chat_output_tokens=50, engines=4, engine="sim:a100-7b",
                    paper="Fig. 18 (4 GPUs): chat 149 ms/token vs 185 (throughput-centric) and 828 (latency-centric); "
                          "map-reduce 23.2 s vs 24.5 and 86.4 s"),
        MixedConfig(map_reduce_apps=1, chunks=4, chunk_tokens=64, map_output_tokens=4, chats=4, chat_rate=8.0,
                    chat_tokens=8, chat_output_tokens=4, engines=2, engine="sim:a100-7b"),
    ),
}


@dataclass
class MixedResult:
    policy: str
    chat_latencies_s: list[float]
    chat_output_tokens: int
    job_completion_s: list[float]
    chat_outputs: list[str]
    map_reduce_outputs: list[str]

    @property
    def chat_s_per_token(self) -> float:
        return statistics.fmean(self.chat_latencies_s) / self.chat_output_tokens

    @property
    def chat_p90_s_per_token(self) -> float:
        ordered = sorted(self.chat_latencies_s)
        return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))] / self.chat_output_tokens

    @property
    def mean_jct_s(self) -> float:
        return statistics.fmean(self.job_completion_s)


# the paper's sizes (mixed-sim's) for a built-in engine on one GPU (--paper-scale --device cuda): one engine, as
# one deploys on one GPU. Two engine processes on one GPU are no stand-in for the paper's two GPUs: the GPU
# time-slices between them, so an engine kept for chats waits on the other's steps (measured on an H100:
# parrot's chats 1.69x latency-centric's, its jobs 1.91x throughput-centric's; benchmarks/RESULTS.md)
PAPER_SIZES: dict[str, MixedConfig] = {
    "mixed": replace(MIXED_WORKLOADS["mixed-sim"][0], engines=1, engine="builtin"),
}


def quick_or_full(name: str, quick: bool, paper_scale: bool = False) -> MixedConfig:
    return PAPER_SIZES[name] if paper_scale else pick_size(MIXED_WORKLOADS, name, quick)


def run_mixed(config: MixedConfig, policy: str, server: RunningServer, tokenizer, request_level: bool = False) -> MixedResult:
    """Starts the map-reduce jobs and the chat arrivals together and waits for all of them: as
    Parrot programs (objectives declared), or `request_level`, as OpenAI completions (a server
    that knows nothing of apps: vLLM)."""
    documents = [make_chunks(tokenizer, config.chunks, config.chunk_tokens, offset_chunks=i * config.chunks)
                 for i in range(config.map_reduce_apps)]
    questions = passages(tokenizer, [config.chat_tokens] * config.chats,
                         skip_tokens=config.map_reduce_apps * config.chunks * config.chunk_tokens)
    rng = random.Random(18)
    arrivals = [0.0]
    for _ in range(config.chats - 1):
        arrivals.append(arrivals[-1] + rng.expovariate(config.chat_rate))
    chat = apps.semantic("chat", CHAT, ["chunk"], config.chat_output_tokens)
    jct = [0.0] * len(documents)
    map_reduce_outputs = [""] * len(documents)
    chat_latency = [0.0] * config.chats
    chat_outputs = [""] * config.chats
    start = time.perf_counter()

    complete = CompletionClient(server, rtt_s=0.0) if request_level else None

    def job(index: int) -> None:
        if complete is not None:
            map_reduce_outputs[index] = apps.request_map_reduce(complete, documents[index], config.map_output_tokens)
        else:
            with P.connect(server.url, api_key=server.api_key):
                map_reduce_outputs[index] = apps.parrot_map_reduce(documents[index], config.map_output_tokens).get(perf=P.THROUGHPUT)
        jct[index] = time.perf_counter() - start

    def ask(index: int) -> None:
        delay = start + arrivals[index] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        if complete is not None:
            chat_outputs[index] = complete(apps.render(CHAT, {"chunk": questions[index]}), config.chat_output_tokens)
        else:
            with P.connect(server.url, api_key=server.api_key):
                chat_outputs[index] = chat(chunk=questions[index]).get(perf=P.LATENCY)
        chat_latency[index] = time.perf_counter() - start - arrivals[index]

    try:
        with ThreadPoolExecutor(max_workers=len(documents) + config.chats) as pool:
            futures = [pool.submit(job, i) for i in range(len(documents))] + [pool.submit(ask, i) for i in range(config.chats)]
            for future in futures:
                future.result()
    finally:
        if complete is not None:
            complete.close()
    return MixedResult(policy, chat_latency, config.chat_output_tokens, jct, chat_outputs, map_reduce_outputs)


def warm_up(server: RunningServer) -> None:
    """One short call per engine, not measured (the first forward steps of a process are slow)."""
    chat = apps.semantic("chat", CHAT, ["chunk"], 2)

    def one(i: int) -> None:
        with P.connect(server.url, api_key=server.api_key):
            chat(chunk=f"warm-up question {i}").get(perf=P.LATENCY)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
