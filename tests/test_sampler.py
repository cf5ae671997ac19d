"""Sampling settings and the pure sampling functions (no model needed)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parrot.engine import batch_sampling
from parrot.engine.batch_sampling import RowConstraints, sample_batch
from parrot.engine.penalties import TokenCounts, apply_penalties
from parrot.engine.sampler import (
    SamplingParams,
    StopChecker,
    apply_min_p,
    apply_token_rules,
    apply_top_k,
    apply_top_p,
    stop_string_holdback,
    token_logprobs,
)
from parrot.engine.structured import StructuredOutput
from parrot.errors import SamplingError, UserError

NEG_INF = float("-inf")


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits: [V] -> one token, as the engine samples a row."""
    return sample_batch(logits.unsqueeze(0), [params], [generator])[0]


# ---- SamplingParams validation ------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_invalid_sampling_params_raise_a_helpful_user_error(kwargs, words):
    with pytest.raises(SamplingError, match=words) as info:
        SamplingParams(**kwargs)
    assert isinstance(info.value, UserError), "bad settings are the caller's error (HTTP 4xx)"
    bad_value = str(next(iter(kwargs.values())))
    assert bad_value in str(info.value) or words == "stop", "the message shows the offending value"


def test_sampling_params_defaults_and_normalisation():
    params = SamplingParams(stop=["\n\n", "END"], stop_token_ids=[7])
    assert params.stop == ("\n\n", "END") and params.stop_token_ids == (7,)
    assert params.greedy and SamplingParams().greedy
    assert not SamplingParams(temperature=0.7).greedy
    hash(params)  # frozen settings can key caches


def test_a_single_stop_string_is_one_stop_not_its_characters():
    assert SamplingParams(stop="END").stop == ("END",)


# ---- top-k / top-p ---------------------------------------------------------------


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    out = apply_top_k(logits, 2)
    assert torch.equal(torch.isfinite(out), torch.tensor([False, True, False, True, False]))
    assert torch.equal(out[torch.isfinite(out)], torch.tensor([5.0, 4.0]))
    assert torch.equal(apply_top_k(logits, 0), logits), "0 disables top-k"
    assert torch.equal(apply_top_k(logits, 10), logits), "k past the vocabulary keeps everything"


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    kept = lambda p: torch.isfinite(apply_top_p(logits, p)).tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.8) == [True, True, False, False]
    assert kept(0.81) == [True, True, True, False]
    assert kept(1.0) == [True, True, True, True]
    assert kept(0.01) == [True, False, False, False], "the most likely token always stays"


def test_top_p_works_on_unsorted_logits():
    logits = torch.tensor([0.05, 0.5, 0.15, 0.3]).log()
    assert torch.isfinite(apply_top_p(logits, 0.7)).tolist() == [False, True, False, True]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-20, 20, allow_nan=False), min_size=1, max_size=40),
    st.floats(0.01, 1.0),
)
def test_top_p_property(values, p):
    logits = torch.tensor(values, dtype=torch.float32)
    out = apply_top_p(logits, p)
    kept = torch.isfinite(out)
    assert kept.any()
    assert torch.equal(out[kept], logits[kept]), "kept logits are unchanged"
    probs = torch.softmax(logits, dim=-1)
    assert probs[kept].sum() >= min(p, 1.0) - 1e-5, "kept mass reaches p"
    # every kept token is at least as likely as every dropped one
    if (~kept).any():
        assert probs[kept].min() >= probs[~kept].max() - 1e-7


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-20, 20, allow_nan=False), min_size=1, max_size=40), st.integers(1, 45))
def test_top_k_property(values, k):
    logits = torch.tensor(values, dtype=torch.float32)
    kept = torch.isfinite(apply_top_k(logits, k))
    assert kept.sum() >= min(k, len(values))  # ties at the threshold may keep more
    if (~kept).any():
        assert logits[kept].min() > logits[~kept].max()


# ---- sampling ------------------------------------------------------------------


def test_greedy_takes_the_argmax():
    logits = torch.tensor([0.1, 2.0, 1.9, -1.0])
    assert sample_token(logits, SamplingParams(), None) == 1
    assert sample_batch(torch.stack([logits, logits.flip(0)]), [SamplingParams()] * 2, [None, None]) == [1, 2]


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, seed=42)

    def draw(seed):
        generator = torch.Generator().manual_seed(seed)
        return [sample_token(logits, params, generator) for _ in range(20)]

    assert draw(42) == draw(42)
    assert draw(42) != draw(43)


def test_sampling_respects_top_k_and_top_p():
    logits = torch.tensor([3.0, 2.9, 2.8, -5.0, -5.0, -6.0])
    generator = torch.Generator().manual_seed(0)
    top_k = {sample_token(logits, SamplingParams(temperature=5.0, top_k=2), generator) for _ in range(200)}
    assert top_k == {0, 1}
    top_p = {sample_token(logits, SamplingParams(temperature=1.0, top_p=0.5), generator) for _ in range(200)}
    assert top_p <= {0, 1}


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([2.0, 1.0, 0.0])
    generator = torch.Generator().manual_seed(0)

    def share_of_best(temperature):
        draws = [sample_token(logits, SamplingParams(temperature=temperature), generator) for _ in range(400)]
        return draws.count(0) / len(draws)

    assert share_of_best(0.1) > 0.99
    expected = math.exp(2) / (math.exp(2) + math.exp(1) + 1)
    assert abs(share_of_best(1.0) - expected) < 0.1
    assert share_of_best(100.0) < 0.45


def test_batch_sampling_uses_each_rows_settings():
    logits = torch.tensor([[0.0, 1.0, 0.5], [5.0, 0.0, 0.0]])
    params = [SamplingParams(), SamplingParams(temperature=1.0, top_k=1, seed=3)]
    assert sample_batch(logits, params, [None, torch.Generator().manual_seed(3)]) == [1, 0]


# ---- stop strings ------------------------------------------------------------------


def stream(stops, deltas):
    checker = StopChecker(tuple(stops))
    out = []
    for delta in deltas:
        out.append(checker.feed(delta))
        if checker.stopped:
            break
    else:
        out.append(checker.flush())
    return "".join(out), out, checker.stopped


def test_stop_string_inside_one_delta():
    text, _, stopped = stream(["STOP"], ["Hello ", "wor", "ld STOP and more"])
    assert text == "Hello world " and stopped


def test_stop_string_split_over_deltas_is_held_back_then_cut():
    text, pieces, stopped = stream(["</answer>"], ["42", "</ans", "wer", ">", "junk"])
    assert text == "42" and stopped
    assert pieces[1] == "" and pieces[2] == "", "a possible stop prefix is held back"


def test_held_back_text_is_released_when_it_is_not_a_stop():
    text, pieces, stopped = stream(["\n\n"], ["a\n", "b\n", "c"])
    assert text == "a\nb\nc" and not stopped
    assert pieces[0] == "a" and pieces[1] == "\nb"


def test_earliest_of_several_stop_strings_wins():
    text, _, stopped = stream(["world", "lo w"], ["hello world"])
    assert text == "hel" and stopped


def test_holdback_is_the_longest_stop_prefix_at_the_end():
    assert stop_string_holdback("abc", ("cde",)) == 1
    assert stop_string_holdback("abcd", ("cde", "bcdx")) == 3
    assert stop_string_holdback("abc", ("xyz",)) == 0
    assert stop_string_holdback("abc", ("abc",)) == 0, "a whole stop string is a match, not a prefix"


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="ab\n", max_size=30),
    stops=st.lists(st.text(alphabet="ab\n", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=8),
)
def test_stop_checker_equals_cutting_the_whole_text(text, stops, cuts):
    """The stream stops at the first delta that completes a stop string and is cut before the
    earliest stop string in the text so far; a single stop string cuts the same wherever the deltas split."""
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    deltas = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    streamed, _, stopped = stream(stops, deltas)
    expected, expect_stop = text, False
    for end in bounds[1:]:
        hits = [text[:end].index(stop) for stop in stops if stop in text[:end]]
        if hits:
            expected, expect_stop = text[: min(hits)], True
            break
    assert streamed == expected and stopped == expect_stop
    assert not any(stop in streamed for stop in stops)
    if len(stops) == 1:
        assert streamed == (text[: text.index(stops[0])] if stops[0] in text else text)


def test_sampling_refuses_more_logprobs_than_it_reports():
    assert SamplingParams(logprobs=0).logprobs == 0
    with pytest.raises(SamplingError, match="logprobs must be from 0 to 20"):
        SamplingParams(logprobs=21)
    with pytest.raises(SamplingError, match="logprobs"):
        SamplingParams(logprobs=-1)


def test_token_logprobs_normalise_each_row_and_rank_its_alternatives():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0], [0.0, 0.0, 5.0, 1.0]])
    rows = token_logprobs(logits, tokens=[1, 2], alternatives=[2, 0])
    expected = torch.log_softmax(logits, dim=-1)
    assert rows[0].logprob == pytest.approx(expected[0, 1].item())
    assert [(t.token_id, round(t.logprob, 5)) for t in rows[0].top] == [(0, round(expected[0, 0].item(), 5)), (2, round(expected[0, 2].item(), 5))]
    assert rows[1].logprob == pytest.approx(expected[1, 2].item()) and rows[1].top == ()


def test_penalties_are_checked_and_default_to_none():
    assert not SamplingParams().penalizes
    assert SamplingParams(presence_penalty=-0.5).penalizes and SamplingParams(repetition_penalty=1.2).penalizes
    with pytest.raises(SamplingError, match="frequency_penalty must be from -2 to 2"):
        SamplingParams(frequency_penalty=2.5)
    with pytest.raises(SamplingError, match="presence_penalty must be from -2 to 2"):
        SamplingParams(presence_penalty=-3)
    with pytest.raises(SamplingError, match="repetition_penalty must be above 0"):
        SamplingParams(repetition_penalty=0)


@settings(max_examples=60, deadline=None)
@given(
    logits=st.lists(st.floats(-20, 20, allow_nan=False), min_size=8, max_size=8),
    prompt=st.lists(st.integers(0, 9), max_size=6),
    output=st.lists(st.integers(0, 9), max_size=10),
    presence=st.floats(-2, 2), frequency=st.floats(-2, 2), repetition=st.floats(0.5, 3),
)
def test_penalties_move_only_the_tokens_seen_and_by_the_rules(logits, prompt, output, presence, frequency, repetition):
    """Ids 8 and 9 lie past the 8-token vocabulary (a tokenizer's added tokens): they move nothing.
    The rows around the penalized one keep to their own settings."""
    params = SamplingParams(presence_penalty=presence, frequency_penalty=frequency, repetition_penalty=repetition)
    before = torch.tensor([logits, logits, logits])
    rows = [TokenCounts.of(output, prompt, 8), TokenCounts.of(prompt, output, 8), TokenCounts.of([], [0, 1], 8)]
    after = apply_penalties(before, rows, [SamplingParams(), params, SamplingParams(frequency_penalty=0.5)])
    for token in range(8):
        value = logits[token]
        if token in prompt or token in output:  # CTRL: divided where positive, multiplied where negative
            value = value / repetition if value > 0 else value * repetition
        count = output.count(token)
        value -= frequency * count + (presence if count else 0.0)
        assert after[1, token].item() == pytest.approx(value, rel=1e-5, abs=1e-4)
    assert torch.equal(after[0], before[0])
    assert after[2, 0].item() == pytest.approx(logits[0] - 0.5, abs=1e-4) and torch.equal(after[2, 2:], before[2, 2:])
    assert torch.equal(before, torch.tensor([logits] * 3))  # the batch's logits are left as they were


def counted(counts: TokenCounts) -> tuple[list[int], list[tuple[int, float]]]:
    """The tokens seen, and the output's tokens with their counts, in id order."""
    return sorted(counts.seen_ids.tolist()), sorted(zip(counts.output_ids.tolist(), counts.output_counts.tolist()))


@settings(max_examples=60, deadline=None)
@given(prompt=st.lists(st.integers(0, 9), max_size=6), steps=st.lists(st.lists(st.integers(0, 9), max_size=3), max_size=5))
def test_token_counts_kept_a_step_at_a_time_equal_counts_taken_at_once(prompt, steps):
    """A generate's counts follow its context as tokens come, a few a step; a context whose prompt
    changed (rebuilt after a fault) is counted anew. Ids 8 and 9 lie past the vocabulary."""
    counts = TokenCounts.of(prompt, [], 8)
    ids = list(prompt)
    for new in steps:
        ids += new
        counts = counts.catch_up(ids, len(ids) - len(prompt))
        output = ids[len(prompt):]
        assert counted(counts) == (sorted({t for t in ids if t < 8}), sorted((t, float(output.count(t))) for t in set(output) if t < 8))
    recounted = counts.catch_up([1] + ids, len(ids) - len(prompt))
    assert counted(recounted) == counted(TokenCounts.of([1] + prompt, ids[len(prompt):], 8))


def test_token_rules_are_checked_and_a_mapping_of_biases_is_taken():
    assert SamplingParams(logit_bias={"5": 1, 2: -3.5}).logit_bias == ((2, -3.5), (5, 1.0))
    assert not SamplingParams().shapes_tokens and SamplingParams(allowed_token_ids=[1]).shapes_tokens
    assert SamplingParams(stop_token_ids=(1,), allowed_token_ids=(2,), logit_bias={3: 1}).token_ids_named == (1, 2, 3)
    with pytest.raises(SamplingError, match="biases from -100 to 100"):
        SamplingParams(logit_bias={1: 101})
    with pytest.raises(SamplingError, match=r"logit_bias maps token ids, written as strings of digits .*'yes': 1 is not one"):
        SamplingParams(logit_bias={"yes": 1})
    with pytest.raises(SamplingError, match="at most 300 may be biased"):
        SamplingParams(logit_bias={t: 1.0 for t in range(301)})
    with pytest.raises(SamplingError, match="min_p must be from 0 to 1"):
        SamplingParams(min_p=1.5)
    with pytest.raises(SamplingError, match="none may be negative"):
        SamplingParams(allowed_token_ids=(-1,))
    with pytest.raises(SamplingError, match="give one of them"):
        SamplingParams(allowed_token_ids=(1,), structured=StructuredOutput.json_object())


@settings(max_examples=60, deadline=None)
@given(
    logits=st.lists(st.floats(-20, 20, allow_nan=False), min_size=8, max_size=8),
    bias=st.dictionaries(st.integers(0, 7), st.floats(-100, 100), max_size=4),
    allowed=st.lists(st.integers(0, 7), max_size=4, unique=True),
)
def test_token_rules_add_the_biases_and_keep_only_the_allowed(logits, bias, allowed):
    after = apply_token_rules(torch.tensor(logits), SamplingParams(logit_bias=bias, allowed_token_ids=allowed))
    for token in range(8):
        if allowed and token not in allowed:
            assert after[token].item() == NEG_INF
        else:
            assert after[token].item() == pytest.approx(logits[token] + bias.get(token, 0.0), rel=1e-5, abs=1e-3)


@settings(max_examples=60, deadline=None)
@given(logits=st.lists(st.floats(-20, 20, allow_nan=False), min_size=8, max_size=8), min_p=st.floats(0.0, 1.0))
def test_min_p_keeps_the_tokens_at_least_that_share_of_the_likeliest(logits, min_p):
    before = torch.tensor(logits)
    probs = torch.softmax(before, dim=-1)
    kept = torch.isfinite(apply_min_p(before, min_p))
    assert kept[int(torch.argmax(before))]  # the likeliest always stays
    for token in range(8):
        ratio = (probs[token] / probs.max()).item()
        if not math.isclose(ratio, min_p, rel_tol=1e-4, abs_tol=1e-6):
            assert bool(kept[token]) == (ratio >= min_p)


def test_a_biased_greedy_row_takes_the_best_token_after_its_bias():
    logits = torch.tensor([[5.0, 4.0, 0.0], [5.0, 4.0, 0.0]])
    biased = SamplingParams(logit_bias={2: 6.0})
    assert sample_batch(logits, [SamplingParams(), biased], [None, None]) == [0, 2]
    only_ends = SamplingParams(allowed_token_ids=(1,), min_tokens=1)  # every allowed token is held back: it comes anyway
    assert sample_batch(logits[:1], [only_ends], [None], [RowConstraints(banned=(1,))]) == [1]


def test_a_penalized_greedy_row_takes_the_best_token_after_its_penalties():
    logits = torch.tensor([[5.0, 4.0, 0.0], [5.0, 4.0, 0.0]])
    plain = SamplingParams()
    penalized = SamplingParams(frequency_penalty=1.5)
    counts = TokenCounts.of(prompt_ids=[2], output_ids=[0], vocab=3)  # token 0 once in the output: 5 - 1.5 < 4
    assert sample_batch(logits, [plain, penalized], [None, None], [None, RowConstraints(counts)]) == [0, 1]
    repeated = RowConstraints(TokenCounts.of([0], [], 3))
    assert sample_batch(logits[:1], [SamplingParams(repetition_penalty=2.0)], [None], [repeated]) == [1]  # 2.5 < 4


def test_a_grammar_mask_leaves_only_the_tokens_it_allows_greedy_or_sampled():
    logits = torch.tensor([[5.0, 4.0, 0.0, 3.0]] * 2)
    allowed = RowConstraints(allowed=torch.tensor([False, False, True, True]))
    hot = SamplingParams(temperature=2.0)
    assert sample_batch(logits, [SamplingParams(), SamplingParams()], [None, None], [None, allowed]) == [0, 3]
    for seed in range(20):
        token = sample_batch(logits[:1], [hot], [torch.Generator().manual_seed(seed)], [allowed])[0]
        assert token in (2, 3)


# ---- batched sampling: the plain way's distribution without sorting the vocabulary -------


def plain_distribution(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """[V] -> the probabilities the plain way samples from: min_p, top_k, top_p, each over what the one before left."""
    return torch.softmax(apply_top_p(apply_top_k(apply_min_p(logits / p.temperature, p.min_p), p.top_k), p.top_p), dim=-1)


def dense(choices, vocab: int) -> torch.Tensor:
    probs = torch.zeros(vocab).index_add(0, choices.ids[0], choices.probs[0])
    return probs / probs.sum()


@settings(max_examples=80, deadline=None)
@given(
    logits=st.lists(st.floats(-12, 12, allow_nan=False).map(lambda v: round(v, 3)), min_size=40, max_size=40, unique=True),
    temperature=st.floats(0.2, 2.0), top_k=st.sampled_from([0, 1, 3, 10, 39]), top_p=st.sampled_from([1.0, 0.95, 0.6, 0.1]),
    min_p=st.sampled_from([0.0, 0.01, 0.3]), tiers=st.sampled_from([(256, 4096), (4, 8), (2,)]),
)
def test_each_row_samples_from_the_plain_ways_distribution(logits, temperature, top_k, top_p, min_p, tiers):
    """Whichever way a row's nucleus is found (among the likeliest few, the next tier, or the whole
    vocabulary sorted), the distribution it samples from is the plain way's."""
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    row = torch.tensor(logits)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(batch_sampling, "CANDIDATE_TIERS", tiers)
        [choices] = batch_sampling.row_choices(row.unsqueeze(0), [params])
    torch.testing.assert_close(dense(choices, 40), plain_distribution(row, params), atol=2e-5, rtol=1e-4)


def test_rows_of_a_batch_sample_apart_and_a_seeded_row_whatever_its_neighbours():
    logits = torch.tensor([[4.0, 3.9, -2.0, 0.0], [0.0, 1.0, 8.0, 0.5], [1.0, 1.0, 1.0, 1.0]])
    params = [SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=0.5, top_p=0.5), SamplingParams(temperature=1.0, min_p=0.5)]

    def seeded(seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    drawn = [batch_sampling.sample_rows(logits, params, [seeded(s), None, None]) for s in range(200)]
    assert {d[0] for d in drawn} == {0, 1} and {d[1] for d in drawn} == {2} and {d[2] for d in drawn} == {0, 1, 2, 3}
    for seed in range(20):  # the seeded row's token does not depend on what else the batch holds
        alone = batch_sampling.sample_rows(logits[:1], params[:1], [seeded(seed)])
        beside = batch_sampling.sample_rows(logits.flip(0), params[::-1], [None, None, seeded(seed)])
        assert alone[0] == beside[2]
    # a seeded row's draws follow its distribution: token 1 of row 0 about half the time (4.0 against 3.9)
    ones = sum(batch_sampling.sample_rows(logits[:1], params[:1], [seeded(s)])[0] for s in range(2000))
    assert 850 < ones < 1100


def test_a_race_over_a_head_and_a_tail_draws_each_token_by_its_mass(monkeypatch):
    """A whole vocabulary's draw picks its head or its tail by their masses, then races within:
    every token comes about as often as its probability says, and a dropped one never."""
    monkeypatch.setattr(batch_sampling, "RACE_HEAD", 2)
    probs = torch.tensor([[0.3, 0.0, 0.1, 0.25, 0.15, 0.2]])
    ids = torch.arange(6).unsqueeze(0)
    counts = torch.zeros(6)
    for seed in range(4000):
        for whole in (False, True):
            counts[batch_sampling._race(batch_sampling.RowChoices(ids, probs, whole), torch.tensor([seed * 7919])).item()] += 1
    assert counts[1] == 0
    torch.testing.assert_close(counts / 8000, probs[0], atol=0.03, rtol=0)


def test_counter_based_numbers_are_uniform_and_keyed_by_seed_and_token():
    seeds = torch.tensor([1, 2, 2**61 + 5])
    keys = torch.arange(20000).expand(3, 20000)
    draws = batch_sampling._exponentials(seeds, keys)
    assert draws.min() > 0 and abs(draws.mean().item() - 1.0) < 0.02  # Exp(1)
    assert not torch.equal(draws[0], draws[1])
    # a token's number does not depend on which other tokens are drawn beside it
    torch.testing.assert_close(batch_sampling._exponentials(seeds[:1], keys[:1, 500:510]), draws[:1, 500:510])


def test_a_seeded_draw_survives_rounding_of_the_logits():
    """Logits that differ by rounding (a batch of another size, bf16 products) draw the same token
    from the same seed, nearly always: each token races with its own number."""
    logits = torch.randn(8, 5000, generator=torch.Generator().manual_seed(0)) * 2
    params = [SamplingParams(temperature=1.5)] * 8
    same = 0
    for seed in range(25):
        noisy = logits + torch.randn(logits.shape, generator=torch.Generator().manual_seed(100 + seed)) * 1e-3
        a = batch_sampling.sample_rows(logits, params, [torch.Generator().manual_seed(seed * 8 + r) for r in range(8)])
        b = batch_sampling.sample_rows(noisy, params, [torch.Generator().manual_seed(seed * 8 + r) for r in range(8)])
        same += sum(x == y for x, y in zip(a, b))
    assert same >= 0.97 * 200


@pytest.mark.parametrize("setting, message", [
    (dict(stop=(1,)), "stop takes strings"), (dict(stop=1), "stop takes strings"),
    (dict(temperature=float("nan")), "temperature must be a finite number"), (dict(temperature=1e9), "temperature must be from 0"),
    (dict(top_k=2.5), "top_k must be an integer"), (dict(seed="abc"), "seed must be an integer"),
    (dict(structured="json"), "structured takes a StructuredOutput"), (dict(stop_token_ids=[1.5]), "stop_token_ids takes token ids"),
    (dict(max_tokens=True), "max_tokens must be an integer"), (dict(ignore_eos="yes"), "ignore_eos must be True or False"),
])
def test_settings_of_the_wrong_type_are_refused_with_their_name(setting, message):
    """Past these checks a setting of the wrong type would fail inside the engine's step."""
    with pytest.raises(SamplingError, match=message):
        SamplingParams(**setting)


def test_numbers_and_sequences_of_other_kinds_are_taken_as_pythons():
    import numpy as np

    p = SamplingParams(top_k=np.int64(5), seed=np.int64(3), temperature=np.float32(0.5), allowed_token_ids=range(5, 8),
                       stop_token_ids={2}, stop=(s for s in ["a", "b"]), logprobs=True)
    assert (p.top_k, p.seed, p.temperature, p.allowed_token_ids, p.stop_token_ids, p.stop, p.logprobs) == (5, 3, 0.5, (5, 6, 7), (2,), ("a", "b"), 1)
    assert type(p.top_k) is int and type(p.temperature) is float
