"""`--step-trace`: every forward step an engine runs is one JSON line saying what it held,
and `python -m parrot.engine.step_trace` sums the steps up by kind."""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict

import pytest

from parrot.engine.llm_engine import EngineConfig, LLMEngine
from parrot.engine.scheduler import PRIORITY_LATENCY, PRIORITY_THROUGHPUT
from parrot.engine.step_trace import StepRecord, main, read_trace, summarize, timeline

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


def test_a_step_records_the_cap_other_work_kept_to_beside_a_latency_job(tmp_path):
    trace = tmp_path / "steps.jsonl"
    engine = LLMEngine(EngineConfig(random_weights="tiny", kv_memory_gb=0.05, max_tokens_per_step=256,
                                    latency_max_tokens_per_step=32, step_trace=str(trace)))
    short = engine.tokenizer.encode(PROMPTS[0])
    long = engine.tokenizer.encode(" ".join([PROMPTS[4]] * 12))[:600]

    async def chat_beside_a_long_throughput_prompt() -> None:
        await engine.fill("chat", None, short)
        chat = asyncio.ensure_future(collect(engine, "chat", greedy(OUTPUT_TOKENS), PRIORITY_LATENCY))
        await engine.fill("job", None, long, priority=PRIORITY_THROUGHPUT)
        await chat
        await engine.close()

    asyncio.run(chat_beside_a_long_throughput_prompt())
    records = read_trace(trace)
    beside_chat = [r for r in records if r.latency_rows and r.throughput_rows]
    assert beside_chat, "the long prompt ran beside the chat's decodes"
    # 32, or less where the fitted step cost makes tokens dear (step_profile.latency_cap)
    assert all(r.cap_tokens <= 32 and r.prefill_tokens <= r.cap_tokens and not r.later_apps_capped for r in beside_chat)
    assert all(r.throughput_priorities == [PRIORITY_THROUGHPUT] for r in beside_chat)
    alone = [r for r in records if r.throughput_rows and not r.latency_rows]
    assert alone and all(r.cap_tokens is None and r.prefill_tokens <= 256 for r in alone)


def test_traces_written_before_the_budget_was_recorded_still_read(tmp_path):
    old = tmp_path / "old.jsonl"
    old.write_text('{"at_s": 0.0, "seconds": 0.1, "decode_rows": 2, "prefill_tokens": 30, "kv_tokens": 90, '
                   '"latency_rows": 1, "throughput_rows": 2, "replayed_graph": false}\n')
    (record,) = read_trace(old)
    assert (record.cap_tokens, record.later_apps_capped, record.throughput_priorities) == (None, False, [])
    assert record.caps_normal_class is None and record.caps_later_apps is None  # unknown, not off


def test_the_timeline_shows_how_the_budget_went_over_time(tmp_path, capsys):
    def step(at_s: float, cap: int | None, later: bool, rule: bool | None, priorities: list[int]) -> StepRecord:
        return StepRecord(at_s, 0.05, decode_rows=2, prefill_tokens=30, kv_tokens=90, latency_rows=0, throughput_rows=len(priorities),
                          replayed_graph=False, cap_tokens=cap, later_apps_capped=later, caps_normal_class=rule,
                          caps_later_apps=rule, throughput_priorities=priorities)

    records = [step(0.1, None, False, False, [1009]), step(0.6, 16, False, False, [1019]),  # a latency cap, rule off
               step(1.2, 18, True, True, [1009, 1019]), step(3.5, None, False, None, [])]  # the rule on; an old record
    first, second, last = timeline(records, 1.0)
    assert (first.start_s, first.steps, first.prompt_tokens, first.decode_rows) == (0.0, 2, 60, 4)
    assert (first.latency_capped_steps, first.later_apps_capped_steps, first.caps_later_apps) == (1, 0, "off")
    assert first.throughput_priorities == [1009, 1019] and first.busy_s == pytest.approx(0.1)
    assert (second.start_s, second.later_apps_capped_steps, second.caps_later_apps) == (1.0, 1, "on")
    assert (last.start_s, last.caps_later_apps, last.throughput_priorities) == (3.0, "?", [])  # no steps from 2 s to 3 s
    assert [b.start_s for b in timeline(records, 2.0)] == [0.0, 2.0]
    assert [b.caps_later_apps for b in timeline(records, 10.0)] == ["off, on, ?"]

    trace = tmp_path / "steps.jsonl"
    trace.write_text("".join(json.dumps(asdict(r)) + "\n" for r in records))
    assert main(["--timeline", "1", str(trace)]) == 0
    assert "over time" in capsys.readouterr().out
    assert main(["--timeline", "0", str(trace)]) == 2
    assert "--timeline is a stretch of seconds" in capsys.readouterr().out
