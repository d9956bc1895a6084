"""benchmarks/grpo_vs_trl.py runs end to end in smoke mode: a tiny model with the real tokenizer and chat template,
TRL's GRPOTrainer and posttrain in separate processes on the same addition prompts (asserted token for token by the
script), completions forced to full length, the JSON complete. The full run on SmolLM2 is for docs/performance.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_grpo_vs_trl_smoke(tmp_path):
    pytest.importorskip("trl", minversion="1.16")
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "grpo_vs_trl.py"), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    protocol = data["protocol"]
    assert data["machine"]["smoke"] is True and protocol["min_new_tokens"] == protocol["max_new_tokens"]
    rows = {r["name"]: r for r in data["rows"]}
    assert set(rows) == {"trl", "posttrain_plain", "posttrain_best"}
    for r in rows.values():
        assert len(r["losses"]) == protocol["steps"] and all(abs(loss) < 10 for loss in r["losses"])
        assert all(0 <= reward <= 1 for reward in r["rewards"])
        assert r["s_per_step"] > r["generation_s_per_step"] > 0 and r["train_s_per_step"] > 0
        assert r["generation_tokens_per_s"] > 0 and r["train_tokens_per_s"] > 0 and r["peak_rss_mb"] > 0
        assert 0 < r["generation_share_of_bound"] < 1 and r["generation_bound_s"] > 0
    for name in ("posttrain_plain", "posttrain_best"):
        assert rows[name]["vs_trl"]["row"] == "trl" and rows[name]["vs_trl"]["speedup"] > 0
    assert "| posttrain_best |" in result.stdout
    fp32, bf16 = data["greedy_check"]
    assert fp32["dtype"] == "float32" and bf16["dtype"] == "bfloat16" and fp32["prompts"] == bf16["prompts"] == 32
    assert fp32["loop_identical"] == fp32["loop_merged_identical"] == 32  # fp32: generate's tokens exactly
    assert bf16["loop_identical"] == 32 and bf16["loop_merged_identical"] >= 24  # merged bf16 weights round
    assert {"matmul_fp32_gflops", "matmul_bf16_gflops", "read_gb_per_s"} <= set(data["machine"])
