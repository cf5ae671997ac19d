"""A server's background work (heartbeats, reapers, watchers) runs while the server is up:
started with it, cancelled as it stops before its stop hooks run, and a failure is logged."""

from __future__ import annotations

import asyncio
import logging

import httpx

from parrot.server.background import on_stop, run_while_up, server_app

from loopback import serve_on_loopback


def test_background_tasks_run_while_the_server_is_up_and_failures_are_logged(caplog):
    events: list[str] = []
    app = server_app(title="chores")

    @app.get("/events")
    async def seen():
        return events

    async def forever() -> None:
        events.append("started")
        try:
            await asyncio.Event().wait()
        finally:
            events.append("cancelled")

    async def fails() -> None:
        raise RuntimeError("the reaper broke")

    async def stop() -> None:
        events.append("stop hook")

    run_while_up(app, "waits", forever)
    run_while_up(app, "reaper", fails)
    on_stop(app, stop)
    with caplog.at_level(logging.ERROR, logger="parrot.server.background"):
        with serve_on_loopback(app) as url:
            assert httpx.get(f"{url}/events", timeout=10).json() == ["started"]
    assert events == ["started", "cancelled", "stop hook"]
    assert any("background task reaper stopped with an error" in r.getMessage() and r.exc_info for r in caplog.records)
