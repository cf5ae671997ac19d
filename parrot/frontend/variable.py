"""Semantic variables as the program sees them: futures for text."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import TYPE_CHECKING

from parrot.errors import UserError
from parrot.manager.spec import Perf

if TYPE_CHECKING:
    from parrot.frontend.runtime import Client

LATENCY = Perf.LATENCY
THROUGHPUT = Perf.THROUGHPUT


class SemanticVariable:
    """A named text region: set by the program, or produced by a call; `get` waits for it."""

    def __init__(self, client: "Client", name: str, var_id: str | None = None):
        self.client = client
        self.name = name
        self.var_id = var_id or f"v-{uuid.uuid4().hex[:16]}"
        # outputs of native functions are produced in this process
        self.native_result: Future | None = None

    def set(self, value) -> None:
        self.client.set_variable(self.var_id, str(value))

    def get(self, perf: Perf | str | None = LATENCY, timeout: float | None = None) -> str:
        """Blocks until the value is ready; perf (P.LATENCY, P.THROUGHPUT or their names) tells the
        server what matters. Raises TimeoutError after `timeout` seconds."""
        perf = _perf(perf)
        if self.native_result is not None:
            started = time.monotonic()
            try:
                self.native_result.result(timeout)
            except FutureTimeoutError:
                raise TimeoutError(f"variable {self.var_id} was not ready within {timeout}s") from None
            if timeout is not None:
                timeout = max(0.0, timeout - (time.monotonic() - started))
        return self.client.get_variable(self.var_id, perf, timeout)

    async def aget(self, perf: Perf | str | None = LATENCY) -> str:
        perf = _perf(perf)
        if self.native_result is not None:
            import asyncio

            await asyncio.wrap_future(self.native_result)
        return await self.client.aget_variable(self.var_id, perf)

    def __repr__(self) -> str:
        return f"SemanticVariable({self.name!r}, id={self.var_id})"


def _perf(perf: Perf | str | None) -> Perf | None:
    if perf is None or isinstance(perf, Perf):
        return perf
    try:
        return Perf(str(perf).lower())
    except ValueError:
        raise UserError(f"perf is P.LATENCY or P.THROUGHPUT (or None), not {perf!r}") from None
