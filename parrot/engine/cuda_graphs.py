"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step on a GPU is a few kernels per layer for a handful of rows: launching them from
Python costs more than running them. So the whole forward of a decode batch is captured once
per bucket over static buffers; a step copies its inputs into the smallest bucket that holds
it (padding rows write their KV into a scratch block past the pool's and read it back) and
replays the graph. Attention inside is the work-item kernel with a fixed number of items per
sequence (a graph fixes the launch grid): each reads one of `splits` block-aligned chunks of
the sequence's KV, empty ones included, and the parts merge by log-sum-exp inside the graph.
Small buckets get more splits, so that a few long sequences still spread over the GPU
(flash-decoding). Steps whose sequences share a long prefix replay a second graph per bucket
that also holds a fixed number of shared items: each reads a chunk of a shared segment once for
all its members (padding items of no tokens fill the rest), and each sequence's own items read
only its suffix. Only a step with more segments than shared items runs eagerly.

On the CPU the same static path runs without capture, which is how tests check the buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parrot.engine.attention import AttentionBackend, AttentionMetadata, write_kv
from parrot.engine.model import ForwardBatch, LlamaModel
from parrot.engine.model_runner import KVCacheTensors
from parrot.engine.prefix_plan import PrefixPlan, SequenceParts, min_shared_blocks, plan_prefix_groups
from parrot.engine.shared_prefix_attention import merge_partials
from parrot.engine.triton_attention import WorkItems, run_items

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
PROGRAMS_PER_SM = 2  # kernel programs (item x KV head) wanted per multiprocessor at least
MAX_SPLITS = 16
MAX_SHARED_ITEMS = 16  # shared-segment chunks a static step holds (a prefix of 8k tokens: chunks of 512)


def bucket_sizes(max_batch: int) -> list[int]:
    """The batch sizes a graph is captured for: the standard ones below max_batch, and max_batch."""
    return sorted({b for b in BUCKETS if b < max_batch} | {max_batch})


@dataclass(frozen=True)
class GraphMemory:
    """What captured decode graphs keep or need beyond an eager step, for sizing the KV pool
    before they are captured (the pool is sized first; a capture that finds no memory fails)."""

    part_rows: int  # float32 attention parts of the largest static step: (shared items + splits) per sequence
    logits_rows: int  # float32 logits rows the graphs keep: each graph's output outlives its capture


def graph_memory(max_batch: int, shared: bool) -> GraphMemory:
    """The GraphMemory of DecodeGraphs(max_batch) with shared buckets or without."""
    sizes = bucket_sizes(max_batch)
    per_row = MAX_SPLITS + (MAX_SHARED_ITEMS if shared else 0)
    shared_rows = sum(size for size in sizes if size > 1) if shared else 0
    return GraphMemory(per_row * max_batch, sum(sizes) + shared_rows)


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
    # shared-segment items: 2*C items over C*S part rows, C = the chunks a step may hold; None: a plain bucket
    shared: WorkItems | None = None
    logits: torch.Tensor | None = None  # [S, V] float32, written by each replay
    graph: torch.cuda.CUDAGraph | None = None


class StaticDecodeAttention(AttentionBackend):
    """Attention of a static decode batch: the step's metadata is ignored, the buffers say it all."""

    def __init__(self, static: StaticDecodeBatch):
        self.static = static

    def forward(self, q, k, v, k_cache, v_cache, meta):
        write_kv(k, v, k_cache, v_cache, self.static.slots)
        parts = [run_items(q, k_cache, v_cache, self.static.items)]
        if self.static.shared is not None:
            parts.append(run_items(q, k_cache, v_cache, self.static.shared))
        if len(parts) == 1 and self.static.splits == 1:  # rows 0..S-1 in order, each whole: no merge
            return parts[0].out.to(q.dtype)
        return merge_partials(parts, self.static.size).out.to(q.dtype)


_NO_METADATA = AttentionMetadata([], torch.empty(0, dtype=torch.int64), [], [], None, None)


class DecodeGraphs:
    def __init__(self, model: LlamaModel, kv: KVCacheTensors, scratch_block: int, max_batch: int,
                 min_shared_tokens: int | None = None, splits: int | None = None):
        """scratch_block: a KV block no context holds. min_shared_tokens: the attention groups
        sequences sharing at least this many tokens (steps with such a group replay the shared buckets).
        splits: KV chunks per sequence in every bucket (default: by bucket, to fill the GPU; 1 on a CPU)."""
        self.model, self.kv, self.scratch_block = model, kv, scratch_block
        self.min_shared_tokens = min_shared_tokens
        self.width = -(-model.config.max_position_embeddings // kv.block_size)
        self.buckets = bucket_sizes(max_batch)
        self.device = kv.layers[0][0].device
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count if self.device.type == "cuda" else 0
        splits_of = {size: splits or (splits_for(size, model.config.num_kv_heads, sms) if sms else 1) for size in self.buckets}
        self._static = {size: self._buffers(size, splits_of[size]) for size in self.buckets}
        # a segment has two members at least: no shared bucket of one row
        self._shared = {} if min_shared_tokens is None else {
            size: self._buffers(size, splits_of[size], shared=True) for size in self.buckets if size > 1}
        self.replays = 0
        self.shared_replays = 0
        if self.device.type == "cuda":
            self._capture_all()

    def plan(self, tables: list[list[int]], lengths: list[int]) -> PrefixPlan | None:
        """How a decode step of these sequences runs from a static bucket (its shared segments,
        none for a plain step), or None when it must run eagerly."""
        bs = self.kv.block_size
        if len(tables) > self.buckets[-1]:
            return None
        if self.min_shared_tokens is None:
            return PrefixPlan(bs, [], [SequenceParts([], 0, n) for n in lengths])
        plan = plan_prefix_groups(tables, lengths, min_shared_blocks(self.min_shared_tokens, bs), bs)
        return plan if len(plan.segments) <= MAX_SHARED_ITEMS else None

    def run(self, token_ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]],
            plan: PrefixPlan) -> torch.Tensor:
        """One decode step of n sequences, planned by `plan` -> logits [n, V] (a view of the
        bucket's buffer, valid until the next run)."""
        n = len(token_ids)
        size = next(b for b in self.buckets if b >= n)
        static = self._shared[size] if plan.segments else self._static[size]
        pad, splits, bs = static.size - n, static.splits, self.kv.block_size
        table = torch.zeros((static.size * splits, self.width), dtype=torch.int32)
        item_lengths = [0] * (static.size * splits)
        for i, (blocks, parts) in enumerate(zip(tables, plan.sequences)):
            # the sequence's own items read what no shared segment covers: its suffix, block-aligned
            blocks, length = blocks[parts.suffix_start // bs :], parts.suffix_len
            chunk_tokens = -(-length // splits)
            chunk_blocks = -(-chunk_tokens // bs)  # block-aligned chunks of at least ceil(length / splits) tokens
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
        if plan.segments:
            self._fill_shared(static.shared, plan, static.size)
            self.shared_replays += 1
        if static.graph is not None:
            static.graph.replay()
        else:
            static.logits = self._forward(static)
        self.replays += 1
        return static.logits[:n]

    def _fill_shared(self, shared: WorkItems, plan: PrefixPlan, size: int) -> None:
        """Writes the step's shared items: each segment in at most C // (segments) chunks, then
        padding items of no tokens (output 0, weight 0 in the merge) over the part rows left, so
        that every part row is written; the items after those take no rows."""
        capacity, bs = shared.q_start.numel() // 2, self.kv.block_size
        per_segment = capacity // len(plan.segments)
        entries: list[tuple[list[int], list[int]]] = []  # (member rows, blocks)
        for segment in plan.segments:
            chunk = -(-len(segment.block_ids) // per_segment)
            entries += [(segment.members, segment.block_ids[j : j + chunk]) for j in range(0, len(segment.block_ids), chunk)]
        left = capacity * size - sum(len(members) for members, _ in entries)
        while left > 0:
            entries.append(([0] * min(size, left), []))
            left -= min(size, left)
        rows, starts, counts, lengths = [], [], [], []
        table = torch.zeros((2 * capacity, self.width), dtype=torch.int32)
        for i, (members, blocks) in enumerate(entries):
            starts.append(len(rows))
            counts.append(len(members))
            lengths.append(len(blocks) * bs)
            rows += members
            table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        unused = 2 * capacity - len(entries)
        shared.q_rows.copy_(torch.tensor(rows, dtype=torch.int32))
        shared.q_start.copy_(torch.tensor(starts + [len(rows)] * unused, dtype=torch.int32))
        shared.q_count.copy_(torch.tensor(counts + [0] * unused, dtype=torch.int32))
        shared.lengths.copy_(torch.tensor(lengths + [0] * unused, dtype=torch.int32))
        shared.tables.copy_(table)

    def _buffers(self, size: int, splits: int, shared: bool = False) -> StaticDecodeBatch:
        """Buffers in the padding state: every row a one-token sequence in the scratch block,
        the shared items (if any) all padding."""
        on = dict(device=self.device)
        items = size * splits
        table = torch.zeros((items, self.width), dtype=torch.int32, **on)
        lengths = torch.zeros(items, dtype=torch.int32, **on)
        table[::splits, 0], lengths[::splits] = self.scratch_block, 1
        rows = torch.arange(size, dtype=torch.int32, **on).repeat_interleave(splits)  # item k serves row k // splits
        work = WorkItems(rows, torch.arange(items, dtype=torch.int32, **on), torch.ones(items, dtype=torch.int32, **on),
                         table, lengths, max_q=1)
        shared_items = None
        if shared:
            chunks = MAX_SHARED_ITEMS
            counts = torch.cat([torch.full((chunks,), size), torch.zeros(chunks)]).to(dtype=torch.int32, **on)
            shared_items = WorkItems(torch.zeros(chunks * size, dtype=torch.int32, **on),
                                     (torch.arange(2 * chunks, **on).clamp(max=chunks) * size).to(torch.int32),
                                     counts, torch.zeros((2 * chunks, self.width), dtype=torch.int32, **on),
                                     torch.zeros(2 * chunks, dtype=torch.int32, **on), max_q=size)
        return StaticDecodeBatch(
            size,
            splits,
            torch.zeros(size, dtype=torch.int64, **on),
            torch.zeros(size, dtype=torch.int64, **on),
            torch.full((size,), self.scratch_block * self.kv.block_size, dtype=torch.int64, **on),
            work,
            shared_items,
        )

    def _forward(self, static: StaticDecodeBatch) -> torch.Tensor:
        batch = ForwardBatch(static.token_ids, static.positions, _NO_METADATA, torch.arange(static.size, device=self.device))
        return self.model.forward(batch, self.kv.layers, attention=StaticDecodeAttention(static))

    def _capture_all(self) -> None:
        """Largest bucket first, all in one memory pool (a smaller graph reuses the larger's blocks)."""
        pool = None
        for static in [buffers[size] for size in reversed(self.buckets) for buffers in (self._static, self._shared) if size in buffers]:
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
