"""Runs a prefix-sharing workload on every system, one server at a time, and reports it."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from parrot.bench.report import PartialResults, result_header, save_report, size_name
from parrot.bench.sharing import (
    GIVE_UP_SLO_FACTOR, SHARING_SYSTEMS, LoadResult, Request, SharingSystem, past_the_slo, plan_requests, quick_or_full, request_sender,
    run_level, system_prompts,
)
from parrot.bench.sharing_report import compare, plot_sharing, print_sharing_table, sharing_summary, write_sharing_markdown
from parrot.bench.systems import RunningServer, peak_batch_blocks, start_parrot, start_vllm
from parrot.engine.loader import resolve_model_dir
from parrot.engine.tokenizer import Tokenizer


def _start(system: SharingSystem, model: str, out_dir: Path, kv_memory_gb: float, users: int) -> RunningServer | None:
    """users: the most requests in flight at once; each parrot request is a session of its own."""
    if system.label == "vllm":
        return start_vllm(model, out_dir)
    return start_parrot(model, 1, out_dir, ["--kv-memory-gb", str(kv_memory_gb), "--max-sessions-per-tenant", str(users + 16),
                                            *system.serve_flags], log_name=f"{system.label}.log")


def run_sharing_bench(workload: str, quick: bool, out_dir: Path, model: str, peers: bool, console: Console,
                      paper_scale: bool = False) -> dict:
    config = quick_or_full(workload, quick, paper_scale)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = PartialResults(out_dir, workload)
    tokenizer = Tokenizer(resolve_model_dir(model))
    prompts = system_prompts(config, tokenizer)
    levels = plan_requests(config, tokenizer)
    most_in_flight = max(len(level) for level in levels)
    systems = [s for s in SHARING_SYSTEMS if peers or s.label != "vllm"]
    results: dict[str, list[LoadResult]] = {}
    warmup_outputs: dict[str, list[str]] = {}
    notes: list[str] = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(workload, total=len(systems) * len(levels))
        for system in systems:
            progress.update(task, description=f"{workload}: starting {system.label}")
            server = _start(system, model, out_dir, config.kv_memory_gb, most_in_flight)
            if server is None:
                notes.append("vLLM skipped: not installed (bash benchmarks/setup_vllm.sh installs it)")
                console.print(f"[yellow]{notes[-1]}")
                progress.advance(task, len(levels))
                continue
            sender = request_sender(system, server, prompts, config.output_tokens)
            try:
                # not measured: each app once, one at a time (a deployed app's system prompt is hot);
                # greedy outputs of every system are compared on these
                warmup_outputs[system.label] = [sender.send(Request(app, levels[0][0].query, 0.0)) for app in range(len(prompts))]
                for index, (level, load) in enumerate(zip(levels, config.loads)):
                    progress.update(task, description=f"{workload}: {system.label}, {load:g} {config.load_kind.value}")
                    measured = run_level(sender.send, level, load, config.output_tokens, lambda: peak_batch_blocks(server))
                    results[system.label] = results.get(system.label, []) + [measured]
                    partial.add(system.label, measured)
                    progress.advance(task)
                    skipped = config.loads[index + 1:]
                    if skipped and past_the_slo(config, measured):
                        notes.append(f"{system.label}: {measured.s_per_output_token * 1e3:.0f} ms/token at {load:g} req/s, past "
                                     f"{GIVE_UP_SLO_FACTOR:g}x the SLO; its higher rates ({', '.join(f'{x:g}' for x in skipped)}) "
                                     "were not run")
                        console.print(f"[yellow]{notes[-1]}")
                        progress.advance(task, len(skipped))
                        break
            finally:
                sender.close()
                server.stop()
    reference = warmup_outputs.get("parrot")
    result = {
        **result_header(workload, quick, model), "size": size_name(quick, paper_scale), "notes": notes,
        "config": {**asdict(config), "load_kind": config.load_kind.value},
        "systems": {s.label: s.description for s in systems if s.label in results},
        "results": {label: [{**asdict(r), "s_per_output_token": r.s_per_output_token, "throughput_tokens_s": r.throughput_tokens_s}
                            for r in rows] for label, rows in results.items()},
        "warmup_outputs": warmup_outputs,
        "outputs_match": {label: outputs == reference for label, outputs in warmup_outputs.items()},
    }
    result["comparison"] = compare(result)
    save_report(result, out_dir, write_sharing_markdown, plot_sharing)
    print_sharing_table(result, console)
    console.print(sharing_summary(result))
    return result
