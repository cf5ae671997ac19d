"""Every `parrot bench` workload in --quick mode against one real server: the report
has every figure and the outputs are real text (timings are never asserted)."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from parrot.bench.harness import run_bench
from parrot.bench.systems import start_parrot
from parrot.bench.workloads import PAPER_SIZES, WORKLOADS, RunDocuments, SizeOverrides, check_documents_suffice
from parrot.errors import UserError


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = start_parrot("smollm2-135m", 1, tmp_path_factory.mktemp("server"))
    yield running
    running.stop()


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_quick_run_reports_every_figure(workload, server, tmp_path):
    run_bench(workload, True, tmp_path, "smollm2-135m", 20.0, False, 1, Console(quiet=True), server=server)
    result = json.loads((tmp_path / f"{workload}.json").read_text())
    assert (tmp_path / f"{workload}.md").read_text().count("|") > 10
    assert (tmp_path / f"{workload}.png").stat().st_size > 1000
    config = result["config"]
    systems = {(m["system"], m["rtt_ms"]) for m in result["measurements"]}
    assert systems == {(s, r) for s in ("parrot", "request-level") for r in (0.0, 20.0)}
    for m in result["measurements"]:
        assert len(m["latencies_s"]) == config["apps"] and all(t > 0 for t in m["latencies_s"])
        assert all(len(text.split()) >= 1 for text in m["final_outputs"])
        assert m["p90_s"] >= min(m["latencies_s"])
    assert set(result["ratios"]) == {"0ms", "20ms"} and all(r["parrot"] == 1.0 for r in result["ratios"].values())
    if workload == "chain-summary":
        # one request at a time: the same batches, so the same text (with concurrency, batches of <= 3 rows
        # may run their matmuls in bf16 or float32 depending on what else is running)
        assert result["outputs_match"], "greedy outputs of the same prompts must agree between parrot and request-level"
    assert all(text.strip() for outputs in result["check_outputs"].values() for text in outputs)
    if config["background_rate"]:
        assert any(m["background_requests"] > 0 for m in result["measurements"])
        # every background request sent was answered and timed
        assert all(len(m["background_latencies_s"]) == m["background_requests"] and m["background_failures"] == 0
                   for m in result["measurements"])
        assert all(m["background_mean_s"] > 0 for m in result["measurements"] if m["background_requests"])
        assert "background requests' mean latency" in (tmp_path / f"{workload}.md").read_text()


def test_a_run_that_would_run_out_of_documents_is_refused_before_it_starts(tokenizer):
    multi_chain = PAPER_SIZES["multi-chain"]
    check_documents_suffice(tokenizer, multi_chain, 4)  # the default: two systems at two RTT settings
    with pytest.raises(UserError, match="use fewer --repeats"):
        check_documents_suffice(tokenizer, multi_chain, 8)


@pytest.mark.parametrize("workload", ["chain-summary-bg", "multi-chain"])
def test_measured_runs_share_no_text(workload, tokenizer):
    """A chunk one run read (its apps' or its background's) would be in the prefix cache when
    the next run on that server reads it: that run would start a step ahead."""
    config = WORKLOADS[workload][0]
    seen: set[str] = set()
    for document_set in range(4):
        run = RunDocuments.of(tokenizer, config, document_set)
        chunks = [chunk for app in run.apps for chunk in app] + [run.background]
        assert len(chunks) == RunDocuments.chunks_per_run(config)
        starts = {chunk[:200] for chunk in chunks}
        assert len(starts) == len(chunks) and not starts & seen
        seen |= starts


def test_size_overrides_replace_only_what_was_given():
    paper = PAPER_SIZES["multi-chain"]
    sized = SizeOverrides(apps=40, chunks=4).apply(paper)
    assert (sized.apps, sized.chunks, sized.chunk_tokens, sized.output_tokens) == (40, 4, paper.chunk_tokens, paper.output_tokens)
    assert SizeOverrides().apply(paper) == paper


def test_a_baseline_policy_adds_a_request_level_baseline_on_a_server_of_its_own(server, tmp_path):
    run_bench("map-reduce", True, tmp_path, "smollm2-135m", 20.0, False, 1, Console(quiet=True), server=server,
              baseline_policy="latency-centric")
    result = json.loads((tmp_path / "map-reduce.json").read_text())
    label = "request-level (latency-centric)"
    assert {(m["system"], m["rtt_ms"]) for m in result["measurements"]} == {
        (s, r) for s in ("parrot", "request-level", label) for r in (0.0, 20.0)}
    assert all(label in ratios for ratios in result["ratios"].values())
    assert all(text.strip() for m in result["measurements"] for text in m["final_outputs"])
    # its own server, started with the policy and stopped with the run
    log = (tmp_path / "parrot-serve-latency-centric.log").read_text()
    assert "policy latency-centric" in log
    assert label in (tmp_path / "map-reduce.md").read_text()


def test_the_command_line_offers_every_workload_and_only_those():
    from parrot.bench.mixed import MIXED_WORKLOADS
    from parrot.bench.multi_agent import MULTI_AGENT_WORKLOADS
    from parrot.bench.parallel_sampling import PARALLEL_SAMPLING_WORKLOADS
    from parrot.bench.sharing import SHARING_WORKLOADS
    from parrot.bench.soak import SOAK_WORKLOADS
    from parrot.cli import build_parser

    bench = build_parser()._subparsers._group_actions[0].choices["bench"]
    offered = next(a.choices for a in bench._actions if a.dest == "workload")
    # the parser keeps its own list so that `parrot --help` does not import the benchmarks
    assert set(offered) == {*WORKLOADS, *MIXED_WORKLOADS, *MULTI_AGENT_WORKLOADS, *SHARING_WORKLOADS, *SOAK_WORKLOADS,
                            *PARALLEL_SAMPLING_WORKLOADS}


def test_bench_hands_its_engine_precision_to_every_server():
    """`parrot bench --kv-dtype bfloat16 --prompt-attention-dtype bfloat16` (vLLM's precision, for
    --peers): the flags reach the engines of every server the run starts; by default, the engine's own."""
    from parrot.cli import bench_engine_flags, build_parser, engine_config

    parser = build_parser()
    for given, want in (([], ("auto", "auto")), (["--kv-dtype", "bfloat16", "--prompt-attention-dtype", "bfloat16"], ("bfloat16", "bfloat16"))):
        flags = bench_engine_flags(parser.parse_args(["bench", "map-reduce", *given]))
        config = engine_config(parser.parse_args(["serve", *flags]))
        assert (config.kv_dtype, config.prompt_attention_dtype) == want
