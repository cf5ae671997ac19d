"""An ASGI app served by uvicorn on loopback in a thread of the test process."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import uvicorn

from parrot.server.launch import free_port, uvicorn_config


@contextlib.contextmanager
def serve_on_loopback(app) -> Iterator[str]:
    """Yields the server's base URL; stops the server on exit."""
    port = free_port()
    server = uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the loopback server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
