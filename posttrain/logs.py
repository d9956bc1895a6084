"""Logging: console logger, JSONL metrics file and TensorBoard event files (main process only)."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Optional

_LOGGER = "posttrain"


def get_logger() -> logging.Logger:
    logger = logging.getLogger(_LOGGER)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[posttrain] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


class MetricsWriter:
    """Writes one JSON object per logged step to metrics.jsonl, and the same scalars to TensorBoard."""

    def __init__(self, output_dir: Path, tensorboard: bool = True, enabled: bool = True, append: bool = False):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not append:
            self.path.write_text("")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint's step (they will be logged again)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, metrics: dict, prefix: Optional[str] = None) -> None:
        if not self.enabled:
            return
        record = {"step": step}
        for key, value in metrics.items():
            name = f"{prefix}/{key}" if prefix else key
            record[name] = value
            if self._tb is not None and isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(name, value, step)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
