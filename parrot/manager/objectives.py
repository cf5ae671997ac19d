"""GetPerfObj: deduce each call's scheduling objective from what the program asks for.

get(perf=LATENCY) on a variable makes the calls it depends on latency-critical,
backwards through the DAG, except that calls which all feed one consumer form a
task group: the group's completion is what matters, so its members are scheduled
as throughput work, together. get(perf=THROUGHPUT) makes the whole sub-DAG
throughput work. Depth orders work across apps (App-FIFO: deeper first).
"""

from __future__ import annotations

from parrot.engine.scheduler import PRIORITY_LATENCY, PRIORITY_NORMAL, PRIORITY_THROUGHPUT
from parrot.manager.graph import Call, Objective, SVGraph, Variable
from parrot.manager.spec import Perf

_MAX_DEPTH = 999


def deduce_objectives(graph: SVGraph, var: Variable, perf: Perf) -> list[Call]:
    """Marks the calls var depends on; returns them (the calls to activate)."""
    calls = graph.upstream_calls(var)
    for call in calls:
        if perf is Perf.THROUGHPUT:
            if call.objective is Objective.UNKNOWN:
                call.objective = Objective.THROUGHPUT
            continue
        group = task_group_of(call)
        if group is not None:
            call.task_group = group
            if call.objective is not Objective.LATENCY:
                call.objective = Objective.THROUGHPUT
        else:
            call.objective = Objective.LATENCY
    return calls


def task_group_of(call: Call) -> str | None:
    """The consumer a call feeds together with sibling producers, if there is one.

    A call is in a task group when one of its outputs is consumed by a call that
    takes inputs from two or more distinct producers (the map stage of map-reduce).
    """
    for output in call.outputs.values():
        for consumer in output.consumers:
            if len({p.call_id for p in consumer.producers}) >= 2:
                return consumer.call_id
    return None


def engine_priority(call: Call) -> int:
    """Engine-level priority (lower runs first): objective class, then deeper stages first."""
    base = {Objective.LATENCY: PRIORITY_LATENCY, Objective.THROUGHPUT: PRIORITY_THROUGHPUT}.get(call.objective, PRIORITY_NORMAL)
    return base * (_MAX_DEPTH + 1) - min(call.depth, _MAX_DEPTH)
