"""The step cost an engine reports to the manager: how much of its prompt rate other work
keeps while a latency-class job waits beside it (engine/step_profile.py)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from parrot.engine.llm_engine import EngineConfig, LLMEngine
from parrot.engine.step_profile import MIN_STEPS, LatencyStepRules, StepCost, StepProfile, latency_cap, prefill_share_at_cap


@given(per_step=st.floats(0.0, 0.1), per_token=st.floats(1e-6, 1e-3),
       tokens=st.lists(st.integers(1, 4096), min_size=MIN_STEPS, max_size=200).filter(lambda t: max(t) - min(t) >= 256))
def test_the_fit_recovers_a_linear_step_cost(per_step, per_token, tokens):
    profile = StepProfile()
    for n in tokens:
        profile.record(n, per_step + per_token * n)
    cost = profile.cost()
    assert cost is not None
    assert cost.per_token_s == pytest.approx(per_token, rel=1e-6)
    assert cost.per_step_s == pytest.approx(per_step, rel=1e-6, abs=1e-9)


def test_no_cost_is_fitted_from_too_few_steps_or_steps_of_one_size():
    profile = StepProfile()
    for _ in range(100):
        profile.record(16, 0.01)
    assert profile.cost() is None
    few = StepProfile()
    for n in (1, 500, 1000):
        few.record(n, 0.01 + 1e-4 * n)
    assert few.cost() is None


def test_the_share_is_the_capped_rate_over_the_full_rate():
    # a fixed cost per step that equals 256 tokens' cost: 128-token steps run at half the rate of 512-token steps
    assert prefill_share_at_cap(StepCost(0.01, 0.01 / 256), 128, 512) == pytest.approx(0.5)
    assert prefill_share_at_cap(StepCost(0.0, 1e-4), 128, 512) == pytest.approx(1.0)  # tokens cost all: no loss
    assert prefill_share_at_cap(None, 128, 512) == 1.0  # unknown: treated as no loss
    assert prefill_share_at_cap(StepCost(0.01, 0.0), 512, 512) == 1.0  # no cap below the full step
    assert prefill_share_at_cap(StepCost(0.0, 0.0), 128, 512) == 1.0  # steps that cost nothing lose nothing


def test_the_cap_beside_latency_work_keeps_a_step_within_twice_its_fixed_cost():
    cpu, gpu = StepCost(per_step_s=0.012, per_token_s=0.0009), StepCost(per_step_s=0.015, per_token_s=0.000072)
    assert latency_cap(cpu, 128) == 16  # 13 tokens cost the fixed 12 ms: the least cap, a step of 16
    assert latency_cap(gpu, 128) == 128  # 208 tokens would: the configured cap stands
    assert latency_cap(None, 128) == 128 and latency_cap(StepCost(0.01, 0.0), 128) == 128
    assert latency_cap(cpu, 8) == 8  # a configured cap below the floor stands


@given(per_step=st.floats(0.0, 0.1), per_token=st.floats(1e-7, 1e-2), configured=st.integers(1, 1024))
def test_the_cap_never_passes_the_configured_one_and_is_affordable_above_16(per_step, per_token, configured):
    cap = latency_cap(StepCost(per_step, per_token), configured)
    assert 1 <= cap <= configured
    assert cap == configured or cap % 16 == 0
    assert cap >= min(16, configured)
    if 16 < cap < configured:
        assert cap * per_token <= per_step * (1 + 1e-9)


def test_the_built_in_engine_fits_its_steps_and_reports_the_share(engine):
    short, long = engine.tokenizer.encode("Hello"), engine.tokenizer.encode("The history of the world, told briefly. " * 30)

    async def scenario():
        for i in range(6):
            for name, ids in ((f"short-{i}", short), (f"long-{i}", long)):
                await engine.fill(name, None, ids)
                engine.free_context(name)

    steps_before = engine._step_profile.steps
    asyncio.run(scenario())
    assert engine._step_profile.steps > steps_before  # the fit takes in the engine's real steps
    cost = engine.step_cost
    assert cost is not None and cost.per_token_s > 0
    share = engine.stats().prefill_share_beside_latency
    assert 0 < share <= 1
    # the scheduler keeps other work beside a latency job to the cap its fitted steps afford
    assert engine.scheduler.rules.cap_tokens == latency_cap(cost, engine.config.latency_max_tokens_per_step)
    assert share == pytest.approx(prefill_share_at_cap(cost, engine.scheduler.rules.cap_tokens, engine.config.max_tokens_per_step))


def test_a_new_engine_knows_its_step_cost_before_its_first_request(monkeypatch):
    """Fitted from real steps only, an engine whose steps are all full never learns its cost,
    and the rules that need it (the cap beside latency work, later apps capped) stay off: the
    engine times steps of two sizes as it starts. They leave no trace: no steps or tokens
    counted, no context, every block free. (The step times are this test's, so its rules are
    known; the engine takes the quickest of several, so a slow one is ignored.)"""
    timed = []

    def cpu_like(self, plan):  # this CPU's cost (RESULTS.md): 12 ms a step, 0.9 ms a token; once 10x slower
        timed.append(plan.num_tokens)
        return (0.012 + 0.0009 * plan.num_tokens) * (10 if len(timed) == 2 else 1)

    monkeypatch.setattr(LLMEngine, "_timed", cpu_like)
    engine = LLMEngine(EngineConfig(random_weights="tiny", kv_memory_gb=0.05))
    assert sorted(set(timed)) == [1, 128]
    cost = engine.step_cost
    assert (cost.per_step_s, cost.per_token_s) == (pytest.approx(0.012), pytest.approx(0.0009))
    assert engine.scheduler.rules == LatencyStepRules.for_cost(cost, 128, engine.config.max_tokens_per_step)
    assert engine.scheduler.rules.caps_later_apps and engine.scheduler.rules.cap_tokens == 16
    # what the manager weighs placements by is what the scheduler runs by
    assert engine.stats().prefill_share_beside_latency == engine.scheduler.rules.prefill_share < 1.0
    stats = engine.stats()
    assert (stats.steps, stats.tokens_processed, stats.num_contexts) == (0, 0, 0)
    assert stats.blocks_free == stats.blocks_total
    engine.contexts.check_integrity()


def test_an_engine_too_small_to_time_two_sizes_waits_for_its_real_steps():
    engine = LLMEngine(EngineConfig(random_weights="tiny", kv_memory_gb=0.05, max_tokens_per_step=16))
    assert engine.step_cost is None  # 1 and 16 tokens are too close to tell the costs apart
    assert engine.scheduler.rules == LatencyStepRules.for_cost(None, 128, 16)
