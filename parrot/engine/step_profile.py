"""What a forward step costs, as the manager needs to know it: how much of an engine's
prompt rate is left to other work while a latency-class job waits beside it, and how many
latency-class jobs it can serve together before their own tokens slow each other.

While a latency-class job waits, the other work's steps are capped at a few tokens
(`StepBudget`), so each of its tokens carries a larger part of the step's fixed cost.
Where that fixed cost is large (a GPU reads every weight once a step) capped steps
prefill at a fraction of the full rate. Where tokens cost most (this CPU) the cap is
lowered until a capped step stays near its fixed cost (`latency_cap`), and then capped
steps too prefill at about half the full rate. The scheduler gives an engine serving
latency work a share of throughput work in proportion (`manager/policy.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

# a fit needs steps of different sizes: their token counts must spread by this much
MIN_TOKEN_SPREAD = 32.0
MIN_STEPS = 8
# An engine serving latency work takes latency-class jobs while their decodes add at most
# this part to a capped step (the goal keeps chats within 1.1x of the best latency), and at
# least LATENCY_SEQS_FLOOR of them: the small batch every latency-centric engine keeps.
LATENCY_SEQS_SLOWDOWN = 0.1
LATENCY_SEQS_FLOOR = 4


@dataclass(frozen=True)
class StepCost:
    """seconds of one step = per_step_s + per_token_s * tokens computed in it"""

    per_step_s: float
    per_token_s: float


def cap_pays(cost: StepCost | None, capped_tokens: int) -> bool:
    """Whether capping normal-class work's steps at `capped_tokens` while a latency-class job
    waits is worth it (StepBudget): only where the capped tokens cost at most the step's
    fixed cost, so a capped step is at most twice a step of decodes alone (a GPU reading its
    weights: 0.6-0.7 of it on the simulated A100s; a CPU: 2-5 times it). True while the cost
    is unknown."""
    return cost is None or capped_tokens * cost.per_token_s <= cost.per_step_s


def latency_cap(cost: StepCost | None, configured: int, granularity: int = 16) -> int:
    """The tokens other work may put in a step beside a waiting latency-class job (StepBudget):
    the configured cap, lowered where tokens cost so much that they would make the step more
    than twice its fixed cost, so that a latency job's token never waits much longer than two
    steps of decodes alone. On this CPU that is the floor of 16 tokens, not 128: a chat's token
    rode steps of about 100 ms beside capped prefill against 12 ms alone (step traces of
    `mixed`). Where the fixed cost is large (the simulated A100s: it affords 176-208 tokens)
    the configured cap stands. Never below `granularity` tokens (where even they cost more
    than the fixed cost) unless the configured cap is; the configured cap while the cost is unknown."""
    if cost is None or cost.per_token_s <= 0:
        return configured
    affordable = int(cost.per_step_s / cost.per_token_s) // granularity * granularity
    return min(configured, max(granularity, affordable))


def prefill_share_at_cap(cost: StepCost | None, capped_tokens: int, full_tokens: int) -> float:
    """Prompt tokens per second in steps of `capped_tokens`, over that in steps of `full_tokens`;
    1.0 when the cost is unknown (no reason then to treat the engine differently)."""
    if cost is None or capped_tokens >= full_tokens or cost.per_step_s + cost.per_token_s <= 0:
        return 1.0  # unknown, no cap, or steps that cost nothing
    capped_rate = capped_tokens / (cost.per_step_s + capped_tokens * cost.per_token_s)
    full_rate = full_tokens / (cost.per_step_s + full_tokens * cost.per_token_s)
    return min(1.0, capped_rate / full_rate)


def latency_seqs_bound(cost: StepCost | None, capped_tokens: int, configured_cap: int) -> int:
    """Latency-class jobs one engine serves at once. Where a step's fixed cost dominates (the
    configured cap pays, `cap_pays`: the simulated A100s, 15 ms a step and 0.07 ms a token),
    as many as decode in at most LATENCY_SEQS_SLOWDOWN of a capped step's time, some 30
    chats: gathering them on one engine leaves the others' steps uncapped. Approximate: a
    decoding sequence is counted as one prompt token of the fit, its reading of its context
    left out (on the simulated A100-7B a chat of 2k tokens costs some 10 times that); the
    manager never takes it above the engine's max_seqs_per_step. Elsewhere, and
    while the cost is unknown, LATENCY_SEQS_FLOOR: where tokens are dear, a decoding
    sequence is dearer still than the prompt tokens the fit is made of (it reads its whole
    context: 4-5 ms against under 1-2 ms a prompt token on this project's CPUs), and the next
    chat takes an engine of its own."""
    if cost is None or cost.per_token_s <= 0 or not cap_pays(cost, configured_cap):
        return LATENCY_SEQS_FLOOR
    capped_step_s = cost.per_step_s + capped_tokens * cost.per_token_s
    return max(LATENCY_SEQS_FLOOR, int(LATENCY_SEQS_SLOWDOWN * capped_step_s / cost.per_token_s))


@dataclass(frozen=True)
class LatencyStepRules:
    """How an engine's steps treat other work while a latency-class job waits (StepBudget),
    from its step cost: whether normal-class work keeps to the cap (decided at the configured
    cap), the cap itself (lowered where tokens are dear), the prompt rate kept at that cap and
    the latency-class jobs served together (what the manager weighs placements by)."""

    caps_normal_class: bool
    cap_tokens: int
    prefill_share: float
    # whether later throughput apps' prompts keep to the cap beside the first app's decodes: only
    # where tokens are dear (the configured cap would cost more than the step's fixed cost, as on
    # this CPU), so that a decode riding steps full of prompts is slowed many times over. Where the
    # fixed cost dominates (a GPU) such a step costs little more and the cap would only cost the
    # backlog throughput: on the simulated A100s mixed's jobs took 1.21-1.26x throughput-centric's
    # time with it and 1.19x without; on this CPU 1.00-1.06x with it and 1.17-1.25x without
    caps_later_apps: bool = False
    latency_seqs: int = LATENCY_SEQS_FLOOR

    @classmethod
    def for_cost(cls, cost: StepCost | None, configured_cap: int, full_tokens: int) -> LatencyStepRules:
        cap = latency_cap(cost, configured_cap)
        pays = cap_pays(cost, configured_cap)
        return cls(pays, cap, prefill_share_at_cap(cost, cap, full_tokens), caps_later_apps=cost is not None and not pays,
                   latency_seqs=latency_seqs_bound(cost, cap, configured_cap))


@dataclass
class StepProfile:
    """A running least-squares fit of step seconds on step tokens. Older steps weigh less
    (`decay` per step), so the fit follows an engine whose load changes."""

    decay: float = 0.995
    weight: float = 0.0
    steps: int = 0
    sum_x: float = 0.0
    sum_y: float = 0.0
    sum_xx: float = 0.0
    sum_xy: float = 0.0

    def record(self, tokens: int, seconds: float) -> None:
        d = self.decay
        self.weight = self.weight * d + 1.0
        self.sum_x = self.sum_x * d + tokens
        self.sum_y = self.sum_y * d + seconds
        self.sum_xx = self.sum_xx * d + tokens * tokens
        self.sum_xy = self.sum_xy * d + tokens * seconds
        self.steps += 1

    def seed(self, tokens: int, seconds: float) -> None:
        """A step timed apart from the running engine, weighed as enough steps for a fit with
        one of another size (MIN_STEPS between the two)."""
        for _ in range(-(-MIN_STEPS // 2)):
            self.record(tokens, seconds)

    def cost(self) -> StepCost | None:
        """The fitted cost, or None until steps of different sizes were seen."""
        if self.steps < MIN_STEPS:
            return None
        mean_x, mean_y = self.sum_x / self.weight, self.sum_y / self.weight
        variance = self.sum_xx / self.weight - mean_x * mean_x
        if variance < MIN_TOKEN_SPREAD**2:
            return None
        per_token = (self.sum_xy / self.weight - mean_x * mean_y) / variance
        if per_token <= 0:
            return None  # noise, not a cost model: a step cannot get cheaper with more tokens
        return StepCost(max(0.0, mean_y - per_token * mean_x), per_token)
