"""Shared fixtures: the model is loaded once per session, on the CPU.

`engine` is float32 with every matmul in float32 (cpu_bf16="off"), so its
output is comparable token for token with transformers and across batch sizes.
Every test that uses an engine must leave it clean: no contexts, no jobs, every
block back in the pool, integrity intact (checked after the test).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
import torch

from parrot.engine.llm_engine import EngineConfig, FinishReason, GeneratedToken, LLMEngine
from parrot.engine.loader import DEFAULT_MODEL, resolve_model_dir
from parrot.engine.model_runner import KVCacheTensors
from parrot.engine.sampler import SamplingParams
from parrot.engine.scheduler import PRIORITY_NORMAL
from parrot.engine.tokenizer import Tokenizer

# prompts of different lengths (in tokens: about 6, 5, 15, 4, 40)
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village, there lived an old parrot who",
    "List three colors:",
    "The following is a short report on the migration of birds across the Mediterranean sea. "
    "Every autumn, millions of storks, swallows and bee-eaters leave Europe for Africa, and",
]


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Runs a coroutine on a fresh event loop (the engine starts its step loop on demand)."""
    return asyncio.run(coro)


def greedy(max_tokens: int, **kwargs: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=kwargs.pop("ignore_eos", True), **kwargs)


async def collect(engine: LLMEngine, context_id: str, sampling: SamplingParams, priority: int = PRIORITY_NORMAL) -> list[GeneratedToken]:
    return [token async for token in engine.generate(context_id, sampling, priority)]


async def fill_and_generate(
    engine: LLMEngine, context_id: str, token_ids: list[int], sampling: SamplingParams, parent: str | None = None, free: bool = True
) -> list[GeneratedToken]:
    await engine.fill(context_id, parent, token_ids)
    try:
        return await collect(engine, context_id, sampling)
    finally:
        if free:
            engine.free_context(context_id)


def token_ids(tokens: list[GeneratedToken]) -> list[int]:
    return [t.token_id for t in tokens]


def text_of(tokens: list[GeneratedToken]) -> str:
    return "".join(t.text for t in tokens)


def finish_of(tokens: list[GeneratedToken]) -> FinishReason | None:
    assert tokens, "no token was generated"
    assert all(t.finish_reason is None for t in tokens[:-1]), "only the last token may carry a finish reason"
    return tokens[-1].finish_reason


def assert_clean(engine: LLMEngine) -> None:
    try:
        engine.check_integrity()
        stats = engine.stats()
        assert stats.num_contexts == 0, f"{stats.num_contexts} contexts were left behind"
        assert stats.num_jobs == 0, f"{stats.num_jobs} jobs were left behind"
        assert stats.blocks_free == stats.blocks_total, f"{stats.blocks_total - stats.blocks_free} blocks were not returned"
    finally:
        # leave the shared engine usable for the next test even when this one failed
        cache = engine.prefix_cache
        for context_id in list(engine.contexts._contexts):
            if context_id in engine.contexts and (cache is None or not cache.owns(context_id)):
                engine.free_context(context_id)
        engine.clear_prefix_cache()


def kv_gb_for_blocks(engine: LLMEngine, num_blocks: int, block_size: int) -> float:
    """kv_memory_gb that gives exactly num_blocks blocks for this model in float32."""
    per_block = KVCacheTensors.bytes_per_block(engine.model_config, block_size, torch.float32)
    return (num_blocks * per_block + per_block // 2) / 2**30


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return resolve_model_dir(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer(model_dir)


@pytest.fixture(scope="session")
def exact_engine_session() -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="float32", cpu_bf16="off", kv_memory_gb=0.1, prefix_caching=False))


@pytest.fixture
def engine(exact_engine_session: LLMEngine):
    """The exact float32 engine (large pool); checked clean after the test."""
    assert_clean(exact_engine_session)
    yield exact_engine_session
    assert_clean(exact_engine_session)


SMALL_POOL_BLOCKS = 16
SMALL_BLOCK_SIZE = 4


@pytest.fixture(scope="session")
def small_engine_session(exact_engine_session: LLMEngine) -> LLMEngine:
    """Same weights and numerics, but 16 blocks of 4 tokens (64 tokens of KV) and 16-token steps."""
    return LLMEngine(
        EngineConfig(
            dtype="float32",
            cpu_bf16="off",
            kv_memory_gb=kv_gb_for_blocks(exact_engine_session, SMALL_POOL_BLOCKS, SMALL_BLOCK_SIZE),
            block_size=SMALL_BLOCK_SIZE,
            max_tokens_per_step=16,
            prefix_caching=False,
        )
    )


@pytest.fixture
def small_engine(small_engine_session: LLMEngine):
    assert small_engine_session.stats().blocks_total == SMALL_POOL_BLOCKS
    assert_clean(small_engine_session)
    yield small_engine_session
    assert_clean(small_engine_session)
