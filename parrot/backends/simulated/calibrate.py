"""Measures the built-in engine's step times and fits the simulated cost model to them.

    python -m parrot.backends.simulated.calibrate        # a few minutes on a 2-core CPU

Each ModelRunner.run call (one forward step) is timed with its batch composition
(prefill tokens, decoding sequences, KV tokens attended) over prefills of 64-1024
tokens and decodes at batch 1-32. Step time is CPU time / torch threads: on a shared
machine that estimates an idle machine's wall time, which wall clocks overstate.
A least-squares fit of relative error gives the four CostModel coefficients.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

CASES = ((1, 64), (1, 256), (1, 1024), (2, 64), (4, 64), (8, 64), (8, 512), (16, 64), (32, 64), (32, 256))  # (batch, context)


@dataclass(frozen=True)
class StepSample:
    prefill_tokens: int
    decode_seqs: int
    kv_tokens: int
    seconds: float  # CPU seconds / threads
    wall_seconds: float


async def measure(decode_steps: int = 6) -> list[StepSample]:
    import torch

    from parrot.engine.llm_engine import EngineConfig, LLMEngine
    from parrot.engine.sampler import SamplingParams
    from parrot.engine.scheduler import JobKind

    engine = LLMEngine(EngineConfig())
    threads = torch.get_num_threads()
    samples: list[StepSample] = []
    run = engine.runner.run

    def timed(plan):
        wall, cpu = time.perf_counter(), time.process_time()
        result = run(plan)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        decodes = sum(1 for c in plan.chunks if c.length == 1 and c.job.kind is JobKind.GENERATE)
        kv = sum(c.start + c.length for c in plan.chunks)
        samples.append(StepSample(plan.num_tokens - decodes, decodes, kv, cpu / threads, wall))
        return result

    engine.runner.run = timed
    for batch, context in ((1, 16),) + CASES:  # the first case warms up
        for b in range(batch):
            await engine.fill(f"c{b}", None, [100 + (i * 13 + b) % 5000 for i in range(context)])

        async def generate(b: int) -> None:
            async for _ in engine.generate(f"c{b}", SamplingParams(max_tokens=decode_steps, ignore_eos=True)):
                pass

        await asyncio.gather(*(generate(b) for b in range(batch)))
        for b in range(batch):
            engine.free_context(f"c{b}")
        if context == 16:
            samples.clear()
    await engine.close()
    return samples


def fit(samples: list[StepSample]) -> tuple[list[float], float, float]:
    """(seconds_per_step, per_prefill_token, per_decode_seq, per_kv_token), median and max relative error."""
    import numpy as np

    x = np.array([[1, s.prefill_tokens, s.decode_seqs, s.kv_tokens] for s in samples], dtype=float)
    y = np.array([s.seconds for s in samples])
    coef, *_ = np.linalg.lstsq(x / y[:, None], np.ones_like(y), rcond=None)  # minimizes relative error
    coef = np.clip(coef, 0, None)
    error = np.abs(x @ coef - y) / y
    return [float(c) for c in coef], float(np.median(error)), float(error.max())


def main() -> None:
    samples = asyncio.run(measure())
    coef, median, worst = fit(samples)
    print(f"{len(samples)} steps; relative error median {median:.0%}, max {worst:.0%}")
    print("CostModel(seconds_per_step={:.3g}, seconds_per_prefill_token={:.3g}, seconds_per_decode_seq={:.3g}, "
          "seconds_per_kv_token={:.3g})".format(*coef))


if __name__ == "__main__":
    main()
