"""A simulated engine for scale experiments and manager benchmarks: no model.

It keeps contexts as text, "generates" deterministic words, and takes time from
a cost model (zero by default, for measuring the manager alone). It is a
separate, named backend: nothing on the production path sleeps.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from parrot.backends.base import BackendStats, EngineBackend
from parrot.engine.llm_engine import FinishReason, GeneratedToken
from parrot.errors import ContextError


@dataclass(frozen=True)
class CostModel:
    seconds_per_prefill_token: float = 0.0
    seconds_per_decode_step: float = 0.0


class SimulatedEngineBackend(EngineBackend):
    def __init__(self, name: str = "sim-0", model: str = "simulated", cost: CostModel = CostModel()):
        self.name = name
        self.model = model
        self.cost = cost
        self._contexts: dict[str, str] = {}
        self._running = 0
        self._tokens = 0

    async def fill(self, context_id, parent_context_id, text, priority):
        if parent_context_id is not None and parent_context_id not in self._contexts:
            raise ContextError(f"unknown context {parent_context_id!r}")
        base = self._contexts.get(context_id, self._contexts.get(parent_context_id, ""))
        self._contexts[context_id] = base + text
        self._tokens += len(text.split())
        if self.cost.seconds_per_prefill_token:
            await asyncio.sleep(self.cost.seconds_per_prefill_token * len(text.split()))

    async def generate(self, context_id, sampling, priority):
        if context_id not in self._contexts:
            raise ContextError(f"unknown context {context_id!r}")
        self._running += 1
        try:
            seed = len(self._contexts[context_id])
            for i in range(sampling.max_tokens):
                if self.cost.seconds_per_decode_step:
                    await asyncio.sleep(self.cost.seconds_per_decode_step)
                word = f" w{(seed + i) % 97}"
                self._contexts[context_id] += word
                self._tokens += 1
                last = i + 1 == sampling.max_tokens
                yield GeneratedToken(i, word, FinishReason.LENGTH if last else None)
        finally:
            self._running -= 1

    async def free_context(self, context_id):
        if self._contexts.pop(context_id, None) is None:
            raise ContextError(f"unknown context {context_id!r}")

    def stats(self) -> BackendStats:
        return BackendStats(self.name, self.model, self._running, len(self._contexts), 0, 0, self._tokens)
