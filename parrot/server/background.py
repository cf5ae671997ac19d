"""Coroutines a server runs for as long as it is up (heartbeats, reapers, watchers).

Registered with `run_while_up` before the server starts; the app's lifespan starts them
when the server starts and cancels them when it stops, then runs the app's stop hooks.
One that ends with an exception is logged with its name, not lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI

log = logging.getLogger(__name__)


@dataclass
class ServerChores:
    """What the app's lifespan starts (`tasks`: name, coroutine factory) and, after cancelling them, awaits (`on_stop`)."""

    tasks: list[tuple[str, Callable[[], Awaitable[None]]]] = field(default_factory=list)
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s stopped with an error", task.get_name(), exc_info=task.exception())


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    chores: ServerChores = app.state.chores
    running = []
    for name, start in chores.tasks:
        task = asyncio.ensure_future(start())
        task.set_name(name)
        task.add_done_callback(_log_failure)
        running.append(task)
    try:
        yield
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        for stop in chores.on_stop:
            await stop()


def server_app(**options) -> FastAPI:
    """A FastAPI app whose lifespan runs its ServerChores."""
    app = FastAPI(lifespan=lifespan, **options)
    app.state.chores = ServerChores()
    return app


def run_while_up(app: FastAPI, name: str, start: Callable[[], Awaitable[None]]) -> None:
    """Runs `start()` from the server's start to its stop (cancelled then)."""
    app.state.chores.tasks.append((name, start))


def on_stop(app: FastAPI, stop: Callable[[], Awaitable[None]]) -> None:
    """Awaits `stop()` as the server stops, after its background tasks are cancelled."""
    app.state.chores.on_stop.append(stop)
