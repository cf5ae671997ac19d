"""The keep-alive race: calls sent on idle connections that the server is closing that instant.

httpx (and so the openai SDK) drops an idle connection after 5 s; uvicorn closes one after 5 s
by default. A client whose connection has been idle for about 5 s can send a call just as the
server closes it, and the call fails with "Server disconnected without sending a response" (or, when the
call reached the closing socket, "Connection reset by peer").
This script sends calls after idle gaps of 4.95-5.02 s against a server keeping idle
connections 5 s (uvicorn's default) and one keeping them as long as parrot's servers do.

    python benchmarks/keep_alive_race.py [--clients 64] [--rounds 6]
"""

from __future__ import annotations

import argparse
import random
import threading
import time

import httpx
import uvicorn
from fastapi import FastAPI

from parrot.server.launch import KEEP_ALIVE_S, free_port, uvicorn_config


def start_server(keep_alive_s: float) -> tuple[uvicorn.Server, str]:
    app = FastAPI()

    @app.get("/ping")
    def ping() -> dict[str, bool]:
        return {"ok": True}

    port = free_port()
    config = uvicorn_config(app, host="127.0.0.1", port=port)
    config.timeout_keep_alive = keep_alive_s
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return server, f"http://127.0.0.1:{port}"


def client_rounds(url: str, rounds: int, failures: list[str]) -> None:
    with httpx.Client(base_url=url) as http:  # httpx's default keep-alive expiry: 5 s
        for _ in range(rounds):
            http.get("/ping")
            time.sleep(random.uniform(4.95, 5.02))
            try:
                http.get("/ping")
            except httpx.TransportError as exc:  # the server's close met the call: a disconnect or a reset
                failures.append(f"{type(exc).__name__}: {exc}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64, help="clients sending at once (default 64)")
    parser.add_argument("--rounds", type=int, default=6, help="idle gaps per client (default 6; each about 5 s)")
    args = parser.parse_args()
    for keep_alive_s in (5, KEEP_ALIVE_S):
        server, url = start_server(keep_alive_s)
        failures: list[str] = []
        clients = [threading.Thread(target=client_rounds, args=(url, args.rounds, failures)) for _ in range(args.clients)]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        server.should_exit = True
        kinds = "; ".join(sorted(set(failures))) or "none"
        print(f"server keeps idle connections {keep_alive_s} s: {len(failures)} of {args.clients * args.rounds} "
              f"calls after an idle gap failed ({kinds})", flush=True)


if __name__ == "__main__":
    main()
