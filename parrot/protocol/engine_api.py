"""Payloads between the manager and engine servers."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

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


class GenerateBody(Strict):
    context_id: str = Id
    sampling: SamplingBody
    priority: int = PRIORITY_NORMAL


class FreeBody(Strict):
    context_id: str = Id


class TokenEvent(Strict):
    token_id: int
    text: str
    finish_reason: str | None = None


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
