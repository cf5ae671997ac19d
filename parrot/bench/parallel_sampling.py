"""parallel-sampling: n choices of one long prompt (best-of-n, self-consistency voting).

Parrot gets them as one OpenAI request with `n`: its choices are calls that say they share
the prompt, so the engine prefills it once and forks every choice from it. The baseline is
the same server sent n requests of one choice each at once, as a client without `n` (or a
server that sees the requests apart) does: identical prompts that arrive together are each
computed. vLLM (`--peers`) gets the one request with `n`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx

from parrot.backends.http_engine import uncapped_limits
from parrot.bench.systems import RunningServer, engine_metric

SEED = 1234
TEMPERATURE = 1.0  # sampled choices, as best-of-n and voting use them


@dataclass(frozen=True)
class ParallelSamplingConfig:
    prompt_tokens: int
    choices: tuple[int, ...]  # the values of n measured
    output_tokens: int  # per choice, with ignore_eos
    repeats: int  # requests per n and system, each on a prompt of its own
    kv_memory_gb: float = 1.0


QUICK = ParallelSamplingConfig(prompt_tokens=300, choices=(4,), output_tokens=24, repeats=1, kv_memory_gb=0.5)
FULL = ParallelSamplingConfig(prompt_tokens=1024, choices=(2, 4, 8, 16), output_tokens=32, repeats=3)
PARALLEL_SAMPLING_WORKLOADS = ("parallel-sampling",)


@dataclass(frozen=True)
class SamplingSystem:
    label: str
    description: str
    one_request: bool  # the n choices in one request (`n`), else n requests of one choice each


SAMPLING_SYSTEMS = (
    SamplingSystem("parrot", "one request with n: the prompt prefilled once, every choice forked from it", True),
    SamplingSystem("request-level", "n requests of one choice each, sent at once, to the same server", False),
    SamplingSystem("vllm", "vLLM's OpenAI server, one request with n (automatic prefix caching on)", True),
)


@dataclass
class SamplingMeasurement:
    n: int
    repeat: int
    latency_s: float  # from sending to the last choice's end
    output_tokens: int
    distinct_choices: int  # choices whose texts differ: each sampled apart
    tokens_computed: int | None  # tokens the engines computed for it (parrot's metrics); None elsewhere


def engine_tokens(server: RunningServer) -> int | None:
    """The tokens the server's engines have computed so far, if it reports them."""
    values = engine_metric(server, "parrot_engine_tokens")
    return None if values is None else int(sum(values))


async def _sample(client: httpx.AsyncClient, server: RunningServer, prompt: str, n: int, seed: int, max_tokens: int) -> list[str]:
    body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": TEMPERATURE, "seed": seed,
            "ignore_eos": True, "n": n}
    response = await client.post("/v1/completions", json=body)
    if response.status_code != 200:
        raise RuntimeError(f"{server.name} answered {response.status_code}: {response.text[:500]}")
    choices = sorted(response.json()["choices"], key=lambda c: c["index"])
    return [c["text"] for c in choices]


async def _choices(server: RunningServer, system: SamplingSystem, prompt: str, n: int, max_tokens: int) -> list[str]:
    headers = {"authorization": f"Bearer {server.api_key}"}
    transport = httpx.AsyncHTTPTransport(limits=uncapped_limits())  # every request of the n reaches the server at once
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=600, transport=transport) as client:
        if system.one_request:
            return await _sample(client, server, prompt, n, SEED, max_tokens)
        # choice j with seed + j, as a server with n seeds it
        answers = await asyncio.gather(*(_sample(client, server, prompt, 1, SEED + j, max_tokens) for j in range(n)))
        return [texts[0] for texts in answers]


@dataclass
class TokenMeter:
    """The tokens a server's engines computed between two readings (None where it does not report them)."""

    server: RunningServer
    last: int | None = None

    def start(self) -> None:
        self.last = engine_tokens(self.server)

    def since_last(self) -> int | None:
        now = engine_tokens(self.server)
        computed = now - self.last if now is not None and self.last is not None else None
        self.last = now
        return computed


def measure(server: RunningServer, system: SamplingSystem, prompt: str, n: int, repeat: int, config: ParallelSamplingConfig,
            meter: TokenMeter) -> SamplingMeasurement:
    """One request's (or n requests') time to the last choice, and the tokens computed for it."""
    started = time.perf_counter()
    texts = asyncio.run(_choices(server, system, prompt, n, config.output_tokens))
    latency = time.perf_counter() - started
    if len(texts) != n or not all(t.strip() for t in texts):
        raise RuntimeError(f"{system.label} gave {len(texts)} choices for n={n}, some empty: {texts!r}")
    return SamplingMeasurement(n, repeat, latency, n * config.output_tokens, len(set(texts)), meter.since_last())
