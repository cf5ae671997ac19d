"""The engine computes what the reference implementation computes.

Same weights (the converted SmolLM2 directory), both in float32: transformers'
LlamaForCausalLM against our LlamaModel over the paged KV cache.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from parrot.engine.llm_engine import LLMEngine
from parrot.engine.sampler import SamplingParams
from parrot.engine.scheduler import Job, JobKind, ScheduledChunk, StepPlan

from conftest import PROMPTS, fill_and_generate, greedy, run, token_ids

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
