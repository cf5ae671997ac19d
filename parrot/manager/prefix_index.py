"""PrefixHash: which engines recently held which prompt prefixes.

A prompt is cut at fixed character granules and each cut is hashed (chained, so
a hash names the whole prefix up to it). Placement asks for the engines holding
the longest hashed prefix of a new prompt; the engines' own KV caches then find
the shared tokens (static prefixes of semantic functions, or any prompts that
happen to start alike).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

GRANULE_CHARS = 128
MAX_ENTRIES = 200_000


def prefix_hashes(text: str, granule: int = GRANULE_CHARS) -> list[bytes]:
    """Hashes of text[:granule], text[:2*granule], ... (whole granules only)."""
    hashes: list[bytes] = []
    digest = b""
    for end in range(granule, len(text) + 1, granule):
        digest = hashlib.blake2b(digest + text[end - granule : end].encode(), digest_size=12).digest()
        hashes.append(digest)
    return hashes


@dataclass(frozen=True)
class PrefixMatch:
    granules: int  # of the prompt, from its start
    holders: set[str]  # the engines holding them

    @property
    def chars(self) -> int:
        return self.granules * GRANULE_CHARS


class PrefixIndex:
    def __init__(self, max_entries: int = MAX_ENTRIES):
        self.max_entries = max_entries
        self._engines: OrderedDict[bytes, set[str]] = OrderedDict()  # LRU: least recently used first

    def record(self, engine: str, hashes: list[bytes]) -> None:
        for digest in hashes:
            holders = self._engines.pop(digest, None) or set()
            holders.add(engine)
            self._engines[digest] = holders
        while len(self._engines) > self.max_entries:
            self._engines.popitem(last=False)

    def longest_match(self, hashes: list[bytes]) -> PrefixMatch:
        """The most granules some engines hold, and those engines; none when no engine holds any."""
        for length in range(len(hashes), 0, -1):
            holders = self._engines.get(hashes[length - 1])
            if holders:
                return PrefixMatch(length, set(holders))
        return PrefixMatch(0, set())

    def forget_engine(self, engine: str) -> None:
        for holders in self._engines.values():
            holders.discard(engine)
