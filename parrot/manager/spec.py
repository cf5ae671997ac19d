"""What a program submits: semantic calls over variables, and the criteria it asks for.

Plain frozen dataclasses shared by the frontend and the manager; the HTTP layer
maps its pydantic payloads onto these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from parrot.engine.sampler import SamplingParams


class Perf(Enum):
    """The performance criterion a program asks for when it gets a variable."""

    LATENCY = "latency"
    THROUGHPUT = "throughput"


@dataclass(frozen=True)
class InputBinding:
    """A template input bound to a variable (by id)."""

    name: str
    var_id: str


@dataclass(frozen=True)
class OutputBinding:
    """A template output: the variable it produces and how to sample it."""

    name: str
    var_id: str
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class CallSpec:
    """One call of a semantic function as the program submits it.

    The server parses the template again (clients can be anything) and lowers it
    with the bindings into prompt pieces.
    """

    function: str
    template: str
    inputs: tuple[InputBinding, ...] = ()
    outputs: tuple[OutputBinding, ...] = ()
