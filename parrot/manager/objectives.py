"""GetPerfObj: deduce each call's scheduling objective from what the program asks for.

get(perf=LATENCY) on a variable makes the calls it depends on latency-critical,
backwards through the DAG, except that calls which all feed one consumer form a
task group: the group's completion is what matters, so its members are scheduled
as throughput work, together. get(perf=THROUGHPUT) makes the whole sub-DAG
throughput work. Depth orders work across apps (App-FIFO: deeper first).
"""

from __future__ import annotations

from parrot.engine.scheduler import MAX_STAGE_DEPTH, PRIORITY_LATENCY, PRIORITY_NORMAL, PRIORITY_THROUGHPUT
from parrot.manager.graph import Call, CallState, Objective, SVGraph, Variable
from parrot.manager.spec import Perf

_STARTED = (CallState.RUNNING, CallState.DONE, CallState.FAILED)


def deduce_objectives(graph: SVGraph, var: Variable, perf: Perf) -> list[Call]:
    """Marks the calls var depends on; returns them (the calls to activate)."""
    calls = graph.upstream_calls(var)
    wanted = {call.call_id for call in calls}
    side_by_side: dict[str, set[str]] = {}
    for call in calls:
        if call.state in _STARTED:
            continue  # it runs (or ran) with the objective it had when it started
        if perf is Perf.THROUGHPUT:
            if call.objective is Objective.UNKNOWN:
                call.objective = Objective.THROUGHPUT
            continue
        group = task_group_of(call, wanted, side_by_side)
        if group is not None:
            call.task_group = group
            if call.objective is not Objective.LATENCY:
                call.objective = Objective.THROUGHPUT
        else:
            call.objective = Objective.LATENCY
    return calls


def task_group_of(call: Call, wanted: set[str] | None = None, cache: dict[str, set[str]] | None = None) -> str | None:
    """The consumer a call feeds together with sibling producers, if there is one.

    A call is in a task group when one of its outputs is consumed by a call that
    takes inputs from two or more producers that can run side by side (the map
    stage of map-reduce). A producer that another producer of the same consumer
    depends on is a stage before them, not a sibling; and only consumers in
    `wanted` (the calls the program asked for) count.
    """
    for output in call.outputs.values():
        for consumer in output.consumers:
            if wanted is not None and consumer.call_id not in wanted:
                continue
            members = cache.get(consumer.call_id) if cache is not None else None
            if members is None:
                members = parallel_producers(consumer)
                if cache is not None:
                    cache[consumer.call_id] = members
            if len(members) >= 2 and call.call_id in members:
                return consumer.call_id
    return None


def parallel_producers(consumer: Call) -> set[str]:
    """Ids of the consumer's producers that no other producer of it depends on."""
    producers = {p.call_id for p in consumer.producers}
    before: set[str] = set()  # calls that some producer depends on
    stack = [q for p in consumer.producers for q in p.producers]
    while stack:
        upstream = stack.pop()
        if upstream.call_id in before:
            continue
        before.add(upstream.call_id)
        stack.extend(upstream.producers)
    return producers - before


# Throughput priorities (PRIORITY_NORMAL + 1 .. PRIORITY_THROUGHPUT) hold the app's place among
# the apps with throughput work in flight, then its stage: STAGE_LEVELS stages a place
STAGE_LEVELS = 10
MAX_APPS_AHEAD = (PRIORITY_THROUGHPUT - PRIORITY_NORMAL) // STAGE_LEVELS - 1


def engine_priority(call: Call, apps_ahead: int = 0) -> int:
    """Engine-level priority (lower runs first): objective class, then deeper stages first.
    Throughput work orders apps first (App-FIFO): `apps_ahead` is the app's place among the
    apps with throughput work in flight (Executor._app_place: kept while the app runs, after
    every earlier app); places past MAX_APPS_AHEAD share the last, stages past STAGE_LEVELS
    the deepest."""
    if call.objective is Objective.THROUGHPUT:
        place = min(apps_ahead, MAX_APPS_AHEAD) * STAGE_LEVELS + STAGE_LEVELS - 1 - min(call.depth, STAGE_LEVELS - 1)
        return PRIORITY_NORMAL + 1 + place
    base = PRIORITY_LATENCY if call.objective is Objective.LATENCY else PRIORITY_NORMAL
    return base - min(call.depth, MAX_STAGE_DEPTH)
