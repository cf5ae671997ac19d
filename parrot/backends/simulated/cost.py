"""What one simulated forward step costs: a linear model of the step's batch composition.

A real engine with continuous batching runs one forward pass per step over every
active job: prefill chunks and one token per decoding sequence. Its time is, to a
good approximation (see the presets for where the coefficients come from),

    seconds = per_step                  # read the weights once, launch the kernels
            + per_prefill_token * prefill_tokens   # matmul FLOPs of prompt tokens
            + per_decode_seq * decode_seqs         # matmul FLOPs, sampling per sequence
            + per_kv_token * kv_tokens_read        # attention reads the KV it attends

Linear, not a roofline max(memory, compute): near the ridge point (decode batches of
~100 sequences on an A100) it overestimates by up to a third; elsewhere one term dominates.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass

from parrot.errors import UserError


@dataclass(frozen=True)
class StepShape:
    """The batch composition of one step: what the cost model prices."""

    prefill_tokens: int = 0  # prompt tokens computed by this step's prefill chunks
    decode_seqs: int = 0  # sequences that decode one token in this step
    kv_tokens_read: int = 0  # context tokens whose KV this step's attention reads

    @property
    def is_empty(self) -> bool:
        return self.prefill_tokens == 0 and self.decode_seqs == 0


@dataclass(frozen=True)
class CostModel:
    """Seconds a step takes, from its StepShape. All zero (the default) is an instant engine.

    `seconds_per_decode_step` is the first simulated engine's spelling (a sleep per decode
    step of each request); it adds to seconds_per_step, which is the same thing for one
    request alone and what a shared step costs under batching.
    """

    seconds_per_step: float = 0.0
    seconds_per_prefill_token: float = 0.0
    seconds_per_decode_seq: float = 0.0
    seconds_per_kv_token: float = 0.0
    seconds_per_decode_step: InitVar[float] = 0.0

    def __post_init__(self, seconds_per_decode_step: float) -> None:
        object.__setattr__(self, "seconds_per_step", self.seconds_per_step + seconds_per_decode_step)
        coefficients = (self.seconds_per_step, self.seconds_per_prefill_token, self.seconds_per_decode_seq, self.seconds_per_kv_token)
        if any(c < 0 for c in coefficients):
            raise UserError(f"cost model coefficients must be >= 0, got {coefficients}")

    @property
    def is_zero(self) -> bool:
        return not (self.seconds_per_step or self.seconds_per_prefill_token or self.seconds_per_decode_seq or self.seconds_per_kv_token)

    def step_seconds(self, shape: StepShape) -> float:
        if shape.is_empty:
            return 0.0
        return (
            self.seconds_per_step
            + self.seconds_per_prefill_token * shape.prefill_tokens
            + self.seconds_per_decode_seq * shape.decode_seqs
            + self.seconds_per_kv_token * shape.kv_tokens_read
        )
