"""Runs a workload on Parrot and its baselines in one run and writes the report."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from parrot.bench.report import (PartialResults, background_cell, best_measurements, has_background, plot, print_rows, ratio_of,
                                 result_header, save_report, size_name, size_of, summary_line, write_markdown)
from parrot.bench.systems import ENGINE_FLAGS, RunningServer, start_parrot, start_vllm
from parrot.bench.workloads import Measurement, SizeOverrides, WorkloadConfig, check_documents_suffice, quick_or_full, run_workload
from parrot.engine.loader import resolve_model_dir
from parrot.engine.tokenizer import Tokenizer


def run_bench(workload: str, quick: bool, out_dir: Path, model: str, rtt_ms: float, peers: bool, repeats: int, console: Console,
              server: RunningServer | None = None, engine: str = "builtin", engines: int = 1, overrides: SizeOverrides = SizeOverrides(),
              paper_scale: bool = False, baseline_policy: str | None = None) -> dict:
    """Runs and reports one workload; a given server is used as is (and left running).
    `paper_scale` runs the paper's sizes instead of the full ones; `overrides` replace some
    of the size's parameters (apps, chunks, chunk and output tokens, background rate).
    `baseline_policy` adds a second request-level baseline: the same client against a server of
    its own that schedules every request by that policy (latency-centric is how the paper's
    request-level services were set: one that cannot tell throughput work from latency work
    keeps every batch small)."""
    config: WorkloadConfig = overrides.apply(quick_or_full(workload, quick, paper_scale))
    size = size_name(quick, paper_scale)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = PartialResults(out_dir, workload)
    tokenizer = Tokenizer(resolve_model_dir(model))
    settings = sorted({0.0, rtt_ms})
    # every server sees documents of its own in each run (a prefix cache would remember them), but
    # servers reuse each other's: the parrot server, which holds two systems, needs the most
    check_documents_suffice(tokenizer, config, len(settings) * 2 * repeats)
    warmup = quick_or_full(workload, True)  # the size every server warms up on, unmeasured
    servers: list[RunningServer] = []
    measurements: list[Measurement] = []
    notes: list[str] = []
    shared_device_flags: list[str] = []
    if baseline_policy and engine == "builtin" and "cuda" in ENGINE_FLAGS:
        # two servers' engines on one GPU: each sizes its KV pool from its share, not from what the other left
        shared_device_flags = ["--gpu-memory-utilization", "0.45"]
        notes.append("the request-level baseline's second server shares the GPU: its engines, and those of a parrot "
                     "server started here, may fill 45 % of it each")
    try:
        parrot_server = server
        if parrot_server is None:
            with console.status(f"starting parrot serve ({engines} {engine} engine(s))"):
                parrot_server = start_parrot(model, engines, out_dir, ["--engine", engine, *shared_device_flags])
            servers.append(parrot_server)
        systems: list[tuple[str, RunningServer]] = [("parrot", parrot_server), ("request-level", parrot_server)]
        if baseline_policy:
            with console.status(f"starting parrot serve --policy {baseline_policy} (the second request-level baseline)"):
                policy_server = start_parrot(model, engines, out_dir, ["--engine", engine, "--policy", baseline_policy, *shared_device_flags],
                                             log_name=f"parrot-serve-{baseline_policy}.log")
            servers.append(policy_server)
            systems.append((request_level_label(baseline_policy), policy_server))
            # its engine warms up too (not measured), so the first measured run pays no first-call costs
            run_workload(workload, warmup, "request-level", policy_server, 0.0, tokenizer, document_set=0)
        if peers:
            with console.status("starting vLLM (its own venv)"):
                vllm = start_vllm(model, out_dir)
            if vllm is None:
                notes.append("vLLM skipped: not installed (bash benchmarks/setup_vllm.sh installs it)")
                console.print(f"[yellow]{notes[-1]}")
            else:
                servers.append(vllm)
                systems.append(("vllm", vllm))
        # warm-up, not measured: both paths once on the same documents, whose outputs
        # must agree (sharing and batching never change what greedy decoding says)
        check = [run_workload(workload, warmup, kind, parrot_server, 0.0, tokenizer, document_set=0) for kind in ("parrot", "request-level")]
        total = len(settings) * len(systems) * repeats
        next_document_set = {id(s): 1 for _, s in systems}  # per server
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"{workload} ({size})", total=total)
            for rtt in settings:
                for _ in range(repeats):
                    # systems alternate inside each repeat, so drift in the machine hits all alike
                    for label, server in systems:
                        progress.update(task, description=f"{workload}: {label}, +{rtt:.0f} ms RTT")
                        m = run_workload(workload, config, "parrot" if label == "parrot" else "request-level", server, rtt / 1e3,
                                         tokenizer, document_set=next_document_set[id(server)])
                        next_document_set[id(server)] += 1
                        m.system = label
                        measurements.append(m)
                        partial.add(label, m)
                        progress.advance(task)
    finally:
        for server in servers:
            server.stop()
    result = {
        **result_header(workload, quick, model), "size": size, "engine": engine, "engines": engines,
        "simulated": engine.startswith("sim:"), "config": asdict(config),
        "rtt_settings_ms": sorted({0.0, rtt_ms}), "repeats": repeats, "notes": notes,
        "measurements": [
            {**asdict(m), "mean_s": m.mean_s, "p90_s": m.p90_s, "background_mean_s": m.background_mean_s} for m in measurements
        ],
    }
    result["ratios"] = ratios(result)
    result["outputs_match"] = check[0].final_outputs == check[1].final_outputs
    result["check_outputs"] = {"parrot": check[0].final_outputs, "request-level": check[1].final_outputs}
    save_report(result, out_dir, write_markdown, plot)
    print_table(result, console)
    console.print(summary_line(result))
    return result


def request_level_label(policy: str) -> str:
    """The name a request-level baseline on a server with `policy` has in reports."""
    return f"request-level ({policy})"


def ratios(result: dict) -> dict[str, dict[str, float]]:
    """Per RTT setting: each system's best mean latency divided by Parrot's."""
    best = best_measurements(result)
    out: dict[str, dict[str, float]] = {}
    for (rtt, system), m in best.items():
        out.setdefault(f"{rtt:.0f}ms", {})[system] = m["mean_s"] / best[(rtt, "parrot")]["mean_s"]
    return out


def print_table(result: dict, console: Console) -> None:
    engines = f"{result['engines']} x {result['engine']}" + (" (SIMULATED)" if result["simulated"] else "")
    background = has_background(result)
    rows = []
    for m in result["measurements"]:
        ratio = ratio_of(result, m["rtt_ms"], m["system"])
        rows.append((m["system"], f"{m['rtt_ms']:.0f} ms", f"{m['mean_s']:.2f}", f"{m['p90_s']:.2f}", f"{ratio:.2f}x")
                    + ((background_cell(m),) if background else ()))
    print_rows(console, f"{result['workload']} ({size_of(result)}, {result['model']}, {engines})",
               ("system", "added RTT", "mean latency s", "p90 s", "vs parrot") + (("background mean s",) if background else ()), rows)
