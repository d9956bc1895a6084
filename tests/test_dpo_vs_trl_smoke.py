"""benchmarks/dpo_vs_trl.py runs end to end in smoke mode: a tiny model with the real tokenizer, TRL and
posttrain in separate processes on the same HH-RLHF pairs, the numerics check passing, the JSON complete.
The full run on SmolLM2 is for docs/performance.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "helpful-base" / "test.jsonl"


@pytest.mark.skipif(not HH.is_file(), reason="needs the shared HH-RLHF data")
def test_dpo_vs_trl_smoke(tmp_path):
    pytest.importorskip("trl", minversion="1.16")
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dpo_vs_trl.py"), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["machine"]["smoke"] is True and data["machine"]["matmul_fp32_gflops"] > 0
    rows = {r["name"]: r for r in data["rows"]}
    assert set(rows) == {"trl_best", "posttrain_plain", "posttrain_best"}
    steps = data["protocol"]["steps"]
    for r in rows.values():
        assert len(r["losses"]) == steps and all(0 < loss < 10 for loss in r["losses"])
        assert r["pairs_per_s"] > 0 and r["peak_rss_mb"] > 0 and 0 < r["mfu"] < 1
        assert r["vs_trl_best"]["pairs_per_s"] > 0
    assert rows["trl_best"]["precompute_s"] > 0 and rows["posttrain_best"]["precompute_s"] > 0
    assert rows["posttrain_plain"]["precompute_s"] == 0
    # LoRA starts as the identity: every run's first loss is log 2 (up to fp32)
    for r in rows.values():
        assert abs(r["losses"][0] - 0.6931) < 1e-3
    numerics = data["numerics"]
    assert numerics["passed"] and numerics["policy_moved_from_reference"]
    assert max(numerics["relative_differences"].values()) <= numerics["rtol"]
    assert "| posttrain_best |" in result.stdout
