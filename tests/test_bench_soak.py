"""The `soak` workload in --quick mode on a real `parrot serve` with two engines: no app
fails, and after the load the server holds what it held before (no session, context or
KV block leaks; abandoned sessions expired). Timings are never asserted."""

from __future__ import annotations

import json

from rich.console import Console

from parrot.bench.soak import APP_KINDS, quick_or_full
from parrot.bench.soak_harness import run_soak_bench


def test_quick_soak_serves_every_app_and_leaks_nothing(tmp_path):
    run_soak_bench("soak", True, tmp_path, "smollm2-135m", Console(quiet=True))
    result = json.loads((tmp_path / "soak.json").read_text())
    config = quick_or_full("soak", True)
    assert result["errors"] == []
    assert result["apps"] == config.max_apps or result["wall_s"] >= config.duration_s
    assert all(result["served"][kind] > 0 for kind in APP_KINDS)
    before, after = result["before"], result["after"]
    assert after["sessions"] == 0  # closed, or expired when the client went away
    assert after["engine_contexts"] == before["engine_contexts"] == 0
    assert after["kv_blocks_live"] == before["kv_blocks_live"] == 0
    assert after["running_jobs"] == 0
    assert (tmp_path / "soak.md").read_text().count("|") > 20 and (tmp_path / "soak.png").stat().st_size > 1000
