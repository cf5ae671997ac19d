"""Shared-prefix decode attention on CUDA: one Triton kernel over "work items", merged by log-sum-exp.

A work item is some query rows attending to a token range read through a list of KV blocks.
A shared segment is one item per chunk of its blocks, holding the queries of all its members
(one matrix-matrix product per tile instead of one matrix-vector product per member); each
sequence's own blocks are one item per chunk with its queries alone; a sequence in no group is
all suffix. Chunking a long prefix splits the KV (flash-decoding) so a few sequences still fill
the GPU; merge_partials then merges every part of every row, on the GPU. Written without a GPU
at hand: tests/test_triton_attention.py checks it against the CPU backends where CUDA is present.
`run_items_torch` is the same contract in plain torch, so the host side is tested on the CPU.
Prefill chunks are items too, run causally (chunked prefill over paged KV): an item's queries are
its last `count` tokens in order, so query j sees the first length - count + j + 1 tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from parrot.engine.attention import AttentionBackend, AttentionMetadata, write_kv
from parrot.engine.prefix_plan import PrefixPlan, min_shared_blocks, plan_prefix_groups
from parrot.engine.shared_prefix_attention import PartialAttention, SubBatch, merge_partials, sub_batch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the module imports, the kernel is unavailable
    triton = None

# TRITON_INTERPRET=1 runs the kernel in Triton's interpreter on CPU tensors (slow; for debugging and tests)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class WorkItems:
    """Items of the kernel. Item i's queries are q_rows[q_start[i] : q_start[i] + q_count[i]];
    part row j of the output belongs to batch row q_rows[j]."""

    q_rows: torch.Tensor  # [R] int32: batch rows, the items' rows back to back
    q_start: torch.Tensor  # [I] int32
    q_count: torch.Tensor  # [I] int32
    tables: torch.Tensor  # [I, W] int32 block ids; the item's tokens are the first lengths[i] of these blocks
    lengths: torch.Tensor  # [I] int32 tokens; 0: an empty part (output 0, log-sum-exp -inf: weight 0 in a merge)
    max_q: int  # most query rows of one item (sizes the launch grid)


def build_items(groups: list[tuple[list[int], list[int], int]], device: torch.device | str) -> WorkItems:
    """groups: (batch rows, block ids, tokens) per item -> the kernel's tensors."""
    rows = [r for members, _, _ in groups for r in members]
    starts, total = [], 0
    for members, _, _ in groups:
        starts.append(total)
        total += len(members)
    width = max((len(blocks) for _, blocks, _ in groups), default=1)
    i32 = dict(dtype=torch.int32, device=device)
    return WorkItems(
        torch.tensor(rows, **i32),
        torch.tensor(starts, **i32),
        torch.tensor([len(m) for m, _, _ in groups], **i32),
        torch.tensor([b + [0] * (width - len(b)) for _, b, _ in groups], **i32).view(len(groups), width),
        torch.tensor([n for _, _, n in groups], **i32),
        max((len(m) for m, _, _ in groups), default=0),
    )


def plan_items(plan: PrefixPlan, tables: list[list[int]], chunk_blocks: int, device) -> tuple[WorkItems, WorkItems]:
    """(shared items: segment chunks with all their members, own items: each sequence's suffix chunks)."""
    bs = plan.block_size
    shared = [
        (seg.members, seg.block_ids[j : j + chunk_blocks], len(seg.block_ids[j : j + chunk_blocks]) * bs)
        for seg in plan.segments
        for j in range(0, len(seg.block_ids), chunk_blocks)
    ]
    own = []
    for i, parts in enumerate(plan.sequences):
        blocks = tables[i][parts.suffix_start // bs : -(-parts.context_len // bs)]
        for j in range(0, len(blocks), chunk_blocks):
            own.append(([i], blocks[j : j + chunk_blocks], min(chunk_blocks * bs, parts.suffix_len - j * bs)))
    return build_items(shared, device), build_items(own, device)


def run_items_torch(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, items: WorkItems, causal: bool = False
) -> PartialAttention:
    """The kernel's contract in torch, item by item: q [B, H, D] -> parts over items.q_rows.
    causal: item row j sees only the first length - (count - 1 - j) tokens (its chunk's own queries)."""
    hkv, _, bs, d = k_cache.shape
    b, h, _ = q.shape
    outs, lses = [], []
    for i in range(items.q_start.numel()):
        start, count, n = int(items.q_start[i]), int(items.q_count[i]), int(items.lengths[i])
        rows = items.q_rows[start : start + count].long()
        blocks = items.tables[i, : -(-n // bs)].long()
        keys = k_cache[:, blocks].reshape(hkv, -1, d)[:, :n]  # [Hkv, n, D]
        values = v_cache[:, blocks].reshape(hkv, -1, d)[:, :n]
        queries = q[rows].view(count, hkv, h // hkv, d).transpose(0, 1).reshape(hkv, -1, d).float()
        scores = queries @ keys.float().transpose(1, 2) * d**-0.5  # [Hkv, count*G, n]
        if causal:  # query j of the item (rows j*G .. j*G+G-1) sees tokens < n - (count - 1 - j)
            limit = n - (count - 1 - torch.arange(count, device=q.device)).repeat_interleave(h // hkv)  # [count*G]
            scores = scores.masked_fill(torch.arange(n, device=q.device) >= limit.unsqueeze(1), float("-inf"))
        lse = scores.logsumexp(-1)
        out = (scores - lse.unsqueeze(-1)).exp() @ values.float()
        outs.append(out.view(hkv, count, h // hkv, d).transpose(0, 1).reshape(count, h, d))  # count may be 0: no rows
        lses.append(lse.view(hkv, count, h // hkv).transpose(0, 1).reshape(count, h))
    empty = (torch.zeros((0, h, d), device=q.device), torch.zeros((0, h), device=q.device))
    return PartialAttention(items.q_rows.long(), torch.cat(outs) if outs else empty[0], torch.cat(lses) if lses else empty[1])


if triton is not None:

    @triton.jit
    def _items_kernel(
        Q, K, V, QRows, QStart, QCount, Tables, Lengths, Out, Lse,
        stride_qb, stride_qh, stride_kh, stride_kb, stride_kt, stride_tab, stride_ob, stride_oh, stride_lb, scale,
        G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, CAUSAL: tl.constexpr,
    ):  # fmt: skip
        # one program: one item, one KV head, BLOCK_M of its query rows (row r: query r // G, head r % G of the group)
        item = tl.program_id(0)
        kv_head = tl.program_id(1).to(tl.int64)
        tile = tl.program_id(2)
        q_start = tl.load(QStart + item)
        q_count = tl.load(QCount + item)
        if tile * BLOCK_M >= q_count * G:  # the grid is sized for the largest item
            return
        r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        valid_r = r < q_count * G
        part_row = (q_start + r // G).to(tl.int64)
        seq = tl.load(QRows + part_row, mask=valid_r, other=0).to(tl.int64)
        head = kv_head * G + r % G
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + seq[:, None] * stride_qb + head[:, None] * stride_qh + d[None, :], mask=valid_r[:, None], other=0.0)
        q = q.to(K.dtype.element_ty)
        length = tl.load(Lengths + item)
        end = length
        if CAUSAL:  # query j of the item sees tokens < limit; the tile stops after its last query's limit
            limit = length - (q_count - 1 - r // G)  # [BLOCK_M]; past q_count (padding rows) it exceeds length
            end = length - (q_count - 1 - tl.minimum((tile * BLOCK_M + BLOCK_M - 1) // G, q_count - 1))
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for start in range(0, end, BLOCK_N):  # online softmax over the item's tokens
            t = start + tl.arange(0, BLOCK_N)
            valid_t = t < length
            block = tl.load(Tables + item.to(tl.int64) * stride_tab + t // BLOCK_SIZE, mask=valid_t, other=0).to(tl.int64)
            offset = kv_head * stride_kh + block * stride_kb + (t % BLOCK_SIZE) * stride_kt  # [BLOCK_N]
            k = tl.load(K + offset[None, :] + d[:, None], mask=valid_t[None, :], other=0.0)  # [HEAD_DIM, BLOCK_N]
            v = tl.load(V + offset[:, None] + d[None, :], mask=valid_t[:, None], other=0.0)  # [BLOCK_N, HEAD_DIM]
            s = tl.dot(q, k, input_precision=PRECISION) * scale
            visible = valid_t[None, :]
            if CAUSAL:
                visible = visible & (t[None, :] < limit[:, None])
            s = tl.where(visible, s, float("-inf"))  # token 0 is visible to every row: rows stay finite
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # an empty item: 0, and its lse below is -inf
        tl.store(Out + part_row[:, None] * stride_ob + head[:, None] * stride_oh + d[None, :], out, mask=valid_r[:, None])
        tl.store(Lse + part_row * stride_lb + head, m_i + tl.log(l_i), mask=valid_r)


def run_items_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, items: WorkItems, causal: bool = False
) -> PartialAttention:
    """q [B, H, D] (last dim contiguous), caches [Hkv, nb, bs, D] contiguous, on CUDA (or the CPU when
    interpreting) -> parts over items.q_rows."""
    b, h, d = q.shape
    hkv, _, bs, _ = k_cache.shape
    assert triton is not None and (q.is_cuda or INTERPRET), "the Triton kernel runs on CUDA (or in the interpreter)"
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and q.stride(2) == 1
    assert d >= 16 and d & (d - 1) == 0, "tl.arange needs a power-of-two head_dim"
    g = h // hkv
    rows = items.q_rows.numel()
    out = torch.empty((rows, h, d), dtype=torch.float32, device=q.device)
    lse = torch.empty((rows, h), dtype=torch.float32, device=q.device)
    if rows:
        block_m = 16 if items.max_q * g <= 16 else 64  # tl.dot wants tiles of at least 16 rows
        grid = (items.q_start.numel(), hkv, triton.cdiv(items.max_q * g, block_m))
        _items_kernel[grid](
            q, k_cache, v_cache, items.q_rows, items.q_start, items.q_count, items.tables, items.lengths, out, lse,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), items.tables.stride(0),
            out.stride(0), out.stride(1), lse.stride(0), d**-0.5,
            G=g, HEAD_DIM=d, BLOCK_SIZE=bs, BLOCK_M=block_m, BLOCK_N=64,
            PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32",  # exact float32: no TF32 rounding
            CAUSAL=causal,
        )  # fmt: skip
    return PartialAttention(items.q_rows.long(), out, lse)


@dataclass(frozen=True)
class _Step:
    decode_rows: torch.Tensor  # [B] int64 query rows of the decode sequences
    slots: torch.Tensor  # [N] int64 slot mapping, on the cache's device
    shared: WorkItems
    own: WorkItems
    prefill: WorkItems | None  # one causal item per prefill chunk, its rows those of the flat batch
    prefill_sub: SubBatch | None  # the prefill rows, when a prefill backend of its own takes them


def run_items(q, k_cache, v_cache, items: WorkItems, causal: bool = False) -> PartialAttention:
    """The Triton kernel on CUDA (or in the interpreter), else its torch contract."""
    use_kernel = triton is not None and (k_cache.is_cuda or INTERPRET)
    return (run_items_triton if use_kernel else run_items_torch)(q, k_cache, v_cache, items, causal)


class TritonSharedPrefixAttention(AttentionBackend):
    """Every row through the work-item kernel: decode rows with shared segments read once for
    their members, prefill chunks as causal items. `prefill`, when given, takes the prefill rows
    instead (a CPU backend, so that the CPU path can compare the decode side alone)."""

    _KEY = "triton_shared_prefix_step"

    def __init__(self, prefill: AttentionBackend | None = None, min_shared_tokens: int = 128, chunk_tokens: int = 512):
        self.prefill, self.min_shared_tokens, self.chunk_tokens = prefill, min_shared_tokens, chunk_tokens

    def forward(self, q, k, v, k_cache, v_cache, meta):
        step = meta.scratch.get(self._KEY)
        if step is None:
            step = meta.scratch[self._KEY] = self._prepare(meta, k_cache.shape[2], k_cache.device)
        write_kv(k, v, k_cache, v_cache, step.slots)
        out = torch.empty_like(q)
        if step.decode_rows.numel():
            decode_q = q[step.decode_rows]  # [B, H, D]
            parts = [run_items(decode_q, k_cache, v_cache, items) for items in (step.shared, step.own)]
            out[step.decode_rows] = merge_partials(parts, decode_q.shape[0]).out.to(q.dtype)
        if step.prefill is not None:  # each prefill row is in exactly one item: its part is its attention
            part = run_items(q, k_cache, v_cache, step.prefill, causal=True)
            out[part.rows] = part.out.to(q.dtype)
        if step.prefill_sub is not None:  # the prefill backend writes its rows' k/v again: the same values
            rows = step.prefill_sub.rows.to(q.device)
            out[rows] = self.prefill.forward(q[rows], k[rows], v[rows], k_cache, v_cache, step.prefill_sub.meta)
        return out

    def _prepare(self, meta: AttentionMetadata, block_size: int, device) -> _Step:
        decode = [meta.sequences[i] for i in meta.decode_rows]
        tables = [s.block_table for s in decode]
        plan = plan_prefix_groups(tables, [s.context_len for s in decode], min_shared_blocks(self.min_shared_tokens, block_size), block_size)
        shared, own = plan_items(plan, tables, max(1, self.chunk_tokens // block_size), device)
        rows = torch.tensor([s.query_start for s in decode], dtype=torch.int64, device=device)
        prefill = prefill_sub = None
        if meta.prefill_rows and self.prefill is not None:
            prefill_sub = sub_batch(meta, meta.prefill_rows)
        elif meta.prefill_rows:
            chunks = [meta.sequences[i] for i in meta.prefill_rows]
            prefill = build_items(
                [
                    (list(range(s.query_start, s.query_start + s.query_len)), s.block_table[: -(-s.context_len // block_size)], s.context_len)
                    for s in chunks
                ],
                device,
            )
        return _Step(rows, meta.slot_mapping.to(device), shared, own, prefill, prefill_sub)
