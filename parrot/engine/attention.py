"""Attention over the paged KV cache.

KV tensors per layer are laid out [num_kv_heads, num_blocks, block_size, head_dim],
so gathering a sequence's blocks gives a tensor whose leading dim is the KV head:
grouped-query attention then needs no head expansion (the G query heads of a KV
head ride along as extra query rows).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SequenceSlice:
    """One sequence's part of a flat batch: its queries and the KV they attend to."""

    query_start: int
    query_len: int
    context_len: int  # KV entries after this step's tokens are written
    block_table: list[int]


@dataclass(frozen=True)
class AttentionMetadata:
    sequences: list[SequenceSlice]
    slot_mapping: torch.Tensor  # [N] int64: where each new token's KV goes
    decode_rows: list[int]  # indices into sequences with query_len == 1
    prefill_rows: list[int]
    decode_block_tables: torch.Tensor | None  # [B_decode, max_blocks] int64, padded
    decode_context_lens: torch.Tensor | None  # [B_decode] int64

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


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """cache [Hkv, nb, bs, D], block_table [B, W] -> [Hkv, B, W*bs, D]."""
    hkv, _, bs, d = cache.shape
    b, w = block_table.shape
    return cache.index_select(1, block_table.reshape(-1)).view(hkv, b, w * bs, d)


class CpuPagedAttention(AttentionBackend):
    """Decode rows batched in one masked product; each prefill chunk on its own."""

    def forward(self, q, k, v, k_cache, v_cache, meta):
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        n, h, d = q.shape
        hkv = k_cache.shape[0]
        g = h // hkv
        out = torch.empty_like(q)
        if meta.decode_rows:
            rows = torch.tensor([meta.sequences[i].query_start for i in meta.decode_rows])
            out[rows] = self._decode(q[rows], k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, g)
        for i in meta.prefill_rows:
            seq = meta.sequences[i]
            span = slice(seq.query_start, seq.query_start + seq.query_len)
            out[span] = self._prefill(q[span], k_cache, v_cache, seq, g)
        return out

    @staticmethod
    def _decode(q, k_cache, v_cache, tables, lens, g):
        b, h, d = q.shape
        hkv = h // g
        keys = gather_kv(k_cache, tables)  # [Hkv, B, T, D]
        values = gather_kv(v_cache, tables)
        t = keys.shape[2]
        queries = q.view(b, hkv, g, d).permute(1, 0, 2, 3).to(keys.dtype)  # [Hkv, B, G, D]
        visible = torch.arange(t).unsqueeze(0) < lens.unsqueeze(1)  # [B, T]
        attn = F.scaled_dot_product_attention(queries, keys, values, attn_mask=visible.unsqueeze(1))
        return attn.permute(1, 0, 2, 3).reshape(b, h, d).to(q.dtype)  # [B, H, D]

    @staticmethod
    def _prefill(q, k_cache, v_cache, seq, g):
        L, h, d = q.shape
        hkv = h // g
        table = torch.tensor([seq.block_table], dtype=torch.int64)
        keys = gather_kv(k_cache, table)[:, 0, : seq.context_len]  # [Hkv, T, D]
        values = gather_kv(v_cache, table)[:, 0, : seq.context_len]
        # G query heads of one KV head become G*L query rows: [Hkv, G*L, D]
        queries = q.view(L, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * L, d).to(keys.dtype)
        cached = seq.context_len - L
        if cached == 0:
            # no cached prefix: plain causal attention, heads as [H, L, D] with GQA broadcast
            heads = q.transpose(0, 1).to(keys.dtype)
            causal = F.scaled_dot_product_attention(
                heads.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0), is_causal=True, enable_gqa=True
            )
            return causal[0].transpose(0, 1).to(q.dtype)
        # query i sits at position cached + i and sees keys 0..cached + i
        visible = torch.arange(seq.context_len).unsqueeze(0) <= (torch.arange(L) + cached).unsqueeze(1)
        rows = F.scaled_dot_product_attention(queries, keys, values, attn_mask=visible.repeat(g, 1))
        return rows.view(hkv, g, L, d).permute(2, 0, 1, 3).reshape(L, h, d).to(q.dtype)
