"""Engine faults: a call whose engine dies is run again elsewhere, and no waiter hangs.

The engines are simulated (deterministic text, so a re-run elsewhere yields exactly
what the first engine would have); the killed-process case over HTTP is in
test_serve_faults.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from parrot.backends.simulated import CostModel, SimulatedEngineBackend
from parrot.engine.sampler import SamplingParams
from parrot.errors import EngineUnavailableError
from parrot.manager.manager import Manager
from parrot.manager.policy import CHARS_PER_TOKEN, ParrotPolicy
from parrot.manager.spec import CallSpec, InputBinding, OutputBinding

TOKENS = 6


class DyingBackend(SimulatedEngineBackend):
    """Loses its connection after `die_after` generated tokens, as a killed engine process would."""

    def __init__(self, name: str, die_after: int = 2, **options):
        super().__init__(name, **options)
        self.die_after = die_after
        self.deaths = 0

    async def generate(self, context_id, sampling, priority):
        count = 0
        async for token in super().generate(context_id, sampling, priority):
            if count == self.die_after:
                self.deaths += 1
                raise EngineUnavailableError(f"engine {self.name} went away")
            count += 1
            yield token


def chain(manager: Manager) -> str:
    """A two-call app: plan, then code from the plan."""
    session = manager.create_session()
    manager.create_variable(session, "task", "task", "a snake game")
    for name in ("design", "code"):
        manager.create_variable(session, name, name, None)
    sampling = SamplingParams(max_tokens=TOKENS)
    manager.submit_call(session, "plan", CallSpec("plan", "Design {{task}}: {{design}}", (InputBinding("task", "task"),),
                                                  (OutputBinding("design", "design", sampling),)))
    manager.submit_call(session, "code", CallSpec("code", "Code for {{design}}: {{code}}", (InputBinding("design", "design"),),
                                                  (OutputBinding("code", "code", sampling),)))
    return session


async def run_chain(engines) -> tuple[str, str]:
    """(streamed text, final value) of the app's last output."""
    manager = Manager(list(engines))
    session = chain(manager)
    streamed = "".join([delta async for delta in manager.stream_variable(session, "code")])
    value = await manager.get_variable(session, "code")
    await manager.shutdown()
    return streamed, value


def test_a_call_whose_engine_dies_completes_on_another_with_the_same_result() -> None:
    async def main() -> None:
        _, expected = await run_chain([SimulatedEngineBackend("healthy")])
        dying = DyingBackend("dying")
        healthy = SimulatedEngineBackend("healthy")
        streamed, value = await run_chain([dying, healthy])
        assert dying.deaths >= 1
        assert value == expected
        # the reader of the stream saw each character once, though the output was generated twice
        assert streamed == value
        healthy.check_integrity()
        assert not healthy.tree.live  # every context on the surviving engine was freed

    asyncio.run(main())


class AccentBackend(SimulatedEngineBackend):
    """Generates words of its own (another engine's numerics may sample a near tie apart) and
    keeps what it was asked, to see where a continued call starts."""

    def __init__(self, name: str, **options):
        super().__init__(name, **options)
        self.fills: list[str] = []
        self.max_tokens: list[int] = []

    async def fill(self, context_id, parent_context_id, text, priority, shared_prefix_chars=0, then_generate=False):
        self.fills.append(text)
        await super().fill(context_id, parent_context_id, text, priority, shared_prefix_chars, then_generate)

    async def generate(self, context_id, sampling, priority):
        self.max_tokens.append(sampling.max_tokens)
        async for token in super().generate(context_id, sampling, priority):
            yield replace(token, text=token.text.replace(" w", f" {self.name}-"))


class DyingAccentBackend(AccentBackend, DyingBackend):
    pass


def test_a_call_whose_engine_dies_continues_after_what_was_streamed() -> None:
    """The second engine continues the output after the first's streamed words (the context
    holds them) for the tokens left, so readers never see two generations spliced together."""

    async def main() -> None:
        dying = DyingAccentBackend("first", die_after=2)
        other = AccentBackend("other")
        manager = Manager([dying, other])
        session = chain(manager)
        streamed = "".join([delta async for delta in manager.stream_variable(session, "design")])
        value = await manager.get_variable(session, "design")
        await manager.shutdown()
        assert dying.deaths == 1 and streamed == value
        words = value.split()
        assert len(words) == TOKENS
        assert all(w.startswith("first-") for w in words[:2]) and all(w.startswith("other-") for w in words[2:])
        assert other.fills[0] == "Design a snake game: " + "".join(f" {w}" for w in words[:2])  # words come with their space
        assert other.max_tokens[0] == TOKENS - 2

    asyncio.run(main())


def test_a_call_run_again_is_placed_by_what_it_sends_and_what_is_left_to_generate() -> None:
    """The prompt the policy weighs for a call run again after its engine died is the one the
    next engine is sent: with what the dead engine streamed (its queue estimate and prefix
    affinity read it)."""
    weighed: list[int] = []
    kv_tokens: list[int] = []

    class RecordingPolicy(ParrotPolicy):
        def place(self, call, demand, view):
            if call.function == "plan":
                weighed.append(demand.prompt_tokens)
                kv_tokens.append(demand.tokens)
            return super().place(call, demand, view)

    async def main() -> None:
        dying = DyingAccentBackend("first", die_after=2)
        other = AccentBackend("other")
        manager = Manager([dying, other], policy=RecordingPolicy())
        session = chain(manager)
        await manager.get_variable(session, "code")
        await manager.shutdown()
        first, again = other.fills[0], "Design a snake game: "
        assert len(weighed) == 2 and len(first) - len(again) >= CHARS_PER_TOKEN  # the words streamed before the death
        assert weighed == [len(again) // CHARS_PER_TOKEN, len(first) // CHARS_PER_TOKEN]
        # the KV it will hold: the longer prompt and the tokens left to generate, not all of them again
        assert kv_tokens == [weighed[0] + TOKENS, weighed[1] + TOKENS - 2]

    asyncio.run(main())


def plan_only(manager: Manager, stop: tuple[str, ...] = ()) -> str:
    session = manager.create_session()
    manager.create_variable(session, "task", "task", "a snake game")
    manager.create_variable(session, "design", "design", None)
    sampling = SamplingParams(max_tokens=TOKENS, stop=stop)
    manager.submit_call(session, "plan", CallSpec("plan", "Design {{task}}: {{design}}", (InputBinding("task", "task"),),
                                                  (OutputBinding("design", "design", sampling),)))
    return session


async def design_of(engines, stop: tuple[str, ...] = ()) -> tuple[str, str, str | None]:
    """(streamed text, value, finish reason) of the plan's output."""
    manager = Manager(list(engines))
    session = plan_only(manager, stop)
    streamed = "".join([delta async for delta in manager.stream_variable(session, "design")])
    value = await manager.get_variable(session, "design")
    finish = manager.sessions[session].graph.variable("design").finish_reason
    await manager.shutdown()
    return streamed, value, finish


def test_a_stop_string_that_begins_in_the_streamed_text_ends_the_continuation() -> None:
    """The first engine streamed "... first-25"; a stop string "25 other-" would end in the second
    engine's first word, which that engine reads as prompt and never checks: the manager does."""

    async def main() -> None:
        _, value, _ = await design_of([DyingAccentBackend("first", die_after=2), AccentBackend("other")])
        streamed_word = value.split()[1].split("-")[1]  # the number in the first engine's last word
        stop = f"{streamed_word} other-"
        streamed, value, finish = await design_of([DyingAccentBackend("first", die_after=2), AccentBackend("other")], (stop,))
        assert streamed == value and finish == "stop"
        assert len(value.split()) == 2 and value.endswith(f"-{streamed_word}")  # nothing after the stop's start but what was sent

    asyncio.run(main())


class DiesAfterItsLastToken(SimulatedEngineBackend):
    """Its connection drops after the last token (before the stream's end), as when an engine is
    dropped for missed heartbeats just then."""

    def __init__(self, name: str):
        super().__init__(name)
        self.deaths = 0

    async def generate(self, context_id, sampling, priority):
        async for token in super().generate(context_id, sampling, priority):
            yield token
        self.deaths += 1
        raise EngineUnavailableError(f"engine {self.name} went away")


def test_an_output_whose_last_token_came_is_not_continued_elsewhere() -> None:
    async def main() -> None:
        _, expected, _ = await design_of([SimulatedEngineBackend("reference")])
        dying, other = DiesAfterItsLastToken("dying"), AccentBackend("other")
        streamed, value, finish = await design_of([dying, other])
        assert dying.deaths == 1 and other.fills == []  # the ended output went nowhere else
        assert streamed == value == expected and finish == "length"

    asyncio.run(main())


def test_with_no_other_engine_the_waiter_gets_a_clear_error() -> None:
    async def main() -> None:
        manager = Manager([DyingBackend("only")])
        session = chain(manager)
        with pytest.raises(EngineUnavailableError, match="no other engine serves the model"):
            await asyncio.wait_for(manager.get_variable(session, "code"), 10)
        await manager.shutdown()

    asyncio.run(main())


def test_a_call_that_kills_every_engine_stops_being_retried() -> None:
    async def main() -> None:
        engines = [DyingBackend(f"e{i}", die_after=0) for i in range(5)]
        manager = Manager(engines)
        session = chain(manager)
        with pytest.raises(EngineUnavailableError, match="failed on 3 engines in turn"):
            await asyncio.wait_for(manager.get_variable(session, "design"), 10)
        assert sum(e.deaths for e in engines) == 3
        assert all((load.calls, load.tokens, load.unfilled_tokens) == (0, 0, 0) for load in manager.executor.view.load.values())
        await manager.shutdown()

    asyncio.run(main())


def test_an_engine_dropped_mid_call_hands_the_call_to_another() -> None:
    """The manager drops an engine that misses its heartbeats; what it ran moves on."""

    async def main() -> None:
        slow = SimulatedEngineBackend("slow", cost=CostModel(seconds_per_decode_step=0.05))
        spare = SimulatedEngineBackend("spare")
        manager = Manager([slow, spare])
        session = chain(manager)
        waiter = asyncio.ensure_future(manager.get_variable(session, "design"))
        while not slow.stats().running_jobs:
            await asyncio.sleep(0.01)
        manager.remove_engine("slow")
        design = await asyncio.wait_for(waiter, 10)
        reference = Manager([SimulatedEngineBackend("reference")])
        assert design == await reference.get_variable(chain(reference), "design")
        await reference.shutdown()
        assert manager.sessions[session].graph.calls[f"{session}:plan"].engine == "spare"
        # the dropped engine's load is given back (its calls still ended there), the spare's too
        assert all((load.calls, load.tokens, load.unfilled_tokens) == (0, 0, 0) for load in manager.executor.view.load.values())
        await manager.shutdown()

    asyncio.run(main())


class HoldsBackTheLastWordBackend(DyingAccentBackend):
    """Streams its second token's text as nothing (held back, as an engine holds the start of
    a possible stop string) and dies before it would have sent it."""

    async def generate(self, context_id, sampling, priority):
        count = 0
        async for token in super().generate(context_id, sampling, priority):
            count += 1
            yield replace(token, text="") if count == 2 else token


def test_a_token_whose_text_a_dead_engine_held_back_is_generated_again() -> None:
    """The continuation generates the held-back token's place again (its text never reached the
    manager), so the output still has max_tokens tokens, and its count says so."""

    async def main() -> None:
        dying = HoldsBackTheLastWordBackend("first", die_after=2)
        other = AccentBackend("other")
        manager = Manager([dying, other])
        session = chain(manager)
        value = await manager.get_variable(session, "design")
        output = manager.sessions[session].graph.variable("design")
        await manager.shutdown()
        words = value.split()
        assert dying.deaths == 1 and words[0].startswith("first-") and len(words) == TOKENS
        assert other.max_tokens[0] == TOKENS - 1
        assert output.num_tokens == TOKENS

    asyncio.run(main())


def test_a_stream_whose_only_engine_dies_ends_with_the_error_type_a_plain_request_would_get() -> None:
    """Plain, the request gets 503 (service_unavailable_error); streamed, its error event says the same."""
    import json

    import httpx

    from parrot.server.auth import KeyStore
    from parrot.server.manager_app import create_manager_app

    from loopback import serve_on_loopback

    keys = KeyStore.load(env={"PARROT_API_KEYS": "alice=k1"}, engine_key="engine-key")
    app = create_manager_app(Manager([DyingBackend("sim-dying", die_after=1)]), keys, "simulated")
    body = {"model": "simulated", "prompt": "Count with me: one two three", "max_tokens": 6, "stream": True}
    with serve_on_loopback(app) as url:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers={"authorization": "Bearer k1"}, timeout=30) as response:
            events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:") and "[DONE]" not in line]
    errors = [e["error"] for e in events if "error" in e]
    assert errors and errors[-1]["type"] == "service_unavailable_error", events
