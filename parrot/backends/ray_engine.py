"""Built-in engines as Ray actors, placed across a Ray cluster.

The manager drives each replica through the same EngineBackend interface as local and
HTTP engines. Ray restarts a replica whose process dies (`max_restarts`); the calls it
was running fail over to other engines (EngineUnavailableError), and `RayEngineFleet`
keeps the manager's engine list in step: a replica that stops answering is dropped,
and added back once its restart has loaded the model. Ray is an optional extra
(`pip install 'parrot-serve[ray]'`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from parrot.backends.base import BackendStats, EngineBackend, engine_gone_on
from parrot.engine.llm_engine import EngineConfig
from parrot.engine.outputs import PromptLogprobs
from parrot.engine.sampler import SamplingParams
from parrot.errors import UserError

log = logging.getLogger(__name__)


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("Ray is not installed: pip install 'parrot-serve[ray]' (or pip install ray)") from None
    return ray


class EngineReplica:
    """The actor's body: one built-in engine in its own Ray worker process."""

    def __init__(self, name: str, config: EngineConfig):
        from parrot.backends.builtin import BuiltinEngineBackend
        from parrot.engine.llm_engine import LLMEngine

        self.backend = BuiltinEngineBackend(LLMEngine(config), name)

    async def fill(self, context_id: str, parent_context_id: str | None, text: str, priority: int, shared_prefix_chars: int,
                   then_generate: bool) -> None:
        await self.backend.fill(context_id, parent_context_id, text, priority, shared_prefix_chars, then_generate)

    async def generate(self, context_id: str, sampling: SamplingParams, priority: int):
        async for token in self.backend.generate(context_id, sampling, priority):
            yield token

    async def free_context(self, context_id: str) -> None:
        await self.backend.free_context(context_id)

    async def score_prompt(self, text: str, top: int, token_ids: list[int] | None = None) -> PromptLogprobs:
        return await self.backend.score_prompt(text, top, token_ids)

    async def stats(self) -> BackendStats:
        return self.backend.stats()


class RayEngineBackend(EngineBackend):
    def __init__(self, name: str, model: str, actor):
        self.name, self.model, self.actor = name, model, actor
        self._ray = import_ray()
        self._stats = BackendStats(name, model, 0, 0, 0, 0, 0)

    def _reachable(self, what: str):
        # a dead or restarting actor
        lost = (self._ray.exceptions.RayActorError, self._ray.exceptions.ActorUnavailableError)
        return engine_gone_on(lost, f"{self.name} (a Ray actor)", what)

    async def fill(self, context_id, parent_context_id, text, priority, shared_prefix_chars=0, then_generate=False):
        async with self._reachable(f"fill of {context_id}"):
            await self.actor.fill.remote(context_id, parent_context_id, text, priority, shared_prefix_chars, then_generate)

    async def generate(self, context_id, sampling, priority):
        async with self._reachable(f"generate of {context_id}"):
            async for ref in self.actor.generate.options(num_returns="streaming").remote(context_id, sampling, priority):
                yield await ref

    async def free_context(self, context_id):
        async with self._reachable(f"free of {context_id}"):
            await self.actor.free_context.remote(context_id)

    async def score_prompt(self, text, top, token_ids=None):
        async with self._reachable("scoring a prompt"):
            return await self.actor.score_prompt.remote(text, top, token_ids)

    def stats(self) -> BackendStats:
        return self._stats

    async def refresh(self, timeout_s: float) -> bool:
        """Fetches the replica's stats; False when it does not answer in time (dead or restarting)."""
        try:
            self._stats = await asyncio.wait_for(self.actor.stats.remote(), timeout_s)
        except (TimeoutError, self._ray.exceptions.RayError) as exc:
            log.debug("engine %s did not answer: %s", self.name, exc)
            return False
        return True


@dataclass
class RayEngineFleet:
    """Starts replicas on a Ray cluster and keeps the manager's engines in step with the live ones."""

    replicas: list[RayEngineBackend]
    period_s: float = 2.0
    timeout_s: float = 5.0
    registered: set[str] = field(default_factory=set)
    stopped: bool = False

    @classmethod
    def start(cls, count: int, config: EngineConfig, address: str | None = None, **options) -> RayEngineFleet:
        ray = import_ray()
        if count < 1:
            raise UserError(f"--ray needs at least one engine (--engines), not {count}")
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
        threads = config.threads or 1
        actor_class = ray.remote(EngineReplica).options(
            # a replica that dies is started again (it loads the model anew); its calls are re-run elsewhere.
            # --device cuda: one GPU per replica (Ray sets CUDA_VISIBLE_DEVICES in the actor)
            max_restarts=-1, max_task_retries=0, num_cpus=threads, num_gpus=1 if config.device == "cuda" else 0,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}},
        )
        replicas = [RayEngineBackend(f"ray-{i}", config.model, actor_class.remote(f"ray-{i}", config)) for i in range(count)]
        return cls(replicas, **options)

    async def sync(self, manager) -> None:
        """One round: drops replicas that stopped answering, adds those that answer again."""
        alive = await asyncio.gather(*(replica.refresh(self.timeout_s) for replica in self.replicas))
        for replica, ok in zip(self.replicas, alive):
            if ok and replica.name not in self.registered:
                manager.add_engine(replica)
                self.registered.add(replica.name)
                log.info("engine %s (Ray actor) is serving", replica.name)
            elif not ok and replica.name in self.registered:
                manager.remove_engine(replica.name)  # its running calls move to other engines
                self.registered.discard(replica.name)
                log.warning("engine %s (Ray actor) stopped answering; dropped until it is back", replica.name)

    def stop(self) -> None:
        """Ends the replicas for good (the backends' close() leaves them to the fleet)."""
        if self.stopped:
            return
        self.stopped = True
        ray = import_ray()
        for replica in self.replicas:
            ray.kill(replica.actor, no_restart=True)

    async def watch(self, manager) -> None:
        while True:
            try:
                await self.sync(manager)
            except Exception:
                log.exception("checking the Ray engines failed; trying again in %.0fs", self.period_s)
            await asyncio.sleep(self.period_s)
