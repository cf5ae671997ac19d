"""The GPU benchmark scripts run end to end in their CPU smoke mode (the harness, not the speed):
every figure is in their JSON, the tables and plot are written."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def _script(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_attention_smoke_run_reports_every_case(tmp_path, capsys):
    assert _script("gpu_attention").main(["--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu_attention.json").read_text())
    assert {(c["prefix_tokens"], c["batch"]) for c in result["cases"]} == {(64, 2), (64, 4), (128, 2), (128, 4)}
    assert all(c["shared_ms"] > 0 and c["plain_ms"] > 0 and c["speedup"] > 0 for c in result["cases"])
    assert result["copy_gbps"] > 0 and (tmp_path / "gpu_attention.png").stat().st_size > 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("gpu-attention: shared-prefix")


def test_gpu_engine_smoke_run_reports_parrot_transformers_and_the_roofline(tmp_path, capsys):
    assert _script("gpu_engine").main(["--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu_engine.json").read_text())
    systems = {s["name"]: s for s in result["systems"]}
    assert set(systems) == {"parrot", "transformers", "roofline"}
    for name in ("parrot", "transformers"):
        assert systems[name]["prefill_tok_s"] > 0
        assert set(systems[name]["decode_tok_s"]) == {"1", "4"} and all(v > 0 for v in systems[name]["decode_tok_s"].values())
    assert "| parrot |" in (tmp_path / "gpu_engine.md").read_text()
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("gpu-engine (tiny, cpu):")
