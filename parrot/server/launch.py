"""Starting servers: `parrot serve` (a manager with N engine processes) and `parrot engine`."""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import resource
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import uvicorn

from parrot.server.common import HEARTBEAT_S

log = logging.getLogger(__name__)

# seconds a manager whose engines have all exited gives open connections before it stops
GRACE_WITHOUT_ENGINES_S = 5
# seconds an idle keep-alive connection stays open. httpx (and so the openai SDK) drops its idle
# connections after 5 s, uvicorn's own default: with both at 5 s a client can send a call on a
# connection the server is closing that instant, and the call fails with "Server disconnected
# without sending a response". A server that waits longer than its clients never races them.
KEEP_ALIVE_S = 75


# seconds a stopping server (SIGTERM, Ctrl-C) gives open requests to finish: a long-poll may
# wait 300 s, and uvicorn alone would wait for it
GRACEFUL_SHUTDOWN_S = 10


def uvicorn_config(app, **options) -> uvicorn.Config:
    """How every parrot server (manager, engine) runs under uvicorn."""
    return uvicorn.Config(app, log_level="warning", timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                          **options)


def gpu_count() -> int:
    """GPUs this machine's engines may use (CUDA_VISIBLE_DEVICES counts), without starting CUDA here."""
    import torch

    return torch.cuda.device_count()


def raise_open_file_limit() -> None:
    """Lets this process hold as many sockets as the system allows: the manager keeps one
    connection to an engine per call in flight there (no pool cap, see HttpEngineBackend), and
    an engine serves them, so a soft limit of 1024 would fail calls under a large batch."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as error:
            log.warning("could not raise the open-file limit from %d to %d (%s): large batches may fail to connect", soft, wanted, error)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def listening_socket(host: str, port: int | None) -> socket.socket:
    """A socket bound to host:port (a free port where None), held from here on: a port picked
    free and bound only after the model loads can be taken meanwhile (two engines that
    `parrot serve` started together once picked the same one, and the second failed to bind)."""
    from parrot.errors import UserError

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port or 0))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port or 0}: {exc.strerror}; check --host, or pick another --port") from exc
    return sock


def serve_app(app, sock: socket.socket, server: uvicorn.Server | None = None) -> None:
    """Serves the app on the socket until the process is told to stop (or `server.should_exit` is set)."""
    (server or uvicorn.Server(uvicorn_config(app))).run(sockets=[sock])


async def watch_engine_processes(children: list[subprocess.Popen], engine_serving_since: Callable[[float], bool],
                                 on_all_gone: Callable[[], None], stopping: Callable[[], bool], period_s: float = 1.0,
                                 settle_s: float = 2 * HEARTBEAT_S + 0.5) -> None:
    """Logs each engine process of this manager that exits. Once all have, and no engine serves
    the manager since (waiting `settle_s`, two heartbeats, for one to speak), calls
    `on_all_gone`: a manager without engines would hold every call until its client gave up
    (an engine that fails as it starts, say out of GPU memory). An engine from elsewhere, one
    restarted by hand under a dead one's name, or an --openai-backend keeps the manager up.
    Returns once the manager is `stopping` anyway: its engines then exit because they are told to."""
    running = dict(enumerate(children))
    while running:
        await asyncio.sleep(period_s)
        if stopping():
            return
        for index, child in list(running.items()):
            code = child.poll()
            if code is not None:
                del running[index]
                log.error("engine-%d (pid %d) exited with code %d; its output is above", index, child.pid, code)
    last_exit = time.monotonic()
    await asyncio.sleep(settle_s)
    if not stopping() and not engine_serving_since(last_exit):
        on_all_gone()


def engine_serving_since(manager, liveness) -> Callable[[float], bool]:
    """Whether an engine could serve the manager after a moment: one that registered or sent a
    heartbeat since, or one that never heartbeats and stays registered (an --openai-backend)."""
    def serving(moment: float) -> bool:
        return any(e.name not in liveness.last_seen for e in manager.engines) or liveness.any_seen_since(moment)

    return serving


def builtin_context(args, engine_settings, model_dir) -> int | None:
    """The context in tokens of the built-in engines' model, where every engine is one (simulated
    engines and other servers' models say nothing of theirs)."""
    if engine_settings is None or args.openai_backend:
        return None
    from parrot.engine.loader import load_config
    from parrot.engine.random_weights import shape_named

    if engine_settings.random_weights is not None:
        return shape_named(engine_settings.random_weights).max_position_embeddings
    return load_config(model_dir).max_position_embeddings


def serve(args) -> None:
    from parrot.backends.openai_compat import OpenAICompatibleBackend
    from parrot.cli import engine_config, engine_flags
    from parrot.engine.loader import resolve_model_dir
    from parrot.engine.tokenizer import Tokenizer
    from parrot.errors import EngineUnavailableError, UserError
    from parrot.manager.manager import Manager, SessionLimits
    from parrot.manager.policy import policy_named
    from parrot.server.auth import KeyStore
    from parrot.server.background import run_while_up
    from parrot.server.manager_app import create_manager_app

    if args.engine.startswith("sim:") and (args.threads or args.no_prefix_caching or args.no_shared_attention or args.random_weights
                                           or args.step_trace):
        raise UserError("--threads, --no-prefix-caching, --no-shared-attention, --random-weights and --step-trace set built-in "
                        "engines; a simulated engine (--engine sim:PRESET) takes its settings from its preset")
    if args.step_trace and args.ray:
        raise UserError("--step-trace writes the traces of engine processes on this machine: drop it with --ray")
    # the engine flags are checked here, once, not in each engine process
    engine_settings = None if args.engine.startswith("sim:") else engine_config(args)
    if engine_settings is not None and args.engines and not args.ray:
        from parrot.engine.device import resolve_device

        resolve_device(engine_settings.device)  # engines on this machine: refuse --device cuda here, not in each of them
    engine_key = os.environ.get("PARROT_ENGINE_KEY") or secrets.token_urlsafe(24)
    if args.engines == 0 and not args.openai_backend and "PARROT_ENGINE_KEY" not in os.environ and not args.engine.startswith("sim:"):
        # engines started elsewhere (`parrot engine`) need the key to register: without it none ever could
        print(f"No PARROT_ENGINE_KEY set; for this run, engines register with key:\n  {engine_key}", flush=True)
    keys = KeyStore.load(args.api_keys, engine_key=engine_key)
    if keys.empty:
        key = secrets.token_urlsafe(24)
        keys.add("default", key)
        print(f"No API keys configured (--api-keys FILE or PARROT_API_KEYS); for this run, tenant 'default' has key:\n  {key}", flush=True)
    model_dir = resolve_model_dir(args.model)  # converts once here, before engines start in parallel
    limits = SessionLimits(idle_timeout_s=args.session_idle_timeout or None, max_sessions_per_tenant=args.max_sessions_per_tenant)
    manager = Manager([], policy_named(args.policy), limits)
    local_processes = args.engines
    if args.engine.startswith("sim:"):
        from parrot.backends.simulated import SimulatedEngineBackend

        # simulated engines (a named backend for scale experiments) live in the manager's process
        for i in range(args.engines):
            manager.add_engine(SimulatedEngineBackend.from_profile(args.engine, name=f"sim-{i}", time_scale=args.time_scale))
        local_processes = 0
    elif args.engine != "builtin":
        raise UserError(f"--engine must be builtin or sim:PRESET, not {args.engine!r}")
    fleet = None
    if args.ray:
        from parrot.backends.ray_engine import RayEngineFleet

        if engine_settings is None:
            raise UserError("--ray places built-in engines on a Ray cluster; it does not take --engine sim:PRESET")
        fleet = RayEngineFleet.start(args.engines, engine_settings, address=args.address)
        local_processes = 0
    elif args.address:
        raise UserError("--address names a Ray cluster: use it with --ray")
    if args.step_trace:
        if local_processes == 0:
            raise UserError("--step-trace traces the engine processes parrot serve starts, and --engines 0 starts none: "
                            "give each engine its own, parrot engine --step-trace FILE")
        try:
            os.makedirs(args.step_trace, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot make the step-trace folder {args.step_trace}: {exc.strerror}") from exc
    for i, url in enumerate(args.openai_backend):
        manager.add_engine(OpenAICompatibleBackend(f"openai-{i}", url, args.backend_model or args.model, args.backend_api_key))
    app = create_manager_app(manager, keys, args.model, Tokenizer(model_dir), builtin_context(args, engine_settings, model_dir),
                             engine_key=engine_key,
                             max_body_bytes=args.max_body_mb * 2**20, heartbeat_timeout_s=args.heartbeat_timeout)
    if fleet is not None:
        run_while_up(app, "watch Ray engines", lambda: fleet.watch(manager))
    sock = listening_socket(args.host, args.port)
    port = sock.getsockname()[1]
    manager_url = f"http://127.0.0.1:{port}" if args.host in ("0.0.0.0", "127.0.0.1", "localhost") else f"http://{args.host}:{port}"
    # on a GPU machine the engines go round the GPUs (engine i on GPU i mod count); engines
    # sharing a GPU split its memory
    gpus = gpu_count() if args.device == "cuda" else 0
    per_gpu = -(-local_processes // gpus) if gpus else 1
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # already narrowed: engine i takes the i-th of those
    gpu_ids = (visible.split(",") if visible else [str(g) for g in range(gpus)])[:gpus]
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "parrot.cli", "engine", "--manager", manager_url, "--name", f"engine-{i}",
             "--parent-pid", str(os.getpid()), *engine_flags(args, engines_per_gpu=per_gpu),
             *(["--step-trace", os.path.join(args.step_trace, f"engine-{i}.jsonl")] if args.step_trace else [])],
            # OMP_NUM_THREADS too: it also bounds the threads of the process's other parallel work
            env={**os.environ, "PARROT_ENGINE_KEY": engine_key, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}),
                 **({"CUDA_VISIBLE_DEVICES": gpu_ids[i % gpus]} if gpus else {})},
        )
        for i in range(local_processes)
    ]

    def stop_children() -> None:
        if fleet is not None:
            fleet.stop()
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()

    atexit.register(stop_children)
    kind = "Ray-actor" if args.ray else args.engine
    print(f"parrot manager on http://{args.host}:{port} (model {args.model}, {args.engines} {kind} engine(s), "
          f"policy {args.policy})", flush=True)
    raise_open_file_limit()
    server = uvicorn.Server(uvicorn_config(app))
    engines_gone = False

    def stop_without_engines() -> None:
        nonlocal engines_gone
        engines_gone = True
        # calls waiting for an engine fail now (503), and clients still streaming get at most a few seconds
        manager.executor.fail_held(EngineUnavailableError("every engine of this manager has exited; the manager is stopping"))
        server.config.timeout_graceful_shutdown = GRACE_WITHOUT_ENGINES_S
        server.should_exit = True

    if children:
        run_while_up(app, "watch engine processes", lambda: watch_engine_processes(
            children, engine_serving_since(manager, app.state.liveness), stop_without_engines, lambda: server.should_exit))
    try:
        serve_app(app, sock, server)
    finally:
        stop_children()
    if engines_gone:
        raise UserError("every engine process of this manager exited (their output is above) and no other engine serves it: "
                        "stopping. Fix what their output names (e.g. --gpu-memory-utilization, --kv-memory-gb) and start again")


def engine(args) -> None:
    from parrot.backends.builtin import BuiltinEngineBackend
    from parrot.cli import engine_config
    from parrot.engine.llm_engine import LLMEngine
    from parrot.errors import UserError
    from parrot.server.auth import KeyStore
    from parrot.server.engine_app import create_engine_app

    engine_key = args.engine_key or os.environ.get("PARROT_ENGINE_KEY")
    if not engine_key:
        raise UserError("an engine needs the manager's engine key: set PARROT_ENGINE_KEY or pass --engine-key")
    sock = listening_socket(args.host, args.port)
    port = sock.getsockname()[1]
    public_url = args.public_url or f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '127.0.0.1') else args.host}:{port}"
    name = args.name or f"{socket.gethostname()}-{port}"
    llm = LLMEngine(engine_config(args))
    backend = BuiltinEngineBackend(llm, name)
    app = create_engine_app(backend, KeyStore.load(env={}, engine_key=engine_key), args.manager, public_url, engine_key,
                            parent_pid=args.parent_pid)
    print(f"parrot engine {name} on {public_url}, registering with {args.manager}", flush=True)
    raise_open_file_limit()
    server = uvicorn.Server(uvicorn_config(app))
    app.state.request_stop = lambda: setattr(server, "should_exit", True)
    serve_app(app, sock, server)
    if app.state.refusal is not None:
        raise UserError(app.state.refusal)
