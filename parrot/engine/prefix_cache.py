"""Cached prompt prefixes, found by chained hashes of their full KV blocks.

A prefix is a context owned by the cache. New root contexts fork from the longest
cached prefix of their tokens instead of prefilling it again: across requests,
sessions and tenants (the KV of identical tokens at identical positions is
identical; nobody sees anyone's text, only shares its computation). A prefix stays
while contexts use it; idle ones are evicted least-recently-used when the block
pool runs short.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from dataclasses import dataclass

from parrot.engine.kv_cache import ContextTable


@dataclass
class CachedPrefix:
    context_id: str
    num_tokens: int  # a multiple of the block size
    users: int = 0


@dataclass(frozen=True)
class PrefixMatch:
    context_id: str
    num_tokens: int


def block_hashes(token_ids: list[int], block_size: int) -> list[bytes]:
    """Chained hashes: the i-th names the first i+1 full blocks."""
    hashes, digest = [], b""
    for end in range(block_size, len(token_ids) + 1, block_size):
        digest = hashlib.blake2b(digest + repr(token_ids[end - block_size : end]).encode(), digest_size=16).digest()
        hashes.append(digest)
    return hashes


class PrefixCache:
    def __init__(self, contexts: ContextTable):
        self.contexts = contexts
        self.block_size = contexts.pool.block_size
        self._by_hash: dict[bytes, str] = {}
        self._hashes_of: dict[str, list[bytes]] = {}
        self._entries: OrderedDict[str, CachedPrefix] = OrderedDict()  # least recently used first
        self._ids = itertools.count()
        self.hits_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def owns(self, context_id: str) -> bool:
        return context_id in self._entries

    def new_context_id(self) -> str:
        return f"__prefix__{next(self._ids)}"

    def idle_blocks(self) -> int:
        """KV blocks that only cached prefixes hold: reclaimable the moment a job needs them."""
        cached: set[int] = set()
        live: set[int] = set()
        for context_id, ctx in self.contexts.items():
            (cached if context_id in self._entries else live).update(ctx.block_table)
        return len(cached - live)

    def longest(self, token_ids: list[int]) -> PrefixMatch | None:
        match = None
        for blocks, digest in enumerate(block_hashes(token_ids, self.block_size), start=1):
            owner = self._by_hash.get(digest)
            if owner is None:
                break
            match = PrefixMatch(owner, blocks * self.block_size)
        return match

    def insert(self, context_id: str) -> None:
        """Adopts a computed, block-aligned context as a cached prefix."""
        ctx = self.contexts.get(context_id)
        assert ctx.num_pending == 0 and len(ctx.token_ids) % self.block_size == 0
        hashes = block_hashes(ctx.token_ids, self.block_size)
        for digest in hashes:
            self._by_hash[digest] = context_id  # the newest holder answers; older ones still hold theirs
        self._hashes_of[context_id] = hashes
        self._entries[context_id] = CachedPrefix(context_id, len(ctx.token_ids))

    def acquire(self, context_id: str) -> None:
        self._entries[context_id].users += 1
        self._entries.move_to_end(context_id)

    def release(self, context_id: str) -> None:
        entry = self._entries.get(context_id)
        if entry is not None:
            entry.users -= 1
            self._entries.move_to_end(context_id)

    def evict(self, blocks_wanted: int) -> int:
        """Frees idle prefixes, oldest first, until blocks_wanted blocks are free; returns blocks freed."""
        pool = self.contexts.pool
        before = pool.num_free
        dropped = True
        while dropped and pool.num_free - before < blocks_wanted:
            dropped = False  # a prefix skipped while a longer one held its blocks may free them after it goes
            for context_id in list(self._entries):
                if pool.num_free - before >= blocks_wanted:
                    break
                entry = self._entries[context_id]
                ctx = self.contexts.get(context_id)
                if entry.users > 0 or ctx.children:
                    continue
                # a prompt cached while its request still runs shares every block with it: dropping
                # it would free nothing now and lose it for the requests after
                if ctx.block_table and pool.refcount(ctx.block_table[-1]) > 1:
                    continue
                self._drop(context_id)
                dropped = True
        return pool.num_free - before

    def clear(self) -> None:
        """Drops every idle prefix (prefixes in use stay)."""
        self.evict(self.contexts.pool.num_blocks)

    def _drop(self, context_id: str) -> None:
        for digest in self._hashes_of.pop(context_id):
            if self._by_hash.get(digest) == context_id:
                del self._by_hash[digest]
        del self._entries[context_id]
        self.contexts.free(context_id)
