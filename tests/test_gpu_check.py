"""benchmarks/gpu_check.py runs end to end on CPU in smoke mode (a tiny random model with the real tokenizer):
every check present and passed, exit code 0, the log-prob differences within the script's own tolerances. The
real run is `python benchmarks/gpu_check.py` on a machine with one CUDA GPU (docs/install.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "helpful-base" / "test.jsonl"
LAYOUTS = ["plain", "share_prompt", "packing"]


@pytest.mark.slow
@pytest.mark.skipif(not HH.is_file(), reason="needs the shared HH-RLHF data (the TRL comparison)")
def test_gpu_check_cpu_smoke(tmp_path):
    pytest.importorskip("trl", minversion="1.16")
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--smoke",
                             "--out", str(out)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["smoke"] is True and data["passed"] is True and data["failed"] == []
    assert data["device"]["type"] == "cpu" and data["versions"]["torch"] and data["versions"]["transformers"]

    checks = {c["check"]: c for c in data["checks"]}
    expected = []
    for layout in LAYOUTS:
        label = f"dpo[{layout}]"
        expected += [f"{label}: loss and grad_norm finite", f"{label}: first loss = log 2",
                     f"{label}: trainer forward in bf16 on cpu", f"{label}: policy on cpu",
                     f"{label}: the update moved the policy", f"{label}: log-probs cpu bf16 vs cpu fp32, max",
                     f"{label}: log-probs cpu bf16 vs cpu fp32, mean"]
        if layout != "plain":
            expected.append(f"{label}: cpu fp32 log-probs vs plain layout")
    expected += ["grpo: loss and grad_norm finite", "grpo: trainer forward in bf16 on cpu",
                 "dpo x2: losses and grad_norms finite", "peak RSS (getrusage)",
                 "trl_best: ran 4 steps, losses finite", "posttrain_best: ran 4 steps, losses finite",
                 "trl vs posttrain: same tokens"]
    missing = [name for name in expected if name not in checks]
    assert not missing, missing
    assert all(checks[name]["passed"] is True for name in expected)
    assert all(c["passed"] is not False for c in data["checks"])

    tol, numbers = data["tolerances"], data["numbers"]
    for layout in LAYOUTS:
        entry = numbers["layouts"][layout]
        assert entry["tokens"] > 0
        assert 0 <= entry["bf16_vs_fp32_max_abs"] <= tol["logprob_max_abs"]
        assert 0 <= entry["bf16_vs_fp32_mean_abs"] <= tol["logprob_mean_abs"]
        assert entry["layout_vs_plain_fp32_max_abs"] <= tol["layout_fp32_max_abs"]
        assert abs(entry["loss"] - 0.6931) <= tol["first_loss"]
    assert len(numbers["dpo_steps"]["losses"]) == 2
    assert numbers["peak_memory"]["peak_rss_mb"] > 0
    trl = numbers["trl"]
    assert trl["pairs_per_s_ratio"] > 0
    assert set(trl["rows"]) == {"trl_best", "posttrain_best"}
    assert "posttrain_best / trl_best pairs/s" in checks
    assert "all checks passed" in result.stdout
