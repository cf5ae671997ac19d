"""Where a program's calls go: the embedded runtime (manager and engines in this
process) or, with P.connect, a remote server. The program code is the same."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Coroutine
from typing import Any

from parrot.errors import UserError
from parrot.manager.spec import CallSpec, Perf

log = logging.getLogger(__name__)

# The runtime a thread made current wins; otherwise the one made current last in the
# process (so threads a program starts, like native functions, see its runtime).
_current: "Client | None" = None
_thread_current = threading.local()
_opened: "list[Client]" = []  # open runtimes, the one made current last at the end
_opened_lock = threading.Lock()


def current() -> "Client":
    client = getattr(_thread_current, "client", None) or _current
    if client is None:
        raise UserError("no runtime: create one first with P.Runtime() (embedded) or P.connect(url) (a server)")
    return client


def format_dag(dag) -> str:
    """The server's view of a session, one line a call: inputs, outputs, state, deduced objective."""
    var_names = {v.var_id: v.name for v in dag.variables}
    call_names = {c.call_id: f"{c.function}#{i}" for i, c in enumerate(dag.calls)}
    lines = []
    for call in dag.calls:
        ins = ", ".join(var_names[v] for v in call.inputs.values())
        outs = ", ".join(var_names[v] for v in call.outputs.values())
        group = f", task group of {call_names.get(call.task_group, call.task_group)}" if call.task_group else ""
        engine = f" on {call.engine}" if call.engine else ""
        lines.append(
            f"  {call_names[call.call_id]:<12} depth {call.depth}  ({ins}) -> {outs}: {call.state}{engine}, objective {call.objective}{group}"
        )
    return "\n".join(lines)


class Client(ABC):
    """One session of a program with a manager.

    Contract: every method is safe to call from any thread; errors the user can
    fix are raised as parrot.errors.UserError subclasses.
    """

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def make_current(self) -> None:
        global _current
        with _opened_lock:
            if self in _opened:
                _opened.remove(self)
            _opened.append(self)
            _current = self
        _thread_current.client = self

    @abstractmethod
    def create_variable(self, var_id: str, name: str, value: str | None) -> None: ...

    @abstractmethod
    def set_variable(self, var_id: str, value: str) -> None: ...

    @abstractmethod
    def fail_variable(self, var_id: str, message: str) -> None: ...

    @abstractmethod
    def submit_call(self, call_id: str, spec: CallSpec) -> None: ...

    @abstractmethod
    def get_variable(self, var_id: str, perf: Perf | None, timeout: float | None = None) -> str: ...

    @abstractmethod
    async def aget_variable(self, var_id: str, perf: Perf | None) -> str: ...

    @abstractmethod
    def dag(self) -> Any: ...

    def flush(self) -> None:
        """Sends what this client holds back to send with a later request (nothing, unless remote)."""

    def close(self) -> None:
        """Ends the session. The runtime made current before this one, if still open, is current again."""
        global _current
        with _opened_lock:
            if self in _opened:
                _opened.remove(self)
            previous = _opened[-1] if _opened else None
            if _current is self:
                _current = previous
        if getattr(_thread_current, "client", None) is self:
            _thread_current.client = previous


class Runtime(Client):
    """The embedded default: a manager and built-in engines on a background event loop.

    The runtime owns its engines, those it builds and any given as `backends`: `close()`
    shuts them down, and a closed engine refuses further work (build new ones for a second
    runtime)."""

    def __init__(self, model: str = "smollm2-135m", engines: int = 1, kv_memory_gb: float = 1.0, backends: list | None = None,
                 policy: str = "parrot"):
        from parrot.manager.manager import Manager, SessionLimits
        from parrot.manager.policy import policy_named

        if engines < 1:
            raise UserError("a runtime needs at least one engine")
        scheduling = policy_named(policy)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="parrot-runtime", daemon=True)
        self._thread.start()
        if backends is None:
            backends = self._builtin_engines(model, engines, kv_memory_gb)
        # a server's per-session limits keep tenants from exhausting it for each other; here the
        # program is the process's own (its session keeps every call, for dag())
        own = SessionLimits(max_calls_per_session=sys.maxsize, max_variables_per_session=sys.maxsize)
        self.manager = Manager(backends, scheduling, own)
        self.session_id = self.manager.create_session()
        self._closed = False
        self.make_current()

    @staticmethod
    def _builtin_engines(model: str, count: int, kv_memory_gb: float) -> list:
        from parrot.backends.builtin import BuiltinEngineBackend
        from parrot.engine.llm_engine import EngineConfig, LLMEngine

        return [BuiltinEngineBackend(LLMEngine(EngineConfig(model=model, kv_memory_gb=kv_memory_gb)), f"engine-{i}") for i in range(count)]

    def _run(self, coro: Coroutine, timeout: float | None = None):
        if self._closed:
            coro.close()
            raise UserError("this runtime is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()  # stop it on the loop too: nobody waits for it now
            raise

    async def _call(self, method: str, *args):
        return getattr(self.manager, method)(self.session_id, *args)

    def create_variable(self, var_id, name, value):
        self._run(self._call("create_variable", var_id, name, value))

    def set_variable(self, var_id, value):
        self._run(self._call("set_variable", var_id, value))

    def fail_variable(self, var_id, message):
        self._run(self._call("fail_variable", var_id, message))

    def submit_call(self, call_id, spec):
        self._run(self._call("submit_call", call_id, spec))

    def get_variable(self, var_id, perf, timeout=None):
        try:  # a wait that times out stops waiting on the loop too (the work the wait started goes on)
            return self._run(self.manager.get_variable(self.session_id, var_id, perf), timeout)
        except TimeoutError:
            raise TimeoutError(f"variable {var_id} was not ready within {timeout}s") from None

    async def aget_variable(self, var_id, perf):
        if self._closed:
            raise UserError("this runtime is closed")
        future = asyncio.run_coroutine_threadsafe(self.manager.get_variable(self.session_id, var_id, perf), self._loop)
        return await asyncio.wrap_future(future)

    def dag(self):
        return self._run(self._call("dag"))

    @property
    def client_calls(self) -> int:
        return self.manager.sessions[self.session_id].client_calls

    def close(self) -> None:
        if self._closed:
            return
        try:
            self._run(self.manager.shutdown(), timeout=30)
        except Exception:
            log.exception("the runtime did not shut down cleanly")
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        super().close()
