"""Test probes as posttrain callbacks (posttrain.callbacks), switched on by environment variables so that
subprocess launches (accelerate launch -m posttrain train) carry them. tests/helpers.py's recipes name
`tests.callbacks:EnvProbes` in run.callbacks.

POSTTRAIN_KILL_AFTER_CHECKPOINT=k   SIGKILL this process right after checkpoint k is complete
POSTTRAIN_KILL_BEFORE_RENAME=k      SIGKILL it after checkpoint k's files are written, before the rename
POSTTRAIN_STEP_PROBE=<dir>          after each optimiser step, append to <dir>/rank-<r>.jsonl the example
                                    indices this process trained on and a hash of its trainable parameters
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

from posttrain.callbacks import Callback, StepEnd


class EnvProbes(Callback):
    def before_checkpoint_rename(self, step: int, staging_dir: Path) -> None:
        if os.environ.get("POSTTRAIN_KILL_BEFORE_RENAME") == str(step):
            os.kill(os.getpid(), signal.SIGKILL)

    def on_checkpoint(self, step: int, path: Path) -> None:
        if os.environ.get("POSTTRAIN_KILL_AFTER_CHECKPOINT") == str(step):
            os.kill(os.getpid(), signal.SIGKILL)

    def on_step_end(self, event: StepEnd) -> None:
        directory = os.environ.get("POSTTRAIN_STEP_PROBE")
        if not directory:
            return
        digest = hashlib.sha256()
        with event.gathered():
            for name, p in event.trainable:
                digest.update(name.encode())
                digest.update(p.detach().cpu().double().numpy().tobytes())
        path = Path(directory) / f"rank-{event.rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            handle.write(json.dumps({"step": event.step, "rank": event.rank, "world": event.world, "rows": event.rows,
                                     "params_sha256": digest.hexdigest(), "loss": event.record["loss"]}) + "\n")
