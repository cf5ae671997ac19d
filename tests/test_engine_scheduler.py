"""The batch scheduler over a small pool, with the forward pass faked (no model).

Random workloads (prompt lengths, output lengths, priorities, arrival times, forks
from a shared prefix) run step by step the way LLMEngine drives the scheduler. Every
step must respect its budgets, never write a slot twice or into a block another
context holds, and keep the books balanced; every request that fits in the pool
finishes, and one fails only when it could never fit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parrot.engine.kv_cache import BlockPool, ContextTable
from parrot.engine.sampler import SamplingParams
from parrot.engine.scheduler import (
    PRIORITY_LATENCY,
    PRIORITY_NORMAL,
    PRIORITY_THROUGHPUT,
    BatchScheduler,
    JobKind,
    SchedulerConfig,
    StepPlan,
)
from parrot.engine.step_profile import StepCost, cap_pays, prefill_share_at_cap

MAX_STEPS = 2000


@dataclass
class Request:
    prompt: int
    output: int
    priority: int
    arrives: int
    forked: bool


requests_st = st.lists(
    st.builds(
        Request,
        prompt=st.integers(1, 20),
        output=st.integers(1, 12),
        priority=st.integers(0, 2),
        arrives=st.integers(0, 15),
        forked=st.booleans(),
    ),
    min_size=1,
    max_size=7,
)


def fake_token(ctx) -> int:
    return 1000 + len(ctx.token_ids)  # whatever the model "samples"; deterministic per position


@settings(max_examples=300, deadline=None)
@given(
    requests=requests_st,
    num_blocks=st.integers(4, 24),
    block_size=st.sampled_from([1, 2, 4]),
    step_tokens=st.integers(1, 24),
    step_seqs=st.integers(1, 4),
    prefix_len=st.integers(1, 9),
)
def test_random_workloads_finish_or_fail_only_when_they_cannot_fit(requests, num_blocks, block_size, step_tokens, step_seqs, prefix_len):
    kv: dict[int, int] = {}  # slot -> token written there

    def copy_block(src: int, dst: int) -> None:
        for offset in range(block_size):
            if src * block_size + offset in kv:
                kv[dst * block_size + offset] = kv[src * block_size + offset]

    table = ContextTable(BlockPool(num_blocks, block_size), copy_block)
    scheduler = BatchScheduler(table, SchedulerConfig(max_tokens_per_step=step_tokens, max_seqs_per_step=step_seqs))
    capacity = num_blocks * block_size

    # a shared prefix held (idle) for the whole run when any request forks from it
    has_prefix = any(r.forked for r in requests) and -(-prefix_len // block_size) < num_blocks
    if has_prefix:
        prefix = table.create("prefix", None)
        prefix.token_ids = list(range(prefix_len))
        slots = table.reserve_slots(prefix, prefix_len)
        kv.update(zip(slots, prefix.token_ids))
        prefix.num_computed = prefix_len

    pending = sorted(enumerate(requests), key=lambda item: item[1].arrives)
    jobs = {}  # request index -> job
    outcome: dict[int, str] = {}
    for step in range(MAX_STEPS):
        while pending and pending[0][1].arrives <= step:
            index, request = pending.pop(0)
            parent = "prefix" if request.forked and has_prefix else None
            ctx = table.create(f"r{index}", parent)
            ctx.token_ids.extend(range(100 + index * 50, 100 + index * 50 + request.prompt))
            if len(ctx.token_ids) + request.output - 1 > capacity:
                outcome[index] = "too big"  # the engine refuses such a fill up front
                table.free(ctx.context_id)
                continue
            jobs[index] = scheduler.submit(JobKind.GENERATE, ctx, request.priority, sampling=SamplingParams(max_tokens=request.output))
        if not jobs and not pending:
            break
        plan = scheduler.schedule()

        # the step's budgets, and every slot is fresh and private to its writer
        assert plan.num_tokens <= step_tokens and len(plan.chunks) <= step_seqs
        assert len({id(c.job) for c in plan.chunks}) == len(plan.chunks)
        written = [slot for c in plan.chunks for slot in c.slots]
        assert len(written) == len(set(written)), "two tokens of one step share a KV slot"
        for chunk in plan.chunks:
            ctx = chunk.job.ctx
            assert chunk.start == ctx.num_computed and chunk.length <= ctx.num_pending
            for slot in chunk.slots:
                assert table.pool.refcount(slot // block_size) == 1, "a write into a block another context holds"
        table.check_integrity()

        for job in plan.failed:
            index = next(i for i, j in jobs.items() if j is job)
            outcome[index] = "failed"
            scheduler.remove(job)
            table.free(job.ctx.context_id)
            del jobs[index]

        # "run" the step: write the KV, advance, sample where a chunk reaches the end
        for chunk in plan.chunks:
            ctx = chunk.job.ctx
            kv.update(zip(chunk.slots, ctx.token_ids[chunk.start : chunk.start + chunk.length]))
            ctx.num_computed = chunk.start + chunk.length
            if chunk.wants_logits:
                job = chunk.job
                job.num_generated += 1
                if job.num_generated == job.sampling.max_tokens:
                    index = next(i for i, j in jobs.items() if j is job)
                    outcome[index] = "done"
                    scheduler.remove(job)
                    table.free(ctx.context_id)  # the owner frees its context at once
                    del jobs[index]
                else:
                    ctx.token_ids.append(fake_token(ctx))

        # every live context reads back exactly its own tokens
        for index, job in jobs.items():
            ctx = job.ctx
            seen = [kv.get(ctx.block_table[p // block_size] * block_size + p % block_size) for p in range(ctx.num_computed)]
            assert seen == ctx.token_ids[: ctx.num_computed], f"request {index} reads foreign KV"
    else:
        raise AssertionError(f"no progress after {MAX_STEPS} steps: {len(jobs)} jobs stuck")

    assert set(outcome) == set(range(len(requests)))
    for index, result in outcome.items():
        if result == "failed":
            # a request fails only when it cannot fit beside the idle prefix: the running
            # jobs' blocks never make it fail (they are preempted instead)
            request = requests[index]
            assert has_prefix, f"request {index} failed although only running jobs held blocks"
            if request.forked:
                total = prefix_len + request.prompt + request.output - 1
                needed = -(-total // block_size) + (1 if prefix_len % block_size else 0)
            else:
                needed = -(-(request.prompt + request.output - 1) // block_size) + -(-prefix_len // block_size)
            assert needed > num_blocks, f"request {index} failed though it fits beside the prefix"
    if has_prefix:
        table.free("prefix")
    table.check_integrity()
    assert table.pool.num_free == num_blocks and len(table) == 0


def _queued(scheduler: BatchScheduler, contexts: ContextTable, name: str, tokens: int, priority: int):
    ctx = contexts.create(name, None)
    ctx.token_ids.extend(range(tokens))
    return scheduler.submit(JobKind.FILL, ctx, priority)


def test_a_latency_job_beside_throughput_work_gets_short_steps_and_goes_first():
    contexts = ContextTable(BlockPool(64, 16), lambda src, dst: None)
    scheduler = BatchScheduler(contexts, SchedulerConfig(max_tokens_per_step=512, max_seqs_per_step=8, latency_max_tokens_per_step=96))
    bulk = _queued(scheduler, contexts, "map", 600, priority=PRIORITY_THROUGHPUT)
    plan = scheduler.schedule()
    assert plan.num_tokens == 512  # throughput work alone: the whole budget
    chat = _queued(scheduler, contexts, "chat", 40, priority=PRIORITY_LATENCY)
    plan = scheduler.schedule()
    assert [c.job for c in plan.chunks] == [chat, bulk]
    assert plan.num_tokens == 96 and plan.chunks[0].length == 40  # the chat prompt whole, the bulk fills the rest


def test_a_latency_prompt_is_prefilled_in_one_step_while_other_work_keeps_to_the_cap():
    contexts = ContextTable(BlockPool(64, 16), lambda src, dst: None)
    scheduler = BatchScheduler(contexts, SchedulerConfig(max_tokens_per_step=512, max_seqs_per_step=8, latency_max_tokens_per_step=96))
    bulk = _queued(scheduler, contexts, "background", 600, priority=PRIORITY_THROUGHPUT)
    chunk = _queued(scheduler, contexts, "chain-step", 300, priority=PRIORITY_LATENCY)
    plan = scheduler.schedule()
    assert [(c.job, c.length) for c in plan.chunks] == [(chunk, 300)]  # not 96-token pieces; the bulk waits
    ahead = _queued(scheduler, contexts, "short-chat", 10, priority=PRIORITY_LATENCY - 1)
    chunk.ctx.num_computed = 300  # the chain step decodes now (nothing pending)
    plan = scheduler.schedule()
    assert [(c.job, c.length) for c in plan.chunks] == [(ahead, 10), (bulk, 86)]


def _step_beside_a_chat(prompts: list[int], priority: int, cap_pays: bool = True) -> StepPlan:
    contexts = ContextTable(BlockPool(1024, 16), lambda src, dst: None)
    scheduler = BatchScheduler(contexts, SchedulerConfig(max_tokens_per_step=512, max_seqs_per_step=16, latency_max_tokens_per_step=96))
    scheduler.rules = replace(scheduler.rules, caps_normal_class=cap_pays)
    _queued(scheduler, contexts, "chat", 10, priority=PRIORITY_LATENCY)
    for i, tokens in enumerate(prompts):
        _queued(scheduler, contexts, f"request-{i}", tokens, priority=priority)
    return scheduler.schedule()


def test_normal_class_work_keeps_to_the_cap_only_where_the_step_cost_says_it_pays():
    assert _step_beside_a_chat([600], PRIORITY_NORMAL, cap_pays=True).num_tokens == 96
    assert _step_beside_a_chat([600], PRIORITY_NORMAL, cap_pays=False).num_tokens == 512
    gpu, cpu = StepCost(per_step_s=0.0246, per_token_s=0.000139), StepCost(per_step_s=0.022, per_token_s=0.0008)
    assert cap_pays(gpu, 128) and not cap_pays(cpu, 128) and cap_pays(None, 128)  # unknown: the cap holds
    assert prefill_share_at_cap(gpu, 128, 2048) == pytest.approx(0.456, abs=0.01)


def test_throughput_class_work_keeps_to_the_cap_whatever_the_step_cost():
    assert _step_beside_a_chat([600] * 8, PRIORITY_THROUGHPUT, cap_pays=True).num_tokens == 96
    assert _step_beside_a_chat([600] * 8, PRIORITY_THROUGHPUT, cap_pays=False).num_tokens == 96
    # normal-class work past the cap takes what it needs; throughput work gets what is left under it
    contexts = ContextTable(BlockPool(1024, 16), lambda src, dst: None)
    scheduler = BatchScheduler(contexts, SchedulerConfig(max_tokens_per_step=512, max_seqs_per_step=16, latency_max_tokens_per_step=96))
    scheduler.rules = replace(scheduler.rules, caps_normal_class=False)
    chat = _queued(scheduler, contexts, "chat", 10, priority=PRIORITY_LATENCY)
    request = _queued(scheduler, contexts, "request", 50, priority=PRIORITY_NORMAL)
    bulk = _queued(scheduler, contexts, "map", 600, priority=PRIORITY_THROUGHPUT)
    assert [(c.job, c.length) for c in scheduler.schedule().chunks] == [(chat, 10), (request, 50), (bulk, 36)]


def _decoding(scheduler: BatchScheduler, contexts: ContextTable, name: str, priority: int):
    ctx = contexts.create(name, None)
    ctx.token_ids.extend(range(20))
    ctx.num_computed = 19  # its prompt is in; one token to compute a step
    return scheduler.submit(JobKind.GENERATE, ctx, priority, sampling=SamplingParams(max_tokens=4))


@pytest.mark.parametrize("caps_later_apps", [True, False])
def test_a_later_apps_prompts_keep_to_the_cap_beside_the_first_apps_decodes(caps_later_apps):
    """Throughput priorities order apps (App-FIFO): while the first app's call decodes, a later
    app's prompt fills only the cap (the decode rows do not count against it), so the first
    app's tokens are not each a full step; the same app's prompts are not capped. Where the
    step cost says capping costs more than it gains (caps_later_apps off) nothing is capped."""
    contexts = ContextTable(BlockPool(1024, 16), lambda src, dst: None)
    scheduler = BatchScheduler(contexts, SchedulerConfig(max_tokens_per_step=512, max_seqs_per_step=16, latency_max_tokens_per_step=96))
    scheduler.rules = replace(scheduler.rules, caps_later_apps=caps_later_apps)
    first, later = PRIORITY_NORMAL + 9, PRIORITY_NORMAL + 19
    decodes = [_decoding(scheduler, contexts, f"first-{i}", first) for i in range(3)]
    own = _queued(scheduler, contexts, "first-map", 40, priority=first)
    other = _queued(scheduler, contexts, "later-map", 600, priority=later)
    plan = scheduler.schedule()
    expected_other = 96 - 40 if caps_later_apps else 512 - 3 - 40
    assert [(c.job, c.length) for c in plan.chunks] == [*[(d, 1) for d in decodes], (own, 40), (other, expected_other)]
    # what a step trace records of the budget: the cap counts the decode rows in
    assert (plan.later_apps_capped, plan.cap_tokens) == ((True, 96 + 3) if caps_later_apps else (False, None))
    scheduler.remove(own)
    for job in decodes:
        scheduler.remove(job)
    same_app = [_decoding(scheduler, contexts, f"later-{i}", later) for i in range(2)]
    assert [(c.job, c.length) for c in scheduler.schedule().chunks] == [*[(d, 1) for d in same_app], (other, 510)]


def test_later_apps_are_capped_only_where_tokens_are_dear():
    from parrot.engine.step_profile import LatencyStepRules

    cpu = StepCost(per_step_s=0.012, per_token_s=0.0009)  # this CPU: 128 tokens cost 10x the fixed cost
    a100 = StepCost(per_step_s=0.02, per_token_s=0.02 * 0.62 / 128)  # 128 tokens cost 0.62 of the fixed cost
    assert LatencyStepRules.for_cost(cpu, 128, 512).caps_later_apps
    assert not LatencyStepRules.for_cost(a100, 128, 2048).caps_later_apps
    assert not LatencyStepRules.for_cost(None, 128, 512).caps_later_apps  # unknown: not until the steps say so


def test_latency_jobs_alone_use_the_whole_budget():
    contexts = ContextTable(BlockPool(64, 16), lambda src, dst: None)
    scheduler = BatchScheduler(contexts, SchedulerConfig(max_tokens_per_step=512, max_seqs_per_step=8, latency_max_tokens_per_step=96))
    _queued(scheduler, contexts, "a", 300, priority=PRIORITY_LATENCY)
    _queued(scheduler, contexts, "b", 300, priority=PRIORITY_LATENCY - 3)
    assert scheduler.schedule().num_tokens == 512
