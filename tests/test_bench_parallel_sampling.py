"""parallel-sampling: a --quick run on real servers (timings are never asserted), and its arithmetic."""

from __future__ import annotations

import json

from rich.console import Console

from parrot.bench.parallel_sampling import QUICK
from parrot.bench.parallel_sampling_harness import run_parallel_sampling_bench
from parrot.bench.parallel_sampling_report import compare


def test_quick_run_reports_every_figure_and_parrot_computes_the_prompt_once(tmp_path):
    run_parallel_sampling_bench("parallel-sampling", True, tmp_path, "smollm2-135m", False, Console(quiet=True))
    result = json.loads((tmp_path / "parallel-sampling.json").read_text())
    assert (tmp_path / "parallel-sampling.md").read_text().count("|") > 10
    assert (tmp_path / "parallel-sampling.png").stat().st_size > 1000
    assert set(result["results"]) == {"parrot", "request-level"}
    for rows in result["results"].values():
        assert [r["n"] for r in rows] == [n for n in QUICK.choices for _ in range(QUICK.repeats)]
        for r in rows:
            assert r["latency_s"] > 0 and r["output_tokens"] == r["n"] * QUICK.output_tokens
            assert r["distinct_choices"] > 1  # sampled apart, each with its own seed
    # the work done, not its time: parrot's engine computes the prompt once, the n requests' each computes it
    parrot, request_level = (result["results"][label][0]["tokens_computed"] for label in ("parrot", "request-level"))
    n = QUICK.choices[0]
    assert parrot < QUICK.prompt_tokens + n * (QUICK.output_tokens + 16)
    assert request_level >= n * QUICK.prompt_tokens
    assert result["comparison"][0]["slower_than_parrot"]["parrot"] == 1.0


def test_comparison_means_the_repeats_per_n():
    def row(n, seconds, tokens):
        return {"n": n, "latency_s": seconds, "tokens_computed": tokens}

    result = {"config": {"choices": [2, 4]},
              "results": {"parrot": [row(2, 1.0, 10), row(2, 3.0, 30), row(4, 2.0, 40)],
                          "vllm": [row(2, 4.0, None), row(4, 3.0, None)]}}
    rows = compare(result)
    assert [r["n"] for r in rows] == [2, 4]
    assert rows[0]["mean_s"] == {"parrot": 2.0, "vllm": 4.0} and rows[0]["slower_than_parrot"]["vllm"] == 2.0
    assert rows[0]["tokens_computed"] == {"parrot": 20, "vllm": None}
    assert rows[1]["slower_than_parrot"] == {"parrot": 1.0, "vllm": 1.5}
