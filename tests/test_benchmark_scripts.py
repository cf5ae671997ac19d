"""The benchmark scripts run end to end in their smoke sizes (their numbers are not checked:
timings are never asserted), so a change in the engine's API cannot leave them broken."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs benchmarks/<name> from the project root; it must exit 0 (its output's tail says why not)."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def test_engine_throughput_quick_reports_the_engine(tmp_path):
    run_script("engine_throughput.py", "--quick", "--no-transformers", "--threads", "1", "--cpu-bf16", "auto,off",
               "--vllm-precision", "--out", str(tmp_path))
    result = json.loads((tmp_path / "engine_throughput.json").read_text())
    assert [s["name"] for s in result["systems"]] == ["parrot", "parrot cpu-bf16=off", "parrot vllm-precision"]
    assert result["vllm_precision"] == {"kv_dtype": "bfloat16", "prompt_attention_dtype": "bfloat16"}
    assert all(s["decode_tok_s"] and s["prefill_tok_s"] > 0 for s in result["systems"])
    assert (tmp_path / "engine_throughput.md").read_text().count("|") > 10


def test_engine_throughputs_threads_setting_stays_out_of_vllms_server():
    probe = ("import sys; sys.argv = ['engine_throughput.py', '--threads', '2']; sys.path.insert(0, 'benchmarks'); "
             "import engine_throughput as bench; import os; "
             "print(os.environ['OMP_NUM_THREADS'], bench.vllm_env(None).get('OMP_NUM_THREADS'), bench.vllm_env(3)['OMP_NUM_THREADS'])")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # ours for our engine; vLLM gets the caller's (none) unless --vllm-threads says
    assert out.stdout.split() == ["2", "None", "3"]


def test_precision_probe_quick_prints_agreement_with_float32():
    done = run_script("precision_probe.py", "--quick", "--threads", "1")
    # the reference agrees with itself and reads the same filled in parts; every setting and prompt has a row
    assert "| float32 throughout | float32, KV cache float32, prompt attention float32 | 2/2 | 100% | 2/2 |" in done.stdout
    assert "| default | " in done.stdout
    assert "'What is the capital of France?'" in done.stdout and "'The capital of France is'" in done.stdout


def test_prefill_attention_quick_checks_both_forms_agree():
    done = run_script("prefill_attention.py", "--quick", "--repeats", "1", timeout=120)
    assert done.stdout.strip().splitlines()[-1].startswith("prefill-attention: the engine's form")


def test_decode_kernel_quick_reports_both_cache_types():
    done = run_script("decode_kernel.py", "--quick")
    assert done.stdout.count("| float32 |") == 1 and done.stdout.count("| bfloat16 |") == 1
    assert done.stdout.strip().splitlines()[-1].startswith("decode-kernel: float32 KV at")


def test_structured_output_quick_decodes_as_many_tokens_with_a_grammar_as_without():
    done = run_script("structured_output.py", "--quick")
    assert done.stdout.strip().splitlines()[-1].startswith("structured output: batch 1 ")


def test_sampling_cost_quick_runs_every_sampler_and_sums_up():
    done = run_script("sampling_cost.py", "--quick")
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("sampling: batch 1: plain ") and "batch 4: plain " in last


def test_penalty_cost_quick_checks_both_ways_agree_and_sums_up():
    done = run_script("penalty_cost.py", "--quick")
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("penalties: batch 1: rebuilt ") and "batch 4: rebuilt " in last
