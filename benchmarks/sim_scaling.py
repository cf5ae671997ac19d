"""Scaling smoke test: the real Manager over 1..N simulated engines running many small apps.

Each engine is a SimulatedEngineBackend from a preset (default sim:a100-7b: LLaMA-7B on
one A100-80GB), running `time_scale` times faster than real time. Apps alternate
between map-reduce (4 chunk summaries feeding a reduce) and a 3-step chain; every app
is asked for with get(perf=LATENCY) at once. Reported per engine count:
- throughput in apps per simulated second, where the simulated span is wall time /
  time_scale (so manager overhead counts, magnified by 1/time_scale: keep it small
  next to the step times, or read the engines' busy time beside it);
- the busiest engine's simulated busy seconds (a lower bound on the span);
- the manager's CPU time per call: process CPU time less the engines' own step loops.

    python benchmarks/sim_scaling.py --quick          # < 1 minute
    python benchmarks/sim_scaling.py                  # 1 to 64 engines: writes sim-scaling.json/.png to --out
    python benchmarks/sim_scaling.py --engines 1 2 4 8 --apps-per-engine 32 --preset a100-13b
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from parrot.backends.simulated import PRESETS, SimulatedEngineBackend
from parrot.engine.sampler import SamplingParams
from parrot.manager.manager import Manager
from parrot.manager.spec import CallSpec, InputBinding, OutputBinding, Perf

MAP = "You summarize one part of a long document in a few sentences.\nPart: {{input:chunk}}\nSummary: {{output:summary}}"
REDUCE = "Combine these partial summaries into one.\n{{input:a}}\n{{input:b}}\n{{input:c}}\n{{input:d}}\nSummary: {{output:final}}"
CHAIN = "Refine the running summary with the next part.\nSummary so far: {{input:prev}}\nNext part: {{input:chunk}}\nRefined: {{output:summary}}"


@dataclass(frozen=True)
class ScalingResult:
    engines: int
    apps: int
    calls: int
    wall_s: float
    time_scale: float
    busiest_engine_s: float  # simulated busy seconds of the busiest engine
    decodes_per_step: float
    manager_cpu_s: float

    @property
    def simulated_s(self) -> float:
        return self.wall_s / self.time_scale

    @property
    def apps_per_s(self) -> float:
        return self.apps / self.simulated_s


class AppBuilder:
    """Submits apps to one session of the manager; returns the variables to get."""

    def __init__(self, manager: Manager, session: str, chunk_tokens: int, output_tokens: int):
        self.manager, self.session = manager, session
        self.chunk_chars = 4 * chunk_tokens  # the simulated engine counts 4 characters a token
        self.sampling = SamplingParams(max_tokens=output_tokens)
        self.calls = 0
        self._vars = 0

    def var(self, name: str, value: str | None = None) -> str:
        self._vars += 1
        self.manager.create_variable(self.session, f"v{self._vars}", name, value)
        return f"v{self._vars}"

    def call(self, template: str, inputs: dict[str, str], output: str, out_var: str) -> None:
        self.calls += 1
        spec = CallSpec("f", template, tuple(InputBinding(n, v) for n, v in inputs.items()), (OutputBinding(output, out_var, self.sampling),))
        self.manager.submit_call(self.session, f"c{self.calls}", spec)

    def chunk(self, app: int, part: int) -> str:
        words = f"app {app} part {part} " + " ".join(f"word{(app * 31 + part * 7 + i) % 1000}" for i in range(self.chunk_chars // 8))
        return self.var("chunk", words[: self.chunk_chars])

    def map_reduce(self, app: int) -> str:
        summaries = []
        for part in range(4):
            summaries.append(self.var("summary"))
            self.call(MAP, {"chunk": self.chunk(app, part)}, "summary", summaries[-1])
        final = self.var("final")
        self.call(REDUCE, dict(zip("abcd", summaries)), "final", final)
        return final

    def chain(self, app: int) -> str:
        prev = self.var("prev", "nothing yet")
        for part in range(3):
            out = self.var("summary")
            self.call(CHAIN, {"prev": prev, "chunk": self.chunk(app, part)}, "summary", out)
            prev = out
        return prev


async def run(engines: int, apps: int, args: argparse.Namespace, progress: Progress) -> ScalingResult:
    backends = [SimulatedEngineBackend.from_profile(f"sim:{args.preset}", name=f"sim-{i}", time_scale=args.time_scale) for i in range(engines)]
    manager = Manager(backends)
    session = manager.create_session()
    builder = AppBuilder(manager, session, args.chunk_tokens, args.output_tokens)
    task = progress.add_task(f"{engines} engine(s)", total=apps)
    cpu, started = time.process_time(), time.perf_counter()
    finals = [builder.map_reduce(a) if a % 2 == 0 else builder.chain(a) for a in range(apps)]

    async def get(var_id: str) -> None:
        await manager.get_variable(session, var_id, Perf.LATENCY)
        progress.advance(task)

    await asyncio.gather(*(get(v) for v in finals))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    await manager.shutdown()
    stats = [b.sim_stats() for b in backends]
    engine_cpu = sum(s.host_cpu_seconds for s in stats)
    steps = sum(s.steps for s in stats)
    return ScalingResult(engines, apps, builder.calls, wall, args.time_scale, max(s.simulated_seconds for s in stats),
                         sum(s.decode_tokens for s in stats) / max(steps, 1), cpu - engine_cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="a100-7b", choices=sorted(PRESETS), help="simulated engine preset (default a100-7b)")
    parser.add_argument("--engines", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64], help="engine counts to run (default 1 to 64)")
    parser.add_argument("--apps-per-engine", type=int, default=16, help="apps submitted per engine (default 16)")
    parser.add_argument("--time-scale", type=float, default=0.25,
                        help="wall seconds per simulated second (default 0.25; manager overhead is magnified by its inverse)")
    parser.add_argument("--chunk-tokens", type=int, default=512, help="document chunk length in tokens (default 512)")
    parser.add_argument("--output-tokens", type=int, default=50, help="tokens each call generates (default 50)")
    parser.add_argument("--quick", action="store_true", help="1, 2 and 4 engines, 8 apps each, time_scale 0.1 (seconds)")
    parser.add_argument("--out", default="benchmarks/results", help="directory for sim-scaling.json and .png (default benchmarks/results)")
    args = parser.parse_args()
    if args.quick:
        args.engines, args.apps_per_engine, args.time_scale = [1, 2, 4], 8, 0.1
    console = Console(width=max(Console().width, 140))
    results = []
    with Progress(console=console, transient=True) as progress:
        for n in args.engines:
            results.append(asyncio.run(run(n, n * args.apps_per_engine, args, progress)))
    table = Table(title=f"sim:{args.preset}, time_scale {args.time_scale}, {args.apps_per_engine} apps per engine")
    for column in ("engines", "apps", "calls", "wall s", "sim s", "apps/s", "scaling", "engine-bound apps/s", "decodes/step", "manager ms/call"):
        table.add_column(column, justify="right")
    base = results[0].apps_per_s / results[0].engines
    for r in results:
        table.add_row(str(r.engines), str(r.apps), str(r.calls), f"{r.wall_s:.2f}", f"{r.simulated_s:.1f}", f"{r.apps_per_s:.2f}",
                      f"{r.apps_per_s / base:.2f}x", f"{r.apps / r.busiest_engine_s:.2f}", f"{r.decodes_per_step:.1f}",
                      f"{r.manager_cpu_s / r.calls * 1e3:.3f}")
    console.print(table)
    save(results, args, Path(args.out))
    console.print(f"wrote {Path(args.out) / 'sim-scaling.json'} and .png")
    console.print("apps/s: per simulated second (wall / time_scale); scaling: relative to one engine's apps/s per engine;\n"
                  "engine-bound: apps / the busiest engine's busy time, what a free manager and no idle gaps would give;\n"
                  "manager ms/call: real CPU outside the engines' step loops (the manager and its backend calls), per call")


def save(results: list[ScalingResult], args: argparse.Namespace, out: Path) -> None:
    """JSON of every figure, and a plot of throughput against engines beside the linear line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    rows = [{**asdict(r), "apps_per_s": r.apps_per_s, "manager_ms_per_call": r.manager_cpu_s / r.calls * 1e3} for r in results]
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    (out / "sim-scaling.json").write_text(json.dumps({"simulated": True, "settings": settings, "rows": rows}, indent=2))
    engines = [r.engines for r in results]
    per_engine = results[0].apps_per_s / results[0].engines
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(engines, [r.apps_per_s for r in results], marker="o", label="parrot manager")
    left.plot(engines, [per_engine * n for n in engines], linestyle="--", color="gray", label="linear")
    left.set(xscale="log", yscale="log", xlabel="engines", ylabel="apps per simulated second", title=f"throughput (SIMULATED sim:{args.preset})")
    left.legend()
    right.plot(engines, [row["manager_ms_per_call"] for row in rows], marker="o", color="tab:red")
    right.set(xscale="log", xlabel="engines", ylabel="manager CPU ms per call", title="scheduler cost per call")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "sim-scaling.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
