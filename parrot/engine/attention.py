"""Attention over the paged KV cache.

KV tensors per layer are laid out [num_kv_heads, num_blocks, block_size, head_dim],
so gathering a sequence's blocks gives a tensor whose leading dim is the KV head:
grouped-query attention then needs no head expansion (the G query heads of a KV
head ride along as extra query rows).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from parrot.engine.cpu_kernels import kernel_decodes, paged_decode


@dataclass(frozen=True)
class SequenceSlice:
    """One sequence's part of a flat batch: its queries and the KV they attend to."""

    query_start: int
    query_len: int
    context_len: int  # KV entries after this step's tokens are written
    block_table: list[int]


def consecutive_run(block_table: list[int], num_blocks: int) -> int:
    """How many of the first num_blocks blocks of the table are consecutive ids (at least 1)."""
    first = block_table[0]
    if block_table[num_blocks - 1] == first + num_blocks - 1 and block_table[:num_blocks] == list(
        range(first, first + num_blocks)
    ):
        return num_blocks
    run = 1
    while run < num_blocks and block_table[run] == first + run:
        run += 1
    return run


def descending_run(block_table: list[int], num_blocks: int) -> int:
    """How many of the first num_blocks blocks of the table are consecutive ids counting down."""
    if num_blocks == 0:
        return 0
    first, run = block_table[0], 1
    while run < num_blocks and block_table[run] == first - run:
        run += 1
    return run


# A sequence's run of consecutive blocks is read in place when it holds at least this many
# tokens; shorter runs are cheaper to gather with the rest than to attend to on their own.
MIN_VIEW_TOKENS = 64


@dataclass(frozen=True)
class DecodePlan:
    """How the step's decode rows read their KV, derived once per step and used by every layer.

    A sequence's KV is split in two parts: its leading run of consecutive blocks ("main"),
    ascending, or full blocks descending, read in place as a slice of the cache, and the other blocks ("rest"), gathered for all
    sequences at once into one padded batch. A sequence with both parts merges the two
    attention results through their log-sum-exp.
    """

    context_lens: list[int]  # per decode sequence
    main: list[tuple[int, int]]  # per decode sequence: (first block, tokens read in place); 0 tokens: none
    rest: list[int]  # decode sequences with gathered KV, in order
    rest_table: torch.Tensor | None  # [R, W] int64 block ids, padded with each row's last block
    rest_lens: list[int]  # gathered tokens per rest sequence
    rest_mask: torch.Tensor | None  # [1, R, 1, W*bs] additive (-inf past each length); None when lengths agree
    rest_index: torch.Tensor | None  # [R] int64: the rest sequences' positions among the decode sequences

    @classmethod
    def build(cls, seqs: list[SequenceSlice], block_size: int) -> "DecodePlan":
        lens = [s.context_len for s in seqs]
        main: list[tuple[int, int]] = []
        rest: list[int] = []
        rest_blocks: list[list[int]] = []
        rest_lens: list[int] = []
        for i, seq in enumerate(seqs):
            used = -(-seq.context_len // block_size)
            run = consecutive_run(seq.block_table, used)
            first = seq.block_table[0]
            down = descending_run(seq.block_table, seq.context_len // block_size)
            if down > run:
                # blocks handed out in reverse (contexts of one block each, freed one after another,
                # come back last-first; a freed longer context's come back in ascending order):
                # full blocks of one id range are read in place all the same, since a decode
                # query sees every key and the order of keys does not change the softmax
                run, first = down, seq.block_table[down - 1]
            if min(run * block_size, seq.context_len) < MIN_VIEW_TOKENS and run < used:
                run = 0
            in_place = min(run * block_size, seq.context_len)
            main.append((first if in_place else 0, in_place))
            if in_place < seq.context_len:
                rest.append(i)
                rest_blocks.append(seq.block_table[run:used])
                rest_lens.append(seq.context_len - in_place)
        table = mask = index = None
        if rest:
            width = max(len(b) for b in rest_blocks)
            table = torch.tensor([b + [b[-1]] * (width - len(b)) for b in rest_blocks], dtype=torch.int64)
            index = torch.tensor(rest, dtype=torch.int64)
            span = width * block_size
            if any(n != rest_lens[0] for n in rest_lens):
                visible = torch.arange(span).unsqueeze(0) < torch.tensor(rest_lens).unsqueeze(1)  # [R, W*bs]
                mask = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf")).view(1, len(rest), 1, span)
        return cls(lens, main, rest, table, rest_lens, mask, index)


@dataclass(frozen=True)
class AttentionMetadata:
    sequences: list[SequenceSlice]
    slot_mapping: torch.Tensor  # [N] int64: where each new token's KV goes
    decode_rows: list[int]  # indices into sequences with query_len == 1
    prefill_rows: list[int]
    decode_block_tables: torch.Tensor | None  # [B_decode, max_blocks] int64, padded
    decode_context_lens: torch.Tensor | None  # [B_decode] int64
    # per-step scratch of the backend (gather buffers, masks), reused by every layer of the step
    scratch: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, sequences: list[SequenceSlice], slots: list[int]) -> "AttentionMetadata":
        decode = [i for i, s in enumerate(sequences) if s.query_len == 1]
        prefill = [i for i, s in enumerate(sequences) if s.query_len != 1]
        tables = lens = None
        if decode:
            width = max(len(sequences[i].block_table) for i in decode)
            tables = torch.tensor(
                [sequences[i].block_table + [0] * (width - len(sequences[i].block_table)) for i in decode],
                dtype=torch.int64,
            )
            lens = torch.tensor([sequences[i].context_len for i in decode], dtype=torch.int64)
        return cls(sequences, torch.tensor(slots, dtype=torch.int64), decode, prefill, tables, lens)

    def decode_query_rows(self) -> torch.Tensor | None:
        """[B_decode] int64: the decode sequences' rows of the batch; None when the step is
        decode only, in order (row i is sequence i)."""
        if "decode_query_rows" not in self.scratch:
            seqs = [self.sequences[i] for i in self.decode_rows]
            in_order = not self.prefill_rows and all(s.query_start == i for i, s in enumerate(seqs))
            rows = None if in_order else torch.tensor([s.query_start for s in seqs], dtype=torch.int64)
            self.scratch["decode_query_rows"] = rows
        return self.scratch["decode_query_rows"]


class AttentionBackend(ABC):
    """Computes attention for a flat batch of queries over the paged KV cache.

    Contract: `forward` first writes the batch's new k/v into the cache at
    metadata.slot_mapping, then returns, for every query row, softmax(q k^T / sqrt(d)) v
    over the sequence's first context_len KV entries with causal masking inside
    the step's own tokens. Output rows are in the order of the input rows.
    """

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [N, H, D]
        k: torch.Tensor,  # [N, Hkv, D]
        v: torch.Tensor,  # [N, Hkv, D]
        k_cache: torch.Tensor,  # [Hkv, num_blocks, block_size, D]
        v_cache: torch.Tensor,  # [Hkv, num_blocks, block_size, D]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [N, H, D]
        ...


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> None:
    hkv, nb, bs, d = k_cache.shape
    # k: [N, Hkv, D] -> [Hkv, N, D], scattered into the flat [Hkv, nb*bs, D] view
    k_cache.view(hkv, nb * bs, d).index_copy_(1, slots, k.transpose(0, 1).to(k_cache.dtype))
    v_cache.view(hkv, nb * bs, d).index_copy_(1, slots, v.transpose(0, 1).to(v_cache.dtype))


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """cache [Hkv, nb, bs, D], block_table [B, W] -> [Hkv, B, W*bs, D] (into out when given)."""
    hkv, _, bs, d = cache.shape
    b, w = block_table.shape
    if out is None:
        return cache.index_select(1, block_table.reshape(-1)).view(hkv, b, w * bs, d)
    torch.index_select(cache, 1, block_table.reshape(-1), out=out.view(hkv, b * w, bs, d))
    return out.view(hkv, b, w * bs, d)


def cache_view(cache: torch.Tensor, first_block: int, length: int) -> torch.Tensor:
    """The first length entries of a run of consecutive blocks, without a copy: [Hkv, length, D]."""
    hkv, _, bs, d = cache.shape
    return cache[:, first_block : first_block + -(-length // bs)].reshape(hkv, -1, d)[:, :length]


_flash_with_lse = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None):
    """q [B, H, L, D], k/v [B, H, S, D], mask additive, broadcast to [B, H, L, S]
    -> (out [B, H, L, D], log-sum-exp of the scaled scores [B, H, L])."""
    if _flash_with_lse is not None and q.device.type == "cpu":
        return _flash_with_lse(q, k, v, attn_mask=mask)
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores + mask
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v), lse


def merge_attention(out_a, lse_a, out_b, lse_b):
    """Softmax attention over the union of two disjoint key sets from the parts over each:
    out [..., L, D], lse [..., L] -> out [..., L, D]."""
    top = torch.maximum(lse_a, lse_b)
    w_a = torch.exp(lse_a - top).unsqueeze(-1)
    w_b = torch.exp(lse_b - top).unsqueeze(-1)
    return (out_a * w_a + out_b * w_b) / (w_a + w_b)


def _scratch(meta: AttentionMetadata, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A buffer of the step, allocated by the first layer and reused by the others."""
    buf = meta.scratch.get(name)
    if buf is None or buf.shape != shape or buf.dtype != like.dtype:
        buf = meta.scratch[name] = torch.empty(shape, dtype=like.dtype)
    return buf


class CpuPagedAttention(AttentionBackend):
    """Decode rows: our compiled kernel (cpu_kernels.paged_decode), which reads each sequence's
    blocks in place, where it builds; else one unmasked product over gathered KV when they share
    a length, else one product per sequence over a slice of the cache (or of the gathered KV).
    Prefill chunks: causal attention over the chunk's own k/v when nothing is cached before it,
    else a masked product over the sequence's KV; both in `prompt_dtype` where one is given."""

    def __init__(self, decode_kernel: bool | None = None, prompt_dtype: torch.dtype | None = None):
        self.decode_kernel = decode_kernel  # None: the kernel where it builds for this head size
        self.prompt_dtype = prompt_dtype  # what prompt attention computes in; None: q's dtype (device.prompt_attention_dtype)

    def uses_kernel(self, head_dim: int, kv_dtype: torch.dtype, device: torch.device) -> bool:
        return kernel_decodes(head_dim, kv_dtype, device) if self.decode_kernel is None else self.decode_kernel

    def forward(self, q, k, v, k_cache, v_cache, meta):
        assert k_cache.is_contiguous() and v_cache.is_contiguous(), "KV caches are read in place: they must be contiguous"
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        rows = meta.decode_query_rows() if meta.decode_rows else None
        if meta.decode_rows and rows is None:  # a decode-only step
            return self._decode_rows(q, k_cache, v_cache, meta)
        out = torch.empty(q.shape, dtype=q.dtype)
        if meta.decode_rows:
            out[rows] = self._decode_rows(q[rows], k_cache, v_cache, meta)
        for i in meta.prefill_rows:
            seq = meta.sequences[i]
            span = slice(seq.query_start, seq.query_start + seq.query_len)
            out[span] = self._prefill(q[span], k[span], v[span], k_cache, v_cache, seq, meta, i)
        return out

    def _decode_rows(self, q, k_cache, v_cache, meta: AttentionMetadata):
        """q: [B, H, D], the decode sequences' rows in order -> [B, H, D]"""
        if self.uses_kernel(q.shape[-1], k_cache.dtype, q.device):
            return paged_decode(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens).out.to(q.dtype)
        plan = meta.scratch.get("decode_plan")
        if plan is None:  # derived once per step, used by every layer
            plan = meta.scratch["decode_plan"] = DecodePlan.build([meta.sequences[i] for i in meta.decode_rows], k_cache.shape[2])
        return self._decode(q, k_cache, v_cache, plan, meta)

    @staticmethod
    def _decode(q, k_cache, v_cache, plan: DecodePlan, meta: AttentionMetadata):
        """q: [B, H, D] -> [B, H, D]"""
        b, h, d = q.shape
        hkv, _, bs, _ = k_cache.shape
        g = h // hkv
        queries = q.view(b, hkv, g, d).transpose(0, 1)  # [Hkv, B, G, D]; a bf16 cache is widened to q's dtype below
        rest_out = rest_lse = None
        if plan.rest:
            r, width = plan.rest_table.shape
            shape = (hkv, r, width * bs, d)
            keys = gather_kv(k_cache, plan.rest_table, _scratch(meta, "decode_k", shape, k_cache))
            values = gather_kv(v_cache, plan.rest_table, _scratch(meta, "decode_v", shape, v_cache))
            if plan.rest_mask is None:
                keys, values = keys[:, :, : plan.rest_lens[0]], values[:, :, : plan.rest_lens[0]]
            keys, values = keys.to(q.dtype), values.to(q.dtype)
            rest_q = queries if len(plan.rest) == b else queries[:, plan.rest_index]
            if len(plan.rest) == b and not any(n for _, n in plan.main):
                # every sequence is gathered whole: one product, no merge
                attn = F.scaled_dot_product_attention(rest_q, keys, values, attn_mask=plan.rest_mask)  # [Hkv, B, G, D]
                return attn.transpose(0, 1).reshape(b, h, d).to(q.dtype)
            rest_out, rest_lse = attention_with_lse(rest_q, keys, values, plan.rest_mask)  # [Hkv, R, G, D], [Hkv, R, G]
        # the in-place runs, one sequence at a time (a slice of the cache each, no copy)
        outs, lses = [], []
        stride = k_cache.stride()
        for i, (first, length) in enumerate(plan.main):
            if length == 0:
                outs.append(queries.new_zeros(hkv, 1, g, d))
                lses.append(queries.new_full((hkv, 1, g), float("-inf")))
                continue
            size, strides, offset = (hkv, 1, length, d), (stride[0], 0, d, 1), first * stride[1]
            seq_k = k_cache.as_strided(size, strides, k_cache.storage_offset() + offset).to(q.dtype)
            seq_v = v_cache.as_strided(size, strides, v_cache.storage_offset() + offset).to(q.dtype)
            if rest_out is None:
                outs.append(F.scaled_dot_product_attention(queries[:, i : i + 1], seq_k, seq_v))
            else:
                out, lse = attention_with_lse(queries[:, i : i + 1], seq_k, seq_v)
                outs.append(out)
                lses.append(lse)
        main_out = torch.cat(outs, dim=1)  # [Hkv, B, G, D]
        if rest_out is not None:
            main_lse = torch.cat(lses, dim=1)  # [Hkv, B, G]
            index = plan.rest_index
            merged = merge_attention(main_out[:, index], main_lse[:, index], rest_out, rest_lse)
            if len(plan.rest) == b:
                main_out = merged
            else:
                main_out[:, index] = merged.to(main_out.dtype)  # the merge computes in float32
        return main_out.transpose(0, 1).reshape(b, h, d).to(q.dtype)

    def _prefill(self, q, k, v, k_cache, v_cache, seq: SequenceSlice, meta: AttentionMetadata, index: int):
        """q: [L, H, D], k/v: [L, Hkv, D] (this chunk's own, already in the cache) -> [L, H, D]"""
        out_dtype = q.dtype
        if self.prompt_dtype is not None:
            q = q.to(self.prompt_dtype)
        L = q.shape[0]
        bs = k_cache.shape[2]
        cached = seq.context_len - L
        if cached == 0:
            # nothing before the chunk: plain causal attention over its own k/v, GQA by broadcast,
            # as the cache holds them (rounded to its dtype): a later prompt that forks from this
            # one's cached KV then attends to the same values
            def as_stored(x: torch.Tensor) -> torch.Tensor:  # [L, Hkv, D] -> [1, Hkv, L, D]
                return x.transpose(0, 1).unsqueeze(0).to(k_cache.dtype).to(q.dtype)

            causal = F.scaled_dot_product_attention(
                q.transpose(0, 1).unsqueeze(0), as_stored(k), as_stored(v), is_causal=True, enable_gqa=True
            )  # [1, H, L, D]
            return causal[0].transpose(0, 1).to(out_dtype)
        used = -(-seq.context_len // bs)
        if consecutive_run(seq.block_table, used) == used:
            first = seq.block_table[0]
            keys, values = cache_view(k_cache, first, seq.context_len), cache_view(v_cache, first, seq.context_len)
        else:
            table = torch.tensor([seq.block_table[:used]], dtype=torch.int64)
            keys = gather_kv(k_cache, table)[:, 0, : seq.context_len]  # [Hkv, T, D]
            values = gather_kv(v_cache, table)[:, 0, : seq.context_len]
        keys, values = keys.to(q.dtype), values.to(q.dtype)  # a bf16 cache is widened, the math stays in q's dtype
        mask = meta.scratch.get(("prefill_mask", index))
        if mask is None:  # built once a step, for every layer: query i sits at cached + i, sees keys 0..cached + i
            mask = meta.scratch[("prefill_mask", index)] = torch.ones(L, seq.context_len, dtype=torch.bool).tril(cached)
        # heads as a batch dimension of 4-D tensors, GQA by the kernel: PyTorch's fused CPU kernel
        # takes this shape (G query heads folded into rows of [Hkv, G*L, D] took its unfused path,
        # 4x slower: 83 against 20 ms a layer for 512 queries over 2048 keys, float32)
        rows = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
                                              attn_mask=mask, enable_gqa=True)  # [1, H, L, D]
        return rows[0].transpose(0, 1).to(out_dtype)
