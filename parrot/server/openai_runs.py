"""How an OpenAI request runs on the manager: its choices are the calls of one app.

Each choice (a prompt of the request, n times) is a call in one session of the caller's
tenant. Choices of one prompt say so (`prompt_shared`), so the engine prefills that prompt
once and forks every choice from it. The session closes when the answer is out, or when
the client hangs up, which stops whatever is still generating.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from fastapi import Request
from fastapi.responses import StreamingResponse

from parrot.engine.sampler import SamplingParams
from parrot.errors import EngineUnavailableError, UserError
from parrot.manager.graph import LoggedToken, Variable
from parrot.manager.manager import Manager
from parrot.server.common import unless_client_gone

# A plain OpenAI request says nothing of its app, so it declares no objective: it runs at the
# engines' normal class, as request-level serving runs everything. Latency-critical treatment
# (small steps beside other work, placement on lightly loaded engines) is for what an app
# declares with get(perf=LATENCY); if every request claimed it, none would get it.
OPENAI_OBJECTIVE = None


@dataclasses.dataclass(frozen=True)
class ChoiceSpec:
    """One choice to generate: choices of one prompt share it, each with a seed of its own."""

    index: int  # its place in the answer's choices
    prompt: str
    sampling: SamplingParams
    prompt_shared: bool  # another choice of the request has the same prompt


def choice_specs(prompts: list[str], samplings: list[SamplingParams], n: int) -> list[ChoiceSpec]:
    """n choices per prompt, in the prompts' order. With a seed, choice j of a prompt samples
    with seed + j, as vLLM does, so that the choices differ and the answer is still repeatable."""
    copies = Counter(prompts)
    return [
        ChoiceSpec(i * n + j, prompt, sampling if sampling.seed is None else dataclasses.replace(sampling, seed=sampling.seed + j),
                   prompt_shared=n * copies[prompt] > 1)
        for i, (prompt, sampling) in enumerate(zip(prompts, samplings)) for j in range(n)
    ]


@dataclasses.dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str
    completion_tokens: int
    tokens: list[LoggedToken]  # with their log probabilities, where the sampling asked for them


def _answer_of(var: Variable) -> Answer:
    return Answer(var.value or "", var.finish_reason or "stop", var.num_tokens, var.token_logprobs)


@dataclasses.dataclass
class _Submitted:
    session: str
    variables: list[Variable]  # one per choice, in the specs' order


def _submit(manager: Manager, tenant: str, specs: list[ChoiceSpec]) -> _Submitted:
    session = manager.create_session(tenant)
    try:
        var_ids = [manager.submit_prompt(session, s.prompt, s.sampling, tenant, prompt_shared=s.prompt_shared) for s in specs]
    except BaseException:
        manager.close_session(session, tenant)
        raise
    graph = manager.sessions[session].graph
    return _Submitted(session, [graph.variable(v) for v in var_ids])


async def answer_choices(manager: Manager, request: Request, tenant: str, specs: list[ChoiceSpec]) -> list[Answer]:
    """Every choice's whole answer, in the specs' order. Raises ClientGone when the client hangs
    up first; one choice's failure stops the others (their answers would go nowhere)."""
    run = _submit(manager, tenant, specs)
    try:
        waits = [manager.get_variable(run.session, v.var_id, OPENAI_OBJECTIVE, tenant) for v in run.variables]
        await unless_client_gone(request, asyncio.gather(*waits))
        return [_answer_of(v) for v in run.variables]
    finally:
        manager.close_session(run.session, tenant)


# render(index, delta, finish_reason, tokens) -> one SSE event for choice `index` (empty bytes: none
# yet, render keeps the piece); tokens: those logged since the last call (where the sampling asked
# for log probabilities)
Render = Callable[[int, str, str | None, list[LoggedToken]], bytes]
_CHOICE_DONE = object()


def stream_choices(manager: Manager, tenant: str, specs: list[ChoiceSpec], render: Render,
                   usage_event: Callable[[int], bytes] | None = None, leads: list[bytes] = ()) -> StreamingResponse:
    """The choices' text as it comes, interleaved, as server-sent events, then [DONE].
    usage_event(completion_tokens) -> the last event before [DONE], where the client asked for its
    usage; leads: events sent first (the prompts, where echo asks for them). The calls are
    submitted before the response starts, so a refusal is still a plain error status."""
    run = _submit(manager, tenant, specs)

    async def one_choice(spec: ChoiceSpec, var: Variable, queue: asyncio.Queue) -> None:
        sent = 0  # of var.token_logprobs
        try:
            async for piece in manager.stream_published(run.session, var.var_id, OPENAI_OBJECTIVE, tenant):
                if piece.text:
                    # the tokens whose text this piece completes: one whose text is held back goes with a later one
                    event = render(spec.index, piece.text, None, var.token_logprobs[sent : piece.logged_tokens])
                    sent = max(sent, piece.logged_tokens)
                    if event:  # empty: render holds the piece back (a tool call sent whole at its end)
                        await queue.put(event)
            await queue.put(render(spec.index, "", var.finish_reason or "stop", var.token_logprobs[sent:]))
            await queue.put(_CHOICE_DONE)
        except Exception as exc:  # handed to the response, which sends it as the stream's error event
            await queue.put(exc)

    async def interleaved() -> AsyncIterator[bytes]:
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.ensure_future(one_choice(s, v, queue)) for s, v in zip(specs, run.variables)]
        try:
            finished = 0
            while finished < len(tasks):
                item = await queue.get()
                if item is _CHOICE_DONE:
                    finished += 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            # each choice's reader leaves its variable's listeners before the session closes
            await asyncio.gather(*tasks, return_exceptions=True)

    async def events() -> AsyncIterator[bytes]:
        try:
            for lead in leads:
                yield lead
            async with aclosing(interleaved()) as stream:
                async for event in stream:
                    yield event
            if usage_event is not None:
                yield usage_event(sum(v.num_tokens for v in run.variables))
            yield b"data: [DONE]\n\n"
        except Exception as exc:
            # the types a plain request's status would carry (400, 503, 500)
            kind = "invalid_request_error" if isinstance(exc, UserError) else \
                "service_unavailable_error" if isinstance(exc, EngineUnavailableError) else "server_error"
            yield f"data: {json.dumps({'error': {'message': str(exc), 'type': kind}})}\n\n".encode()
        finally:
            manager.close_session(run.session, tenant)

    return StreamingResponse(events(), media_type="text/event-stream")
