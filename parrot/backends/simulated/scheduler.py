"""Continuous batching for the simulated engine: which jobs advance in the next step.

The same policy as the built-in engine's scheduler (parrot/engine/scheduler.py), on
token counts: jobs in priority order (lower value first, decodes before prefills,
then arrival) each get a chunk under a per-step token budget, up to a sequence limit.
A decode needs one KV token; a prefill starts or continues only when its whole
remainder fits in free KV, so a half-done prompt is never stranded by a full pool.
When KV is short, later or lower-priority jobs are preempted (their KV dropped, to be
prefilled again); a job nothing can make room for waits, and is reported blocked.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

from parrot.backends.simulated.contexts import ContextTree, SimContext
from parrot.backends.simulated.cost import StepShape
from parrot.engine.scheduler import JobKind, StepBudget
from parrot.engine.step_profile import LatencyStepRules, StepCost


@dataclass(eq=False)
class SimJob:
    kind: JobKind
    ctx: SimContext
    priority: int
    arrival: int
    max_tokens: int = 0  # GENERATE: tokens to produce
    generated: int = 0
    preemptions: int = 0
    closed: bool = False  # finished, failed or abandoned: results of a step in flight are dropped
    done: asyncio.Future | None = None  # FILL: resolved when the prompt is computed
    tokens: asyncio.Queue | None = None  # GENERATE: step results (token index or an exception)

    @property
    def order(self) -> tuple[int, int]:
        """Who may preempt whom: a smaller order outranks a larger one."""
        return (self.priority, self.arrival)

    @property
    def sort_key(self) -> tuple[int, bool, int]:
        return (self.priority, self.ctx.pending > 0, self.arrival)


@dataclass(frozen=True)
class Chunk:
    job: SimJob
    length: int  # tokens computed for this job in the step
    is_decode: bool


@dataclass
class StepPlan:
    chunks: list[Chunk] = field(default_factory=list)
    blocked: list[SimJob] = field(default_factory=list)  # could not get KV this step
    shape: StepShape = StepShape()


class SimScheduler:
    def __init__(self, tree: ContextTree, max_tokens_per_step: int, max_seqs_per_step: int, shared_prefix_attention: bool,
                 latency_max_tokens_per_step: int = 128, step_cost: StepCost | None = None):
        self.tree = tree
        self.max_tokens = max_tokens_per_step
        self.max_seqs = max_seqs_per_step
        self.shared_prefix_attention = shared_prefix_attention
        self.jobs: list[SimJob] = []
        self.preemptions = 0
        # the rules (StepBudget) the built-in engine would fit from steps of this cost
        self.rules = LatencyStepRules.for_cost(step_cost, latency_max_tokens_per_step, max_tokens_per_step)
        self._arrivals = itertools.count()

    def submit(self, kind: JobKind, ctx: SimContext, priority: int, **fields) -> SimJob:
        job = SimJob(kind, ctx, priority, next(self._arrivals), **fields)
        self.jobs.append(job)
        return job

    def remove(self, job: SimJob) -> None:
        if not job.closed:
            job.closed = True
            self.jobs.remove(job)

    def schedule(self) -> StepPlan:
        """Plans one step and reserves its KV (computed by the step's end)."""
        plan = StepPlan()
        # every simulated job waits for its next chunk or token, as pending jobs do in the engine
        budget = StepBudget.for_step(self.max_tokens, self.rules, [job.priority for job in self.jobs],
                                     [job.priority for job in self.jobs if not job.ctx.pending] if self.rules.caps_later_apps else None)
        chosen = set()
        for job in sorted(self.jobs, key=lambda j: j.sort_key):
            if budget.spent or len(plan.chunks) == self.max_seqs:
                break
            pending = job.ctx.pending
            length = budget.grant(job.priority, pending or 1)  # a decode's one token, or a prefill chunk
            if length == 0:
                continue  # other work past the latency cap
            # a prefill needs room for its whole remainder, so a half-done prompt is never stranded
            if not self._make_room(job, pending or 1, chosen):
                plan.blocked.append(job)
                continue
            if pending:
                self.tree.compute(job.ctx, length)
            else:
                self._grow(job.ctx)
            plan.chunks.append(Chunk(job, length, is_decode=not pending))
            chosen.add(job)
            budget.take(length)
        plan.shape = self._shape(plan.chunks)
        return plan

    def _grow(self, ctx: SimContext) -> None:
        # a decode appends the token it feeds back; its KV is written in the step
        ctx.own_tokens += 1
        self.tree.compute(ctx, 1)

    def _make_room(self, job: SimJob, need: int, chosen: set[SimJob]) -> bool:
        if need <= self.tree.kv_free:
            return True
        victims = sorted(
            (o for o in self.jobs if o is not job and o not in chosen and o.order > job.order and o.ctx.children == 0 and o.ctx.computed > 0),
            key=lambda o: o.order,
            reverse=True,
        )
        if self.tree.kv_free + sum(v.ctx.computed for v in victims) < need:
            return False  # preempting would not make enough room: waste nothing
        for victim in victims:
            if need <= self.tree.kv_free:
                break
            # a decoding job's last sampled token is not in its context until its next decode computes it;
            # the recompute that samples next takes it in with the rest, as the engine's does
            decoding = victim.kind is JobKind.GENERATE and victim.generated > 0 and victim.ctx.pending == 0
            self.tree.evict(victim.ctx)
            if decoding:
                victim.ctx.own_tokens += 1
            victim.preemptions += 1
            self.preemptions += 1
        return True

    def _shape(self, chunks: list[Chunk]) -> StepShape:
        reads: dict[SimContext, int] = {}
        total = 0
        for chunk in chunks:
            for ctx, seen in chunk.job.ctx.segments(chunk.job.ctx.computed):
                total += seen
                reads[ctx] = max(reads.get(ctx, 0), seen)
        prefill = sum(c.length for c in chunks if not c.is_decode)
        decodes = sum(1 for c in chunks if c.is_decode)
        kv_read = sum(reads.values()) if self.shared_prefix_attention else total
        return StepShape(prefill, decodes, kv_read)
