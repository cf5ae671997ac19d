"""Paged KV memory: a pool of fixed-size blocks and a tree of forkable contexts.

A context is a token sequence whose KV lives in blocks listed by its block table.
A child forks from its parent by sharing the parent's blocks (reference counts, no
copy); whoever writes into a block that someone else also holds copies it first
(copy-on-write), so a shared block is never changed under its other holders.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from parrot.errors import ContextError


class OutOfBlocksError(Exception):
    """No free block right now; the caller queues or preempts and tries later."""


class BlockPool:
    """Reference-counted fixed-size blocks; block ids index the KV tensors."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("a block pool needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._refcount = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise OutOfBlocksError()
        block = self._free.pop()
        self._refcount[block] = 1
        return block

    def share(self, block: int) -> None:
        assert self._refcount[block] > 0, f"sharing free block {block}"
        self._refcount[block] += 1

    def release(self, block: int) -> None:
        assert self._refcount[block] > 0, f"double free of block {block}"
        self._refcount[block] -= 1
        if self._refcount[block] == 0:
            self._free.append(block)

    def refcount(self, block: int) -> int:
        return self._refcount[block]


@dataclass(eq=False)
class Context:
    """A node of the context tree.

    token_ids are all tokens of the sequence (the parent's first); the first
    num_computed of them have KV in the blocks of block_table.
    """

    context_id: str
    parent: Context | None
    token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    fork_point: int = 0
    children: set[str] = field(default_factory=set)
    freed: bool = False

    @property
    def num_pending(self) -> int:
        return len(self.token_ids) - self.num_computed


class ContextTable:
    """All contexts of an engine and the block accounting behind them."""

    def __init__(self, pool: BlockPool, copy_block: Callable[[int, int], None]):
        self.pool = pool
        self._copy_block = copy_block  # copies the KV of block src into block dst
        self._contexts: dict[str, Context] = {}

    def __contains__(self, context_id: str) -> bool:
        return context_id in self._contexts

    def __len__(self) -> int:
        return len(self._contexts)

    def items(self):
        return self._contexts.items()

    def get(self, context_id: str) -> Context:
        try:
            return self._contexts[context_id]
        except KeyError:
            raise ContextError(f"unknown context {context_id!r}") from None

    def create(self, context_id: str, parent_id: str | None, upto: int | None = None) -> Context:
        """A new context, forked from the parent's tokens (the first `upto` of them, a
        whole number of blocks, when given) if there is a parent."""
        if context_id in self._contexts:
            raise ContextError(f"context {context_id!r} already exists")
        parent = self.get(parent_id) if parent_id is not None else None
        ctx = Context(context_id, parent)
        if parent is not None:
            if parent.num_pending and upto is None:
                raise ContextError(f"context {parent_id!r} is still being filled; fork after its fill completes")
            upto = parent.num_computed if upto is None else upto
            assert upto <= parent.num_computed and (upto == parent.num_computed or upto % self.pool.block_size == 0)
            ctx.token_ids = list(parent.token_ids[:upto])
            ctx.block_table = list(parent.block_table[: -(-upto // self.pool.block_size)])
            ctx.num_computed = ctx.fork_point = upto
            for block in ctx.block_table:
                self.pool.share(block)
            parent.children.add(context_id)
        self._contexts[context_id] = ctx
        return ctx

    def _shared_blocks_touched(self, ctx: Context, num_tokens: int) -> list[int]:
        """Indices in ctx.block_table of existing blocks that the write would touch and others also hold."""
        bs = self.pool.block_size
        first = ctx.num_computed // bs
        last = min(len(ctx.block_table), -(-(ctx.num_computed + num_tokens) // bs))
        return [i for i in range(first, last) if self.pool.refcount(ctx.block_table[i]) > 1]

    def blocks_needed(self, ctx: Context, num_tokens: int) -> int:
        """Fresh blocks that writing num_tokens more KV entries into ctx would take."""
        end = ctx.num_computed + num_tokens
        grow = max(-(-end // self.pool.block_size) - len(ctx.block_table), 0)
        return grow + len(self._shared_blocks_touched(ctx, num_tokens))

    def reserve_slots(self, ctx: Context, num_tokens: int) -> list[int]:
        """Makes room for the next num_tokens KV entries; returns their slot ids.

        Shared blocks in the way are copied first (copy-on-write). Raises
        OutOfBlocksError with nothing changed when the pool cannot supply it.
        """
        if self.blocks_needed(ctx, num_tokens) > self.pool.num_free:
            raise OutOfBlocksError()
        bs = self.pool.block_size
        for index in self._shared_blocks_touched(ctx, num_tokens):
            shared = ctx.block_table[index]
            private = self.pool.allocate()
            self._copy_block(shared, private)
            self.pool.release(shared)
            ctx.block_table[index] = private
        start = ctx.num_computed
        while len(ctx.block_table) * bs < start + num_tokens:
            ctx.block_table.append(self.pool.allocate())
        return [ctx.block_table[pos // bs] * bs + pos % bs for pos in range(start, start + num_tokens)]

    def private_from(self, ctx: Context) -> int:
        """Index in ctx.block_table of the first block that ctx alone holds.

        Holders of a context's blocks (ancestors, descendants) each hold a prefix of its
        table, so every block from this index on is private to ctx.
        """
        for index, block in enumerate(ctx.block_table):
            if self.pool.refcount(block) == 1:
                return index
        return len(ctx.block_table)

    def evict_private(self, ctx: Context) -> int:
        """Preemption: drop every block ctx alone holds (its KV there is recomputed later). Returns blocks freed.

        A copy-on-write copy of the block at the fork point goes too, so eviction gives
        back all that ctx holds privately; the few tokens of that block are recomputed.
        """
        keep = self.private_from(ctx)
        dropped = ctx.block_table[keep:]
        for block in reversed(dropped):  # last first: the pool hands them out again in ascending order
            self.pool.release(block)
        ctx.block_table = ctx.block_table[:keep]
        ctx.num_computed = min(ctx.num_computed, keep * self.pool.block_size)
        return len(dropped)

    def truncate(self, ctx: Context, length: int) -> None:
        """Forgets ctx's tokens from `length` on (a generation cut by a stop string); the
        blocks past its computed KV go back to the pool. The cut lies in ctx's own tokens
        and no fork reads them (forks at or before it, such as its cached prompt, may stay)."""
        if self.forked_past(ctx, length) or not ctx.fork_point <= length <= len(ctx.token_ids):
            raise ContextError(f"context {ctx.context_id!r} cannot be cut at token {length}")
        del ctx.token_ids[length:]
        ctx.num_computed = min(ctx.num_computed, length)
        keep = -(-ctx.num_computed // self.pool.block_size)
        for block in reversed(ctx.block_table[keep:]):
            self.pool.release(block)
        ctx.block_table = ctx.block_table[:keep]

    def forked_past(self, ctx: Context, position: int) -> bool:
        """Whether a fork of ctx reads its tokens from `position` on."""
        return any(self._contexts[child].fork_point > position for child in ctx.children)

    def free(self, context_id: str) -> None:
        ctx = self.get(context_id)
        # last first: the pool (last in, first out) hands them out again in ascending order, and
        # the CPU attention reads a run of ascending, consecutive blocks in place, not gathered
        for block in reversed(ctx.block_table):
            self.pool.release(block)
        # ctx.block_table is left as it was: a forward step in flight may still be reading it
        # (its KV writes land in blocks that nobody can allocate before the step ends)
        ctx.freed = True
        if ctx.parent is not None:
            ctx.parent.children.discard(context_id)
        del self._contexts[context_id]

    def check_integrity(self) -> None:
        """Asserts that every block's reference count equals its holders and free blocks are held by none."""
        expected = [0] * self.pool.num_blocks
        for ctx in self._contexts.values():
            assert ctx.num_computed <= len(ctx.token_ids), f"{ctx.context_id}: computed past its tokens"
            assert len(ctx.block_table) * self.pool.block_size >= ctx.num_computed, f"{ctx.context_id}: KV without blocks"
            for block in ctx.block_table:
                expected[block] += 1
        free = set(self.pool._free)
        assert len(free) == len(self.pool._free), "a block is on the free list twice"
        for block in range(self.pool.num_blocks):
            assert self.pool.refcount(block) == expected[block], f"block {block}: refcount {self.pool.refcount(block)} != holders {expected[block]}"
            assert (block in free) == (expected[block] == 0), f"block {block}: free-list membership disagrees with holders"
