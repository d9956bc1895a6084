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
