"""Manager overhead: submit, deduce and run a DAG of many calls on a zero-cost engine.

The simulated engine takes no time, so everything measured is the manager's own
work: parsing and checking templates, building the graph, deducing objectives,
placing and dispatching calls, and passing values from producers to consumers.

    python benchmarks/manager_overhead.py            # 10,000 calls
    python benchmarks/manager_overhead.py --calls 2000 --engines 4
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from parrot.backends.simulated import SimulatedEngineBackend
from parrot.engine.sampler import SamplingParams
from parrot.manager.manager import Manager
from parrot.manager.spec import CallSpec, InputBinding, OutputBinding, Perf

MAP_TEMPLATE = "Summarize this part of the document.\n{{input:chunk}}\nSummary: {{output:summary}}"
REDUCE_TEMPLATE = "Combine these summaries.\n{{input:a}}\n{{input:b}}\n{{input:c}}\n{{input:d}}\nFinal: {{output:final}}"
CHAIN_TEMPLATE = "Refine the summary {{input:prev}} with {{input:chunk}}.\nRefined: {{output:summary}}"


@dataclass(frozen=True)
class OverheadResult:
    calls: int
    submit_s: float
    run_s: float

    @property
    def per_call_ms(self) -> float:
        return (self.submit_s + self.run_s) / self.calls * 1e3


async def run(num_calls: int, engines: int, progress: Progress) -> OverheadResult:
    manager = Manager([SimulatedEngineBackend(f"sim-{i}") for i in range(engines)])
    session = manager.create_session()
    sampling = SamplingParams(max_tokens=4)
    finals: list[str] = []
    counter = 0

    def new_var(name: str, value: str | None = None) -> str:
        nonlocal counter
        counter += 1
        var_id = f"v{counter}"
        manager.create_variable(session, var_id, name, value)
        return var_id

    def submit(template: str, inputs: dict[str, str], output: tuple[str, str]) -> None:
        nonlocal counter
        counter += 1
        spec = CallSpec(
            "f", template,
            tuple(InputBinding(n, v) for n, v in inputs.items()),
            (OutputBinding(output[0], output[1], sampling),),
        )
        manager.submit_call(session, f"c{counter}", spec)

    task = progress.add_task("submitting", total=num_calls)
    started = time.perf_counter()
    submitted = 0
    # apps of 10 calls: a map stage of 4 feeding a reduce, then a chain of 5 refinements
    while submitted + 10 <= num_calls:
        chunk = new_var("chunk", "text " * 50)
        maps = []
        for _ in range(4):
            out = new_var("summary")
            submit(MAP_TEMPLATE, {"chunk": chunk}, ("summary", out))
            maps.append(out)
        final = new_var("final")
        submit(REDUCE_TEMPLATE, dict(zip("abcd", maps)), ("final", final))
        prev = final
        for _ in range(5):
            out = new_var("summary")
            submit(CHAIN_TEMPLATE, {"prev": prev, "chunk": chunk}, ("summary", out))
            prev = out
        finals.append(prev)
        submitted += 10
        progress.update(task, completed=submitted)
    submit_s = time.perf_counter() - started

    task = progress.add_task("deducing and running", total=len(finals))
    started = time.perf_counter()

    async def get(var_id: str) -> None:
        await manager.get_variable(session, var_id, Perf.LATENCY)
        progress.advance(task)

    await asyncio.gather(*(get(v) for v in finals))
    run_s = time.perf_counter() - started
    await manager.shutdown()
    return OverheadResult(submitted, submit_s, run_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=10_000, help="calls in the DAG (default 10,000)")
    parser.add_argument("--engines", type=int, default=1, help="simulated engines (default 1)")
    args = parser.parse_args()
    console = Console()
    with Progress(console=console, transient=True) as progress:
        result = asyncio.run(run(args.calls, args.engines, progress))
    table = Table(title=f"manager overhead, {result.calls} calls, {args.engines} zero-cost engine(s)")
    for column in ("phase", "seconds", "calls/s", "ms per call"):
        table.add_column(column, justify="right")
    for phase, seconds in (("submit", result.submit_s), ("deduce + dispatch + run", result.run_s)):
        table.add_row(phase, f"{seconds:.3f}", f"{result.calls / seconds:,.0f}", f"{seconds / result.calls * 1e3:.3f}")
    console.print(table)
    print(f"manager-overhead: {result.calls / (result.submit_s + result.run_s):,.0f} calls/s, "
          f"{result.per_call_ms:.3f} ms per call end to end (goal < 1 ms)")


if __name__ == "__main__":
    main()
