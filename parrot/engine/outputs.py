"""What the built-in engine hands back: generated tokens as they stream, and its stats."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class FinishReason(Enum):
    LENGTH = "length"
    STOP = "stop"


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    logprob: float


@dataclass(frozen=True)
class TokenLogprobs:
    """A token's log probability and the most likely tokens' at its position, most likely first
    (as many as were asked for: a sampling's `logprobs`, a scored prompt's `top`)."""

    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class PromptLogprobs:
    """A prompt's tokens and the log probabilities of each after the first, given those before it."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs]  # one fewer than token_ids


@dataclass(frozen=True)
class GeneratedToken:
    token_id: int
    text: str  # whole UTF-8 characters; may be empty while a character or stop string is incomplete
    finish_reason: FinishReason | None = None
    logprobs: TokenLogprobs | None = None  # where the sampling asked for them


@dataclass(frozen=True)
class EngineStats:
    num_contexts: int
    num_jobs: int
    blocks_total: int
    blocks_free: int
    block_size: int
    tokens_processed: int
    steps: int
    preemptions: int
    busy_seconds: float
    cached_prefixes: int = 0
    # most distinct KV blocks one forward step's batch read: the memory sharing saves
    peak_batch_blocks: int = 0
    cached_blocks: int = 0  # held only by cached prefixes (reclaimable, not leaked)
    prefill_share_beside_latency: float = 1.0  # from the fitted step cost (engine/step_profile.py)
    max_tokens_per_step: int = 0
    max_seqs_per_step: int = 0
    latency_seqs_bound: int = 0  # also from the fitted step cost
