"""Block pool and context tree: sharing, copy-on-write, eviction, and that no block is ever lost.

A fake KV store stands in for the tensors: each slot records which token was written
there, and copy_block copies a block's slots, so the tests can check that every
context always reads its own tokens, whatever its relatives write.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from parrot.engine.kv_cache import BlockPool, ContextTable, OutOfBlocksError
from parrot.errors import ContextError


class FakeKV:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.slots: list[int | None] = [None] * (num_blocks * block_size)
        self.copies: list[tuple[int, int]] = []

    def copy_block(self, src: int, dst: int) -> None:
        self.copies.append((src, dst))
        bs = self.block_size
        self.slots[dst * bs : (dst + 1) * bs] = self.slots[src * bs : (src + 1) * bs]


def make_table(num_blocks: int = 8, block_size: int = 4) -> tuple[ContextTable, FakeKV]:
    kv = FakeKV(num_blocks, block_size)
    return ContextTable(BlockPool(num_blocks, block_size), kv.copy_block), kv


def compute(table: ContextTable, kv: FakeKV, ctx, num_tokens: int) -> None:
    """What a forward step does: reserve slots, write the tokens' KV, advance."""
    slots = table.reserve_slots(ctx, num_tokens)
    for slot, token in zip(slots, ctx.token_ids[ctx.num_computed : ctx.num_computed + num_tokens]):
        kv.slots[slot] = token
    ctx.num_computed += num_tokens


def visible_kv(table: ContextTable, kv: FakeKV, ctx) -> list[int | None]:
    bs = table.pool.block_size
    return [kv.slots[ctx.block_table[pos // bs] * bs + pos % bs] for pos in range(ctx.num_computed)]


def filled(table, kv, context_id, tokens, parent=None):
    ctx = table.create(context_id, parent)
    ctx.token_ids.extend(tokens)
    compute(table, kv, ctx, ctx.num_pending)
    return ctx


# ---- unit tests --------------------------------------------------------------------


def test_block_pool_validates_and_counts():
    with pytest.raises(ValueError):
        BlockPool(0, 16)
    pool = BlockPool(3, 2)
    blocks = [pool.allocate() for _ in range(3)]
    assert sorted(blocks) == [0, 1, 2] and pool.num_free == 0
    with pytest.raises(OutOfBlocksError):
        pool.allocate()
    pool.share(blocks[0])
    pool.release(blocks[0])
    assert pool.num_free == 0 and pool.refcount(blocks[0]) == 1
    pool.release(blocks[0])
    assert pool.num_free == 1
    with pytest.raises(AssertionError):
        pool.release(blocks[0])  # double free


def test_fork_shares_blocks_and_copies_only_the_partial_block_on_write():
    table, kv = make_table(num_blocks=8, block_size=4)
    parent = filled(table, kv, "p", [1, 2, 3, 4, 5, 6])  # one full block and one partial
    child = table.create("c", "p")
    assert child.block_table == parent.block_table and table.pool.num_free == 6
    assert child.fork_point == 6 and child.token_ids == parent.token_ids
    child.token_ids.append(70)
    compute(table, kv, child, 1)
    assert kv.copies == [(parent.block_table[1], child.block_table[1])], "only the shared partial block is copied"
    assert child.block_table[0] == parent.block_table[0], "the full block stays shared"
    parent.token_ids.append(60)
    compute(table, kv, parent, 1)  # the parent's block is no longer shared: no copy
    assert len(kv.copies) == 1
    assert visible_kv(table, kv, parent) == [1, 2, 3, 4, 5, 6, 60]
    assert visible_kv(table, kv, child) == [1, 2, 3, 4, 5, 6, 70]
    table.check_integrity()


def test_out_of_blocks_changes_nothing():
    table, kv = make_table(num_blocks=2, block_size=4)
    ctx = filled(table, kv, "a", [1, 2, 3, 4, 5])
    twin = table.create("b", "a")
    before = (list(ctx.block_table), list(twin.block_table), table.pool.num_free)
    twin.token_ids.extend(range(10, 20))
    with pytest.raises(OutOfBlocksError):
        table.reserve_slots(twin, 10)
    assert (list(ctx.block_table), list(twin.block_table), table.pool.num_free) == before
    assert kv.copies == []
    table.check_integrity()


def test_evict_private_gives_back_every_private_block_and_keeps_the_shared_ones():
    table, kv = make_table(num_blocks=8, block_size=4)
    parent = filled(table, kv, "p", [1, 2, 3, 4, 5, 6])
    child = table.create("c", "p")
    child.token_ids.extend([7, 8, 9, 10, 11])
    compute(table, kv, child, 5)  # copies the partial block at the fork point, adds one more
    free_before = table.pool.num_free
    freed = table.evict_private(child)
    assert freed == 2 and table.pool.num_free == free_before + 2, "the copy of the fork-point block goes too"
    assert child.block_table == parent.block_table[:1], "the full shared block stays"
    assert child.num_computed == 4 and child.num_pending == 7, "evicted tokens are kept, to be recomputed"
    compute(table, kv, child, 7)
    assert visible_kv(table, kv, child) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert visible_kv(table, kv, parent) == [1, 2, 3, 4, 5, 6]
    assert table.evict_private(parent) == 1, "the parent's partial block is its own since the child copied it"
    table.check_integrity()


def test_evicting_a_context_whose_blocks_are_all_shared_frees_nothing():
    table, kv = make_table(num_blocks=8, block_size=4)
    parent = filled(table, kv, "p", [1, 2, 3, 4, 5, 6])
    table.create("c", "p")
    assert table.private_from(parent) == 2
    assert table.evict_private(parent) == 0 and parent.num_computed == 6
    table.check_integrity()


def test_free_parent_keeps_children_and_freeing_all_returns_every_block():
    table, kv = make_table(num_blocks=8, block_size=4)
    filled(table, kv, "p", [1, 2, 3, 4, 5])
    child = filled(table, kv, "c", [6, 7], parent="p")
    table.free("p")
    assert "p" not in table and "c" in table
    table.check_integrity()
    assert visible_kv(table, kv, child) == [1, 2, 3, 4, 5, 6, 7]
    with pytest.raises(ContextError):
        table.create("g", "p")
    table.free("c")
    assert table.pool.num_free == 8 and len(table) == 0
    with pytest.raises(ContextError):
        table.free("c")


def test_blocks_given_back_come_out_again_in_ascending_order():
    """The CPU attention reads a context's KV in place only where its blocks are ascending and
    consecutive: a context that takes blocks another gave back gets them in that order."""
    table, kv = make_table(num_blocks=8, block_size=4)
    first = filled(table, kv, "a", list(range(12)))
    assert first.block_table == [0, 1, 2]
    table.free("a")
    assert filled(table, kv, "b", list(range(16))).block_table == [0, 1, 2, 3]
    evicted = filled(table, kv, "c", list(range(12)))
    table.evict_private(evicted)
    assert filled(table, kv, "d", list(range(8))).block_table == [4, 5]
    table.truncate(table.get("b"), 4)
    assert filled(table, kv, "e", list(range(12))).block_table == [1, 2, 3]


def test_fork_of_a_context_being_filled_is_refused():
    table, kv = make_table()
    ctx = table.create("p", None)
    ctx.token_ids.extend([1, 2, 3])
    with pytest.raises(ContextError, match="being filled"):
        table.create("c", "p")
    with pytest.raises(ContextError, match="already exists"):
        table.create("p", None)
    table.free("p")


# ---- random operation sequences --------------------------------------------------------


class ContextTableMachine(RuleBasedStateMachine):
    """Random create / fork / append / compute / evict / truncate / free; the books always balance."""

    contexts = Bundle("contexts")

    def __init__(self):
        super().__init__()
        self.table, self.kv = make_table(num_blocks=12, block_size=3)
        self.counter = 0
        self.live: set[str] = set()

    def _new_id(self) -> str:
        self.counter += 1
        return f"ctx-{self.counter}"

    @rule(target=contexts, tokens=st.lists(st.integers(0, 999), max_size=10), fill=st.booleans())
    def create_root(self, tokens, fill):
        context_id = self._new_id()
        ctx = self.table.create(context_id, None)
        ctx.token_ids.extend(tokens)
        self.live.add(context_id)
        if fill:
            self._compute(ctx, ctx.num_pending)
        return context_id

    @rule(target=contexts, parent=contexts)
    def fork(self, parent):
        if parent not in self.live:
            return parent
        if self.table.get(parent).num_pending:
            with pytest.raises(ContextError):
                self.table.create("never", parent)
            return parent
        context_id = self._new_id()
        self.table.create(context_id, parent)
        self.live.add(context_id)
        return context_id

    @rule(context_id=contexts, tokens=st.lists(st.integers(0, 999), min_size=1, max_size=6))
    def append(self, context_id, tokens):
        if context_id in self.live:
            self.table.get(context_id).token_ids.extend(tokens)

    @rule(context_id=contexts, fraction=st.floats(0.1, 1.0))
    def compute_some(self, context_id, fraction):
        """A prefill chunk (or a decode step, for one pending token)."""
        if context_id in self.live:
            ctx = self.table.get(context_id)
            self._compute(ctx, max(1, int(ctx.num_pending * fraction)) if ctx.num_pending else 0)

    @rule(target=contexts, parent=contexts, tokens=st.lists(st.integers(0, 999), max_size=5))
    def fork_and_fill(self, parent, tokens):
        """The engine's fill with a parent: fork, append, compute all."""
        if parent not in self.live or self.table.get(parent).num_pending:
            return parent
        context_id = self._new_id()
        ctx = self.table.create(context_id, parent)
        self.live.add(context_id)
        ctx.token_ids.extend(tokens)
        self._compute(ctx, ctx.num_pending)
        return context_id

    def _compute(self, ctx, num_tokens):
        if num_tokens == 0:
            return
        before = (list(ctx.block_table), ctx.num_computed, self.table.pool.num_free)
        needed = self.table.blocks_needed(ctx, num_tokens)
        try:
            compute(self.table, self.kv, ctx, num_tokens)
        except OutOfBlocksError:
            assert needed > before[2], "refused although enough blocks were free"
            assert (list(ctx.block_table), ctx.num_computed, self.table.pool.num_free) == before
        else:
            assert needed <= before[2]
            assert self.table.pool.num_free == before[2] - needed, "blocks_needed predicts what reserve_slots takes"

    @rule(context_id=contexts)
    def evict(self, context_id):
        if context_id in self.live:
            ctx = self.table.get(context_id)
            free_before = self.table.pool.num_free
            computed_before = ctx.num_computed
            freed = self.table.evict_private(ctx)
            assert self.table.pool.num_free - free_before == freed, "every dropped block was private"
            assert self.table.private_from(ctx) == len(ctx.block_table), "no private block is left"
            assert ctx.num_computed <= computed_before

    @rule(context_id=contexts, keep=st.floats(0.0, 1.0))
    def truncate(self, context_id, keep):
        """A generation cut by a stop string: the tokens past the cut are forgotten."""
        if context_id not in self.live:
            return
        ctx = self.table.get(context_id)
        length = ctx.fork_point + int((len(ctx.token_ids) - ctx.fork_point) * keep)
        if any(self.table.get(child).fork_point > length for child in ctx.children):  # a fork reads past the cut
            with pytest.raises(ContextError):
                self.table.truncate(ctx, length)
            return
        kept = ctx.token_ids[:length]
        self.table.truncate(ctx, length)
        assert ctx.token_ids == kept and ctx.num_computed <= length
        assert len(ctx.block_table) == -(-ctx.num_computed // self.table.pool.block_size), "no block past the computed KV"

    @rule(context_id=consumes(contexts))
    def free(self, context_id):
        if context_id in self.live:
            self.table.free(context_id)
            self.live.discard(context_id)

    @invariant()
    def books_balance(self):
        self.table.check_integrity()
        assert len(self.table) == len(self.live)

    @invariant()
    def every_context_reads_its_own_tokens(self):
        for context_id in self.live:
            ctx = self.table.get(context_id)
            assert visible_kv(self.table, self.kv, ctx) == ctx.token_ids[: ctx.num_computed], f"{context_id} reads foreign KV"

    def teardown(self):
        for context_id in list(self.live):
            self.table.free(context_id)
        self.table.check_integrity()
        assert self.table.pool.num_free == self.table.pool.num_blocks, "freeing every context returns every block"


ContextTableMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
test_context_table_random_operations = ContextTableMachine.TestCase
