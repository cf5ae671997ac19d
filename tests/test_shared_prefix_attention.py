"""Shared-prefix attention is exact: the same output as plain paged attention (and a float64
reference) on random batches of forked sequences, and the prefix plan is a valid tree."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from parrot.engine.attention import AttentionMetadata, CpuPagedAttention, SequenceSlice
from parrot.engine.prefix_plan import PrefixPlan, plan_prefix_groups
from parrot.engine.shared_prefix_attention import (
    PartialAttention,
    SharedPrefixCpuAttention,
    merge_partials,
    prefix_attention,
    suffix_attention,
)

ATOL = 1e-5


@dataclass
class Batch:
    sequences: list[SequenceSlice]
    slots: list[int]
    q: torch.Tensor  # [N, H, D]
    k: torch.Tensor  # [N, Hkv, D]
    v: torch.Tensor
    k_cache: torch.Tensor  # [Hkv, nb, bs, D]
    v_cache: torch.Tensor

    def meta(self) -> AttentionMetadata:
        return AttentionMetadata.build(self.sequences, self.slots)


def random_batch(seed: int, heads: int, kv_heads: int, head_dim: int, block_size: int, prefill: bool = True) -> Batch:
    """Families of sequences forked from shared prompts (a prompt, then documents under it), each
    with decode rows of varied suffix lengths (zero included), prefill chunks forked from them,
    plus unrelated decode and prefill rows, in random order over a shuffled (or not) block pool."""
    rng = random.Random(seed)
    free = list(range(400))
    if rng.random() < 0.7:  # scattered blocks force gathers; consecutive ones are read as views
        rng.shuffle(free)

    def take(n: int) -> list[int]:
        taken, free[:n] = free[:n], []
        return taken

    rows: list[tuple[list[int], int, int]] = []  # (block table, context_len, query_len)

    def fork(node: list[int], new_tokens: int, query_len: int) -> None:
        base = len(node) * block_size
        rows.append((node + take(-(-new_tokens // block_size)), base + new_tokens, query_len))

    for _ in range(rng.randint(1, 3)):
        prompt = take(rng.randint(1, 6))
        for node in [prompt] + [prompt + take(rng.randint(1, 4)) for _ in range(rng.randint(0, 2))]:
            for _ in range(rng.randint(0, 3)):
                fork(node, rng.randint(1, 3 * block_size), 1)
            if rng.random() < 0.4:  # ends exactly at the node: its new token is the node's last entry
                rows.append((node, len(node) * block_size, 1))
            if rng.random() < 0.3 and prefill:  # a prefill chunk after the shared prompt
                length = rng.randint(2, 2 * block_size)
                fork(node, length, length)
    for _ in range(rng.randint(0 if rows else 1, 3)):  # decode rows in no group (at least one row in all)
        fork([], rng.randint(1, 5 * block_size), 1)
    if rng.random() < 0.5 and prefill:  # a fresh prefill
        length = rng.randint(2, 3 * block_size)
        fork([], length, length)
    rng.shuffle(rows)
    sequences, slots = [], []
    for table, context_len, query_len in rows:
        sequences.append(SequenceSlice(len(slots), query_len, context_len, table))
        slots += [table[p // block_size] * block_size + p % block_size for p in range(context_len - query_len, context_len)]
    gen = torch.Generator().manual_seed(seed)
    n = len(slots)
    cache = (kv_heads, 400, block_size, head_dim)
    return Batch(
        sequences,
        slots,
        torch.randn((n, heads, head_dim), generator=gen),
        torch.randn((n, kv_heads, head_dim), generator=gen),
        torch.randn((n, kv_heads, head_dim), generator=gen),
        torch.randn(cache, generator=gen),
        torch.randn(cache, generator=gen),
    )


def reference(batch: Batch, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """Float64 softmax attention of every query row over its sequence's KV (read from the caches after the write)."""
    hkv, _, bs, d = k_cache.shape
    heads = batch.q.shape[1]
    out = torch.empty(batch.q.shape, dtype=torch.float64)
    for seq in batch.sequences:
        slots = torch.tensor([seq.block_table[p // bs] * bs + p % bs for p in range(seq.context_len)])
        keys = k_cache.view(hkv, -1, d)[:, slots].double().repeat_interleave(heads // hkv, 0)  # [H, T, D]
        values = v_cache.view(hkv, -1, d)[:, slots].double().repeat_interleave(heads // hkv, 0)
        for j in range(seq.query_len):
            visible = seq.context_len - seq.query_len + j + 1
            q = batch.q[seq.query_start + j].double().unsqueeze(1)  # [H, 1, D]
            scores = (q @ keys[:, :visible].transpose(1, 2)) / d**0.5
            out[seq.query_start + j] = (scores.softmax(-1) @ values[:, :visible]).squeeze(1)
    return out


def check_plan(plan: PrefixPlan, tables: list[list[int]], lens: list[int], min_blocks: int) -> None:
    bs = plan.block_size
    for s, seg in enumerate(plan.segments):
        assert len(seg.members) >= 2 and len(seg.block_ids) >= min_blocks
        end = seg.first_block + len(seg.block_ids)
        for i in seg.members:
            assert tables[i][seg.first_block : end] == seg.block_ids and end * bs <= lens[i]  # shared and full
            assert s in plan.sequences[i].segments
        if seg.parent is not None:
            assert set(seg.members) <= set(plan.segments[seg.parent].members)
    for i, parts in enumerate(plan.sequences):
        position = 0  # segments then suffix tile [0, context_len) in order
        for s in parts.segments:
            assert i in plan.segments[s].members and plan.segments[s].token_range(bs).start == position
            position = plan.segments[s].token_range(bs).stop
        assert parts.suffix_start == position and 0 <= parts.suffix_len and parts.context_len == lens[i]
    for i in range(len(tables)):  # maximal: sequences sharing min_blocks full leading blocks are grouped
        for j in range(i):
            common = 0
            while common < min(lens[i], lens[j]) // bs and tables[i][common] == tables[j][common]:
                common += 1
            if common >= min_blocks:
                assert plan.sequences[i].segments and plan.sequences[j].segments


def test_plan_finds_several_groups_and_a_nested_tree():
    system, doc = [1, 2, 3], [4, 5]
    tables = [system + doc + [10], system + doc + [11], system + [12], [20, 21, 22, 23], [20, 21, 22, 24], [30, 31]]
    lens = [4 * 6 - 1, 4 * 6, 4 * 4 - 2, 4 * 4, 4 * 3 + 1, 4 * 2]
    plan = plan_prefix_groups(tables, lens, 1, 4)
    check_plan(plan, tables, lens, 1)
    assert [(s.first_block, s.block_ids, s.members, s.parent) for s in plan.segments] == [
        (0, system, [0, 1, 2], None),
        (3, doc, [0, 1], 0),
        (0, [20, 21, 22], [3, 4], None),
    ]
    assert plan.ungrouped == [5] and [plan.sequences[i].suffix_start for i in range(5)] == [20, 20, 12, 12, 12]
    assert plan.sequences[1].suffix_len == 4  # sequence 1's last block is full but its own


def test_plan_counts_a_block_only_when_full_for_every_member():
    # block 7 is in both tables but the second sequence has filled only part of it
    plan = plan_prefix_groups([[5, 6, 7], [5, 6, 7, 8]], [12, 10], 1, 4)
    assert [s.block_ids for s in plan.segments] == [[5, 6]]
    assert [p.suffix_start for p in plan.sequences] == [8, 8]


def test_plan_pushes_short_runs_down_to_children_and_suffixes():
    tables = [[1, 2, 3, 4], [1, 2, 3, 5], [1, 6, 7, 8]]
    plan = plan_prefix_groups(tables, [16, 16, 16], 3, 4)  # [1] alone is shorter than 3 blocks
    assert [(s.first_block, s.block_ids, s.members) for s in plan.segments] == [(0, [1, 2, 3], [0, 1])]
    assert plan.ungrouped == [2]
    assert plan_prefix_groups([[1, 2, 3, 4]], [16], 1, 4).ungrouped == [0]  # alone: nothing to share


def test_plan_keeps_a_segment_only_where_members_times_blocks_pay():
    few_long = [[1, 2, 3, 4, 5, 6, 7, 8, 10 + i] for i in range(2)]  # 2 members x 8 blocks = 16
    many_short = [[20, 21, 30 + i] for i in range(8)]  # 8 members x 2 blocks = 16
    lens = [len(t) * 4 for t in few_long + many_short]
    assert len(plan_prefix_groups(few_long + many_short, lens, 1, 4).segments) == 2
    assert plan_prefix_groups(few_long + many_short, lens, 1, 4, min_member_blocks=17).segments == []
    kept = plan_prefix_groups(few_long + many_short, lens, 1, 4, min_member_blocks=16)
    assert sorted(len(s.members) for s in kept.segments) == [2, 8]
    # a run too small for all its members still pays for a larger share lower down
    nested = [[1, 2, 3, 4, 5, 6, 40 + i] for i in range(2)] + [[1, 9, 40 + i] for i in range(2, 4)]
    plan = plan_prefix_groups(nested, [28, 28, 12, 12], 1, 4, min_member_blocks=8)
    assert [(s.first_block, len(s.block_ids), s.members) for s in plan.segments] == [(0, 6, [0, 1])]
    assert plan.ungrouped == [2, 3]


@st.composite
def forked_tables(draw):
    """Tables that copy a prefix of an earlier one, then add new or reused ids (any block may repeat)."""
    bs = draw(st.sampled_from([1, 2, 4]))
    tables: list[list[int]] = []
    for _ in range(draw(st.integers(1, 8))):
        base = draw(st.sampled_from(tables)) if tables and draw(st.booleans()) else []
        kept = base[: draw(st.integers(0, len(base)))]
        tables.append(kept + draw(st.lists(st.integers(0, 12), min_size=0 if kept else 1, max_size=5)))
    lens = [draw(st.integers((len(t) - 1) * bs + 1, len(t) * bs)) for t in tables]
    return tables, lens, bs


@settings(max_examples=300, deadline=None)
@given(forked_tables(), st.integers(1, 3))
def test_plan_is_a_valid_maximal_tree(case, min_blocks):
    tables, lens, bs = case
    check_plan(plan_prefix_groups(tables, lens, min_blocks, bs), tables, lens, min_blocks)


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4)])
def test_merging_any_split_of_the_kv_is_exact(heads, kv_heads):
    gen = torch.Generator().manual_seed(heads)
    q = torch.randn((5, heads, 32), generator=gen)
    keys, values = torch.randn((2, kv_heads, 70, 32), generator=gen)
    expected = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, enable_gqa=True).transpose(0, 1)
    cuts = [0, 0, 13, 13, 40, 69, 70, 70]  # parts of 0, 13, 0, 27, 29, 1, 0 entries
    parts = [PartialAttention(torch.arange(5), *prefix_attention(q, keys[:, a:b], values[:, a:b])) for a, b in zip(cuts, cuts[1:])]
    torch.testing.assert_close(merge_partials(parts, 5).out, expected, atol=ATOL, rtol=0)
    # a suffix part of padded rows with per-row lengths, 0 included, merged with a shared prefix
    lengths = torch.tensor([0, 3, 7, 1, 0])
    suffix_k, suffix_v = torch.randn((2, kv_heads, 5, 7, 32), generator=gen)
    merged = merge_partials(
        [
            PartialAttention(torch.arange(5), *prefix_attention(q, keys, values)),
            PartialAttention(torch.arange(5), *suffix_attention(q, suffix_k, suffix_v, lengths)),
        ],
        5,
    )
    for b in range(5):
        n = int(lengths[b])
        full_k, full_v = torch.cat((keys, suffix_k[:, b, :n]), 1), torch.cat((values, suffix_v[:, b, :n]), 1)
        row = F.scaled_dot_product_attention(q[b].unsqueeze(1), full_k, full_v, enable_gqa=True)[:, 0]
        torch.testing.assert_close(merged.out[b], row, atol=ATOL, rtol=0)


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(9, 3, 64, 16), (4, 4, 32, 4), (9, 3, 16, 1)])
def test_shared_prefix_equals_plain_attention(seed, heads, kv_heads, head_dim, block_size):
    batch = random_batch(seed, heads, kv_heads, head_dim, block_size)
    backend = SharedPrefixCpuAttention(min_shared_tokens=1 + (seed % 2) * block_size, min_member_tokens=0)  # runs of 1 or 2 blocks
    shared_k, shared_v = batch.k_cache.clone(), batch.v_cache.clone()
    plain_k, plain_v = batch.k_cache.clone(), batch.v_cache.clone()
    meta = batch.meta()
    for _ in range(2):  # a second layer reuses the step's plan
        out = backend.forward(batch.q, batch.k, batch.v, shared_k, shared_v, meta)
    plain = CpuPagedAttention().forward(batch.q, batch.k, batch.v, plain_k, plain_v, batch.meta())
    assert torch.equal(shared_k, plain_k) and torch.equal(shared_v, plain_v)  # the new KV was written, once
    torch.testing.assert_close(out, plain, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.double(), reference(batch, shared_k, shared_v), atol=ATOL, rtol=0)
    decode = [batch.sequences[i] for i in meta.decode_rows]
    check_plan(meta.scratch[backend._KEY].plan, [s.block_table for s in decode], [s.context_len for s in decode], backend.min_shared_blocks(block_size))


def test_random_batches_exercise_every_case():
    """The generator above does make nested groups, zero-length suffixes, ungrouped rows and prefills."""
    seen = set()
    for seed in range(40):
        batch = random_batch(seed, 9, 3, 16, 4)
        meta = batch.meta()
        backend = SharedPrefixCpuAttention(min_shared_tokens=1, min_member_tokens=0)
        plan = backend.prepare(meta, 4).plan
        seen |= {"nested" for s in plan.segments if s.parent is not None}
        seen |= {"several groups" for _ in [0] if sum(s.parent is None for s in plan.segments) > 1}
        seen |= {"zero suffix" for p in plan.sequences if p.segments and p.suffix_len == 0}
        seen |= {"ungrouped" for _ in plan.ungrouped} | {"prefill" for _ in meta.prefill_rows}
    assert seen == {"nested", "several groups", "zero suffix", "ungrouped", "prefill"}


def test_engine_children_of_a_shared_prompt_decode_the_same_tokens(engine):
    """The real model: children forked from one prompt decode side by side through shared-prefix
    attention and generate what the plain backend generates."""
    from conftest import fill_and_generate, greedy, run, token_ids

    grouped_rows: list[int] = []

    class Spy(SharedPrefixCpuAttention):
        def prepare(self, meta, block_size):
            step = super().prepare(meta, block_size)
            grouped_rows.append(len(step.plan.grouped))
            return step

    system = engine.tokenizer.encode("You are a careful assistant who answers questions about birds in one short sentence. " * 3)
    questions = [engine.tokenizer.encode(q) for q in (" Can parrots talk?", " Do swallows migrate?", " What do owls eat?")]

    async def generate(backend):
        engine.model.attention = backend
        await engine.fill("system", None, system)
        results = await asyncio.gather(
            *[fill_and_generate(engine, f"q{i}", q, greedy(8), parent="system") for i, q in enumerate(questions)]
        )
        engine.free_context("system")
        return [token_ids(r) for r in results]

    plain_backend = engine.model.attention
    try:
        shared = run(generate(Spy(min_shared_tokens=1, min_member_tokens=0)))
        plain = run(generate(plain_backend))
    finally:
        engine.model.attention = plain_backend
    assert len(system) >= 2 * engine.config.block_size
    assert shared == plain
    assert max(grouped_rows) == len(questions)  # the children did decode as one group


def test_the_plain_backends_kernel_switch_holds_for_the_shared_sides_suffixes(monkeypatch):
    import parrot.engine.shared_prefix_attention as shared_module
    from parrot.engine.cpu_kernels import cpu_kernels_available

    if not cpu_kernels_available():
        pytest.skip("the CPU kernels do not build here: the suffixes take the PyTorch path whatever the switch")

    def no_kernel(*args, **kwargs):
        raise AssertionError("the kernel was switched off")

    monkeypatch.setattr(shared_module, "paged_decode", no_kernel)
    batch = random_batch(3, 9, 3, 64, 16)
    backend = SharedPrefixCpuAttention(min_shared_tokens=1, min_member_tokens=0, plain=CpuPagedAttention(decode_kernel=False))
    out = backend.forward(batch.q, batch.k, batch.v, batch.k_cache.clone(), batch.v_cache.clone(), batch.meta())
    plain = CpuPagedAttention(decode_kernel=False).forward(batch.q, batch.k, batch.v, batch.k_cache.clone(), batch.v_cache.clone(), batch.meta())
    assert backend.prepare(batch.meta(), 16).grouped is not None  # the shared side did run
    torch.testing.assert_close(out, plain, atol=ATOL, rtol=0)
