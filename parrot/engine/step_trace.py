"""A record of every forward step an engine ran, to find out where a class of requests
loses its time (`parrot engine --step-trace FILE`, `parrot serve --step-trace DIR`).

One JSON line a step: when it ran, how long it took, what it held (decode rows, prompt
tokens, the KV its attention read, rows of latency-class and throughput-class jobs and
their throughput priorities), whether it replayed a CUDA graph, and its budget (the cap
other work kept to, and the engine's rules from its step cost).
`python -m parrot.engine.step_trace FILE...` sums the steps up by kind.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

from parrot.engine.scheduler import JobKind, StepPlan, is_latency_class, is_throughput_class
from parrot.errors import UserError


@dataclass(frozen=True)
class StepRecord:
    at_s: float  # when the step started, seconds since the trace opened
    seconds: float  # wall time of the step
    decode_rows: int  # sequences that decoded one token
    prefill_tokens: int  # prompt tokens computed (every token but the decode rows')
    kv_tokens: int  # context each chunk attends to, summed over the chunks (a shared prefix counted per sequence)
    latency_rows: int  # chunks of latency-class jobs
    throughput_rows: int  # chunks of throughput-class jobs
    replayed_graph: bool  # the decode graphs ran the step (decode-only steps; CUDA graphs on a GPU)
    # the step budget (StepBudget); a trace written before these were recorded reads with the
    # defaults, and its rules as None
    cap_tokens: int | None = None  # the cap at the step's start (None: none); later apps' counts the decode rows in
    later_apps_capped: bool = False  # the cap was later throughput apps' beside a throughput decode, not a latency job's
    caps_normal_class: bool | None = None  # the engine's rules (its step cost): normal-class work kept to a latency cap
    caps_later_apps: bool | None = None  # and later apps kept to the cap beside the first app's decodes
    throughput_priorities: list[int] = field(default_factory=list)  # distinct, of the step's throughput chunks

    @classmethod
    def of(cls, plan: StepPlan, at_s: float, seconds: float, replayed_graph: bool) -> StepRecord:
        # a generated token fed back; not a preempted job's recompute, whose chunks are longer
        decode = [c for c in plan.chunks if c.length == 1 and c.wants_logits and c.job.kind is JobKind.GENERATE and c.job.num_generated > 0]
        return cls(
            at_s=round(at_s, 6),
            seconds=round(seconds, 6),
            decode_rows=len(decode),
            prefill_tokens=plan.num_tokens - len(decode),
            kv_tokens=sum(c.start + c.length for c in plan.chunks),
            latency_rows=sum(1 for c in plan.chunks if is_latency_class(c.job.priority)),
            throughput_rows=sum(1 for c in plan.chunks if is_throughput_class(c.job.priority)),
            replayed_graph=replayed_graph,
            cap_tokens=plan.cap_tokens,
            later_apps_capped=plan.later_apps_capped,
            caps_normal_class=plan.rules.caps_normal_class if plan.rules is not None else None,
            caps_later_apps=plan.rules.caps_later_apps if plan.rules is not None else None,
            throughput_priorities=sorted({c.job.priority for c in plan.chunks if is_throughput_class(c.job.priority)}),
        )

    @property
    def kind(self) -> str:
        if self.replayed_graph:
            return "graph replay"  # CUDA graphs on a GPU; their static buffers without capture elsewhere
        return "eager, with prompt tokens" if self.prefill_tokens else "eager, decode only"


class StepTrace:
    """Writes StepRecords to a file (replacing what it held), one JSON line each, flushed as
    written (a trace of an engine that is killed keeps every step before it)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file: TextIO = path.open("w", buffering=1)
        except OSError as exc:
            raise UserError(f"cannot write the step trace {path}: {exc.strerror}; pass a writable --step-trace") from exc

    def write(self, record: StepRecord) -> None:
        self._file.write(json.dumps(asdict(record)) + "\n")

    def close(self) -> None:
        self._file.close()


def read_trace(path: Path) -> list[StepRecord]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise UserError(f"cannot read the step trace {path}: {exc.strerror}") from exc
    try:
        return [StepRecord(**json.loads(line)) for line in lines if line.strip()]
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path} is not a step trace (one JSON StepRecord a line): {exc}") from exc


@dataclass(frozen=True)
class StepSummary:
    kind: str
    with_latency_rows: bool
    steps: int
    share_of_time: float
    mean_ms: float
    p90_ms: float
    mean_decode_rows: float
    mean_prefill_tokens: float
    mean_kv_tokens: float


def summarize(records: list[StepRecord]) -> list[StepSummary]:
    """The steps by kind and by whether latency-class rows rode in them, largest share of time first."""
    total = sum(r.seconds for r in records) or 1.0
    groups: dict[tuple[str, bool], list[StepRecord]] = {}
    for record in records:
        groups.setdefault((record.kind, record.latency_rows > 0), []).append(record)
    summaries = []
    for (kind, with_latency), steps in groups.items():
        ms = sorted(r.seconds * 1e3 for r in steps)
        summaries.append(StepSummary(
            kind, with_latency, len(steps), sum(ms) / 1e3 / total, statistics.fmean(ms), ms[int(0.9 * (len(ms) - 1))],
            statistics.fmean(r.decode_rows for r in steps), statistics.fmean(r.prefill_tokens for r in steps),
            statistics.fmean(r.kv_tokens for r in steps),
        ))  # fmt: skip
    return sorted(summaries, key=lambda s: -s.share_of_time)


@dataclass(frozen=True)
class TimelineBucket:
    """The steps that started in one stretch of a trace: how the engine's budget went over time."""

    start_s: float
    steps: int
    busy_s: float
    prompt_tokens: int
    decode_rows: int
    latency_capped_steps: int  # capped beside a latency-class job
    later_apps_capped_steps: int  # capped beside an earlier throughput app's decodes
    caps_later_apps: str  # the engine's rule in the stretch: "on", "off", "on, off" (it changed), "?" (not recorded)
    throughput_priorities: list[int]


def timeline(records: list[StepRecord], bucket_s: float) -> list[TimelineBucket]:
    """The steps in stretches of `bucket_s` seconds, by when they started (stretches without steps left out)."""
    buckets: dict[int, list[StepRecord]] = {}
    for record in records:
        buckets.setdefault(int(record.at_s // bucket_s), []).append(record)
    rule_names = {True: "on", False: "off", None: "?"}
    return [TimelineBucket(
        index * bucket_s, len(steps), sum(r.seconds for r in steps), sum(r.prefill_tokens for r in steps),
        sum(r.decode_rows for r in steps), sum(1 for r in steps if r.cap_tokens is not None and not r.later_apps_capped),
        sum(1 for r in steps if r.later_apps_capped),
        ", ".join(rule_names[rule] for rule in dict.fromkeys(r.caps_later_apps for r in steps)),
        sorted({p for r in steps for p in r.throughput_priorities}),
    ) for index, steps in sorted(buckets.items())]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(prog="python -m parrot.engine.step_trace",
                                     description="Sums up engine step traces (written with --step-trace) by kind of step.")
    parser.add_argument("traces", nargs="+", type=Path, help="trace files (JSON lines), or folders of them")
    parser.add_argument("--timeline", type=float, default=None, metavar="SECONDS",
                        help="also show each trace over time, in stretches of this many seconds: steps, tokens, the steps "
                             "capped beside latency work and beside an earlier app's decodes, the later-apps rule, the "
                             "throughput priorities that ran")
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 160)  # piped to a file: one table row a line
    try:
        if args.timeline is not None and args.timeline <= 0:
            raise UserError(f"--timeline is a stretch of seconds, more than 0, not {args.timeline:g}")
        files = [f for p in args.traces for f in (sorted(p.glob("*.jsonl")) if p.is_dir() else [p])]
        if not files:
            raise UserError(f"no *.jsonl step traces in {', '.join(map(str, args.traces))}")
        for path in files:
            records = read_trace(path)
            table = Table(title=f"{path} ({len(records)} steps, {sum(r.seconds for r in records):.1f} s of steps)")
            for column in ("kind of step", "latency rows", "steps", "time", "mean ms", "p90 ms", "decode rows", "prompt tokens", "KV tokens read"):
                table.add_column(column, justify="left" if column == "kind of step" else "right")
            for s in summarize(records):
                table.add_row(s.kind, "yes" if s.with_latency_rows else "no", str(s.steps), f"{s.share_of_time:.0%}", f"{s.mean_ms:.1f}",
                              f"{s.p90_ms:.1f}", f"{s.mean_decode_rows:.1f}", f"{s.mean_prefill_tokens:.0f}", f"{s.mean_kv_tokens:.0f}")
            console.print(table)
            if args.timeline is not None:
                console.print(timeline_table(path, records, args.timeline))
    except UserError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    return 0


def timeline_table(path: Path, records: list[StepRecord], bucket_s: float):
    from rich.table import Table

    table = Table(title=f"{path} over time (stretches of {bucket_s:g} s)")
    for column in ("from s", "steps", "busy s", "prompt tokens", "decode rows", "capped: latency", "capped: later apps",
                   "later-apps rule", "throughput priorities"):
        table.add_column(column, justify="left" if column == "throughput priorities" else "right")
    for b in timeline(records, bucket_s):
        table.add_row(f"{b.start_s:g}", str(b.steps), f"{b.busy_s:.2f}", str(b.prompt_tokens), str(b.decode_rows),
                      str(b.latency_capped_steps), str(b.later_apps_capped_steps), b.caps_later_apps,
                      " ".join(map(str, b.throughput_priorities)) or "-")
    return table


if __name__ == "__main__":
    sys.exit(main())
