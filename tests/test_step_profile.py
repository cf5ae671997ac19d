"""The step cost an engine reports to the manager: how much of its prompt rate other work
keeps while a latency-class job waits beside it (engine/step_profile.py)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from parrot.engine.step_profile import MIN_STEPS, StepCost, StepProfile, prefill_share_at_cap


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


def test_the_built_in_engine_fits_its_steps_and_reports_the_share(engine):
    short, long = engine.tokenizer.encode("Hello"), engine.tokenizer.encode("The history of the world, told briefly. " * 30)

    async def scenario():
        for i in range(6):
            for name, ids in ((f"short-{i}", short), (f"long-{i}", long)):
                await engine.fill(name, None, ids)
                engine.free_context(name)

    asyncio.run(scenario())
    cost = engine.step_cost
    assert cost is not None and cost.per_token_s > 0
    share = engine.stats().prefill_share_beside_latency
    assert 0 < share <= 1
    assert share == pytest.approx(prefill_share_at_cap(cost, engine.config.latency_max_tokens_per_step, engine.config.max_tokens_per_step))
