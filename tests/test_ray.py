"""Engines as Ray actors on a local Ray cluster: the examples run through them, and a
replica killed mid-generation is restarted by Ray while its call completes elsewhere."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

import parrot as P  # noqa: E402
from parrot.backends.ray_engine import RayEngineFleet  # noqa: E402
from parrot.engine.llm_engine import EngineConfig  # noqa: E402
from parrot.engine.sampler import SamplingParams  # noqa: E402
from parrot.manager.manager import Manager  # noqa: E402
from parrot.manager.spec import CallSpec, InputBinding, OutputBinding  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fleet():
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    fleet = RayEngineFleet.start(2, EngineConfig(kv_memory_gb=0.25, threads=1), period_s=0.5, timeout_s=120)
    try:
        ray.get([replica.actor.stats.remote() for replica in fleet.replicas], timeout=300)  # models loaded
        yield fleet
    finally:
        fleet.stop()
        ray.shutdown()


def test_the_examples_run_on_ray_engines(fleet):
    snake = example("snake_game")
    with P.Runtime(backends=fleet.replicas) as runtime:
        code, test = snake.write_snake_game()
        assert code.strip() and test.strip()
        assert {call.engine for call in runtime.dag().calls} <= {"ray-0", "ray-1"}
        _, summary = example("map_reduce_summary").map_reduce_summary([f"Part {i}: the parrot flew home." for i in range(4)])
        assert summary.get().strip()


def test_a_replica_reports_log_probabilities_of_prompts_and_tokens(fleet):
    """What the OpenAI API's logprobs and echo ask of an engine crosses the actor boundary."""
    async def main():
        replica = fleet.replicas[0]
        scored = await replica.score_prompt("The capital of France is Paris", 2)
        await replica.fill("lp", None, "The capital of France is", 0)
        try:
            tokens = [t async for t in replica.generate("lp", SamplingParams(max_tokens=2, logprobs=1), 0)]
        finally:
            await replica.free_context("lp")
        return scored, tokens

    scored, tokens = asyncio.run(main())
    assert len(scored.logprobs) == len(scored.token_ids) - 1 and all(len(t.top) == 2 for t in scored.logprobs)
    assert [len(t.logprobs.top) for t in tokens] == [1, 1]


def test_a_killed_replica_is_restarted_and_its_call_completes_elsewhere(fleet):
    async def main() -> None:
        manager = Manager([])
        await fleet.sync(manager)
        assert sorted(e.name for e in manager.engines) == ["ray-0", "ray-1"]
        session = manager.create_session()
        manager.create_variable(session, "task", "task", "a snake game")
        manager.create_variable(session, "code", "code", None)
        manager.submit_call(session, "c", CallSpec("code", "Write python code of {{task}}.\nCode: {{code}}", (InputBinding("task", "task"),),
                                                    (OutputBinding("code", "code", SamplingParams(max_tokens=48, ignore_eos=True)),)))
        streamed, killed = "", None
        async for delta in manager.stream_variable(session, "code"):
            streamed += delta
            if killed is None:
                call = manager.sessions[session].graph.calls[f"{session}:c"]
                killed = next(r for r in fleet.replicas if r.name == call.engine)
                ray.kill(killed.actor, no_restart=False)  # the process dies; Ray starts it again
        value = await manager.get_variable(session, "code")
        assert streamed == value and value.strip()
        assert manager.sessions[session].graph.calls[f"{session}:c"].engine != killed.name
        # the replica comes back (its restart loads the model again) and the fleet registers it
        deadline = time.monotonic() + 240
        await fleet.sync(manager)
        while killed.name not in {e.name for e in manager.engines} and time.monotonic() < deadline:
            await asyncio.sleep(1)
            await fleet.sync(manager)
        assert killed.name in {e.name for e in manager.engines}
        await killed.fill("after", None, "Hello", 1)
        await killed.free_context("after")

    asyncio.run(main())


def test_serve_refuses_a_ray_address_without_ray(capsys):
    from parrot.cli import main

    assert main(["serve", "--address", "ray://head:10001", "--port", "0"]) == 2
    assert "--address names a Ray cluster: use it with --ray" in capsys.readouterr().err
