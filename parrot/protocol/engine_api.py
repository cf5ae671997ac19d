"""Payloads between the manager and engine servers."""

from __future__ import annotations

import dataclasses

from pydantic import BaseModel, ConfigDict, Field

from parrot.engine.outputs import FinishReason, GeneratedToken, PromptLogprobs, TokenLogprobs, TopLogprob
from parrot.engine.sampler import MAX_LOGPROBS, SamplingParams
from parrot.engine.scheduler import PRIORITY_NORMAL
from parrot.protocol.manager_api import MAX_VALUE_CHARS, Id, SamplingBody


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FillBody(Strict):
    context_id: str = Id
    parent_context_id: str | None = None
    text: str = Field(max_length=MAX_VALUE_CHARS)
    priority: int = PRIORITY_NORMAL
    shared_prefix_chars: int = Field(0, ge=0)
    then_generate: bool = False  # the next call generates on this context: it may compute the text


class EngineSamplingBody(SamplingBody):
    """The manager's sampling, and what only the OpenAI API asks of an engine."""

    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def to_params(self) -> SamplingParams:
        return dataclasses.replace(super().to_params(), logprobs=self.logprobs)

    @classmethod
    def of(cls, params: SamplingParams) -> "EngineSamplingBody":
        return cls(**SamplingBody.of(params).model_dump(), logprobs=params.logprobs)


class GenerateBody(Strict):
    context_id: str = Id
    sampling: EngineSamplingBody
    priority: int = PRIORITY_NORMAL


class FreeBody(Strict):
    context_id: str = Id


class TokenLogprobsBody(Strict):
    """A token's log probability, and the likeliest tokens' ids and log probabilities at its position, likeliest first."""

    logprob: float
    top_ids: list[int] = Field(default_factory=list, max_length=MAX_LOGPROBS)
    top_logprobs: list[float] = Field(default_factory=list, max_length=MAX_LOGPROBS)

    @classmethod
    def of(cls, logprobs: TokenLogprobs) -> "TokenLogprobsBody":
        return cls(logprob=logprobs.logprob, top_ids=[t.token_id for t in logprobs.top], top_logprobs=[t.logprob for t in logprobs.top])

    def value(self) -> TokenLogprobs:
        return TokenLogprobs(self.logprob, tuple(TopLogprob(i, v) for i, v in zip(self.top_ids, self.top_logprobs, strict=True)))


class TokenEvent(Strict):
    token_id: int
    text: str
    finish_reason: str | None = None
    logprobs: TokenLogprobsBody | None = None  # where the sampling asked for them

    @classmethod
    def of(cls, token: GeneratedToken) -> "TokenEvent":
        return cls(token_id=token.token_id, text=token.text, finish_reason=token.finish_reason.value if token.finish_reason else None,
                   logprobs=TokenLogprobsBody.of(token.logprobs) if token.logprobs is not None else None)

    def token(self) -> GeneratedToken:
        return GeneratedToken(self.token_id, self.text, FinishReason(self.finish_reason) if self.finish_reason else None,
                              self.logprobs.value() if self.logprobs is not None else None)


class ScoreBody(Strict):
    text: str = Field(min_length=1, max_length=MAX_VALUE_CHARS)
    top: int = Field(0, ge=0, le=MAX_LOGPROBS)
    token_ids: list[int] | None = Field(None, min_length=1, max_length=MAX_VALUE_CHARS)  # the text's tokens, as the client cut it


class PromptLogprobsBody(Strict):
    """A prompt's tokens, and the log probabilities of each after the first."""

    token_ids: list[int]
    logprobs: list[TokenLogprobsBody]

    @classmethod
    def of(cls, scored: PromptLogprobs) -> "PromptLogprobsBody":
        return cls(token_ids=scored.token_ids, logprobs=[TokenLogprobsBody.of(t) for t in scored.logprobs])

    def scored(self) -> PromptLogprobs:
        return PromptLogprobs(self.token_ids, [t.value() for t in self.logprobs])


class EngineStatsBody(Strict):
    name: str
    model: str
    running_jobs: int
    contexts: int
    kv_blocks_total: int
    kv_blocks_free: int
    tokens_processed: int
    peak_batch_blocks: int = 0
    kv_block_size: int = 16
    kv_blocks_cached: int = 0
    prefill_share_beside_latency: float = Field(1.0, gt=0, le=1)
    max_tokens_per_step: int = Field(0, ge=0)  # 0: not reported
    max_seqs_per_step: int = Field(0, ge=0)
    latency_seqs_bound: int = Field(0, ge=0)  # 0: not reported (an older engine)


class EngineRegister(Strict):
    name: str = Id
    url: str = Field(max_length=512)
    model: str = Field(max_length=512)
    # its stats as it registers: the manager places calls on it before its first heartbeat
    stats: EngineStatsBody | None = None


class Heartbeat(Strict):
    stats: EngineStatsBody
