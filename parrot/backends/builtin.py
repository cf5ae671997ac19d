"""The built-in engine, in the manager's own process."""

from __future__ import annotations

from parrot.backends.base import BackendStats, EngineBackend, StepLimits
from parrot.engine.llm_engine import LLMEngine
from parrot.engine.outputs import PromptLogprobs


class BuiltinEngineBackend(EngineBackend):
    def __init__(self, engine: LLMEngine, name: str = "engine-0"):
        self.engine = engine
        self.name = name
        self.model = engine.config.model

    async def fill(self, context_id, parent_context_id, text, priority, shared_prefix_chars=0, then_generate=False):
        # the whole text is tokenized at once, so sharing never changes the tokens
        encoded = self.engine.tokenizer.encode_with_prefix(text, shared_prefix_chars)
        await self.engine.fill(context_id, parent_context_id, encoded.token_ids, priority, shared_prefix_len=encoded.prefix_tokens,
                               then_generate=then_generate)

    def generate(self, context_id, sampling, priority):
        return self.engine.generate(context_id, sampling, priority)

    async def free_context(self, context_id):
        self.engine.free_context(context_id)

    async def score_prompt(self, text, top, token_ids=None):
        ids = list(token_ids) if token_ids is not None else self.engine.tokenizer.encode(text)
        return PromptLogprobs(ids, await self.engine.score(ids, top))

    def step_limits(self) -> StepLimits:
        return StepLimits(self.engine.config.max_tokens_per_step, self.engine.config.max_seqs_per_step)

    def stats(self) -> BackendStats:
        s = self.engine.stats()
        return BackendStats(self.name, self.model, s.num_jobs, s.num_contexts, s.blocks_total, s.blocks_free, s.tokens_processed,
                            s.peak_batch_blocks, s.block_size, s.cached_blocks,
                            s.prefill_share_beside_latency, s.max_tokens_per_step, s.max_seqs_per_step, s.latency_seqs_bound)

    async def close(self):
        await self.engine.close()
