"""Runs parallel-sampling on every system, one server at a time, and reports it."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from parrot.bench.documents import passages
from parrot.bench.parallel_sampling import FULL, QUICK, SAMPLING_SYSTEMS, SamplingMeasurement, TokenMeter, measure
from parrot.bench.parallel_sampling_report import compare, plot, print_table, summary_line, write_markdown
from parrot.bench.report import PartialResults, result_header, save_report
from parrot.bench.systems import start_parrot, start_vllm
from parrot.engine.loader import resolve_model_dir
from parrot.engine.tokenizer import Tokenizer

WARMUP_CHOICES = 2


def run_parallel_sampling_bench(workload: str, quick: bool, out_dir: Path, model: str, peers: bool, console: Console) -> dict:
    config = QUICK if quick else FULL
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = PartialResults(out_dir, workload)
    measured_requests = len(config.choices) * config.repeats
    # a prompt of its own for each request (engines cache prefixes), the same sequence for every system
    warmup, *prompts = passages(Tokenizer(resolve_model_dir(model)), [config.prompt_tokens] * (measured_requests + 1))
    systems = [s for s in SAMPLING_SYSTEMS if peers or s.label != "vllm"]
    results: dict[str, list[SamplingMeasurement]] = {}
    notes: list[str] = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(workload, total=len(systems) * measured_requests)
        for system in systems:
            progress.update(task, description=f"{workload}: starting {system.label}")
            if system.label == "vllm":
                server = start_vllm(model, out_dir)
            else:
                server = start_parrot(model, 1, out_dir, ["--kv-memory-gb", str(config.kv_memory_gb)], log_name=f"{system.label}.log")
            if server is None:
                notes.append("vLLM skipped: not installed (bash benchmarks/setup_vllm.sh installs it)")
                console.print(f"[yellow]{notes[-1]}")
                progress.advance(task, measured_requests)
                continue
            try:
                meter = TokenMeter(server)
                measure(server, system, warmup, WARMUP_CHOICES, -1, config, meter)  # not kept: the first steps warm the kernels up
                pending = iter(prompts)
                for n in config.choices:
                    for repeat in range(config.repeats):
                        progress.update(task, description=f"{workload}: {system.label}, n={n}")
                        measurement = measure(server, system, next(pending), n, repeat, config, meter)
                        results.setdefault(system.label, []).append(measurement)
                        partial.add(system.label, measurement)
                        progress.advance(task)
            finally:
                server.stop()
    result = {
        **result_header(workload, quick, model), "size": "quick" if quick else "full", "notes": notes, "config": asdict(config),
        "systems": {s.label: s.description for s in systems if s.label in results},
        "results": {label: [asdict(m) for m in rows] for label, rows in results.items()},
    }
    result["comparison"] = compare(result)
    save_report(result, out_dir, write_markdown, plot)
    print_table(result, console)
    console.print(summary_line(result))
    return result
