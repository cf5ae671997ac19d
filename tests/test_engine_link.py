"""The manager's HTTP link to an engine server adds no queue of its own: a call placed
beside many long-running ones reaches the engine at once, where its priority decides."""

from __future__ import annotations

import asyncio
import json
import threading
import time

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from parrot.backends.http_engine import HttpEngineBackend
from parrot.engine.sampler import SamplingParams
from parrot.engine.scheduler import PRIORITY_LATENCY, PRIORITY_THROUGHPUT

from loopback import serve_on_loopback

# more streams than httpx's default pool (100) holds
LONG_STREAMS = 120


class HeldEngine:
    """An engine server whose streams hold until released, and which counts what reached it."""

    def __init__(self) -> None:
        self.streams_open = 0
        self.fills = 0
        self.release = threading.Event()
        self.app = FastAPI()
        self.app.post("/fill")(self.fill)
        self.app.post("/generate")(self.generate)

    async def fill(self) -> dict:
        self.fills += 1
        return {}

    async def generate(self) -> StreamingResponse:
        self.streams_open += 1

        async def lines():
            while not self.release.is_set():
                await asyncio.sleep(0.02)
            yield json.dumps({"token_id": 1, "text": "x", "finish_reason": "length"}) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")


def test_a_call_reaches_the_engine_while_more_streams_run_there_than_a_default_pool_holds():
    engine = HeldEngine()

    async def scenario(url: str) -> tuple[int, int]:
        backend = HttpEngineBackend("held", url, "model")

        async def drain(index: int) -> None:
            async for _ in backend.generate(f"long-{index}", SamplingParams(max_tokens=1), PRIORITY_THROUGHPUT):
                pass

        streams = [asyncio.create_task(drain(i)) for i in range(LONG_STREAMS)]
        deadline = time.monotonic() + 20
        while engine.streams_open < LONG_STREAMS and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        seen_streams = engine.streams_open
        try:
            await asyncio.wait_for(backend.fill("chat", None, "hello", PRIORITY_LATENCY), timeout=10)
        finally:
            engine.release.set()
            await asyncio.gather(*streams)
            await backend.close()
        return seen_streams, engine.fills

    try:
        with serve_on_loopback(engine.app) as url:
            seen_streams, fills = asyncio.run(scenario(url))
    finally:
        engine.release.set()
    assert seen_streams == LONG_STREAMS, f"only {seen_streams} of {LONG_STREAMS} streams reached the engine"
    assert fills == 1
