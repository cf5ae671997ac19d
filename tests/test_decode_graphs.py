"""Decode steps from static buffers (the CUDA-graph path; on the CPU it runs without capture):
the same tokens as the eager engine, padding rows that touch no context's KV, and steps with a
shared prefix read once per segment from buckets of their own."""

from __future__ import annotations

import asyncio

import pytest
import torch

from parrot.engine.cuda_graphs import MAX_SHARED_ITEMS, MAX_SPLITS, DecodeGraphs, graph_memory
from parrot.engine.llm_engine import EngineConfig, LLMEngine
from parrot.engine.prefix_plan import plan_prefix_groups
from parrot.engine.triton_attention import TritonSharedPrefixAttention

from conftest import PROMPTS, assert_clean, collect, fill_and_generate, greedy, run, token_ids


@pytest.fixture(scope="module")
def static_engine() -> LLMEngine:
    """The exact engine's numerics, decode steps through the static buckets, a 4-row largest bucket."""
    return LLMEngine(EngineConfig(dtype="float32", cpu_bf16="off", kv_memory_gb=0.1, prefix_caching=False,
                                  decode_graphs=True, max_seqs_per_step=4))


@pytest.fixture(scope="module")
def split_engine(static_engine) -> LLMEngine:
    """The same, each sequence's KV read as 3 block-aligned chunks merged by log-sum-exp (as small
    buckets do on a GPU), chunks past a short sequence's end empty."""
    engine = LLMEngine(EngineConfig(dtype="float32", cpu_bf16="off", kv_memory_gb=0.1, prefix_caching=False,
                                    decode_graphs=True, max_seqs_per_step=4))
    graphs = engine.runner.graphs
    engine.runner.graphs = DecodeGraphs(engine.model, engine.kv, graphs.scratch_block, 4, graphs.min_shared_tokens, splits=3)
    return engine


async def _all(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    runs = [fill_and_generate(engine, f"c{i}", ids, greedy(max_tokens)) for i, ids in enumerate(prompts)]
    return [token_ids(tokens) for tokens in await asyncio.gather(*runs)]


@pytest.mark.parametrize("count", [1, 3, 5])
@pytest.mark.parametrize("variant", ["static_engine", "split_engine"])
def test_static_decode_gives_the_eager_engines_tokens(engine, variant, tokenizer, count, request):
    # 3 rows run in the 4-row bucket with a padding row; 5 rows exceed the largest bucket: eager steps
    static_engine = request.getfixturevalue(variant)
    prompts = [tokenizer.encode(p) for p in PROMPTS[:count]]
    replays_before = static_engine.runner.graphs.replays
    expected = run(_all(engine, prompts, 12))
    got = run(_all(static_engine, prompts, 12))
    assert got == expected
    assert static_engine.runner.graphs.replays > replays_before
    assert_clean(static_engine)


def test_a_one_token_fill_runs_through_the_static_path_and_samples_nothing(engine, static_engine, tokenizer):
    # the GPU suite's first app run failed here: a step of one-token fills has no row to sample
    ids = tokenizer.encode(PROMPTS[0])

    async def fill_then_extend(target: LLMEngine) -> list[int]:
        await target.fill("base", None, ids[:-1])
        replays = target.runner.graphs.replays if target.runner.graphs is not None else 0
        await target.fill("base", None, ids[-1:])
        extended = target.runner.graphs.replays if target.runner.graphs is not None else 0
        try:
            return [extended - replays, *token_ids(await collect(target, "base", greedy(6)))]
        finally:
            target.free_context("base")

    static_replays, *got = run(fill_then_extend(static_engine))
    assert static_replays == 1
    assert got == run(fill_then_extend(engine))[1:]
    assert_clean(static_engine)


def test_padding_rows_write_only_the_scratch_block(static_engine, tokenizer):
    kv = static_engine.kv
    pool_blocks = static_engine.contexts.pool.num_blocks
    assert kv.layers[0][0].shape[1] == pool_blocks + 1  # the scratch block lies past the pool
    before = [k[:, :pool_blocks].clone() for k, _ in kv.layers]
    replays = static_engine.runner.graphs.replays

    async def three_rows() -> None:  # a 3-row decode batch runs in the 4-row bucket: one padding row
        runs = [fill_and_generate(static_engine, f"c{i}", tokenizer.encode(PROMPTS[i]), greedy(4), free=False) for i in range(3)]
        await asyncio.gather(*runs)

    run(three_rows())
    assert static_engine.runner.graphs.replays > replays
    held = {b for i in range(3) for b in static_engine.contexts.get(f"c{i}").block_table}
    others = [b for b in range(pool_blocks) if b not in held]
    for (k, _), old in zip(kv.layers, before):  # no block outside the contexts' own was written
        assert torch.equal(k[:, others], old[:, others])
    for i in range(3):
        static_engine.free_context(f"c{i}")
    assert_clean(static_engine)


def test_steps_sharing_a_long_prefix_replay_the_shared_buckets(static_engine):
    graphs: DecodeGraphs = static_engine.runner.graphs
    assert graphs.buckets == [1, 2, 4]
    bs = static_engine.kv.block_size
    plain = graphs.plan([[1, 2], [3, 4]], [2 * bs, 2 * bs])
    assert plain is not None and not plain.segments  # different blocks: a plain bucket
    scratch = static_engine.contexts.pool.num_blocks
    grouping = DecodeGraphs(static_engine.model, static_engine.kv, scratch, 4, min_shared_tokens=2 * bs)
    shared = list(range(10, 12))
    grouped = grouping.plan([shared + [1], shared + [2]], [3 * bs, 3 * bs])
    assert grouped is not None and [s.block_ids for s in grouped.segments] == [shared]
    below = grouping.plan([shared[:1] + [1], shared[:1] + [2]], [2 * bs, 2 * bs])  # one shared block: below the bar
    assert below is not None and not below.segments
    assert graphs.plan([[b] for b in range(5)], [1] * 5) is None  # more rows than the largest bucket
    # more segments than the shared items hold: eager (pairs of rows, each pair its own two blocks)
    many = [[100 + 2 * (i // 2), 101 + 2 * (i // 2), 500 + i] for i in range(2 * (MAX_SHARED_ITEMS + 1))]
    wide = DecodeGraphs(static_engine.model, static_engine.kv, scratch, len(many), min_shared_tokens=2 * bs)
    assert len(plan_prefix_groups(many, [3 * bs] * len(many), 2, bs).segments) == MAX_SHARED_ITEMS + 1
    assert wide.plan(many, [3 * bs] * len(many)) is None


@pytest.mark.parametrize("shared", [False, True])
def test_the_kv_pools_reserve_covers_what_the_graphs_hold(static_engine, shared):
    # the pool is sized before capture: a reserve short of the graphs' buffers fails the capture on a full GPU
    bs, scratch = static_engine.kv.block_size, static_engine.contexts.pool.num_blocks
    graphs = DecodeGraphs(static_engine.model, static_engine.kv, scratch, 6, 2 * bs if shared else None, splits=MAX_SPLITS)
    buckets = [*graphs._static.values(), *graphs._shared.values()]
    assert any(b.shared is not None for b in buckets) == shared
    need = graph_memory(6, shared)
    assert need.logits_rows == sum(b.size for b in buckets)  # every graph keeps its logits [size, V]
    assert need.part_rows >= max(b.items.q_rows.numel() + (b.shared.q_rows.numel() if b.shared is not None else 0) for b in buckets)
    assert graph_memory(6, False).part_rows < graph_memory(6, True).part_rows


@pytest.mark.parametrize("splits", [1, 3])
def test_forks_of_a_long_prefix_decode_from_the_shared_buckets_with_the_eager_engines_tokens(engine, tokenizer, splits):
    # a 3-block parent, three children (one bucket of 4 with a padding row), nested: two of them
    # fork a common middle context, so the step holds a segment inside a segment
    static = LLMEngine(EngineConfig(dtype="float32", cpu_bf16="off", kv_memory_gb=0.1, prefix_caching=False,
                                    decode_graphs=True, max_seqs_per_step=4))
    bs = static.kv.block_size
    static.runner.graphs = DecodeGraphs(static.model, static.kv, static.runner.graphs.scratch_block, 4, bs, splits=splits)
    parent = (tokenizer.encode(" ".join(PROMPTS)) * 4)[: 3 * bs]
    middle = tokenizer.encode(" and then, much later, after a long and winding road that went on")[:bs]

    async def forks(target: LLMEngine) -> list[list[int]]:
        await target.fill("parent", None, parent)
        await target.fill("middle", "parent", middle)
        try:
            runs = [fill_and_generate(target, f"k{i}", tokenizer.encode(s), greedy(8), parent=base)
                    for i, (s, base) in enumerate([(" First,", "parent"), (" Second,", "middle"), (" Third,", "middle")])]
            return [token_ids(t) for t in await asyncio.gather(*runs)]
        finally:
            target.free_context("middle")
            target.free_context("parent")

    assert run(forks(static)) == run(forks(engine))
    assert static.runner.graphs.shared_replays >= 6  # most of the 8 decode steps ran from the shared buckets
    assert_clean(static)


def test_the_gpu_engines_attention_and_graphs_together_on_the_cpu(engine, tokenizer):
    """The composition --device cuda runs (every row through work items: causal prefill items,
    shared decode segments, static decode buckets), with the items run by their torch contract
    (or by the Triton interpreter under TRITON_INTERPRET=1): the exact engine's tokens."""
    gpu_like = LLMEngine(EngineConfig(dtype="float32", cpu_bf16="off", kv_memory_gb=0.1, prefix_caching=False,
                                      decode_graphs=True, max_seqs_per_step=4))
    gpu_like.model.attention = TritonSharedPrefixAttention(min_shared_tokens=16, chunk_tokens=32)
    # steps of forks sharing a block replay the shared buckets; static steps read each KV as 2 chunks
    gpu_like.runner.graphs = DecodeGraphs(gpu_like.model, gpu_like.kv, gpu_like.runner.graphs.scratch_block, 4, 16, splits=2)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    assert run(_all(gpu_like, prompts, 10)) == run(_all(engine, prompts, 10))

    async def forks(target: LLMEngine) -> list[list[int]]:  # two children of a 40-token parent: a shared segment
        await target.fill("parent", None, prompts[4])
        try:
            runs = [fill_and_generate(target, f"k{i}", tokenizer.encode(s), greedy(8), parent="parent")
                    for i, s in enumerate([" First,", " Second,"])]
            return [token_ids(t) for t in await asyncio.gather(*runs)]
        finally:
            target.free_context("parent")

    assert run(forks(gpu_like)) == run(forks(engine))
    assert_clean(gpu_like)
