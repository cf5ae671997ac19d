"""Shared-prefix (cascade) attention for decode rows whose sequences share leading KV blocks.

Plain paged decode reads every sequence's whole KV, so B sequences forked from one long
prompt read that prompt B times, one matrix-vector product each. Here each shared
segment's KV is read once and all its members' queries go through it in one
matrix-matrix product ([Hkv, M*G, D] x [Hkv, D, T]); each sequence's own suffix is a
small batched product; the parts are merged exactly through their log-sum-exps:
    out = sum_p exp(lse_p - m) o_p / sum_p exp(lse_p - m),   m = max_p lse_p.
Any number of parts merge at once, so a batch may hold several prefix families, nested.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parrot.engine.attention import (
    AttentionBackend,
    AttentionMetadata,
    CpuPagedAttention,
    SequenceSlice,
    attention_with_lse,
    cache_view,
    consecutive_run,
    gather_kv,
    write_kv,
)
from parrot.engine.cpu_kernels import paged_decode
from parrot.engine.prefix_plan import PrefixPlan, min_shared_blocks, plan_prefix_groups


@dataclass(frozen=True)
class PartialAttention:
    """Attention of some batch rows over one part of their KV: normalized output and log-sum-exp."""

    rows: torch.Tensor  # [R] int64: the batch rows these are
    out: torch.Tensor  # [R, H, D] float32
    lse: torch.Tensor  # [R, H] float32; -inf for a row whose part is empty


def _empty_part(rows: int, h: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A part with no KV: weight 0 in any merge (and no call into a kernel that cannot take it)."""
    return torch.zeros((rows, h, d)), torch.full((rows, h), float("-inf"))


def prefix_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [M, H, D] (the members' queries), keys/values [Hkv, T, D] (one shared segment)
    -> out [M, H, D] float32, lse [M, H] float32: one matrix-matrix product for all members."""
    m, h, d = q.shape
    hkv, t, _ = keys.shape
    g = h // hkv
    if t == 0:
        return _empty_part(m, h, d)
    queries = q.view(m, hkv, g, d).transpose(0, 1).reshape(hkv, 1, m * g, d)  # [Hkv, 1, M*G, D]
    # a bf16 cache is widened to q's dtype (its copy of the segment is made once for all members)
    keys, values = keys.to(q.dtype), values.to(q.dtype)
    out, lse = attention_with_lse(queries, keys.unsqueeze(1), values.unsqueeze(1))  # [Hkv, 1, M*G, D], [Hkv, 1, M*G]
    out = out.view(hkv, m, g, d).transpose(0, 1).reshape(m, h, d)
    return out.float(), lse.view(hkv, m, g).transpose(0, 1).reshape(m, h).float()


def suffix_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, D], keys/values [Hkv, B, S, D] (each sequence's own tail, padded), lengths [B]
    (entries of row b past lengths[b] are padding; 0 is allowed), mask: the additive padding
    mask [1, B, 1, S] when precomputed -> out [B, H, D] float32, lse [B, H] float32."""
    b, h, d = q.shape
    hkv, _, s, _ = keys.shape
    g = h // hkv
    if s == 0:
        return _empty_part(b, h, d)
    if mask is None:
        mask = suffix_mask(lengths, s)
    queries = q.view(b, hkv, g, d).transpose(0, 1)  # [Hkv, B, G, D]
    keys, values = keys.to(q.dtype), values.to(q.dtype)
    out, lse = attention_with_lse(queries, keys, values, mask)  # [Hkv, B, G, D], [Hkv, B, G]
    # a row with no suffix is fully masked, which the kernel reports as lse 0 (or nan): make it an empty part
    empty = (lengths == 0).view(1, b, 1)
    out = torch.where(empty.unsqueeze(-1), 0.0, out.float()).transpose(0, 1).reshape(b, h, d)
    return out, torch.where(empty, float("-inf"), lse.float()).transpose(0, 1).reshape(b, h)


def suffix_mask(lengths: torch.Tensor, span: int) -> torch.Tensor:
    """lengths [B] -> additive mask [1, B, 1, span]: -inf past each row's length."""
    padding = torch.arange(span).unsqueeze(0) >= lengths.unsqueeze(1)  # [B, span]
    return torch.zeros(padding.shape).masked_fill_(padding, float("-inf")).view(1, -1, 1, span)


def merge_partials(parts: list[PartialAttention], num_rows: int) -> PartialAttention:
    """Merges any number of parts, each covering any subset of rows 0..num_rows-1 (a prefix
    tree gives the outer segment to many rows, an inner one to a few) -> every row's attention
    over the union of its parts."""
    rows = torch.cat([p.rows for p in parts])  # [R]
    lse = torch.cat([p.lse for p in parts])  # [R, H]
    out = torch.cat([p.out for p in parts])  # [R, H, D]
    h, d = out.shape[1:]
    peak = lse.new_full((num_rows, h), float("-inf")).scatter_reduce_(0, rows.unsqueeze(1).expand(-1, h), lse, "amax")
    peak = peak.masked_fill(peak == float("-inf"), 0.0)  # a row no part covers: stays 0, not nan
    weights = (lse - peak[rows]).exp_()  # [R, H]
    total = lse.new_zeros((num_rows, h)).index_add_(0, rows, weights)
    merged = out.new_zeros((num_rows, h, d)).index_add_(0, rows, out * weights.unsqueeze(-1))
    merged.div_(total.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1))
    return PartialAttention(torch.arange(num_rows, device=rows.device), merged, peak + total.log())


@dataclass(frozen=True)
class _SegmentStep:
    members: torch.Tensor  # [M] int64: rows of the grouped batch
    first_block: int | None  # the segment's blocks are consecutive from here (read as a view), else gathered
    table: torch.Tensor  # [1, W] int64 block ids
    length: int  # tokens


@dataclass(frozen=True)
class _GroupedStep:
    """The step's grouped decode rows, derived once per step and used by every layer."""

    query_rows: torch.Tensor  # [B] int64: rows of the flat batch
    rows: torch.Tensor  # [B] int64: 0..B-1, the suffix part's rows (every grouped row has one)
    segments: list[_SegmentStep]
    suffix_table: torch.Tensor  # [B, W] int64: each sequence's own blocks after its segments, padded
    suffix_lens: torch.Tensor  # [B] int64, 0 allowed
    suffix_mask: torch.Tensor  # [1, B, 1, W*bs] additive: -inf past each suffix's length


@dataclass(frozen=True)
class SubBatch:
    """Some sequences of a batch as a batch of their own (for another backend)."""

    rows: torch.Tensor  # [N'] int64: rows of the flat batch, in sub-batch order
    meta: AttentionMetadata


def sub_batch(meta: AttentionMetadata, keep: list[int]) -> SubBatch | None:
    """The sequences keep (indices into meta.sequences, in order) with their queries renumbered."""
    if not keep:
        return None
    rows: list[int] = []
    sub: list[SequenceSlice] = []
    for i in keep:
        s = meta.sequences[i]
        sub.append(SequenceSlice(len(rows), s.query_len, s.context_len, s.block_table))
        rows.extend(range(s.query_start, s.query_start + s.query_len))
    index = torch.tensor(rows, dtype=torch.int64)
    return SubBatch(index, AttentionMetadata.build(sub, meta.slot_mapping[index].tolist()))


@dataclass(frozen=True)
class _Step:
    plan: PrefixPlan
    grouped: _GroupedStep | None
    rest: SubBatch | None  # prefill rows and ungrouped decode rows, for the plain backend
    whole_batch: bool  # every row of the batch is a grouped decode row, in order: no scatter into an output


class SharedPrefixCpuAttention(AttentionBackend):
    """Decode rows of sequences that share full leading blocks go through shared-prefix
    attention (each segment once for all its members, suffixes batched, parts merged by
    log-sum-exp); prefill rows and decode rows in no group go to the plain backend
    unchanged. Same contract as AttentionBackend; the plan is made by the step's first layer."""

    _KEY = "shared_prefix_step"

    def __init__(self, min_shared_tokens: int = 256, min_member_tokens: int = 8192, plain: CpuPagedAttention | None = None):
        # a segment saves reading its tokens once per member but costs one more product and a merge
        # per layer, so it pays from a number of members x tokens on. Measured against our decode
        # kernel on a 2-core CPU (benchmarks/shared_prefix_attention.py --suffix 100, RESULTS.md):
        # 0.44-0.96x below 8192 member-tokens (e.g. 1024 tokens x 4 members 0.75x, 768 x 8 0.96x),
        # 0.99-1.15x at it (256 x 32, 2048 x 4, 1024 x 8, 512 x 16), 1.3-2.1x above
        self.min_shared_tokens = min_shared_tokens
        self.min_member_tokens = min_member_tokens
        self.plain = plain if plain is not None else CpuPagedAttention()

    def min_shared_blocks(self, block_size: int) -> int:
        return min_shared_blocks(self.min_shared_tokens, block_size)

    def forward(self, q, k, v, k_cache, v_cache, meta):
        step = meta.scratch.get(self._KEY)
        if step is None:
            step = meta.scratch[self._KEY] = self.prepare(meta, k_cache.shape[2])
        if step.grouped is None:  # nothing shared this step: the plain backend does all (and writes the KV)
            return self.plain.forward(q, k, v, k_cache, v_cache, meta)
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        grouped = step.grouped
        if step.whole_batch:
            return self._grouped(q, k_cache, v_cache, grouped).to(q.dtype)
        out = torch.empty(q.shape, dtype=q.dtype)
        out[grouped.query_rows] = self._grouped(q[grouped.query_rows], k_cache, v_cache, grouped).to(q.dtype)
        if step.rest is not None:
            # the plain backend writes its rows' k/v again: the same values into the same slots
            rows = step.rest.rows
            out[rows] = self.plain.forward(q[rows], k[rows], v[rows], k_cache, v_cache, step.rest.meta)
        return out

    def _grouped(self, q, k_cache, v_cache, step: _GroupedStep) -> torch.Tensor:
        """q [B, H, D] -> [B, H, D] float32"""
        if self.plain.uses_kernel(q.shape[-1], k_cache.dtype, q.device):  # each suffix read in place, as the plain rows are
            suffix = paged_decode(q, k_cache, v_cache, step.suffix_table, step.suffix_lens)
            parts = [PartialAttention(step.rows, suffix.out, suffix.lse)]
        else:
            keys, values = gather_kv(k_cache, step.suffix_table), gather_kv(v_cache, step.suffix_table)  # [Hkv, B, S, D]
            parts = [PartialAttention(step.rows, *suffix_attention(q, keys, values, step.suffix_lens, step.suffix_mask))]
        for seg in step.segments:
            if seg.first_block is not None:
                seg_k = cache_view(k_cache, seg.first_block, seg.length)  # [Hkv, T, D], no copy
                seg_v = cache_view(v_cache, seg.first_block, seg.length)
            else:
                seg_k, seg_v = gather_kv(k_cache, seg.table)[:, 0], gather_kv(v_cache, seg.table)[:, 0]
            parts.append(PartialAttention(seg.members, *prefix_attention(q[seg.members], seg_k, seg_v)))
        return merge_partials(parts, q.shape[0]).out

    def prepare(self, meta: AttentionMetadata, block_size: int) -> _Step:
        """Groups the step's decode rows and builds the tensors every layer uses."""
        seqs = meta.sequences
        decode = [seqs[i] for i in meta.decode_rows]
        plan = plan_prefix_groups(
            [s.block_table for s in decode], [s.context_len for s in decode], self.min_shared_blocks(block_size), block_size,
            min_member_blocks=self.min_member_tokens // block_size
        )
        grouped_ids = plan.grouped
        if not grouped_ids:
            return _Step(plan, None, None, False)
        position = {seq: row for row, seq in enumerate(grouped_ids)}
        segments = []
        for seg in plan.segments:
            table = torch.tensor([seg.block_ids], dtype=torch.int64)
            first = seg.block_ids[0] if consecutive_run(seg.block_ids, len(seg.block_ids)) == len(seg.block_ids) else None
            members = torch.tensor([position[i] for i in seg.members], dtype=torch.int64)
            segments.append(_SegmentStep(members, first, table, len(seg.block_ids) * block_size))
        own = []
        for i in grouped_ids:
            parts, table = plan.sequences[i], decode[i].block_table
            own.append(table[parts.suffix_start // block_size : -(-parts.context_len // block_size)])
        width = max(len(t) for t in own)
        lengths = torch.tensor([plan.sequences[i].suffix_len for i in grouped_ids], dtype=torch.int64)
        grouped = _GroupedStep(
            torch.tensor([decode[i].query_start for i in grouped_ids], dtype=torch.int64),
            torch.arange(len(grouped_ids)),
            segments,
            torch.tensor([t + [0] * (width - len(t)) for t in own], dtype=torch.int64),  # padding is masked out
            lengths,
            suffix_mask(lengths, width * block_size),
        )
        rest = sub_batch(meta, sorted(meta.prefill_rows + [meta.decode_rows[i] for i in plan.ungrouped]))
        return _Step(plan, grouped, rest, rest is None and grouped.rows.equal(grouped.query_rows))
