"""The `mixed` workload in --quick mode: every policy on its own real server; the report
has every figure and the outputs are real text (timings are never asserted)."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from parrot.bench.mixed import MIXED_POLICIES, quick_or_full
from parrot.bench.mixed_harness import run_mixed_bench


@pytest.mark.parametrize("workload", ["mixed", "mixed-one-engine"])
def test_quick_mixed_run_reports_every_policy(tmp_path, workload, monkeypatch):
    import parrot.bench.mixed_harness as harness

    def vllm_that_dies(model, out_dir):
        raise RuntimeError("server exited early")

    # as where vLLM is not installed (mixed), and where it fails to start (mixed-one-engine): the report is still written
    monkeypatch.setattr(harness, "start_vllm", (lambda model, out_dir: None) if workload == "mixed" else vllm_that_dies)
    run_mixed_bench(workload, True, tmp_path, "smollm2-135m", Console(quiet=True), peers=True)
    result = json.loads((tmp_path / f"{workload}.json").read_text())
    assert result["notes"] == (["vLLM skipped: not installed (bash benchmarks/setup_vllm.sh installs it)"] if workload == "mixed"
                               else [f"vLLM failed: server exited early (its log: {tmp_path / 'vllm.log'})"])
    config = quick_or_full(workload, True)
    assert (tmp_path / f"{workload}.md").read_text().count("|") > 20 and (tmp_path / f"{workload}.png").stat().st_size > 1000
    assert [r["policy"] for r in result["results"]] == list(MIXED_POLICIES)
    for r in result["results"]:
        assert len(r["chat_latencies_s"]) == config.chats and all(t > 0 for t in r["chat_latencies_s"])
        assert len(r["job_completion_s"]) == config.map_reduce_apps and all(t > 0 for t in r["job_completion_s"])
        assert all(text.strip() for text in r["chat_outputs"] + r["map_reduce_outputs"])
        assert r["chat_vs_best"] >= 1.0 and r["jct_vs_best"] >= 1.0
    assert min(r["chat_vs_best"] for r in result["results"]) == 1.0


def test_quick_multi_agent_run_reports_every_policy(tmp_path):
    from parrot.bench.multi_agent import MULTI_AGENT_POLICIES
    from parrot.bench.multi_agent_harness import run_multi_agent_bench

    run_multi_agent_bench("multi-agent", True, tmp_path, "smollm2-135m", Console(quiet=True))
    result = json.loads((tmp_path / "multi-agent.json").read_text())
    assert (tmp_path / "multi-agent.png").stat().st_size > 1000
    assert [row["policy"] for row in result["rows"]] == list(MULTI_AGENT_POLICIES)
    for row in result["rows"]:
        assert row["latency_s"] > 0 and row["program"].strip() and row["peak_batch_blocks"] > 0
    assert result["rows"][0]["slower_than_parrot"] == 1.0


def test_quick_mixed_run_on_simulated_engines_is_labelled_simulated(tmp_path):
    run_mixed_bench("mixed-sim", True, tmp_path, "smollm2-135m", Console(quiet=True), engines=1)  # as --engines 1
    result = json.loads((tmp_path / "mixed-sim.json").read_text())
    assert result["config"]["engine"].startswith("sim:") and result["config"]["engines"] == 1
    assert [r["policy"] for r in result["results"]] == list(MIXED_POLICIES)
    assert all(text.strip() for r in result["results"] for text in r["chat_outputs"] + r["map_reduce_outputs"])
    assert "SIMULATED" in (tmp_path / "mixed-sim.md").read_text()
    assert not (tmp_path / "mixed-sim.partial.jsonl").exists()  # the full report replaced it


def test_a_run_cut_off_keeps_the_policies_it_measured(tmp_path, monkeypatch):
    import parrot.bench.mixed_harness as harness

    measured = []

    def run_then_cut(config, policy, server, tokenizer):
        if measured:
            raise KeyboardInterrupt  # the run's time limit, after the first policy
        measured.append(policy)
        return real_run(config, policy, server, tokenizer)

    real_run = harness.run_mixed
    monkeypatch.setattr(harness, "run_mixed", run_then_cut)
    with pytest.raises(KeyboardInterrupt):
        run_mixed_bench("mixed-sim", True, tmp_path, "smollm2-135m", Console(quiet=True))
    lines = [json.loads(line) for line in (tmp_path / "mixed-sim.partial.jsonl").read_text().splitlines()]
    assert [line["label"] for line in lines] == measured == [MIXED_POLICIES[0]]
    assert len(lines[0]["measurement"]["chat_latencies_s"]) == quick_or_full("mixed-sim", True).chats
    assert not (tmp_path / "mixed-sim.json").exists()


def test_quick_multi_agent_on_a_simulated_engine_is_labelled_and_holds_shared_prefixes_once(tmp_path):
    from parrot.bench.multi_agent_harness import run_multi_agent_bench

    run_multi_agent_bench("multi-agent-sim", True, tmp_path, "smollm2-135m", Console(quiet=True))
    result = json.loads((tmp_path / "multi-agent-sim.json").read_text())
    assert "SIMULATED" in (tmp_path / "multi-agent-sim.md").read_text()
    rows = {row["policy"]: row for row in result["rows"]}
    assert all(row["program"].strip() for row in rows.values())
    # parrot forks every role from one prefilled copy of the guidelines and the design; the
    # baselines' simulated engine (no static prefix hints) holds a copy per call
    assert 0 < rows["parrot"]["peak_batch_blocks"] < rows["throughput-centric"]["peak_batch_blocks"]


def test_multi_agent_at_the_papers_scale_runs_the_simulated_runs_lengths_on_built_in_engines():
    from parrot.bench.multi_agent import MULTI_AGENT_WORKLOADS, quick_or_full

    paper, sim = quick_or_full("multi-agent", False, paper_scale=True), MULTI_AGENT_WORKLOADS["multi-agent-sim"][0]
    assert (paper.guidelines_tokens, paper.design_tokens, paper.code_tokens) == (sim.guidelines_tokens, sim.design_tokens, sim.code_tokens)
    assert paper.engine == "builtin" and paper.team_sizes == (4, 8, 16)
    # the baselines share prefixes the way vLLM does (a block cache), parrot with its shared-prefix attention too
    assert paper.policy_flags()["latency-centric"] == ["--no-shared-attention"] and paper.policy_flags()["parrot"] == []


def test_multi_agent_baselines_can_run_as_the_papers_vllm_did_without_prefix_caching():
    from parrot.bench.multi_agent import quick_or_full

    today, papers = quick_or_full("multi-agent", False), quick_or_full("multi-agent", False, baselines_cache_prefixes=False)
    assert papers.policy_flags() == {"parrot": [], "latency-centric": ["--no-shared-attention", "--no-prefix-caching"],
                                     "throughput-centric": ["--no-shared-attention", "--no-prefix-caching"]}
    assert "--no-prefix-caching" not in str(today.policy_flags())
    assert "no prefix caching" in papers.baselines and today.baselines == "block prefix caching"


def test_mixed_as_plain_completions_serves_every_chat_and_job(tmp_path):
    """The request-level side of `--peers` (how vLLM is driven), here against our own OpenAI API."""
    from parrot.bench.mixed import run_mixed
    from parrot.bench.systems import start_parrot
    from parrot.engine.loader import resolve_model_dir
    from parrot.engine.tokenizer import Tokenizer

    config = quick_or_full("mixed", True)
    server = start_parrot("smollm2-135m", 1, tmp_path, ["--threads", "2"])
    try:
        result = run_mixed(config, "request-level", server, Tokenizer(resolve_model_dir("smollm2-135m")), request_level=True)
    finally:
        server.stop()
    assert len(result.chat_outputs) == config.chats and len(result.map_reduce_outputs) == config.map_reduce_apps
    assert all(text.strip() for text in result.chat_outputs + result.map_reduce_outputs)
    assert all(t > 0 for t in result.chat_latencies_s + result.job_completion_s)


@pytest.mark.slow
def test_quick_mixed_with_vllm_when_installed(tmp_path):
    from parrot.bench.systems import vllm_python

    if not vllm_python().exists():
        pytest.skip("vLLM is not installed (bash benchmarks/setup_vllm.sh)")
    result = run_mixed_bench("mixed", True, tmp_path, "smollm2-135m", Console(quiet=True), peers=True)
    vllm = next(r for r in result["results"] if r["policy"] == "vllm")
    assert all(text.strip() for text in vllm["chat_outputs"] + vllm["map_reduce_outputs"])
