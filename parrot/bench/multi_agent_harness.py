"""Runs the `multi-agent` workload under each policy (a server each) and reports it."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from rich.console import Console

from parrot.bench.mixed_harness import run_per_policy
from parrot.bench.multi_agent import quick_or_full, run_multi_agent
from parrot.bench.report import engines_title, markdown_table, print_rows, result_header, save_report, size_name, size_of
from parrot.engine.loader import resolve_model_dir
from parrot.engine.tokenizer import Tokenizer


def run_multi_agent_bench(workload: str, quick: bool, out_dir: Path, model: str, console: Console, paper_scale: bool = False,
                          baselines_cache_prefixes: bool = True) -> dict:
    config = quick_or_full(workload, quick, paper_scale, baselines_cache_prefixes)
    size = size_name(quick, paper_scale)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(resolve_model_dir(model))
    policy_flags = config.policy_flags()
    results = run_per_policy(workload, policy_flags, config.engines, out_dir, model, console,
                             lambda policy, server: run_multi_agent(config, policy, server, tokenizer))
    parrot = {run.programmers: run.latency_s for r in results if r.policy == "parrot" for run in r.runs}
    rows = [{**asdict(run), "policy": r.policy, "slower_than_parrot": run.latency_s / parrot[run.programmers]}
            for r in results for run in r.runs]
    result = {**result_header(workload, quick, model), "size": size, "config": asdict(config), "baselines": config.baselines,
              "policy_flags": policy_flags, "rows": rows}
    save_report(result, out_dir, write_multi_agent_markdown, plot_multi_agent)
    engines = engines_title(model, config.engine, config.engines)
    print_rows(console, f"{workload} ({size}, {engines})", MULTI_AGENT_COLUMNS, multi_agent_rows(result))
    console.print(multi_agent_summary(result))
    return result


MULTI_AGENT_COLUMNS = ("policy", "programmers", "app latency (s)", "peak batch KV blocks", "slower than parrot")


def multi_agent_rows(result: dict) -> list[tuple[str, ...]]:
    return [(row["policy"], str(row["programmers"]), f"{row['latency_s']:.1f}", str(row["peak_batch_blocks"]),
             f"{row['slower_than_parrot']:.2f}x") for row in result["rows"]]


def write_multi_agent_markdown(result: dict, path: Path) -> None:
    c = result["config"]
    lines = [
        f"### {result['workload']} ({size_of(result)})",
        "",
        (f"**SIMULATED** {c['engine']} engine ({c['engines']}: cost-model steps and KV capacity, the real manager and policies; "
         "without static prefix hints a simulated engine shares no prefix), one server per policy (serve flags: "
         if c["engine"].startswith("sim:") else f"Model {result['model']} on {c['engines']} engine, one server per policy (serve flags: ")
        + "; ".join(f"{p} `{' '.join(f) or 'defaults'}`" for p, f in result["policy_flags"].items())
        + f"). Team guidelines {c['guidelines_tokens']} tokens (every role's constant prefix); outputs: design {c['design_tokens']}, "
        f"code {c['code_tokens']}, review {c['review_tokens']}, program {c['program_tokens']} tokens. "
        + ("" if c["engine"].startswith("sim:") else f"Baselines' prefix sharing: {result.get('baselines', '-')}. ")
        + f"Paper: {c['paper'] or '-'}.",
        "",
        *markdown_table(MULTI_AGENT_COLUMNS, multi_agent_rows(result)),
    ]
    lines += ["", "Peak batch KV blocks: the most distinct KV blocks one forward step's batch read (on a simulated engine: the most "
              "KV held at once, in 16-token blocks), cumulative over the server's run."]
    path.write_text("\n".join(lines) + "\n")


def plot_multi_agent(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for policy in result["policy_flags"]:
        rows = [row for row in result["rows"] if row["policy"] == policy]
        ax.plot([row["programmers"] for row in rows], [row["latency_s"] for row in rows], marker="o", label=policy)
    ax.set_xlabel("programmers")
    ax.set_ylabel("app latency (s)")
    ax.set_title(f"{result['workload']} ({result['model']}; baselines: {result.get('baselines', '-')})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def multi_agent_summary(result: dict) -> str:
    largest = max(row["programmers"] for row in result["rows"])
    at_largest = [row for row in result["rows"] if row["programmers"] == largest and row["policy"] != "parrot"]
    others = ", ".join(f"{row['policy']} {row['slower_than_parrot']:.2f}x slower" for row in at_largest)
    return f"{result['workload']} ({largest} programmers; baselines: {result.get('baselines', '-')}): parrot 1.00x, {others}"
