"""Which decode sequences of a step share leading KV blocks, as a tree of shared segments.

Contexts forked from a common parent hold the parent's physical blocks at the start of
their block tables (refcounted, no copy). A batch may hold several such families, and
families nest: a system prompt shared by all, a document shared by some of them, then
each sequence's own suffix. The plan is that tree, found from the block tables alone;
shared-prefix attention computes each segment once for all of its members.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PrefixSegment:
    """A run of full KV blocks that several sequences hold at the same place of their tables."""

    first_block: int  # index in the members' block tables where the run starts
    block_ids: list[int]  # the physical blocks of the run, the same in every member's table
    members: list[int]  # the sequences (indices into the planner's inputs) that attend to it
    parent: int | None  # the segment holding the blocks before first_block (index into PrefixPlan.segments)

    def token_range(self, block_size: int) -> range:
        return range(self.first_block * block_size, (self.first_block + len(self.block_ids)) * block_size)


@dataclass(frozen=True)
class SequenceParts:
    """How one sequence's KV splits: its shared segments (root first), then its own suffix."""

    segments: list[int]  # indices into PrefixPlan.segments, outermost first
    suffix_start: int  # first token not covered by a shared segment (a block boundary)
    context_len: int

    @property
    def suffix_len(self) -> int:
        return self.context_len - self.suffix_start


@dataclass(frozen=True)
class PrefixPlan:
    block_size: int
    segments: list[PrefixSegment]  # parents before children
    sequences: list[SequenceParts]  # one per input sequence, in input order

    @property
    def grouped(self) -> list[int]:
        """Sequences that attend to at least one shared segment."""
        return [i for i, s in enumerate(self.sequences) if s.segments]

    @property
    def ungrouped(self) -> list[int]:
        return [i for i, s in enumerate(self.sequences) if not s.segments]


def min_shared_blocks(min_shared_tokens: int, block_size: int) -> int:
    """The fewest whole blocks a group must share for a threshold given in tokens (at least 1)."""
    return max(1, -(-min_shared_tokens // block_size))


def plan_prefix_groups(
    block_tables: Sequence[Sequence[int]], context_lens: Sequence[int], min_shared_blocks: int, block_size: int,
    min_member_blocks: int = 0,
) -> PrefixPlan:
    """The tree of shared segments of a batch of sequences.

    A block is shared by sequences that hold the same block id at the same index, and
    only counts when it is full for all of them: the partly filled last block of a
    sequence is its own (its new tokens land there). A segment has at least two members,
    at least min_shared_blocks blocks, and members x blocks of at least min_member_blocks
    (what it saves grows with both); a smaller run is not worth a separate product and
    merge, so its blocks go to the segments below it or to the members' suffixes.
    """
    if min_shared_blocks < 1 or block_size < 1:
        raise ValueError("min_shared_blocks and block_size must be at least 1")
    if len(block_tables) != len(context_lens):
        raise ValueError("one context length per block table")
    tables = [list(t) for t in block_tables]
    full = [min(n // block_size, len(t)) for t, n in zip(tables, context_lens)]
    segments: list[PrefixSegment] = []
    deepest: list[int | None] = [None] * len(tables)
    suffix_start = [0] * len(tables)

    def split(members: list[int], depth: int, start: int, parent: int | None) -> None:
        # members hold identical full blocks [0, depth); the blocks [start, depth) are not yet in a segment
        end = depth
        while len(members) > 1 and all(full[i] > end for i in members) and len({tables[i][end] for i in members}) == 1:
            end += 1
        if len(members) > 1 and end - start >= min_shared_blocks and len(members) * (end - start) >= min_member_blocks:
            segments.append(PrefixSegment(start, tables[members[0]][start:end], members, parent))
            parent, start = len(segments) - 1, end
        branches: dict[int, list[int]] = defaultdict(list)
        for i in members:
            if full[i] > end:
                branches[tables[i][end]].append(i)
        deeper = {i for group in branches.values() if len(group) > 1 for i in group}
        for i in members:
            if i not in deeper:
                deepest[i], suffix_start[i] = parent, start * block_size
        for group in branches.values():
            if len(group) > 1:
                split(group, end, start, parent)

    split(list(range(len(tables))), 0, 0, None)
    parts = []
    for i, n in enumerate(context_lens):
        path: list[int] = []
        node = deepest[i]
        while node is not None:
            path.append(node)
            node = segments[node].parent
        parts.append(SequenceParts(path[::-1], suffix_start[i], n))
    return PrefixPlan(block_size, segments, parts)
