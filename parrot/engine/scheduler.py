"""Continuous batching: which jobs run in the next forward step, and how much of each.

Each step takes jobs in priority order (lower value first, then arrival) and gives
each a chunk of its pending tokens under a per-step token budget: a decode needs
one token, a prefill is chunked so that one long prompt never stalls the others.
When KV blocks run short, the lowest-priority, newest other job is preempted (its
private KV dropped and recomputed later); a job that cannot fit even in an empty
pool fails with a clear error instead of waiting for ever.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch

from parrot.engine.kv_cache import Context, ContextTable
from parrot.engine.outputs import TokenLogprobs
from parrot.engine.penalties import TokenCounts
from parrot.engine.sampler import SamplingParams, StopChecker
from parrot.engine.step_profile import LatencyStepRules
from parrot.engine.structured import OutputGrammar
from parrot.engine.tokenizer import IncrementalDetokenizer

# A job's priority is its objective class's base less its DAG stage depth (App-FIFO: later
# stages of the apps in flight first); depths past MAX_STAGE_DEPTH rank as that depth, so
# the classes never overlap: latency-class priorities are <= 0, normal ones 1..1000,
# throughput ones 1001..2000, where the manager orders apps first, then stages
# (manager/objectives.py engine_priority).
PRIORITY_LATENCY = 0
PRIORITY_NORMAL = 1000
PRIORITY_THROUGHPUT = 2000
MAX_STAGE_DEPTH = 999


class JobKind(Enum):
    FILL = "fill"
    GENERATE = "generate"
    SCORE = "score"  # a fill whose every position's logits are kept: the prompt's log probabilities


@dataclass(eq=False)
class Job:
    kind: JobKind
    ctx: Context
    priority: int
    arrival: int
    sampling: SamplingParams | None = None
    detokenizer: IncrementalDetokenizer | None = None
    stop_checker: StopChecker | None = None
    generator: torch.Generator | None = None
    grammar: OutputGrammar | None = None  # structured output: which tokens may come next
    num_generated: int = 0
    token_counts: TokenCounts | None = None  # penalties' view of its tokens, kept up to date by each step that samples it
    preemptions: int = 0
    error: BaseException | None = None
    # SCORE: the log probabilities of each position's next token and its `score_top` likeliest
    # tokens, by position (a preempted job computes its positions again: they are overwritten)
    scores: dict[int, TokenLogprobs] = field(default_factory=dict)
    score_top: int = 0

    @property
    def sort_key(self) -> tuple[int, bool, int]:
        # decodes before prefills at equal priority: they cost one token each
        return (self.priority, self.ctx.num_pending > 1, self.arrival)


@dataclass(frozen=True)
class ScheduledChunk:
    job: Job
    start: int  # first position computed in this step
    length: int
    slots: list[int]
    wants_logits: bool  # the chunk reaches the end of the context and the job samples from it


@dataclass
class StepPlan:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    failed: list[Job] = field(default_factory=list)
    preempted: list[Job] = field(default_factory=list)
    # what the step's budget was, for step traces: the cap on other work's tokens at the step's
    # start (None: none), whether it was later apps' beside a throughput decode, and the rules
    cap_tokens: int | None = None
    later_apps_capped: bool = False
    rules: LatencyStepRules | None = None

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)


@dataclass(frozen=True)
class SchedulerConfig:
    max_tokens_per_step: int = 512
    max_seqs_per_step: int = 64
    # while a latency-class job waits beside other work, the other work fills steps only up
    # to this many tokens, so the latency job's tokens come quickly (StepBudget)
    latency_max_tokens_per_step: int = 128

    def __post_init__(self) -> None:
        if self.max_tokens_per_step < 1 or self.max_seqs_per_step < 1 or self.latency_max_tokens_per_step < 1:
            raise ValueError("the step budget needs at least one token and one sequence")


def is_latency_class(priority: int) -> bool:
    return priority <= PRIORITY_LATENCY


def is_throughput_class(priority: int) -> bool:
    return priority > PRIORITY_NORMAL


@dataclass
class StepBudget:
    """The tokens one step may still take.

    While a latency-class job waits beside other work, the other work fills a step only up
    to `capped` tokens (less what latency-class jobs took), so a latency job's decode never
    rides in a step full of another job's prefill. Latency-class jobs themselves take what
    they need up to `total`: a latency prompt is prefilled in one step, not in capped pieces.

    Between throughput-class jobs the same holds one level down: while a throughput job
    decodes, throughput jobs of a higher priority value (the manager gives apps that came
    later higher values: App-FIFO) prefill only up to the cap beside it, so the first app's
    tokens are not each a full step of the next app's prompts, and its jobs end first instead
    of every app ending with the last prompt (benchmarks/RESULTS.md, mixed). Only where
    tokens are dear (`LatencyStepRules.caps_later_apps`: a CPU); where a step's fixed cost
    dominates (a GPU) the backlog would lose more than the first app gains.

    Throughput-class work (declared deferrable) always keeps to the cap. Normal-class work
    (requests with no objective, such as other clients' traffic) keeps to it only where the
    owner's step cost says that pays (`step_profile.cap_pays`: a GPU's steps, whose fixed
    cost is large, not a CPU's). Against a stream of such requests the cap gains the latency
    job something only by deferring them past its end: on a CPU a capped step is 4-5 decode
    steps long, so the job waits through the same background tokens in smaller pieces,
    and the lost rate piles requests up (benchmarks/latency_class_probe.py). Against a
    throughput job's long backlog every step would be full, and the cap shortens each.
    """

    total: int
    capped: int | None  # None: no cap this step
    caps_normal_class: bool = True
    urgent_throughput: int | None = None  # the cap is kept by throughput jobs of a priority above this only

    @classmethod
    def for_step(cls, max_tokens: int, rules: LatencyStepRules, priorities: list[int],
                 decode_priorities: list[int] | None = None) -> StepBudget:
        """The budget of a step whose waiting jobs have these priorities (`decode_priorities`:
        those of the jobs among them that decode, one token each, read only where the rules
        cap later apps beside the first app's decodes)."""
        latency = sum(1 for priority in priorities if is_latency_class(priority))
        if 0 < latency < len(priorities):
            return cls(max_tokens, min(max_tokens, rules.cap_tokens), rules.caps_normal_class)
        decodes = (decode_priorities or []) if rules.caps_later_apps else []
        urgent = min((p for p in decodes if is_throughput_class(p)), default=None)
        if urgent is None or not any(p > urgent for p in priorities):
            return cls(max_tokens, None)
        # the decodes' own tokens do not count against the cap: it bounds the later apps' prompts
        return cls(max_tokens, min(max_tokens, rules.cap_tokens + len(decodes)), urgent_throughput=urgent)

    @property
    def spent(self) -> bool:
        return self.total == 0

    def grant(self, priority: int, wanted: int) -> int:
        """Tokens a job of this priority gets of the `wanted`; the caller then `take`s what it used."""
        if self.capped is None or not self._keeps_to_cap(priority):
            return min(wanted, self.total)
        return min(wanted, self.total, self.capped)

    def _keeps_to_cap(self, priority: int) -> bool:
        if self.urgent_throughput is not None:
            return priority > self.urgent_throughput
        return is_throughput_class(priority) or (self.caps_normal_class and not is_latency_class(priority))

    def take(self, tokens: int) -> None:
        self.total -= tokens
        if self.capped is not None:
            self.capped = max(0, self.capped - tokens)


class BatchScheduler:
    def __init__(self, contexts: ContextTable, config: SchedulerConfig, reclaim: Callable[[int], int] | None = None):
        self.contexts = contexts
        self.config = config
        self.reclaim = reclaim  # frees up to n idle cached blocks; returns how many it freed
        # the owner's rules from its fitted step cost (StepBudget); the configured cap until it is known
        self.rules = LatencyStepRules.for_cost(None, config.latency_max_tokens_per_step, config.max_tokens_per_step)
        self.jobs: list[Job] = []
        self._arrivals = itertools.count()

    def submit(self, kind: JobKind, ctx: Context, priority: int, **fields) -> Job:
        job = Job(kind, ctx, priority, next(self._arrivals), **fields)
        self.jobs.append(job)
        return job

    def remove(self, job: Job) -> None:
        if job in self.jobs:
            self.jobs.remove(job)

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        waiting = [job for job in self.jobs if job.ctx.num_pending > 0]
        decodes = ([job.priority for job in waiting if job.kind is JobKind.GENERATE and job.ctx.num_pending == 1]
                   if self.rules.caps_later_apps else None)  # a per-step list on the hot path only where it is read
        budget = StepBudget.for_step(self.config.max_tokens_per_step, self.rules, [job.priority for job in waiting], decodes)
        plan.cap_tokens, plan.later_apps_capped, plan.rules = budget.capped, budget.urgent_throughput is not None, self.rules
        pool = self.contexts.pool
        chosen: set[int] = set()
        blocked: list[Job] = []
        for job in sorted(self.jobs, key=lambda j: j.sort_key):
            if budget.spent or len(plan.chunks) == self.config.max_seqs_per_step:
                break
            ctx = job.ctx
            length = budget.grant(job.priority, ctx.num_pending)
            if length == 0:
                continue  # nothing pending, or other work past the latency cap
            while self.contexts.blocks_needed(ctx, length) > pool.num_free:
                # idle cached prefixes go before any running job is preempted
                if self.reclaim is not None and self.reclaim(self.contexts.blocks_needed(ctx, length) - pool.num_free) > 0:
                    continue
                victim = self._pick_victim(job, chosen)
                if victim is not None:
                    self.contexts.evict_private(victim.ctx)
                    victim.preemptions += 1
                    plan.preempted.append(victim)
                    continue
                # shrink the chunk to what the free blocks hold
                length = self._fitting_length(ctx, length)
                break
            if length == 0:
                blocked.append(job)
                continue
            slots = self.contexts.reserve_slots(ctx, length)
            reaches_end = ctx.num_computed + length == len(ctx.token_ids)
            plan.chunks.append(
                ScheduledChunk(job, ctx.num_computed, length, slots, reaches_end and job.kind is JobKind.GENERATE)
            )
            chosen.add(id(job))
            budget.take(length)
        if not plan.chunks and blocked:
            # nothing can run and nothing running will free a block: only freeing contexts
            # would help. The first-ranked blocked job has evicted every job it outranks, so
            # it alone holds the private blocks in the way: it fails (instead of waiting for
            # ever); the others may fit once its context is freed
            plan.failed = [min(blocked, key=lambda j: (j.priority, j.arrival))]
        return plan

    def _pick_victim(self, job: Job, chosen: set[int]) -> Job | None:
        candidates = [
            other
            for other in self.jobs
            if other is not job
            and id(other) not in chosen
            and other.sort_key[0::2] > job.sort_key[0::2]
            and self.contexts.private_from(other.ctx) < len(other.ctx.block_table)  # evicting it frees blocks
        ]
        return max(candidates, key=lambda j: (j.priority, j.arrival), default=None)

    def _fitting_length(self, ctx: Context, length: int) -> int:
        while length > 0 and self.contexts.blocks_needed(ctx, length) > self.contexts.pool.num_free:
            length -= 1 if length <= self.contexts.pool.block_size else self.contexts.pool.block_size
        return max(length, 0)
