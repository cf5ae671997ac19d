"""A simulated engine for scale experiments and manager benchmarks: no model, real time.

Contexts are text; generated tokens are deterministic words, " w<n>", whatever the
timing. Text becomes tokens at `chars_per_token`, and the core (engine.py) prices
them: with a cost model it batches every active job as a continuous-batching engine
would, sleeps each step's simulated time times `time_scale` (asyncio.sleep, so the
real manager and HTTP stack run against it) and adds it to `simulated_seconds`.
With a zero cost model and unlimited KV (the default) it is instant: fills and
tokens return inline, and benchmarks measure the manager alone. A named backend for
experiments; nothing on the production path uses it.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from dataclasses import replace

from parrot.backends.base import BackendStats, EngineBackend, StepLimits
from parrot.backends.simulated.cost import CostModel
from parrot.backends.simulated.engine import SimEngine, SimulatedStats
from parrot.backends.simulated.presets import EngineProfile, parse_engine_spec
from parrot.engine.llm_engine import FinishReason, GeneratedToken
from parrot.errors import ContextError, KVCacheExhaustedError, UserError

STATS_BLOCK_SIZE = 16  # BackendStats speaks in KV blocks; the built-in engine's block size


class SimulatedEngineBackend(EngineBackend):
    reports_logprobs = False  # it computes no logits

    def __init__(
        self, name: str = "sim-0", model: str = "simulated", cost: CostModel = CostModel(), *,
        kv_capacity_tokens: int | None = None, max_tokens_per_step: int = 512, max_seqs_per_step: int = 64,
        shared_prefix_attention: bool = False, time_scale: float = 1.0, chars_per_token: float = 4.0,
    ):
        self.profile = EngineProfile(name, model, cost, kv_capacity_tokens, max_tokens_per_step, max_seqs_per_step,
                                     shared_prefix_attention, source="custom")
        if time_scale < 0 or chars_per_token <= 0:
            raise UserError(f"time_scale must be >= 0 and chars_per_token > 0, got {time_scale} and {chars_per_token}")
        self.name, self.model, self.cost = name, model, cost
        self.chars_per_token = chars_per_token  # fill text -> tokens (the usual ~4 characters of English)
        self.core = SimEngine(name, cost, kv_capacity_tokens, max_tokens_per_step, max_seqs_per_step, shared_prefix_attention, time_scale)
        self.tree = self.core.tree
        self._contexts: dict[str, str] = {}  # each live context's text (subclasses in tests read it)
        self._locks: dict[str, asyncio.Lock] = {}  # one job at a time per context; forks wait for the parent's fill
        self._prefix_ids: dict[str, str] = {}  # shared prefix text -> the context holding it
        self._prefix_texts: dict[str, str] = {}
        self._prefix_counter = itertools.count()
        self._active = 0

    @classmethod
    def from_profile(cls, profile: EngineProfile | str, name: str = "sim-0", time_scale: float = 1.0, **overrides) -> SimulatedEngineBackend:
        """From a preset or an engine spec ("sim:a100-7b"); overrides replace profile fields."""
        p = replace(parse_engine_spec(profile) if isinstance(profile, str) else profile, **overrides)
        return cls(name, p.model, p.cost, kv_capacity_tokens=p.kv_capacity_tokens, max_tokens_per_step=p.max_tokens_per_step,
                   max_seqs_per_step=p.max_seqs_per_step, shared_prefix_attention=p.shared_prefix_attention, time_scale=time_scale)

    @property
    def simulated_seconds(self) -> float:
        return self.core.simulated_seconds

    async def fill(self, context_id, parent_context_id, text, priority, shared_prefix_chars=0, then_generate=False):
        # an instant engine prices nothing, so sharing would only cost the manager benchmarks time
        if shared_prefix_chars > 0 and parent_context_id is None and not self.core.instant and context_id not in self.tree.live:
            parent_context_id = await self._shared_prefix(text[:shared_prefix_chars], priority)
            text = text[shared_prefix_chars:]
        await self._fill(context_id, parent_context_id, text, priority, then_generate)

    async def _fill(self, context_id: str, parent_context_id: str | None, text: str, priority: int, then_generate: bool = False) -> None:
        # the internal fills of shared prefixes come here too, not through an overridden fill
        if context_id not in self.tree.live:
            if parent_context_id is not None:
                async with self._lock(parent_context_id):
                    self.tree.create(context_id, parent_context_id)
            else:
                self.tree.create(context_id, None)
            self._contexts[context_id] = self._contexts[parent_context_id] if parent_context_id else ""
        elif parent_context_id is not None and self.tree.get(context_id).parent is not self.tree.get(parent_context_id):
            raise ContextError(f"context {context_id!r} exists with another parent")
        async with self._lock(context_id):
            ctx = self.tree.get(context_id)
            tokens = math.ceil(len(text) / self.chars_per_token)
            if self.tree.capacity is not None and ctx.length + tokens > self.tree.capacity:
                raise KVCacheExhaustedError(
                    f"context {context_id!r} would hold {ctx.length + tokens} tokens; the simulated KV holds {self.tree.capacity}"
                )
            self._contexts[context_id] += text
            ctx.own_tokens += tokens
            # the generate after it computes the text (an instant engine prices nothing: now)
            if ctx.pending and not (then_generate and not self.core.instant):
                self._active += 1
                try:
                    await self.core.prefill(ctx, priority)
                finally:
                    self._active -= 1

    async def generate(self, context_id, sampling, priority):
        self.refuse_logit_work(sampling)
        ctx = self.tree.get(context_id)
        self._active += 1
        job = None
        try:
            async with self._lock(context_id):
                if not self.core.instant:
                    job = self.core.decode(ctx, priority, sampling.max_tokens)
                for i in range(sampling.max_tokens):
                    if job is None:
                        self.core.decode_instant(ctx)
                    elif isinstance(item := await job.tokens.get(), BaseException):
                        raise item
                    # a word of the text so far: text generated after a context's first words is the
                    # same whether those words were generated or filled (a call continued elsewhere)
                    word = f" w{len(self._contexts[context_id]) % 97}"
                    self._contexts[context_id] += word
                    yield GeneratedToken(i, word, FinishReason.LENGTH if i + 1 == sampling.max_tokens else None)
        finally:
            self._active -= 1
            if job is not None:  # finished, or the consumer stopped early: stop decoding
                self.core.scheduler.remove(job)

    async def free_context(self, context_id):
        await self._free(context_id)

    async def _free(self, context_id: str) -> None:
        ctx = self.tree.get(context_id)
        for job in [j for j in self.core.scheduler.jobs if j.ctx is ctx]:
            self.core.fail(job, ContextError(f"context {context_id!r} was freed while a job ran on it"))
        self.tree.free(context_id)
        del self._contexts[context_id]
        self._locks.pop(context_id, None)
        if ctx.parent is not None and ctx.parent.context_id in self._prefix_texts:
            await self._drop_prefix_if_unused(ctx.parent.context_id)
        self.core.wake()  # jobs waiting for KV may fit now

    def step_limits(self) -> StepLimits:
        return StepLimits(self.core.scheduler.max_tokens, self.core.scheduler.max_seqs)

    def stats(self) -> BackendStats:
        tree, counts = self.tree, self.core.counts
        total = (tree.capacity or 0) // STATS_BLOCK_SIZE
        free = (tree.capacity - tree.kv_used) // STATS_BLOCK_SIZE if tree.capacity is not None else 0
        # every live context's KV is read by the steps of the call that holds it, so the most KV
        # held at once stands for the built-in engine's "most KV blocks one step's batch read"
        peak = math.ceil(tree.kv_peak / STATS_BLOCK_SIZE)
        return BackendStats(self.name, self.model, self._active, len(tree.live), total, free, counts.prefill + counts.decode,
                            peak_batch_blocks=peak, prefill_share_beside_latency=self.core.scheduler.rules.prefill_share,
                            max_tokens_per_step=self.core.scheduler.max_tokens, max_seqs_per_step=self.core.scheduler.max_seqs,
                            latency_seqs_bound=self.core.scheduler.rules.latency_seqs)

    def sim_stats(self) -> SimulatedStats:
        return self.core.stats()

    def check_integrity(self) -> None:
        self.tree.check_integrity()
        assert set(self._contexts) == set(self.tree.live), "text and KV contexts differ"

    async def close(self) -> None:
        await self.core.close(ContextError("the simulated engine is shutting down"))

    def _lock(self, context_id: str) -> asyncio.Lock:
        self.tree.get(context_id)
        return self._locks.setdefault(context_id, asyncio.Lock())

    async def _shared_prefix(self, prefix: str, priority: int) -> str:
        """The context holding `prefix`, prefilled by its first user; freed with its last child.

        Callers that share it while it lives pay no prefill and no KV for it. Unlike a real
        prefix cache it is not kept once unused, so this under-states sharing across time."""
        prefix_id = self._prefix_ids.get(prefix)
        if prefix_id is None:
            prefix_id = self._prefix_ids[prefix] = f"shared-prefix-{next(self._prefix_counter)}"
            self._prefix_texts[prefix_id] = prefix
            try:
                await self._fill(prefix_id, None, prefix, priority)
            except BaseException:
                await self._drop_prefix_if_unused(prefix_id)
                raise
        return prefix_id

    async def _drop_prefix_if_unused(self, prefix_id: str) -> None:
        ctx = self.tree.live.get(prefix_id)
        if ctx is None or ctx.children == 0:
            self._prefix_ids.pop(self._prefix_texts.pop(prefix_id, None), None)
            if ctx is not None:
                await self._free(prefix_id)
