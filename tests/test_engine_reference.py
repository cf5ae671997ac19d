"""The engine computes what the reference implementation computes.

Same weights (the converted SmolLM2 directory), both in float32: transformers'
LlamaForCausalLM against our LlamaModel over the paged KV cache.
"""

from __future__ import annotations

import asyncio
import inspect

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
    return model.eval()


def reference_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding written out, with transformers' KV cache and no generation config in the way."""
    # the cache argument is `past_key_values` up to transformers 5.x, then `cache`
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    generated: list[int] = []
    with torch.inference_mode():
        out = model(torch.tensor([prompt_ids]), use_cache=True)
        for _ in range(max_new_tokens):
            generated.append(int(out.logits[0, -1].argmax()))
            cache = getattr(out, "cache", None) or out.past_key_values
            out = model(torch.tensor([generated[-1:]]), use_cache=True, **{cache_arg: cache})
    return generated


def reference_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, -1].float()  # [V]


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


def test_greedy_tokens_equal_transformers(engine, reference):
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS[:3]]

    async def ours():  # in one batch; test_engine_batching shows a batch equals one at a time
        return await asyncio.gather(*[fill_and_generate(engine, f"ref-{i}", ids, greedy(32)) for i, ids in enumerate(prompts)])

    for ids, tokens in zip(prompts, run(ours())):
        assert len(tokens) == 32
        assert token_ids(tokens) == reference_greedy(reference, ids, 32), f"greedy output differs from transformers for {ids}"


@pytest.mark.parametrize(
    "split",
    ["prefill", "chunked prefill", "decode"],
)
def test_logits_agree_with_transformers(engine, reference, split):
    for prompt in (PROMPTS[2], PROMPTS[4]):
        ids = engine.tokenizer.encode(prompt)
        n = len(ids)
        chunks = {"prefill": [n], "chunked prefill": [n // 3, n - n // 3], "decode": [n - 2, 1, 1]}[split]
        ours = engine_logits(engine, ids, chunks)
        theirs = reference_logits(reference, ids)
        diff = (ours - theirs).abs().max().item()
        assert diff < LOGITS_ATOL, f"{split}: logits differ by {diff:.2e} for {prompt!r}"
        assert int(ours.argmax()) == int(theirs.argmax())
