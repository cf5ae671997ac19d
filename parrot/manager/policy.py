"""Scheduling policies: which engine runs a ready call, when, and at what priority.

`parrot` uses what the DAG tells it (objectives, task groups, App-FIFO, prefixes);
the others switch that knowledge off and are the baselines of the benchmarks:
`fifo` (arrival order, least-loaded engine), `latency-centric` (every engine kept
at a small batch, the rest waits) and `throughput-centric` (batches filled as
large as they go).
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from parrot.backends.base import EngineBackend
from parrot.engine.scheduler import PRIORITY_NORMAL
from parrot.engine.step_profile import LATENCY_SEQS_FLOOR
from parrot.errors import UserError
from parrot.manager.graph import Call, Objective
from parrot.manager.objectives import engine_priority
from parrot.manager.prefix_index import PrefixIndex, PrefixMatch

# An engine holding a call's prefix is preferred while its load stays within this
# many calls of the least loaded engine; past that the prefix is replicated.
AFFINITY_SLACK = 4
# Throughput work avoids engines with latency-critical calls only while the quiet engine it
# would take instead runs at most the least loaded one's calls over that engine's share of
# its prompt rate beside latency work (BackendStats.prefill_share_beside_latency). An engine
# serving latency work prefills the rest in capped steps, at a fraction of its full rate
# (0.42 on a simulated A100, 0.55-0.6 on this CPU with its 16-token cap), so its fair share of throughput work is that
# fraction; never less than MIN_PREFILL_SHARE of it.
MIN_PREFILL_SHARE = 0.25
# A latency-critical call no engine serving latency work has room for goes to an engine running
# fewer calls than this, if there is one; engines that do not report how many latency-critical
# calls they serve at once serve this many: the small batch of the step cost's rules.
LATENCY_BATCH_BOUND = LATENCY_SEQS_FLOOR
# latency-centric keeps every engine's batch this small; throughput-centric fills up to this
SMALL_BATCH = 4
LARGE_BATCH = 64
CHARS_PER_TOKEN = 4  # for estimates of KV tokens from text
# A task group spreading over idle engines leaves one of them free for latency-critical
# calls while such calls have come within this many seconds; otherwise it takes them all.
LATENCY_RESERVE_WINDOW_S = 60.0
# Throughput work is handed to an engine as it takes it in: once the prompts placed on an
# engine and not yet prefilled would fill this many of its steps, more throughput calls wait
# in the manager. Placed later, they see what has come since: an engine that took on latency
# work prefills the rest in capped steps and drains its queue slower, so it gets less of it,
# where calls placed all at once split evenly and every job waits for its slowest part.
QUEUED_PREFILL_STEPS = 2


@dataclass
class EngineLoad:
    """What the manager has placed on one engine and not yet seen finish."""

    calls: int = 0
    latency_calls: int = 0
    tokens: int = 0  # estimated KV tokens of those calls (prompt and outputs)
    unfilled_tokens: int = 0  # estimated prompt tokens of those calls that the engine has not prefilled yet


@dataclass(frozen=True)
class CallDemand:
    """What placing a ready call asks of an engine."""

    prompt_hashes: list[bytes]  # PrefixHash of the text before its first output
    tokens: int  # estimated KV tokens: the prompt (about 4 characters a token) and every output's max_tokens
    group_size: int = 1  # calls in its task group, itself included
    prompt_tokens: int = 0  # estimated tokens of the text before its first output


def capacity_tokens(engine: EngineBackend) -> int | None:
    """KV tokens the engine holds in all, when it says (None: unbounded or unknown)."""
    stats = engine.stats()
    return stats.kv_blocks_total * stats.kv_block_size if stats.kv_blocks_total > 0 else None


def fits(engine: EngineBackend, view: ClusterView, tokens: int) -> bool:
    capacity = capacity_tokens(engine)
    return capacity is None or view.load[engine.name].tokens + tokens <= capacity


def latency_seqs_bound(engine: EngineBackend) -> int:
    """Latency-critical calls the engine serves at once (BackendStats.latency_seqs_bound);
    LATENCY_BATCH_BOUND where it does not say; never more than one step batches."""
    stats = engine.stats()
    bound = stats.latency_seqs_bound or LATENCY_BATCH_BOUND
    return min(bound, stats.max_seqs_per_step) if stats.max_seqs_per_step else bound


def takes_throughput_work(engine: EngineBackend, view: ClusterView) -> bool:
    """Whether the engine should be handed more throughput work now (QUEUED_PREFILL_STEPS): its
    queue of prompts not yet prefilled is short of that many steps, and it runs fewer calls than
    a step's sequences. Always where the engine does not report its step budget."""
    limits, load = engine.step_limits(), view.load[engine.name]
    if limits.max_tokens_per_step > 0 and load.unfilled_tokens >= QUEUED_PREFILL_STEPS * limits.max_tokens_per_step:
        return False
    return not (limits.max_seqs_per_step > 0 and load.calls >= limits.max_seqs_per_step)


@dataclass
class ClusterView:
    engines: Sequence[EngineBackend]
    load: dict[str, EngineLoad]
    prefixes: PrefixIndex
    group_engines: dict[str, list[str]] = field(default_factory=dict)  # task group -> the engines it runs on
    last_latency_call_s: float | None = None  # clock() when a latency-critical call was last placed
    clock: Callable[[], float] = time.monotonic

    def latency_work_is_recent(self) -> bool:
        return self.last_latency_call_s is not None and self.clock() - self.last_latency_call_s <= LATENCY_RESERVE_WINDOW_S


class SchedulingPolicy(ABC):
    """Contract: `place` gets a call whose inputs are ready and a view with at least one
    engine; it returns one of view.engines, or None to hold the call in the manager (it
    is offered again, in `order`, whenever a call finishes or an engine joins). It may
    record what it decided in the view (task groups, prefixes). `priority` is the engine
    priority of the call's jobs: lower runs first, equal values run in arrival order.
    `shares_static_prefixes`: engines are told which leading text of a call is its
    function's constant prefix (to prefill once and fork); engines without that hint
    still find shared prefixes in their own block cache."""

    name: str
    shares_static_prefixes: bool = False

    @abstractmethod
    def place(self, call: Call, demand: CallDemand, view: ClusterView) -> EngineBackend | None: ...

    def priority(self, call: Call, apps_ahead: int = 0) -> int:
        """`apps_ahead`: the place of the call's app among the apps with throughput work in flight."""
        return PRIORITY_NORMAL

    def order(self, held: list[Call]) -> list[Call]:
        """The order held calls are offered again in."""
        return sorted(held, key=lambda c: c.arrival)


def held_prompt_tokens(match: PrefixMatch, engine: EngineBackend) -> int:
    """The estimated tokens of a prompt's matched prefix where the engine holds it, else 0."""
    return match.chars // CHARS_PER_TOKEN if engine.name in match.holders else 0


def _least_loaded(engines: Sequence[EngineBackend], view: ClusterView) -> EngineBackend:
    return min(engines, key=lambda e: view.load[e.name].calls)


class ParrotPolicy(SchedulingPolicy):
    name = "parrot"
    shares_static_prefixes = True

    def place(self, call, demand, view):
        by_name = {e.name: e for e in view.engines}
        group_engines = [by_name[n] for n in view.group_engines.get(call.task_group or "", []) if n in by_name]
        throughput = call.objective is Objective.THROUGHPUT
        if group_engines:
            if throughput:
                group_engines = [e for e in group_engines if takes_throughput_work(e, view)]
                if not group_engines:
                    return None  # its group's engines are busy: it waits for them
            return _least_loaded(group_engines, view)
        if throughput:
            taking = [e for e in view.engines if takes_throughput_work(e, view)]
            if not taking:
                return None
            view = replace(view, engines=taking)
        # capacity in KV tokens (less the prefix an engine already holds, which forks share):
        # a task group goes whole to an engine where the whole group fits
        match = view.prefixes.longest_match(demand.prompt_hashes)
        holders = match.holders

        def new_tokens(engine: EngineBackend, calls: int) -> int:
            return calls * max(demand.tokens - held_prompt_tokens(match, engine), 0)

        candidates = [e for e in view.engines if fits(e, view, new_tokens(e, demand.group_size))]
        candidates = candidates or [e for e in view.engines if fits(e, view, new_tokens(e, 1))] or list(view.engines)
        if call.objective is Objective.LATENCY:
            if not any(p.task_group == call.call_id for p in call.producers):
                # a group's own consumer runs after the group, never beside it: no reason to keep an engine free
                view.last_latency_call_s = view.clock()
            # the latency class caps the other work's steps on its engine, so it is gathered on
            # few engines: one already serving latency work with room for more (the one serving
            # most; of those, one holding the prompt's prefix), else one kept at a small batch, else any
            serving = [e for e in candidates if 0 < view.load[e.name].latency_calls < latency_seqs_bound(e)]
            if serving:
                candidates = [max(serving, key=lambda e: (view.load[e.name].latency_calls, e.name in holders, -view.load[e.name].calls))]
            else:
                candidates = [e for e in candidates if view.load[e.name].calls < LATENCY_BATCH_BOUND] or candidates
        elif call.objective is Objective.THROUGHPUT:
            # throughput work stays off engines serving latency-critical calls where it can, but
            # not at any price: piling it onto a busy quiet engine beside an idle one with a chat
            # slows the throughput work more than the chat gains (its steps stay short anyway)
            fewest = min(view.load[e.name].calls for e in candidates)
            share = min((e.stats().prefill_share_beside_latency for e in candidates if view.load[e.name].latency_calls), default=1.0)
            most = math.ceil(fewest / max(share, MIN_PREFILL_SHARE))
            quiet = [e for e in candidates if view.load[e.name].latency_calls == 0 and view.load[e.name].calls <= most]
            candidates = quiet or candidates
        engine = _least_loaded(candidates, view)
        holding = [e for e in candidates if e.name in holders]
        if holding:
            best_holder = _least_loaded(holding, view)
            if view.load[best_holder.name].calls <= view.load[engine.name].calls + AFFINITY_SLACK:
                engine = best_holder
        if call.task_group is not None:
            spread = _idle_engines_for_group(engine, candidates, view, demand.group_size, new_tokens)
            if spread or fits(engine, view, new_tokens(engine, demand.group_size)):
                view.group_engines[call.task_group] = [e.name for e in spread] or [engine.name]  # its siblings follow
        return engine

    def priority(self, call, apps_ahead=0):
        return engine_priority(call, apps_ahead)

    def order(self, held):
        # App-FIFO: latency-critical calls, then throughput work app by app in the order the apps
        # asked for it; within those, later stages first, then arrival
        def key(c: Call) -> tuple[bool, int, int, int]:
            return c.objective is not Objective.LATENCY, c.app_order if c.objective is Objective.THROUGHPUT else 0, -c.depth, c.arrival
        return sorted(held, key=key)


def _idle_engines_for_group(first: EngineBackend, candidates: list[EngineBackend], view: ClusterView, group_size: int,
                            new_tokens: Callable[[EngineBackend, int], int]) -> list[EngineBackend]:
    """The idle engines a task group spreads over, `first` among them; empty: keep it on one engine.

    A group's completion time is what matters, and its prefill is compute-bound, so engines
    with nothing to do share it, where at least three are idle (with one or two engines the
    group keeps to one and leaves the other to latency work). While latency-critical calls
    have come lately, one idle engine is kept out of the group, free for the next of them."""
    idle = [e for e in candidates if view.load[e.name].calls == 0]
    if first not in idle or len(idle) < 3:
        return []
    kept_free = 1 if view.latency_work_is_recent() else 0
    spread = [first, *[e for e in idle if e is not first][: len(idle) - 1 - kept_free]]
    share = -(-group_size // len(spread))
    return spread if all(fits(e, view, new_tokens(e, share)) for e in spread) else []


class FifoPolicy(SchedulingPolicy):
    name = "fifo"

    def place(self, call, demand, view):
        return _least_loaded(view.engines, view)


class LatencyCentricPolicy(SchedulingPolicy):
    name = "latency-centric"

    def place(self, call, demand, view):
        engine = _least_loaded(view.engines, view)
        return engine if view.load[engine.name].calls < SMALL_BATCH else None


class ThroughputCentricPolicy(SchedulingPolicy):
    name = "throughput-centric"

    def place(self, call, demand, view):
        # batches as large as an engine takes; what exceeds them waits
        room = [e for e in view.engines if view.load[e.name].calls < LARGE_BATCH]
        return _least_loaded(room, view) if room else None


POLICIES: dict[str, type[SchedulingPolicy]] = {
    p.name: p for p in (ParrotPolicy, FifoPolicy, LatencyCentricPolicy, ThroughputCentricPolicy)
}


def policy_named(name: str) -> SchedulingPolicy:
    if name not in POLICIES:
        raise UserError(f"unknown scheduling policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name]()
