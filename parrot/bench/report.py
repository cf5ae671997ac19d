"""What every benchmark report shares (its header, files, tables), and the app workloads'
markdown table, plot and one-line summary."""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from parrot.bench.systems import ENGINE_FLAGS


def machine() -> dict:
    import os

    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}


def result_header(workload: str, quick: bool, model: str) -> dict:
    """The fields every benchmark result starts with."""
    return {"workload": workload, "quick": quick, "model": model, "engine_flags": " ".join(ENGINE_FLAGS), "machine": machine(),
            "created": time.strftime("%Y-%m-%d %H:%M:%S")}


def partial_path(out_dir: Path, workload: str) -> Path:
    return out_dir / f"{workload}.partial.jsonl"


class PartialResults:
    """Each measurement of a run as it lands, one JSON line each in DIR/WORKLOAD.partial.jsonl,
    so that a run cut off (a time limit, a lost machine) keeps what it had measured; the full
    report replaces the file when the run ends."""

    def __init__(self, out_dir: Path, workload: str):
        self.path = partial_path(out_dir, workload)
        self.path.unlink(missing_ok=True)  # an earlier run's lines are not this run's

    def add(self, label: str, measurement: object) -> None:
        """Appends one measurement (a dataclass) under `label` (the system or policy that gave it)."""
        fields = dataclasses.asdict(measurement) if dataclasses.is_dataclass(measurement) else measurement
        with self.path.open("a") as out:
            out.write(json.dumps({"label": label, "at": time.strftime("%H:%M:%S"), "measurement": fields}, default=str) + "\n")


def save_report(result: dict, out_dir: Path, write_markdown: Callable[[dict, Path], None], plot: Callable[[dict, Path], None]) -> None:
    """Writes out_dir/WORKLOAD.json, .md and .png (and drops the run's partial results)."""
    name = result["workload"]
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2))
    partial_path(out_dir, name).unlink(missing_ok=True)
    write_markdown(result, out_dir / f"{name}.md")
    plot(result, out_dir / f"{name}.png")


def engines_title(model: str, engine: str, engines: int) -> str:
    """What a policy workload ran on, for its table's title."""
    plural = "" if engines == 1 else "s"
    return f"{engines} SIMULATED {engine} engine{plural}" if engine.startswith("sim:") else f"{model}, {engines} engine{plural}"


def print_rows(console: Console, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [f"| {' | '.join(columns)} |", "|" + "---|" * len(columns), *(f"| {' | '.join(row)} |" for row in rows)]


def best_measurements(result: dict) -> dict[tuple[float, str], dict]:
    """(added RTT in ms, system) -> the measurement with the lowest mean latency, in the order measured."""
    best: dict[tuple[float, str], dict] = {}
    for m in result["measurements"]:
        key = (m["rtt_ms"], m["system"])
        if key not in best or m["mean_s"] < best[key]["mean_s"]:
            best[key] = m
    return best


def size_name(quick: bool, paper_scale: bool) -> str:
    """The run's size as reports name it: quick, full or paper-scale."""
    return "paper-scale" if paper_scale else "quick" if quick else "full"


def size_of(result: dict) -> str:
    """quick, full or paper-scale (results written before paper-scale existed say only quick or not)."""
    return result.get("size") or ("quick" if result["quick"] else "full")


def ratio_of(result: dict, rtt_ms: float, system: str) -> float:
    return result["ratios"][f"{rtt_ms:.0f}ms"][system]


# what a failed warm-up check means depends on the numerics: tests hold float32 CPU runs to "identical"
DIFFERENT_OUTPUTS = ("DIFFERENT (in bfloat16 on a GPU a greedy choice between near-tied logits can go either way with the "
                     "batch's shape, random weights tie often; in float32 on the CPU the texts must agree)")


def has_background(result: dict) -> bool:
    return result["config"].get("background_rate", 0) > 0


def background_cell(measurement: dict) -> str:
    """The background requests' mean latency: what the latency class cost the other clients."""
    mean, failed = measurement.get("background_mean_s"), measurement.get("background_failures", 0)
    return ("-" if mean is None else f"{mean:.2f}") + (f" ({failed} failed)" if failed else "")


def write_markdown(result: dict, path: Path) -> None:
    background = has_background(result)
    lines = [
        f"### {result['workload']} ({size_of(result)})",
        "",
        f"Model {result['model']} on {result['engines']} x {result['engine']} engine(s)"
        f"{' (SIMULATED: a cost model, not the real engine)' if result['simulated'] else ''}; settings {result['config']}; {result['repeats']} repeat(s), best mean shown. "
        f"RTT is added in the benchmark's client only. Paper: {result['config'].get('paper') or '-'}.",
        "",
        *markdown_table(("system", "added RTT", "mean latency (s)", "p90 (s)", "slower than parrot")
                        + (("background requests' mean latency (s)",) if background else ()), [
            (system, f"{rtt:.0f} ms", f"{m['mean_s']:.2f}", f"{m['p90_s']:.2f}", f"{ratio_of(result, rtt, system):.2f}x")
            + ((background_cell(m),) if background else ())
            for (rtt, system), m in sorted(best_measurements(result).items())
        ]),
    ]
    lines += ["", "Every measured run reads its own documents (engines cache prompt prefixes); a warm-up pair on the same "
              f"documents checks that parrot and request-level produce the same text: {'identical' if result['outputs_match'] else DIFFERENT_OUTPUTS}."]
    lines += [f"Note: {note}" for note in result["notes"]]
    path.write_text("\n".join(lines) + "\n")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_measurements(result)
    rtts = sorted({rtt for rtt, _ in best})
    systems = sorted({system for _, system in best}, key=lambda s: (s != "parrot", s))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(systems)
    for i, system in enumerate(systems):
        values = [best[(rtt, system)]["mean_s"] if (rtt, system) in best else 0 for rtt in rtts]
        ax.bar([x + i * width for x in range(len(rtts))], values, width, label=system)
    ax.set_xticks([x + width * (len(systems) - 1) / 2 for x in range(len(rtts))], [f"+{r:.0f} ms RTT" for r in rtts])
    ax.set_ylabel("mean app latency (s)")
    ax.set_title(f"{result['workload']} ({result['model']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_line(result: dict) -> str:
    parts = []
    for setting, ratios in sorted(result["ratios"].items(), key=lambda kv: float(kv[0][:-2])):
        others = ", ".join(f"{system} {ratio:.2f}x slower" for system, ratio in sorted(ratios.items()) if system != "parrot")
        parts.append(f"+{setting} RTT: parrot 1.00x, {others}")
    return f"{result['workload']}: " + "; ".join(parts)
