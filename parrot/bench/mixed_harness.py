"""Runs the `mixed` workload under each scheduling policy (a server each) and reports it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import TypeVar

import httpx
from rich.console import Console
from rich.progress import Progress

from parrot.bench.mixed import MIXED_POLICIES, quick_or_full, run_mixed, warm_up
from parrot.bench.report import PartialResults, engines_title, markdown_table, print_rows, result_header, save_report, size_name, size_of
from parrot.bench.systems import CompletionClient, RunningServer, start_parrot, start_vllm
from parrot.engine.loader import resolve_model_dir
from parrot.engine.tokenizer import Tokenizer

T = TypeVar("T")
log = logging.getLogger(__name__)


def run_per_policy(workload: str, policies: dict[str, list[str]], engines: int, out_dir: Path, model: str,
                   console: Console, run: Callable[[str, RunningServer], T], partial: PartialResults | None = None) -> list[T]:
    """Starts one server per policy (with its extra serve flags), warms it up, runs `run` on it, stops it;
    each result goes to `partial` (a new one for the workload when not given) as it lands."""
    results: list[T] = []
    partial = partial or PartialResults(out_dir, workload)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(workload, total=len(policies))
        for policy, flags in policies.items():
            progress.update(task, description=f"{workload}: starting the {policy} server")
            server = start_parrot(model, engines, out_dir, ["--policy", policy, *flags], log_name=f"{workload}-{policy}.log")
            try:
                warm_up(server)
                progress.update(task, description=f"{workload}: {policy}")
                results.append(run(policy, server))
                partial.add(policy, results[-1])
            finally:
                server.stop()
            progress.advance(task)
    return results


def run_on_vllm(model: str, out_dir: Path, console: Console, run: Callable[[RunningServer], T]) -> T | None:
    """Starts vLLM's OpenAI server on the model (None when it is not installed), warms it up with a few
    completions, runs `run` on it and stops it."""
    with console.status("starting vLLM (its own venv)"):
        server = start_vllm(model, out_dir)
    if server is None:
        return None
    try:
        warm = CompletionClient(server, rtt_s=0.0)
        try:
            for i in range(4):
                warm(f"warm-up question {i}", 2)
        finally:
            warm.close()
        with console.status("mixed on vLLM"):
            return run(server)
    finally:
        server.stop()


def run_mixed_bench(workload: str, quick: bool, out_dir: Path, model: str, console: Console, paper_scale: bool = False,
                    engines: int | None = None, peers: bool = False) -> dict:
    config = quick_or_full(workload, quick, paper_scale)
    if engines is not None:
        config = replace(config, engines=engines)
    size = size_name(quick, paper_scale)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(resolve_model_dir(model))
    engine_flags = ["--engine", config.engine] if config.engine.startswith("sim:") else ["--threads", str(config.threads_per_engine)]
    policies = {policy: engine_flags for policy in MIXED_POLICIES}
    partial = PartialResults(out_dir, workload)
    results = run_per_policy(workload, policies, config.engines, out_dir, model, console,
                             lambda policy, server: run_mixed(config, policy, server, tokenizer), partial)
    notes: list[str] = []
    if peers:
        missing = "vLLM skipped: not installed (bash benchmarks/setup_vllm.sh installs it)"
        try:
            measured = run_on_vllm(model, out_dir, console, lambda server: run_mixed(config, "vllm", server, tokenizer, request_level=True))
        except (RuntimeError, TimeoutError, httpx.HTTPError) as exc:  # the policies' report is still written
            log.warning("vLLM did not serve mixed: %s", exc)
            measured, missing = None, f"vLLM failed: {exc} (its log: {out_dir / 'vllm.log'})"
        if measured is None:
            notes.append(missing)
            console.print(f"[yellow]{missing}")
        else:
            results.append(measured)
            partial.add("vllm", measured)
    best_chat = min(r.chat_s_per_token for r in results)
    best_jct = min(r.mean_jct_s for r in results)
    result = {
        **result_header(workload, quick, model), "size": size, "config": asdict(config), "notes": notes,
        "results": [{**asdict(r), "chat_s_per_token": r.chat_s_per_token, "chat_p90_s_per_token": r.chat_p90_s_per_token,
                     "mean_jct_s": r.mean_jct_s, "chat_vs_best": r.chat_s_per_token / best_chat, "jct_vs_best": r.mean_jct_s / best_jct}
                    for r in results],
    }
    save_report(result, out_dir, write_mixed_markdown, plot_mixed)
    engines = engines_title(model, config.engine, config.engines)
    print_rows(console, f"{workload} ({size}, {engines})", MIXED_COLUMNS, mixed_rows(result))
    console.print(mixed_summary(result))
    return result


MIXED_COLUMNS = ("policy", "chat latency per token (ms)", "chat p90 (ms)", "map-reduce JCT (s)", "chat vs best", "JCT vs best")


def mixed_rows(result: dict) -> list[tuple[str, ...]]:
    return [(r["policy"], f"{r['chat_s_per_token'] * 1e3:.0f}", f"{r['chat_p90_s_per_token'] * 1e3:.0f}", f"{r['mean_jct_s']:.1f}",
             f"{r['chat_vs_best']:.2f}x", f"{r['jct_vs_best']:.2f}x") for r in result["results"]]


def write_mixed_markdown(result: dict, path: Path) -> None:
    c = result["config"]
    lines = [
        f"### {result['workload']} ({size_of(result)})",
        "",
        (f"**SIMULATED** {c['engine']} engines ({c['engines']}: cost-model steps, the real manager and policies), one server per policy. "
         if c["engine"].startswith("sim:") else
         f"Model {result['model']} on {c['engines']} engines ({c['threads_per_engine']} thread each), one server per policy. ") +
        f"{c['map_reduce_apps']} map-reduce jobs ({c['chunks']} chunks of {c['chunk_tokens']} tokens, {c['map_output_tokens']} "
        f"output tokens, get(perf=THROUGHPUT)) start together with {c['chats']} chats arriving at {c['chat_rate']} req/s "
        f"({c['chat_tokens']}-token questions, {c['chat_output_tokens']} output tokens, get(perf=LATENCY)). Paper: {c['paper'] or '-'}."
        + (" vLLM: its OpenAI server on the same model and machine, sent the same jobs and chats as plain completions "
           "(a job's maps at once, its reduce after them)." if any(r["policy"] == "vllm" for r in result["results"]) else ""),
        "",
        *markdown_table(MIXED_COLUMNS, mixed_rows(result)),
        *(f"\n- {note}" for note in result.get("notes", [])),
    ]
    path.write_text("\n".join(lines) + "\n")


def plot_mixed(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = [r["policy"] for r in result["results"]]
    fig, (chat_ax, jct_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    chat_ax.bar(policies, [r["chat_s_per_token"] * 1e3 for r in result["results"]], color="tab:blue")
    chat_ax.set_ylabel("chat latency per output token (ms)")
    jct_ax.bar(policies, [r["mean_jct_s"] for r in result["results"]], color="tab:orange", label="mean")
    # each job's own end: App-FIFO shows as jobs ending one after another, not all together
    for x, r in enumerate(result["results"]):
        jct_ax.scatter([x] * len(r["job_completion_s"]), r["job_completion_s"], color="black", s=12, zorder=3,
                       label="each job" if x == 0 else None)
    jct_ax.set_ylabel("map-reduce job completion (s)")
    jct_ax.legend(fontsize=8, loc="lower right")
    for ax in (chat_ax, jct_ax):
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"{result['workload']} ({result['model']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def mixed_summary(result: dict) -> str:
    by_policy = {r["policy"]: r for r in result["results"]}
    parrot = by_policy["parrot"]
    chat = parrot["chat_s_per_token"] / by_policy["latency-centric"]["chat_s_per_token"]
    jct = parrot["mean_jct_s"] / by_policy["throughput-centric"]["mean_jct_s"]
    summary = (f"{result['workload']}: parrot chat {parrot['chat_s_per_token'] * 1e3:.0f} ms/token ({chat:.2f}x latency-centric's), "
               f"map-reduce {parrot['mean_jct_s']:.1f} s ({jct:.2f}x throughput-centric's)")
    vllm = by_policy.get("vllm")
    if vllm is not None:
        summary += (f"; vllm chat {vllm['chat_s_per_token'] / parrot['chat_s_per_token']:.2f}x parrot's, "
                    f"map-reduce {vllm['mean_jct_s'] / parrot['mean_jct_s']:.2f}x")
    return summary
