"""A built-in engine in another process or on another machine, over its HTTP API."""

from __future__ import annotations

import json

import httpx

from parrot.backends.base import BackendStats, EngineBackend, engine_gone_on
from parrot.errors import EngineUnavailableError, PromptTooLongError, UserError
from parrot.protocol import error_message
from parrot.protocol.manager_api import MAX_VALUE_CHARS
from parrot.protocol.engine_api import (
    EngineSamplingBody, EngineStatsBody, FillBody, FreeBody, GenerateBody, PromptLogprobsBody, ScoreBody, TokenEvent,
)


# Idle connections are dropped after this many seconds, before servers drop theirs: vLLM and
# SGLang, like uvicorn by default, close idle connections after 5 s, and a call sent on a
# connection as its server closes it fails ("Server disconnected without sending a response").
IDLE_CONNECTION_EXPIRY_S = 4.0


def uncapped_limits() -> httpx.Limits:
    """Connection limits for a client whose every call in flight must reach the server at once."""
    return httpx.Limits(max_connections=None, max_keepalive_connections=64, keepalive_expiry=IDLE_CONNECTION_EXPIRY_S)


def engine_link(base_url: str, headers: dict[str, str]) -> httpx.AsyncClient:
    """The manager's HTTP client to one engine server.

    No cap on connections: each placed call holds one while its fill or stream runs, and a
    capped pool would queue the rest in arrival order, under the engine's priorities. On an
    H100, 128 map-reduce calls held httpx's default 100, and chats placed beside them waited
    5-10 s for a connection before the engine saw them. The policy bounds what is placed."""
    return httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=httpx.Timeout(600.0, connect=10.0),
                             limits=uncapped_limits())


class EngineRequestError(UserError):
    """The engine rejected a request as bad input (4xx)."""


class HttpEngineBackend(EngineBackend):
    def __init__(self, name: str, url: str, model: str, engine_key: str | None = None):
        self.name = name
        self.url = url.rstrip("/")
        self.model = model
        headers = {"authorization": f"Bearer {engine_key}"} if engine_key else {}
        self._http = engine_link(self.url, headers)
        self._stats = BackendStats(name, model, 0, 0, 0, 0, 0)

    @staticmethod
    def _check(response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        message = error_message(response)
        if response.status_code < 500:
            raise EngineRequestError(message)
        raise RuntimeError(f"engine error {response.status_code}: {message}")

    def _reachable(self, what: str):
        # refused, reset, closed mid-stream: transport failures
        return engine_gone_on((httpx.TransportError,), f"{self.name} at {self.url}", what)

    async def fill(self, context_id, parent_context_id, text, priority, shared_prefix_chars=0, then_generate=False):
        if len(text) > MAX_VALUE_CHARS:  # a template around a value near its limit: far past any context in any case
            raise PromptTooLongError(f"the prompt to fill holds {len(text)} characters, more than an engine takes at once "
                                     f"({MAX_VALUE_CHARS}) and far past the model's context: shorten the inputs")
        body = FillBody(context_id=context_id, parent_context_id=parent_context_id, text=text, priority=priority,
                        shared_prefix_chars=shared_prefix_chars, then_generate=then_generate)
        async with self._reachable(f"fill of {context_id}"):
            response = await self._http.post("/fill", json=body.model_dump())
        self._check(response)

    async def generate(self, context_id, sampling, priority):
        body = GenerateBody(context_id=context_id, sampling=EngineSamplingBody.of(sampling), priority=priority)
        # fields at their defaults stay off the wire: an engine from before a sampling field was added
        # (they refuse fields they do not know) still serves every request that does not use it
        wire = body.model_dump(exclude_defaults=True)
        async with self._reachable(f"generate of {context_id}"), self._http.stream("POST", "/generate", json=wire) as response:
            if response.status_code >= 400:
                await response.aread()
                self._check(response)
            async for line in response.aiter_lines():
                if not line:
                    continue
                payload = json.loads(line)
                if "error" in payload:
                    raise RuntimeError(f"engine {self.name} failed while generating: {payload['error']}")
                token = TokenEvent.model_validate(payload).token()
                yield token
                if token.finish_reason is not None:
                    return
        raise EngineUnavailableError(f"engine {self.name} ended the stream of {context_id} before it finished")

    async def score_prompt(self, text, top, token_ids=None):
        async with self._reachable("scoring a prompt"):
            response = await self._http.post("/score", json=ScoreBody(text=text, top=top, token_ids=token_ids).model_dump())
        self._check(response)
        return PromptLogprobsBody.model_validate(response.json()).scored()

    async def free_context(self, context_id):
        async with self._reachable(f"free of {context_id}"):
            response = await self._http.post("/free", json=FreeBody(context_id=context_id).model_dump())
        self._check(response)

    def update_stats(self, stats: EngineStatsBody) -> None:
        self._stats = BackendStats(self.name, self.model, stats.running_jobs, stats.contexts, stats.kv_blocks_total, stats.kv_blocks_free, stats.tokens_processed,
                                   stats.peak_batch_blocks, stats.kv_block_size, stats.kv_blocks_cached, stats.prefill_share_beside_latency,
                                   stats.max_tokens_per_step, stats.max_seqs_per_step, stats.latency_seqs_bound)

    def stats(self) -> BackendStats:
        return self._stats

    async def close(self):
        await self._http.aclose()
