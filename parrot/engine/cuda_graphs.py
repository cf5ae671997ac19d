"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step on a GPU is a few kernels per layer for a handful of rows: launching them from
Python costs more than running them. So the whole forward of a decode batch is captured once
per bucket over static buffers; a step copies its inputs into the smallest bucket that holds
it (padding rows write their KV into a scratch block past the pool's and read it back) and
replays the graph. Attention inside is the work-item kernel with a fixed number of items per
sequence (a graph fixes the launch grid): each reads one of `splits` block-aligned chunks of
the sequence's KV, empty ones included, and the parts merge by log-sum-exp inside the graph.
Small buckets get more splits, so that a few long sequences still spread over the GPU
(flash-decoding). Steps whose sequences share a long prefix run eagerly instead, where the
shared segment is read once for all of them.

On the CPU the same static path runs without capture, which is how tests check the buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parrot.engine.attention import AttentionBackend, AttentionMetadata, write_kv
from parrot.engine.model import ForwardBatch, LlamaModel
from parrot.engine.model_runner import KVCacheTensors
from parrot.engine.prefix_plan import min_shared_blocks, plan_prefix_groups
from parrot.engine.shared_prefix_attention import merge_partials
from parrot.engine.triton_attention import WorkItems, run_items

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
PROGRAMS_PER_SM = 2  # kernel programs (item x KV head) wanted per multiprocessor at least
MAX_SPLITS = 16


def splits_for(bucket: int, kv_heads: int, multiprocessors: int) -> int:
    """KV chunks per sequence in a bucket: enough items to fill the GPU, at most MAX_SPLITS."""
    return max(1, min(MAX_SPLITS, -(-PROGRAMS_PER_SM * multiprocessors // (bucket * kv_heads))))


@dataclass
class StaticDecodeBatch:
    """One bucket's buffers: what a replay reads and the logits it writes."""

    size: int
    splits: int  # items per row: item i*splits + j reads chunk j of row i's KV
    token_ids: torch.Tensor  # [S] int64
    positions: torch.Tensor  # [S] int64
    slots: torch.Tensor  # [S] int64
    items: WorkItems  # S*splits items of one query row each (tables [S*splits, W], lengths [S*splits])
    logits: torch.Tensor | None = None  # [S, V] float32, written by each replay
    graph: torch.cuda.CUDAGraph | None = None


class StaticDecodeAttention(AttentionBackend):
    """Attention of a static decode batch: the step's metadata is ignored, the buffers say it all."""

    def __init__(self, static: StaticDecodeBatch):
        self.static = static

    def forward(self, q, k, v, k_cache, v_cache, meta):
        write_kv(k, v, k_cache, v_cache, self.static.slots)
        part = run_items(q, k_cache, v_cache, self.static.items)
        if self.static.splits == 1:  # rows 0..S-1 in order, each whole: no merge
            return part.out.to(q.dtype)
        return merge_partials([part], self.static.size).out.to(q.dtype)


_NO_METADATA = AttentionMetadata([], torch.empty(0, dtype=torch.int64), [], [], None, None)


class DecodeGraphs:
    def __init__(self, model: LlamaModel, kv: KVCacheTensors, scratch_block: int, max_batch: int,
                 min_shared_tokens: int | None = None, splits: int | None = None):
        """scratch_block: a KV block no context holds. min_shared_tokens: the attention groups
        sequences sharing at least this many tokens (steps with such a group run eagerly).
        splits: KV chunks per sequence in every bucket (default: by bucket, to fill the GPU; 1 on a CPU)."""
        self.model, self.kv, self.scratch_block = model, kv, scratch_block
        self.min_shared_tokens = min_shared_tokens
        self.width = -(-model.config.max_position_embeddings // kv.block_size)
        self.buckets = sorted({b for b in BUCKETS if b < max_batch} | {max_batch})
        self.device = kv.layers[0][0].device
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count if self.device.type == "cuda" else 0
        self._static = {
            size: self._buffers(size, splits or (splits_for(size, model.config.num_kv_heads, sms) if sms else 1))
            for size in self.buckets
        }
        self.replays = 0
        if self.device.type == "cuda":
            self._capture_all()

    def takes(self, tables: list[list[int]], lengths: list[int]) -> bool:
        """Whether a decode step of these sequences runs from a static bucket."""
        if len(tables) > self.buckets[-1]:
            return False
        if self.min_shared_tokens is None:
            return True
        bs = self.kv.block_size
        return not plan_prefix_groups(tables, lengths, min_shared_blocks(self.min_shared_tokens, bs), bs).segments

    def run(self, token_ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]],
            lengths: list[int]) -> torch.Tensor:
        """One decode step of n sequences -> logits [n, V] (a view of the bucket's buffer, valid until the next run)."""
        n = len(token_ids)
        static = self._static[next(b for b in self.buckets if b >= n)]
        pad, splits, bs = static.size - n, static.splits, self.kv.block_size
        table = torch.zeros((static.size * splits, self.width), dtype=torch.int32)
        item_lengths = [0] * (static.size * splits)
        for i, (blocks, length) in enumerate(zip(tables, lengths)):
            chunk_blocks = -(-(-(-length // splits)) // bs)  # block-aligned chunk of ceil(length / splits) tokens
            for j in range(splits):
                first = j * chunk_blocks
                item_lengths[i * splits + j] = max(0, min(chunk_blocks * bs, length - first * bs))
                part = blocks[first : min(first + chunk_blocks, -(-length // bs))]
                table[i * splits + j, : len(part)] = torch.tensor(part, dtype=torch.int32)
        for i in range(n, static.size):  # padding rows: one token in the scratch block
            table[i * splits, 0], item_lengths[i * splits] = self.scratch_block, 1
        static.token_ids.copy_(torch.tensor(token_ids + [0] * pad))
        static.positions.copy_(torch.tensor(positions + [0] * pad))
        static.slots.copy_(torch.tensor(slots + [self.scratch_block * bs] * pad))
        static.items.tables.copy_(table)
        static.items.lengths.copy_(torch.tensor(item_lengths, dtype=torch.int32))
        if static.graph is not None:
            static.graph.replay()
        else:
            static.logits = self._forward(static)
        self.replays += 1
        return static.logits[:n]

    def _buffers(self, size: int, splits: int) -> StaticDecodeBatch:
        """Buffers in the padding state: every row a one-token sequence in the scratch block."""
        on = dict(device=self.device)
        items = size * splits
        table = torch.zeros((items, self.width), dtype=torch.int32, **on)
        lengths = torch.zeros(items, dtype=torch.int32, **on)
        table[::splits, 0], lengths[::splits] = self.scratch_block, 1
        rows = torch.arange(size, dtype=torch.int32, **on).repeat_interleave(splits)  # item k serves row k // splits
        work = WorkItems(rows, torch.arange(items, dtype=torch.int32, **on), torch.ones(items, dtype=torch.int32, **on),
                         table, lengths, max_q=1)
        return StaticDecodeBatch(
            size,
            splits,
            torch.zeros(size, dtype=torch.int64, **on),
            torch.zeros(size, dtype=torch.int64, **on),
            torch.full((size,), self.scratch_block * self.kv.block_size, dtype=torch.int64, **on),
            work,
        )

    def _forward(self, static: StaticDecodeBatch) -> torch.Tensor:
        batch = ForwardBatch(static.token_ids, static.positions, _NO_METADATA, torch.arange(static.size, device=self.device))
        return self.model.forward(batch, self.kv.layers, attention=StaticDecodeAttention(static))

    def _capture_all(self) -> None:
        """Largest bucket first, all in one memory pool (a smaller graph reuses the larger's blocks)."""
        pool = None
        for size in reversed(self.buckets):
            static = self._static[size]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: compiles the Triton kernel, sets up cuBLAS
                for _ in range(2):
                    self._forward(static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                static.logits = self._forward(static)
            static.graph, pool = graph, graph.pool()
        torch.cuda.synchronize()
