"""The simulated engine's contexts: a tree of token counts, and the KV they hold.

A child context forks from its parent at the parent's current length: it sees those
tokens without computing or storing them again (the copy-free fork of a paged KV
cache). KV is counted in tokens. A freed context whose children still live keeps its
KV until the last child is freed, as refcounted KV blocks would.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from parrot.errors import ContextError


@dataclass(eq=False)
class SimContext:
    context_id: str
    parent: SimContext | None
    fork_point: int  # tokens seen through the parent chain
    own_tokens: int = 0  # tokens appended to this context (prompt and generated)
    computed: int = 0  # own tokens whose KV exists; the rest wait for a prefill
    children: int = 0  # contexts forked from this one and not yet released
    freed: bool = False

    @property
    def length(self) -> int:
        return self.fork_point + self.own_tokens

    @property
    def pending(self) -> int:
        return self.own_tokens - self.computed

    def segments(self, computed: int) -> Iterator[tuple[SimContext, int]]:
        """(context, its tokens seen) down the chain, for a job that has `computed` own tokens."""
        node, seen = self, computed
        while node is not None:
            yield node, seen
            if node.parent is not None:
                seen = node.fork_point - node.parent.fork_point
            node = node.parent


class ContextTree:
    def __init__(self, capacity_tokens: int | None):
        self.capacity = capacity_tokens
        self.live: dict[str, SimContext] = {}
        self._held: set[SimContext] = set()  # live contexts and freed ones children still need
        self.kv_used = 0
        self.kv_peak = 0

    @property
    def kv_free(self) -> float:
        return float("inf") if self.capacity is None else self.capacity - self.kv_used

    def get(self, context_id: str) -> SimContext:
        ctx = self.live.get(context_id)
        if ctx is None:
            raise ContextError(f"unknown context {context_id!r}")
        return ctx

    def create(self, context_id: str, parent_id: str | None) -> SimContext:
        if context_id in self.live:
            raise ContextError(f"context {context_id!r} already exists")
        parent = self.get(parent_id) if parent_id is not None else None
        ctx = SimContext(context_id, parent, parent.length if parent else 0)
        if parent is not None:
            parent.children += 1
        self.live[context_id] = ctx
        self._held.add(ctx)
        return ctx

    def compute(self, ctx: SimContext, tokens: int) -> None:
        """Marks `tokens` more of ctx's own tokens computed: their KV now takes room."""
        assert 0 <= tokens <= ctx.pending
        ctx.computed += tokens
        self.kv_used += tokens
        self.kv_peak = max(self.kv_peak, self.kv_used)

    def evict(self, ctx: SimContext) -> int:
        """Drops ctx's own KV (preemption): its tokens must be prefilled again. Returns tokens freed."""
        assert ctx.children == 0, "a context's children read its KV; it cannot be evicted"
        freed, ctx.computed = ctx.computed, 0
        self.kv_used -= freed
        return freed

    def free(self, context_id: str) -> None:
        ctx = self.get(context_id)
        del self.live[context_id]
        ctx.freed = True
        # release up the chain while nothing references a freed context any more
        node = ctx
        while node is not None and node.freed and node.children == 0 and node in self._held:
            self._held.discard(node)
            self.kv_used -= node.computed
            node.computed = 0
            if node.parent is not None:
                node.parent.children -= 1
            node = node.parent

    def check_integrity(self) -> None:
        assert self.kv_used == sum(c.computed for c in self._held), "KV count drifted"
        assert self.capacity is None or self.kv_used <= self.capacity, "KV over capacity"
        for ctx in self._held:
            assert 0 <= ctx.computed <= ctx.own_tokens
            assert ctx.children == sum(1 for c in self._held if c.parent is ctx), f"{ctx.context_id}: child count"
            assert ctx.parent is None or ctx.parent in self._held, f"{ctx.context_id}: parent released early"
        assert set(self.live.values()) <= self._held
