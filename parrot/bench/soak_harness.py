"""Runs the `soak` workload against `parrot serve` with two engines and reports it."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from parrot.bench.mixed import warm_up
from parrot.bench.report import markdown_table, print_rows, result_header, save_report
from parrot.bench.soak import APP_KINDS, SoakResult, quick_or_full, run_soak, settle
from parrot.bench.systems import start_parrot


def run_soak_bench(workload: str, quick: bool, out_dir: Path, model: str, console: Console) -> dict:
    config = quick_or_full(workload, quick)
    out_dir.mkdir(parents=True, exist_ok=True)
    flags = ["--threads", "1", "--session-idle-timeout", str(config.session_idle_timeout_s)]
    server = start_parrot(model, config.engines, out_dir, flags, log_name=f"{workload}.log")
    try:
        warm_up(server)
        before = settle(server, config)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"{workload}: {config.clients} clients, up to {config.duration_s:.0f}s", total=config.max_apps)
            soak = run_soak(config, server, lambda done: progress.update(task, completed=done))
        soak.before, soak.after = before, settle(server, config)
    finally:
        server.stop()
    result = {**result_header(workload, quick, model), "config": asdict(config), "wall_s": soak.wall_s,
              "apps": len(soak.runs), "errors": [asdict(r) for r in soak.errors],
              "latency": {kind: soak.latency_percentiles(kind) for kind in APP_KINDS},
              "served": {kind: sum(1 for r in soak.runs if r.kind == kind and r.error is None) for kind in APP_KINDS},
              "before": asdict(soak.before), "after": asdict(soak.after),
              "runs": [asdict(r) for r in soak.runs]}
    save_report(result, out_dir, write_soak_markdown, plot_soak)
    print_rows(console, f"{workload} ({'quick' if quick else 'full'}, {model})", SOAK_COLUMNS, soak_rows(result))
    print_rows(console, "server before and after", STATE_COLUMNS, state_rows(result))
    console.print(soak_summary(result, soak))
    return result


SOAK_COLUMNS = ("app", "served", "p50 (s)", "p90 (s)", "p99 (s)")
STATE_COLUMNS = ("", "sessions", "engine contexts", "live KV blocks", "cached KV blocks", "running jobs", "memory (MiB)")


def _seconds(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def soak_rows(result: dict) -> list[tuple[str, ...]]:
    return [(kind, str(result["served"][kind]), *(_seconds(result["latency"][kind][p]) for p in ("p50", "p90", "p99")))
            for kind in APP_KINDS]


def state_rows(result: dict) -> list[tuple[str, ...]]:
    return [(label, *(str(round(v)) if isinstance(v, float) else str(v) for v in result[key].values()))
            for label, key in (("before", "before"), ("after", "after"))]


def write_soak_markdown(result: dict, path: Path) -> None:
    c = result["config"]
    lines = [
        f"### {result['workload']} ({'quick' if result['quick'] else 'full'})",
        "",
        f"Model {result['model']}, `parrot serve` with {c['engines']} engines of one thread; {c['clients']} client threads for "
        f"{result['wall_s']:.0f} s ({result['apps']} apps: chains, map-reduces, streamed OpenAI chats and abandoned sessions, "
        f"{c['output_tokens']} output tokens each), session idle timeout {c['session_idle_timeout_s']:.0f} s. "
        f"Errors: **{len(result['errors'])}**.",
        "",
        *markdown_table(SOAK_COLUMNS, soak_rows(result)),
        "",
        *markdown_table(STATE_COLUMNS, state_rows(result)),
    ]
    if result["errors"]:
        lines += ["", "Errors:", *(f"- {e['kind']} at {e['started_s']:.0f} s: {e['error']}" for e in result["errors"][:20])]
    path.write_text("\n".join(lines) + "\n")


def plot_soak(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for kind in APP_KINDS:
        runs = [r for r in result["runs"] if r["kind"] == kind and r["error"] is None]
        ax.scatter([r["started_s"] for r in runs], [r["latency_s"] for r in runs], s=8, label=kind)
    failed = [r for r in result["runs"] if r["error"] is not None]
    if failed:
        ax.scatter([r["started_s"] for r in failed], [r["latency_s"] for r in failed], s=30, marker="x", color="red", label="error")
    ax.set_xlabel("app start (s)")
    ax.set_ylabel("app latency (s)")
    ax.set_title(f"{result['workload']}: {result['apps']} apps, {len(result['errors'])} errors")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def soak_summary(result: dict, soak: SoakResult) -> str:
    b, a = soak.before, soak.after
    assert b is not None and a is not None
    return (f"{result['workload']}: {result['apps']} apps in {result['wall_s']:.0f}s, {len(result['errors'])} errors; "
            f"engine contexts {b.engine_contexts} -> {a.engine_contexts}, live KV blocks {b.kv_blocks_live} -> {a.kv_blocks_live}, "
            f"sessions {b.sessions} -> {a.sessions}, memory {b.rss_mib:.0f} -> {a.rss_mib:.0f} MiB")
