"""Figure 11's two sweeps: chain-summary at the paper's sizes, Parrot against request-level
serving, (a) over output lengths at one chunk size and (b) over chunk sizes at one output
length. Each point is one `parrot bench chain-summary --paper-scale` run (both systems,
loopback and the added round trip, in the same run); the sweep prints the ratios per point
and writes chain-summary-sweep.json/.md/.png to --out.

    python benchmarks/chain_summary_sweep.py                         # 7 points on 1 SIMULATED A100-13B
    python benchmarks/chain_summary_sweep.py --outputs 25 100 --chunk-sizes 1024
    python benchmarks/chain_summary_sweep.py --engine builtin --device cuda --random-weights llama-13b

A simulated engine (the default here) is the named cost-model backend, labelled as such in
every table; the built-in engine at these sizes needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from parrot.bench.harness import run_bench
from parrot.bench.report import best_measurements, markdown_table, print_rows
from parrot.bench.systems import use_engine_flags
from parrot.bench.workloads import PAPER_SIZES, SizeOverrides

PAPER_OUTPUTS = (25, 50, 75, 100)  # Fig. 11a, at chunks of 1024 tokens
PAPER_CHUNK_SIZES = (512, 1024, 1536, 2048)  # Fig. 11b, at outputs of 50 tokens


@dataclass(frozen=True)
class SweepPoint:
    chunk_tokens: int
    output_tokens: int
    parrot_s: dict[str, float]  # added RTT label ("0ms", "250ms") -> Parrot's best mean latency
    request_level_x: dict[str, float]  # the same labels -> request-level latency / Parrot's


def run_point(chunk_tokens: int, output_tokens: int, args, console: Console) -> SweepPoint:
    out = Path(args.out) / f"chunk{chunk_tokens}-out{output_tokens}"
    result = run_bench("chain-summary", False, out, args.model, args.rtt_ms, False, 1, console, engine=args.engine,
                       engines=1, overrides=SizeOverrides(chunk_tokens=chunk_tokens, output_tokens=output_tokens), paper_scale=True)
    parrot_s = {f"{rtt:.0f}ms": m["mean_s"] for (rtt, system), m in best_measurements(result).items() if system == "parrot"}
    return SweepPoint(chunk_tokens, output_tokens, parrot_s, {k: v["request-level"] for k, v in result["ratios"].items()})


def plot(points: list[SweepPoint], fixed_chunk: int, fixed_output: int, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    sweeps = [(axes[0], [p for p in points if p.chunk_tokens == fixed_chunk], "output_tokens", "output tokens per step"),
              (axes[1], [p for p in points if p.output_tokens == fixed_output], "chunk_tokens", "chunk tokens")]
    for ax, chosen, field, xlabel in sweeps:
        chosen = sorted(chosen, key=lambda p: getattr(p, field))
        for rtt in sorted({k for p in chosen for k in p.request_level_x}, key=lambda k: float(k[:-2])):
            ax.plot([getattr(p, field) for p in chosen], [p.request_level_x[rtt] for p in chosen], marker="o",
                    label=f"request-level, +{rtt[:-2]} ms RTT")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("slower than Parrot (x)")
    axes[0].set_title(f"(a) chunks of {fixed_chunk} tokens")
    axes[1].set_title(f"(b) outputs of {fixed_output} tokens")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    paper = PAPER_SIZES["chain-summary"]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outputs", type=int, nargs="+", default=list(PAPER_OUTPUTS),
                        help=f"output lengths of sweep (a), at --fixed-chunk tokens (default {' '.join(map(str, PAPER_OUTPUTS))})")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=list(PAPER_CHUNK_SIZES),
                        help=f"chunk sizes of sweep (b), at --fixed-output tokens (default {' '.join(map(str, PAPER_CHUNK_SIZES))})")
    parser.add_argument("--fixed-chunk", type=int, default=paper.chunk_tokens)
    parser.add_argument("--fixed-output", type=int, default=paper.output_tokens)
    parser.add_argument("--engine", default="sim:a100-13b", help="sim:PRESET (default sim:a100-13b) or builtin (with --device cuda)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--random-weights", default=None, choices=["llama-7b", "llama-13b"])
    parser.add_argument("--model", default="smollm2-135m", help="the tokenizer (and, for the built-in engine, the model)")
    parser.add_argument("--rtt-ms", type=float, default=250.0, help="the added client-server round trip (default 250)")
    parser.add_argument("--out", default="bench-out/chain-summary-sweep")
    args = parser.parse_args()
    if args.engine == "builtin" and args.device == "cpu":
        parser.error("the paper's sizes take hours on a CPU engine: use --engine sim:PRESET, or builtin with --device cuda")
    use_engine_flags(["--device", args.device, *(["--random-weights", "--config", args.random_weights] if args.random_weights else [])])
    console = Console()
    grid = sorted({(args.fixed_chunk, o) for o in args.outputs} | {(c, args.fixed_output) for c in args.chunk_sizes})
    started = time.perf_counter()
    points = []
    for number, (chunk_tokens, output_tokens) in enumerate(grid, 1):
        console.rule(f"point {number}/{len(grid)}: chunks of {chunk_tokens} tokens, outputs of {output_tokens}")
        points.append(run_point(chunk_tokens, output_tokens, args, console))
    simulated = " (SIMULATED)" if args.engine.startswith("sim:") else ""
    title = f"chain-summary, {paper.chunks} steps, 1 x {args.engine}{simulated}: request-level latency / Parrot's"
    columns = ("chunk tokens", "output tokens", "parrot s (+0 / +RTT)", "request-level slower by (+0 / +RTT)")
    rows = [(str(p.chunk_tokens), str(p.output_tokens), " / ".join(f"{v:.1f}" for v in p.parrot_s.values()),
             " / ".join(f"{v:.2f}x" for v in p.request_level_x.values())) for p in points]
    out = Path(args.out)
    print_rows(console, title, columns, rows)
    (out / "chain-summary-sweep.json").write_text(json.dumps({
        "engine": args.engine, "simulated": bool(simulated), "rtt_ms": args.rtt_ms, "steps": paper.chunks,
        "wall_s": time.perf_counter() - started, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "points": [vars(p) for p in points]}, indent=2))
    (out / "chain-summary-sweep.md").write_text("\n".join([f"### {title}", "", *markdown_table(columns, rows), ""]))
    plot(points, args.fixed_chunk, args.fixed_output, title, out / "chain-summary-sweep.png")
    console.print(f"wrote {out}/chain-summary-sweep.json, .md and .png; paper (Fig. 11): request-level 1.38-1.88x slower")


if __name__ == "__main__":
    main()
