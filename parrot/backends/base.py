"""The interface between the manager and an engine."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from parrot.engine.llm_engine import GeneratedToken
from parrot.engine.outputs import PromptLogprobs
from parrot.engine.sampler import SamplingParams
from parrot.errors import EngineUnavailableError, UserError


@dataclass(frozen=True)
class BackendStats:
    name: str
    model: str
    running_jobs: int
    contexts: int
    kv_blocks_total: int
    kv_blocks_free: int
    tokens_processed: int
    peak_batch_blocks: int = 0  # most KV blocks one step's batch used (0: not reported)
    kv_block_size: int = 16  # tokens per KV block
    kv_blocks_cached: int = 0  # in use only by cached prefixes: reclaimable
    # of its full prompt-token rate, what other work keeps while a latency-class job waits
    # beside it (its steps capped); 1.0 when unknown (engine/step_profile.py)
    prefill_share_beside_latency: float = 1.0
    # its step budget: prompt tokens one forward step takes, and sequences (0: not reported)
    max_tokens_per_step: int = 0
    max_seqs_per_step: int = 0
    # latency-class jobs it serves at once before their decodes slow each other (0: not reported)
    latency_seqs_bound: int = 0


@dataclass(frozen=True)
class StepLimits:
    """What one forward step of an engine takes at most (0: not reported)."""

    max_tokens_per_step: int = 0
    max_seqs_per_step: int = 0


class EngineBackend(ABC):
    """An engine the manager can place calls on.

    Contract: contexts are named by the caller and form a tree. `fill` appends
    text to a context (creating it, forked from parent_context_id when given,
    if it does not exist) and returns once the engine holds it. `generate`
    streams tokens sampled after the context's current end and appends them to
    it. `free_context` releases a context; its children stay valid.
    `shared_prefix_chars` marks the leading characters of a new root context's
    text as a prefix that other contexts will share (a semantic function's
    constant text): an engine that can share KV keeps it once and forks from it;
    the generated text must not depend on it. `then_generate` says the caller's
    next call is `generate` on this context: an engine may then return at once and
    compute the text with that generate's steps (nothing else runs between the
    prompt and its first token); one that ignores it computes the text now. All methods
    may raise parrot.errors.UserError for bad input; other exceptions mean the
    engine failed. Priorities: lower values run first.
    """

    name: str
    model: str
    # computes logits: generate honours sampling.logprobs and sampling.structured, and score_prompt works
    reports_logprobs: bool = True

    @abstractmethod
    async def fill(self, context_id: str, parent_context_id: str | None, text: str, priority: int, shared_prefix_chars: int = 0,
                   then_generate: bool = False) -> None: ...

    @abstractmethod
    def generate(self, context_id: str, sampling: SamplingParams, priority: int) -> AsyncIterator[GeneratedToken]: ...

    @abstractmethod
    async def free_context(self, context_id: str) -> None: ...

    @abstractmethod
    def stats(self) -> BackendStats: ...

    async def score_prompt(self, text: str, top: int, token_ids: list[int] | None = None) -> PromptLogprobs:
        """The text's tokens (or the given token_ids, the text's tokens as the client cut it) and
        the log probability of each after the first, with the `top` likeliest tokens at each
        position (OpenAI's echo with logprobs); computed apart from any context. The default: an
        engine that computes no logits refuses."""
        raise self._no_logits(LOGPROBS_FEATURE)

    def refuse_logit_work(self, sampling: SamplingParams) -> None:
        """For a generate of a backend that computes no logits: a request for log probabilities or
        structured output fails with a message instead of an answer without them."""
        if not self.reports_logprobs and (feature := logit_feature(sampling)) is not None:
            raise self._no_logits(feature)

    def _no_logits(self, feature: str) -> UserError:
        return UserError(f"engine {self.name} computes no logits, so it cannot give {feature}: ask without it, or serve "
                         "the model on the built-in engine")

    def step_limits(self) -> StepLimits:
        """The step budget, as `stats` reports it; backends whose `stats` costs more than a
        field read answer from their configuration (the manager asks at every placement of
        throughput work)."""
        stats = self.stats()
        return StepLimits(stats.max_tokens_per_step, stats.max_seqs_per_step)

    async def close(self) -> None:
        """Releases what the backend holds; the default holds nothing."""


LOGPROBS_FEATURE = "log probabilities (logprobs, echo)"
STRUCTURED_FEATURE = "structured output (response_format, structured_outputs)"


def logit_feature(sampling: SamplingParams) -> str | None:
    """What the sampling asks of an engine's logits beyond sampling from them, if anything."""
    if sampling.logprobs is not None:
        return LOGPROBS_FEATURE
    if sampling.structured is not None:
        return STRUCTURED_FEATURE
    return None


@asynccontextmanager
async def engine_gone_on(lost: tuple[type[BaseException], ...], engine: str, what: str) -> AsyncIterator[None]:
    """Turns a backend's "cannot reach the engine" errors into EngineUnavailableError: the
    engine is gone (its calls run again elsewhere), which is not bad input."""
    try:
        yield
    except lost as exc:
        raise EngineUnavailableError(f"engine {engine} failed during {what}: {type(exc).__name__}: {exc}") from exc
