"""Workload sizes: every workload has a full size (what RESULTS.md reports) and a --quick one."""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol, TypeVar


class SizedConfig(Protocol):
    paper: str  # the paper's figure and ratio, shown beside ours


C = TypeVar("C", bound=SizedConfig)


def pick_size(table: dict[str, tuple[C, C]], name: str, quick: bool) -> C:
    """The full or the quick config of a workload; a quick one still names the paper's figure."""
    full, small = table[name]
    return replace(small, paper=full.paper) if quick else full
