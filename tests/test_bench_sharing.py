"""The prefix-sharing workloads (shared-prompt, gpts): request plans, the comparison
arithmetic, and a --quick run of each on real servers (timings are never asserted)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import pytest
from rich.console import Console

from parrot.bench.sharing import SHARING_WORKLOADS, LoadKind, plan_requests, quick_or_full, system_prompts
from parrot.bench.sharing_harness import run_sharing_bench
from parrot.bench.sharing_report import compare, sustained_load
from parrot.engine.loader import resolve_model_dir
from parrot.engine.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(resolve_model_dir("smollm2-135m"))


def test_every_system_gets_the_same_requests_in_the_papers_mix(tokenizer):
    config = quick_or_full("gpts", False)
    levels = plan_requests(config, tokenizer)
    assert levels == plan_requests(config, tokenizer)
    assert [len(level) for level in levels] == [config.requests_per_load] * len(config.loads)
    for level, rate in zip(levels, config.loads):
        arrivals = [r.arrival_s for r in level]
        assert arrivals == sorted(arrivals) and arrivals[0] == 0.0
    # 80 requests in the 19/40/28/13 mix: the second app is the most common, every app appears
    counts = Counter(r.app for level in levels for r in level)
    assert set(counts) == {0, 1, 2, 3} and counts.most_common(1)[0][0] == 1
    queries = [r.query for level in levels for r in level]
    assert len(set(queries)) == len(queries)
    prompts = system_prompts(config, tokenizer)
    lengths = [len(tokenizer.encode(p)) for p in prompts]
    assert all(abs(n - want) <= 3 for n, want in zip(lengths, config.system_prompt_tokens))
    assert not any(q in p for q in queries for p in prompts)


def test_a_burst_sends_one_request_per_user_at_once(tokenizer):
    config = quick_or_full("shared-prompt", False)
    assert config.load_kind is LoadKind.BURST
    levels = plan_requests(config, tokenizer)
    assert [len(level) for level in levels] == [int(load) for load in config.loads]
    assert all(r.arrival_s == 0.0 and r.app == 0 for level in levels for r in level)


def row(load: float, s_per_token: float, throughput: float) -> dict:
    return {"load": load, "s_per_output_token": s_per_token, "throughput_tokens_s": throughput, "peak_batch_blocks": None}


def test_sustained_rate_is_the_highest_within_the_slo():
    rows = [row(1, 0.1, 10), row(2, 0.2, 18), row(4, 0.5, 20)]
    assert sustained_load(rows, 0.25) == 2
    assert sustained_load([row(1, 0.3, 5), row(2, 0.2, 9)], 0.25) == 0.0  # a rate beyond a missed one does not count
    assert sustained_load(rows, 0.05) == 0.0
    result = {"config": {"load_kind": "requests/s", "slo_s_per_token": 0.25},
              "results": {"parrot": [row(1, 0.1, 10), row(2, 0.1, 20)], "other": rows[:2]}}
    cmp = compare(result)
    assert cmp["parrot"]["sustained_load"] == 2 and cmp["other"]["sustained_load"] == 2
    assert cmp["other"]["by_load"]["2"] == {"throughput_x": 20 / 18, "latency_x": 2.0, "peak_batch_blocks": None}


def test_a_high_rate_is_held_for_seconds_not_sent_as_one_burst(tokenizer):
    config = replace(quick_or_full("gpts", True), loads=(1, 16), requests_per_load=4, seconds_per_load=2.0)
    levels = plan_requests(config, tokenizer)
    assert [len(level) for level in levels] == [4, 32]
    assert 1.0 < levels[1][-1].arrival_s < 3.5  # 32 Poisson arrivals at 16 req/s span about two seconds


def test_a_system_far_past_the_slo_skips_the_higher_rates(tokenizer, tmp_path, monkeypatch):
    """The harness's climb on a fake server: latency per token grows with the rate, faster without sharing."""
    import parrot.bench.sharing_harness as harness
    from parrot.bench.sharing import LoadResult, RequestSender

    config = replace(quick_or_full("gpts", True), loads=(1, 2, 4, 8), slo_s_per_token=0.25)
    seconds_per_token = {"parrot": 0.05, "parrot-no-sharing": 0.2, "prefix-caching": 0.05}  # at 1 req/s, times the rate
    serving: list[str] = []

    def start(system, *args):
        serving.append(system.label)
        return type("FakeServer", (), {"stop": lambda self: None})()

    def run_level(send, level, load, output_tokens, read_peak_blocks):
        latency_s = seconds_per_token[serving[-1]] * load * output_tokens
        return LoadResult(load, [latency_s] * len(level), output_tokens, 1.0, 10, ["text"] * len(level))

    monkeypatch.setattr(harness, "quick_or_full", lambda *args, **kwargs: config)
    monkeypatch.setattr(harness, "_start", start)
    monkeypatch.setattr(harness, "request_sender", lambda *args: RequestSender(lambda request: "text", lambda: None))
    monkeypatch.setattr(harness, "run_level", run_level)
    result = run_sharing_bench("gpts", True, tmp_path, "smollm2-135m", False, Console(quiet=True))
    loads = {label: [row["load"] for row in rows] for label, rows in result["results"].items()}
    # 0.2 s/token at 1 req/s is within twice the SLO (0.5), 0.4 at 2 too, 0.8 at 4 is not: 8 is never sent
    assert loads == {"parrot": [1, 2, 4, 8], "parrot-no-sharing": [1, 2, 4], "prefix-caching": [1, 2, 4, 8]}
    assert any("parrot-no-sharing" in note and "(8) were not run" in note for note in result["notes"])
    assert result["comparison"]["parrot-no-sharing"]["sustained_load"] == 1
    assert result["comparison"]["parrot"]["sustained_load"] == 4


# gpts runs the same harness as shared-prompt (its plans are tested above): slow, to keep make test short
@pytest.mark.parametrize("workload", [pytest.param(w, marks=pytest.mark.slow) if w == "gpts" else w for w in sorted(SHARING_WORKLOADS)])
def test_quick_run_compares_every_system(workload, tmp_path):
    run_sharing_bench(workload, True, tmp_path, "smollm2-135m", False, Console(quiet=True))
    result = json.loads((tmp_path / f"{workload}.json").read_text())
    assert (tmp_path / f"{workload}.md").read_text().count("|") > 20
    assert (tmp_path / f"{workload}.png").stat().st_size > 1000
    config = quick_or_full(workload, True)
    assert set(result["results"]) == {"parrot", "parrot-no-sharing", "prefix-caching"}
    for label, rows in result["results"].items():
        assert [r["load"] for r in rows] == list(config.loads)
        for r in rows:
            assert all(t > 0 for t in r["latencies_s"]) and r["throughput_tokens_s"] > 0
            assert all(text.strip() for text in r["outputs"])
            assert r["peak_batch_blocks"] > 0
    assert all(text.strip() for outputs in result["warmup_outputs"].values() for text in outputs)
    # prompts behind one system prompt: sharing holds it once per batch, no sharing once per sequence
    peak = {label: rows[-1]["peak_batch_blocks"] for label, rows in result["results"].items()}
    if workload == "shared-prompt":
        assert peak["parrot"] < peak["parrot-no-sharing"]
    assert result["comparison"]["parrot"]["by_load"][f"{config.loads[0]:g}"]["latency_x"] == 1.0


@pytest.mark.parametrize("argv,message", [
    (["bench", "gpts", "--rtt-ms", "100"], "--rtt-ms, --background-rate, --apps, --chunks, --chunk-tokens, --output-tokens and --baseline-policy"),
    (["bench", "mixed", "--apps", "4"], "--rtt-ms, --background-rate, --apps, --chunks, --chunk-tokens, --output-tokens and --baseline-policy"),
    (["bench", "multi-agent", "--chunk-tokens", "64"], "--output-tokens and --baseline-policy"),
    (["bench", "multi-agent-sim", "--background-rate", "1"], "1 simulated sim:a100-13b engine per policy"),
    (["bench", "shared-prompt", "--engines", "2"], "one built-in engine per system"),
    (["bench", "gpts", "--baseline-policy", "latency-centric"], "and --baseline-policy"),
    (["bench", "multi-chain", "--paper-scale"], "use it with --device cuda (or, for the app workloads, --engine sim:PRESET)"),
    (["bench", "map-reduce", "--paper-scale", "--quick", "--engine", "sim:a100-13b"], "drop --quick with it"),
    (["bench", "gpts", "--paper-scale"], "use it with --device cuda"),
    (["bench", "multi-agent-sim", "--paper-scale"], "--paper-scale sizes chain-summary"),
    (["bench", "multi-agent", "--paper-scale"], "use it with --device cuda"),
    (["bench", "mixed", "--paper-scale", "--quick"], "drop --quick with it"),
    (["bench", "map-reduce", "--peers", "--device", "cuda"], "drop --peers"),
    (["bench", "gpts", "--peers", "--random-weights", "llama-7b"], "drop --peers"),
    (["bench", "multi-agent-sim", "--engines", "2"], "1 simulated sim:a100-13b engine per policy"),
    (["bench", "multi-agent-sim", "--baselines-without-prefix-caching"], "multi-agent-sim's share no prefix already"),
    (["bench", "map-reduce", "--baselines-without-prefix-caching"], "--baselines-without-prefix-caching sets multi-agent's"),
    (["bench", "mixed-one-engine", "--engines", "2"], "drop --engine, --engines,"),
    (["bench", "mixed-sim", "--step-trace"], "simulated engines (--engine sim:PRESET, mixed-sim, multi-agent-sim) have no steps"),
    (["bench", "map-reduce", "--engine", "sim:a100-7b", "--step-trace"], "--step-trace traces built-in engines"),
    (["serve", "--engines", "0", "--step-trace", "unused-folder"], "--engines 0 starts none"),
    (["serve", "--engine", "sim:a100-7b", "--no-shared-attention"], "takes its settings from its preset"),
])
def test_flags_a_command_would_ignore_are_refused_with_a_message(argv, message, capsys):
    from parrot.cli import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["bench", "mixed-sim", "--engines", "0"], "--engines: 0 is out of range: give a value at least 1"),
    (["serve", "--threads", "0"], "--threads: 0 is out of range: give a value at least 1"),
    (["serve", "--engines", "-1"], "--engines: -1 is out of range: give a value at least 0"),
    (["serve", "--port", "99999"], "--port: 99999 is out of range: give a value from 0 to 65535"),
    (["serve", "--heartbeat-timeout", "-1"], "--heartbeat-timeout: -1 is out of range: give a value above 0"),
    (["serve", "--max-body-mb", "0"], "--max-body-mb: 0 is out of range"),
    (["bench", "chain-summary", "--repeats", "0"], "--repeats: 0 is out of range"),
    (["bench", "chain-summary-bg", "--background-rate", "-1"], "--background-rate: -1 is out of range: give a value at least 0"),
    (["bench", "multi-chain", "--chunks", "0"], "--chunks: 0 is out of range: give a value at least 1"),
    (["bench", "chain-summary", "--output-tokens", "0"], "--output-tokens: 0 is out of range"),
    (["bench", "chain-summary", "--rtt-ms", "-5"], "--rtt-ms: -5 is out of range: give a value at least 0"),
    (["generate", "hi", "--top-p", "0"], "--top-p: 0 is out of range: give a value above 0 and at most 1"),
    (["generate", "hi", "--kv-memory-gb", "x"], "--kv-memory-gb: 'x' is not a number"),
    (["serve", "--heartbeat-timeout", "nan"], "--heartbeat-timeout: 'nan' is not a finite number"),
])
def test_flags_out_of_range_are_refused_before_anything_starts(argv, message, capsys):
    from parrot.cli import main

    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_a_file_that_is_no_model_is_named_in_one_line(tmp_path, capsys):
    from parrot.cli import main

    junk = tmp_path / "junk.gguf"
    junk.write_text("not a model")
    assert main(["generate", "hi", "--model", str(junk)]) == 2
    assert "could not be read as a GGUF model" in capsys.readouterr().err
    assert main(["generate", "hi", "--model", str(tmp_path / "missing.gguf")]) == 2
    assert "no such file" in capsys.readouterr().err
