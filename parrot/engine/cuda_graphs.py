"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step on a GPU is a few kernels per layer for a handful of rows: launching them from
Python costs more than running them. So the whole forward of a decode batch is captured once
per bucket over static buffers; a step copies its inputs into the smallest bucket that holds
it (padding rows write their KV into a scratch block past the pool's and read it back) and
replays the graph. Attention inside is the work-item kernel with one item per sequence over
its whole KV, since a graph fixes the launch grid. Steps whose sequences share a long prefix
run eagerly instead, where the shared segment is read once for all of them.

On the CPU the same static path runs without capture, which is how tests check the buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parrot.engine.attention import AttentionBackend, AttentionMetadata, write_kv
from parrot.engine.model import ForwardBatch, LlamaModel
from parrot.engine.model_runner import KVCacheTensors
from parrot.engine.prefix_plan import plan_prefix_groups
from parrot.engine.triton_attention import WorkItems, run_items

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass
class StaticDecodeBatch:
    """One bucket's buffers: what a replay reads and the logits it writes."""

    size: int
    token_ids: torch.Tensor  # [S] int64
    positions: torch.Tensor  # [S] int64
    slots: torch.Tensor  # [S] int64
    items: WorkItems  # item i: row i over its sequence's blocks (tables [S, W], lengths [S])
    logits: torch.Tensor | None = None  # [S, V] float32, written by each replay
    graph: torch.cuda.CUDAGraph | None = None


class StaticDecodeAttention(AttentionBackend):
    """Attention of a static decode batch: the step's metadata is ignored, the buffers say it all."""

    def __init__(self, static: StaticDecodeBatch):
        self.static = static

    def forward(self, q, k, v, k_cache, v_cache, meta):
        write_kv(k, v, k_cache, v_cache, self.static.slots)
        part = run_items(q, k_cache, v_cache, self.static.items)  # rows 0..S-1, each whole: no merge
        return part.out.to(q.dtype)


_NO_METADATA = AttentionMetadata([], torch.empty(0, dtype=torch.int64), [], [], None, None)


class DecodeGraphs:
    def __init__(self, model: LlamaModel, kv: KVCacheTensors, scratch_block: int, max_batch: int,
                 min_shared_tokens: int | None = None):
        """scratch_block: a KV block no context holds. min_shared_tokens: the attention groups
        sequences sharing at least this many tokens (steps with such a group run eagerly)."""
        self.model, self.kv, self.scratch_block = model, kv, scratch_block
        self.min_shared_tokens = min_shared_tokens
        self.width = -(-model.config.max_position_embeddings // kv.block_size)
        self.buckets = sorted({b for b in BUCKETS if b < max_batch} | {max_batch})
        self.device = kv.layers[0][0].device
        self._static = {size: self._buffers(size) for size in self.buckets}
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
        return not plan_prefix_groups(tables, lengths, max(1, -(-self.min_shared_tokens // bs)), bs).segments

    def run(self, token_ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]],
            lengths: list[int]) -> torch.Tensor:
        """One decode step of n sequences -> logits [n, V] (a view of the bucket's buffer, valid until the next run)."""
        n = len(token_ids)
        static = self._static[next(b for b in self.buckets if b >= n)]
        pad = static.size - n
        bs = self.kv.block_size
        rows = [t[: -(-length // bs)] for t, length in zip(tables, lengths)]
        table = torch.zeros((static.size, self.width), dtype=torch.int32)
        for i, blocks in enumerate(rows):
            table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        table[n:, 0] = self.scratch_block
        static.token_ids.copy_(torch.tensor(token_ids + [0] * pad))
        static.positions.copy_(torch.tensor(positions + [0] * pad))
        static.slots.copy_(torch.tensor(slots + [self.scratch_block * bs] * pad))
        static.items.tables.copy_(table)
        static.items.lengths.copy_(torch.tensor(lengths + [1] * pad, dtype=torch.int32))
        if static.graph is not None:
            static.graph.replay()
        else:
            static.logits = self._forward(static)
        self.replays += 1
        return static.logits[:n]

    def _buffers(self, size: int) -> StaticDecodeBatch:
        """Buffers in the padding state: every row a one-token sequence in the scratch block."""
        on = dict(device=self.device)
        rows = torch.arange(size, dtype=torch.int32, **on)
        table = torch.zeros((size, self.width), dtype=torch.int32, **on)
        table[:, 0] = self.scratch_block
        items = WorkItems(rows, rows.clone(), torch.ones(size, dtype=torch.int32, **on), table,
                          torch.ones(size, dtype=torch.int32, **on), max_q=1)
        return StaticDecodeBatch(
            size,
            torch.zeros(size, dtype=torch.int64, **on),
            torch.zeros(size, dtype=torch.int64, **on),
            torch.full((size,), self.scratch_block * self.kv.block_size, dtype=torch.int64, **on),
            items,
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
