"""The simulated engine's core: a step loop over jobs, on a clock kept in simulated seconds.

Each step: schedule (scheduler.py) -> sleep the step's cost times time_scale -> deliver
results. The loop sleeps to a deadline on the simulated clock rather than for each
step's own time, so the event loop's oversleep (timers round up to a millisecond)
never accumulates. A zero cost model with unlimited KV is `instant`: the caller then
computes inline and no loop runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from parrot.backends.simulated.contexts import ContextTree, SimContext
from parrot.backends.simulated.cost import CostModel
from parrot.backends.simulated.scheduler import JobKind, SimJob, SimScheduler, StepPlan
from parrot.engine.step_profile import StepCost
from parrot.errors import KVCacheExhaustedError

log = logging.getLogger(__name__)

FREE_GRACE_SECONDS = 0.1  # wall time jobs no KV can be found for wait for a free_context, then fail
MAX_LAG_SECONDS = 0.05  # a loop stalled longer than this is not caught up by sleeping less later


@dataclass(frozen=True)
class SimulatedStats:
    simulated_seconds: float  # busy time: the sum of the steps' simulated durations
    steps: int
    prefill_tokens: int
    decode_tokens: int
    kv_tokens_read: int
    preemptions: int
    max_batch: int  # most sequences in one step
    host_cpu_seconds: float  # real CPU the step loop itself used (planning, bookkeeping)
    kv_used: int
    kv_peak: int
    kv_capacity: int | None


@dataclass
class _Counters:
    steps: int = 0
    prefill: int = 0
    decode: int = 0
    kv_read: int = 0
    max_batch: int = 0
    host_cpu: float = 0.0


class SimEngine:
    def __init__(self, name: str, cost: CostModel, kv_capacity_tokens: int | None, max_tokens_per_step: int,
                 max_seqs_per_step: int, shared_prefix_attention: bool, time_scale: float):
        self.name, self.cost, self.time_scale = name, cost, time_scale
        self.tree = ContextTree(kv_capacity_tokens)
        # the cost model is the step cost the built-in engine fits from its steps
        step_cost = None if cost.is_zero else StepCost(cost.seconds_per_step, cost.seconds_per_prefill_token)
        self.scheduler = SimScheduler(self.tree, max_tokens_per_step, max_seqs_per_step, shared_prefix_attention, step_cost=step_cost)
        self.instant = cost.is_zero and kv_capacity_tokens is None
        self.simulated_seconds = 0.0
        self.counts = _Counters()
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None

    async def prefill(self, ctx: SimContext, priority: int) -> None:
        """Computes ctx's pending tokens; returns when their KV exists."""
        if self.instant:
            self.counts.prefill += ctx.pending
            self.tree.compute(ctx, ctx.pending)
            return
        job = self.scheduler.submit(JobKind.FILL, ctx, priority, done=asyncio.get_running_loop().create_future())
        self.wake()
        try:
            await job.done
        finally:
            self.scheduler.remove(job)  # a cancelled caller's job stops too

    def decode(self, ctx: SimContext, priority: int, max_tokens: int) -> SimJob:
        """Starts decoding (after prefilling what of ctx is pending): job.tokens gets each token's index, or an exception. Not for instant engines."""
        job = self.scheduler.submit(JobKind.GENERATE, ctx, priority, max_tokens=max_tokens, tokens=asyncio.Queue())
        self.wake()
        return job

    def decode_instant(self, ctx: SimContext) -> None:
        ctx.own_tokens += 1
        self.tree.compute(ctx, 1)
        self.counts.decode += 1

    def fail(self, job: SimJob, error: BaseException) -> None:
        if job.closed:
            return
        self.scheduler.remove(job)
        if job.done is not None and not job.done.done():
            job.done.set_exception(error)
        elif job.tokens is not None:
            job.tokens.put_nowait(error)

    def wake(self) -> None:
        if self.instant:
            return
        loop = asyncio.get_running_loop()
        if self._loop_task is None or self._loop_task.done() or self._loop_task.get_loop() is not loop:
            self._wakeup = asyncio.Event()
            self._loop_task = loop.create_task(self._step_loop())
        self._wakeup.set()

    def stats(self) -> SimulatedStats:
        c, tree = self.counts, self.tree
        return SimulatedStats(self.simulated_seconds, c.steps, c.prefill, c.decode, c.kv_read, self.scheduler.preemptions,
                              c.max_batch, c.host_cpu, tree.kv_used, tree.kv_peak, tree.capacity)

    async def close(self, error: BaseException) -> None:
        for job in list(self.scheduler.jobs):
            self.fail(job, error)
        if self._loop_task is not None and not self._loop_task.done():
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
        self._loop_task = None

    async def _step_loop(self) -> None:
        try:
            await self._steps()
        except Exception as exc:  # a bug here must fail the jobs, not leave their callers waiting for ever
            log.exception("simulated engine %s: step loop failed", self.name)
            for job in list(self.scheduler.jobs):
                self.fail(job, exc)

    async def _steps(self) -> None:
        loop = asyncio.get_running_loop()
        anchor: tuple[float, float] | None = None  # (wall, simulated) when the engine last became busy
        while True:
            if not self.scheduler.jobs:
                anchor = None
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            cpu = time.process_time()
            plan = self.scheduler.schedule()
            self.counts.host_cpu += time.process_time() - cpu
            if not plan.chunks:
                anchor = None
                await self._fail_blocked_unless_freed(plan)
                continue
            self._count(plan)
            now = loop.time()
            if anchor is None or now - (anchor[0] + (self.simulated_seconds - anchor[1]) * self.time_scale) > MAX_LAG_SECONDS:
                anchor = (now, self.simulated_seconds)
            end = self.simulated_seconds + self.cost.step_seconds(plan.shape)
            await asyncio.sleep(max(0.0, anchor[0] + (end - anchor[1]) * self.time_scale - loop.time()))
            self.simulated_seconds = end  # the clock moves when the step's results appear
            cpu = time.process_time()
            self._deliver(plan)
            self.counts.host_cpu += time.process_time() - cpu

    async def _fail_blocked_unless_freed(self, plan: StepPlan) -> None:
        """Nothing fits: a context being freed (a turn of the loop after its job ends) may make room."""
        self._wakeup.clear()
        try:
            await asyncio.wait_for(self._wakeup.wait(), FREE_GRACE_SECONDS)
        except TimeoutError:
            tree = self.tree
            for job in plan.blocked:
                self.fail(job, KVCacheExhaustedError(f"out of simulated KV: other contexts hold {tree.kv_used} of {tree.capacity} tokens"))

    def _count(self, plan: StepPlan) -> None:
        c = self.counts
        c.steps += 1
        c.prefill += plan.shape.prefill_tokens
        c.decode += plan.shape.decode_seqs
        c.kv_read += plan.shape.kv_tokens_read
        c.max_batch = max(c.max_batch, len(plan.chunks))

    def _deliver(self, plan: StepPlan) -> None:
        for chunk in plan.chunks:
            job = chunk.job
            if job.closed:
                continue
            if job.kind is JobKind.FILL and job.ctx.pending == 0:
                self.scheduler.remove(job)
                job.done.set_result(None)
            elif chunk.is_decode or job.ctx.pending == 0:
                # a decode's token, or the first after a prompt its generate computed (or recomputed
                # after a preemption): the step that ends a prompt samples, as the built-in engine's does
                job.generated += 1
                job.tokens.put_nowait(job.generated)
                if job.generated == job.max_tokens:
                    self.scheduler.remove(job)
