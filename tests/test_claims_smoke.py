"""The claims scripts run end to end in smoke mode (tiny model, a few steps) and save their JSON.
Their full runs on SmolLM2 are for the docs and the closing notes (docs/results.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks" / "claims").glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_claims_script_smoke(script, tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "claims" / script), "--smoke", "--out", str(out),
                             "--workdir", str(tmp_path / "work")], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["machine"]["smoke"] is True
    assert "|" in result.stdout  # the printed table


def test_chen_combine_plots_rows_of_separate_runs(tmp_path):
    """`--combine` reads the rows of several result files and plots them together without training."""
    results = []
    for template in ("plain", "chat"):
        rows = [{"template": template, "curve": [{"step": s, "R": 0.4, "R_normalised": 0.5,
                                                   "implicit_reward_accuracy": None if s == 0 else 0.6}
                                                  for s in (0, 2)],
                 "losses": [{"step": s, "loss": 0.69 - 0.01 * s, "train_implicit_accuracy": 0.5} for s in (1, 2)],
                 "sets": {"heldout": {"difficulty_bins": [
                     {"bin": "(0, 2]", "c_low": 0.0, "share_flipped_to_right": 0.5},
                     {"bin": "(2, inf)", "c_low": 2.0, "share_flipped_to_right": None}]}}}]
        path = tmp_path / f"{template}.json"
        path.write_text(json.dumps({"results": rows}))
        results.append(str(path))
    out = tmp_path / "both.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "claims" / "chen_hh_rlhf.py"), "--combine",
                             ",".join(results), "--out", str(out)], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    for png in (tmp_path / "both.png", tmp_path / "both_difficulty.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not out.exists()  # plots only: no result JSON written, nothing trained
