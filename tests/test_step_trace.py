"""`--step-trace`: every forward step an engine runs is one JSON line saying what it held,
and `python -m parrot.engine.step_trace` sums the steps up by kind."""

from __future__ import annotations

import asyncio

from parrot.engine.llm_engine import EngineConfig, LLMEngine
from parrot.engine.scheduler import PRIORITY_LATENCY
from parrot.engine.step_trace import main, read_trace, summarize

from conftest import PROMPTS, collect, greedy

OUTPUT_TOKENS = 6


def test_each_step_is_one_record_of_what_it_held(tmp_path, capsys):
    trace = tmp_path / "steps.jsonl"
    engine = LLMEngine(EngineConfig(random_weights="tiny", kv_memory_gb=0.05, decode_graphs=True, max_seqs_per_step=4,
                                    step_trace=str(trace)))
    prompt = engine.tokenizer.encode(PROMPTS[0])

    async def fill_then_generate_for_latency() -> int:
        await engine.fill("a", None, prompt)
        generated = await collect(engine, "a", greedy(OUTPUT_TOKENS), PRIORITY_LATENCY)
        await engine.close()
        return len(generated)

    assert asyncio.run(fill_then_generate_for_latency()) == OUTPUT_TOKENS
    records = read_trace(trace)
    stats = engine.stats()
    assert len(records) == stats.steps
    assert sum(r.prefill_tokens + r.decode_rows for r in records) == stats.tokens_processed
    assert sum(r.decode_rows for r in records) == OUTPUT_TOKENS - 1  # the first token comes from the prompt's last step
    fill, *generate = records
    assert (fill.prefill_tokens, fill.latency_rows, fill.replayed_graph) == (len(prompt), 0, False)
    assert all(r.latency_rows == 1 and r.throughput_rows == 0 and r.replayed_graph for r in generate)
    assert [r.kv_tokens for r in generate] == list(range(len(prompt), len(prompt) + len(generate)))
    assert all(later.at_s > earlier.at_s for earlier, later in zip(records, records[1:]))

    by_kind = {(s.kind, s.with_latency_rows): s for s in summarize(records)}
    assert set(by_kind) == {("eager, with prompt tokens", False), ("graph replay", True)}
    assert by_kind["graph replay", True].steps == len(generate)
    assert abs(sum(s.share_of_time for s in by_kind.values()) - 1.0) < 1e-9

    assert main([str(tmp_path)]) == 0  # a folder: its *.jsonl traces
    assert "graph replay" in capsys.readouterr().out


def test_the_summary_refuses_what_is_not_a_trace(tmp_path, capsys):
    (tmp_path / "notes.jsonl").write_text('{"what": "not a step"}\n')
    assert main([str(tmp_path / "notes.jsonl")]) == 2
    assert "is not a step trace" in capsys.readouterr().out
    assert main([str(tmp_path / "missing.jsonl")]) == 2
    assert main([str(tmp_path / "empty-folder")]) == 2
