"""The engine computes what the reference implementation computes.

Same weights (the converted SmolLM2 directory), both in float32: transformers'
LlamaForCausalLM against our LlamaModel over the paged KV cache.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import torch

from parrot.engine.llm_engine import EngineConfig, LLMEngine
from parrot.engine.sampler import SamplingParams
from parrot.engine.scheduler import Job, JobKind, ScheduledChunk, StepPlan

from conftest import PROMPTS, assert_clean, fill_and_generate, greedy, run, token_ids

LOGITS_ATOL = 1e-3


@pytest.fixture(scope="module")
def reference(model_dir):
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.float().eval()


@pytest.fixture(scope="module")
def reference_logits(reference):
    """Logits [T, V] of transformers for every position of a token sequence (cached per sequence)."""
    cache: dict[tuple[int, ...], torch.Tensor] = {}

    def logits(ids: list[int]) -> torch.Tensor:
        if tuple(ids) not in cache:
            with torch.inference_mode():
                cache[tuple(ids)] = reference(torch.tensor([ids])).logits[0].float()
        return cache[tuple(ids)]

    return logits


def engine_logits(engine: LLMEngine, ids: list[int], chunks: list[int]) -> torch.Tensor:
    """Runs ids through the engine's model runner in steps of the given chunk lengths (a 1 is a
    decode step) over the paged KV cache; returns the logits [V] after the last token."""
    assert sum(chunks) == len(ids)
    table = engine.contexts
    ctx = table.create("logits-probe", None)
    ctx.token_ids = list(ids)
    job = Job(JobKind.GENERATE, ctx, priority=0, arrival=0, sampling=SamplingParams())
    captured: list[torch.Tensor] = []
    forward = engine.model.forward

    def capturing_forward(*args, **kwargs):
        captured.append(forward(*args, **kwargs))
        return captured[-1]

    engine.model.forward = capturing_forward
    try:
        for length in chunks:
            slots = table.reserve_slots(ctx, length)
            engine.runner.run(StepPlan([ScheduledChunk(job, ctx.num_computed, length, slots, wants_logits=True)]))
            ctx.num_computed += length
        return captured[-1][0]  # [V]
    finally:
        del engine.model.forward
        table.free("logits-probe")


def test_greedy_tokens_equal_transformers(engine, reference_logits):
    """Teacher-forced: given the prompt and our first i tokens, transformers' argmax is our token i,
    for every i; by induction transformers' own greedy decoding yields the same 32 tokens."""
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS[:3]]

    async def ours():  # in one batch; test_engine_batching shows a batch equals one at a time
        return await asyncio.gather(*[fill_and_generate(engine, f"ref-{i}", ids, greedy(32)) for i, ids in enumerate(prompts)])

    for ids, tokens in zip(prompts, run(ours())):
        generated = token_ids(tokens)
        assert len(generated) == 32
        logits = reference_logits(ids + generated)  # [T, V]
        theirs = logits[len(ids) - 1 : -1].argmax(dim=-1).tolist()
        assert generated == theirs, f"greedy output differs from transformers after {ids}"


@pytest.mark.parametrize("split", ["prefill", "chunked prefill", "decode"])
def test_logits_agree_with_transformers(engine, reference_logits, split):
    for prompt in (PROMPTS[2], PROMPTS[4]):
        ids = engine.tokenizer.encode(prompt)
        n = len(ids)
        chunks = {"prefill": [n], "chunked prefill": [n // 3, n - n // 3], "decode": [n - 2, 1, 1]}[split]
        ours = engine_logits(engine, ids, chunks)
        theirs = reference_logits(ids)[-1]
        diff = (ours - theirs).abs().max().item()
        assert diff < LOGITS_ATOL, f"{split}: logits differ by {diff:.2e} for {prompt!r}"
        assert int(ours.argmax()) == int(theirs.argmax())


@pytest.mark.parametrize("setting", [{"cpu_bf16": "all"}, {"dtype": "bfloat16"}], ids=["bf16 matmuls", "bf16 engine"])
def test_bf16_on_the_cpu_stays_near_transformers_and_decodes_batches(setting, reference_logits):
    """bf16 matmuls (the default on CPUs with bf16 dot products) and a whole bf16 engine: logits
    within bf16's precision of float32 transformers, and batched decode over KV that lies partly
    out of place (a bf16 engine once failed there, merging float32 parts into bf16 ones)."""
    engine = LLMEngine(EngineConfig(kv_memory_gb=0.05, prefix_caching=False, **setting))
    for prompt in (PROMPTS[2], PROMPTS[4]):
        ids = engine.tokenizer.encode(prompt)
        ours = engine_logits(engine, ids, [len(ids) - 2, 1, 1]).float()
        theirs = reference_logits(ids)[-1]
        # 8 bits of mantissa through 30 layers: a few percent of the logits' range, the same top tokens
        assert (ours - theirs).abs().max() < 0.05 * (theirs.max() - theirs.min())
        assert int(ours.argmax()) in theirs.topk(3).indices.tolist()
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS[:4]]

    async def batch():
        return await asyncio.gather(*[fill_and_generate(engine, f"b-{i}", ids, greedy(40)) for i, ids in enumerate(prompts)])

    outputs = run(batch())
    assert all(len(tokens) == 40 for tokens in outputs)
    assert_clean(engine)


def test_logprobs_are_transformers_log_softmax_of_each_generated_position(engine, reference_logits):
    """A generate that asks for logprobs reports, for every token it samples (greedy and hot), that
    token's log probability and the k likeliest tokens' under transformers' distribution at the
    position, likeliest first; one that does not ask gets none."""
    ids = engine.tokenizer.encode(PROMPTS[0])
    for sampling in (greedy(6, logprobs=4), SamplingParams(max_tokens=6, temperature=1.5, seed=7, ignore_eos=True, logprobs=2)):
        tokens = run(fill_and_generate(engine, "logprobs", ids, sampling))
        generated = token_ids(tokens)
        expected = torch.log_softmax(reference_logits(ids + generated)[len(ids) - 1 : -1], dim=-1)  # [6, V]
        for row, token in enumerate(tokens):
            reported = token.logprobs
            assert reported.logprob == pytest.approx(expected[row, token.token_id].item(), abs=LOGITS_ATOL)
            top_values, top_ids = torch.topk(expected[row], sampling.logprobs)
            assert [t.logprob for t in reported.top] == pytest.approx(top_values.tolist(), abs=LOGITS_ATOL)
            assert [expected[row, t.token_id].item() for t in reported.top] == pytest.approx(top_values.tolist(), abs=LOGITS_ATOL)
        if sampling.greedy:
            assert all(t.token_id == t.logprobs.top[0].token_id for t in tokens)
    plain = run(fill_and_generate(engine, "no-logprobs", ids, greedy(2)))
    assert all(t.logprobs is None for t in plain)


@pytest.mark.parametrize("penalties", [dict(repetition_penalty=1.8), dict(presence_penalty=1.5, frequency_penalty=0.7)])
def test_penalized_greedy_decoding_is_transformers_argmax_after_the_same_penalties(engine, reference_logits, penalties):
    """Each step's token is the argmax of transformers' logits at that position after the penalties
    (CTRL's repetition penalty over the prompt and output; OpenAI's presence and frequency penalties
    over the output), and they change what greedy decoding gives on a prompt that invites repeats."""
    ids = engine.tokenizer.encode("one two three one two three one two three one two three")
    tokens = token_ids(run(fill_and_generate(engine, "penalized", ids, greedy(12, ignore_eos=True, **penalties))))
    sampling = SamplingParams(**penalties)
    expected: list[int] = []
    for _ in range(12):
        logits = reference_logits(ids + expected)[-1].clone()  # [V]
        seen = set(ids) | set(expected)
        for token in seen:
            value = logits[token]
            logits[token] = value / sampling.repetition_penalty if value > 0 else value * sampling.repetition_penalty
        for token in set(expected):
            logits[token] -= sampling.frequency_penalty * expected.count(token) + sampling.presence_penalty
        expected.append(int(torch.argmax(logits)))
    assert tokens == expected
    assert tokens != token_ids(run(fill_and_generate(engine, "plain", ids, greedy(12, ignore_eos=True))))


def test_score_gives_each_prompt_tokens_log_probability_as_transformers_does(engine, reference_logits):
    """A prompt's log probabilities (OpenAI's echo): the same as transformers' for every token after
    the first, whether the prompt fits one step or is computed in chunks beside a generate."""
    ids = engine.tokenizer.encode(PROMPTS[4])
    expected = torch.log_softmax(reference_logits(ids), dim=-1)  # [T, V]

    def check(scores) -> None:
        assert len(scores) == len(ids) - 1
        for position, reported in enumerate(scores):
            assert reported.logprob == pytest.approx(expected[position, ids[position + 1]].item(), abs=LOGITS_ATOL)
            top_values, _ = torch.topk(expected[position], 3)
            assert [t.logprob for t in reported.top] == pytest.approx(top_values.tolist(), abs=LOGITS_ATOL)

    check(run(engine.score(ids, top=3)))

    async def beside_a_generate():
        other = engine.tokenizer.encode(PROMPTS[1])
        scores, tokens = await asyncio.gather(engine.score(ids, top=3), fill_and_generate(engine, "beside", other, greedy(8)))
        return scores, tokens

    saved = engine.scheduler.config
    engine.scheduler.config = replace(saved, max_tokens_per_step=5)  # the prompt in chunks of at most 5 tokens
    try:
        scores, tokens = run(beside_a_generate())
    finally:
        engine.scheduler.config = saved
    check(scores)
    assert len(tokens) == 8
    assert run(engine.score(ids[:1])) == []
