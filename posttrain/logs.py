"""Logging: console logger, JSONL metrics file and TensorBoard event files (main process only)."""

from __future__ import annotations

import json
import logging
import math
import os
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


# tracker -> (module to import, package to install); jsonl is the always-written metrics.jsonl
TRACKERS = {"jsonl": None, "tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "trackio": ("trackio", "trackio"), "mlflow": ("mlflow", "mlflow")}


def flat_config(values: dict, prefix: str = "") -> dict:
    """A nested recipe dict as dotted keys with scalar values, for trackers' configs: lists of sections by index
    (loss.0.params.beta), other lists and None as JSON text."""
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            value = dict(enumerate(value))
        if isinstance(value, dict):
            out.update(flat_config(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return out


def mlflow_name(name: str) -> str:
    """MLflow accepts letters, digits, _ - . / space and : in metric names; '@' (pass@1) becomes '_at_'."""
    return name.replace("@", "_at_")


def start_trackers(logging_config, output_dir: Path, config: dict) -> list:
    """accelerate's trackers for `logging.report_to` (besides jsonl and tensorboard), started, with the recipe as
    their configuration. wandb writes under <output_dir>/wandb, mlflow to <output_dir>/mlruns unless
    MLFLOW_TRACKING_URI is set, trackio to its own store (TRACKIO_DIR)."""
    from accelerate.tracking import MLflowTracker, TrackioTracker, WandBTracker

    run_name = logging_config.run_name or Path(output_dir).resolve().name
    kwargs = logging_config.tracker_kwargs
    trackers = []
    for name in logging_config.report_to:
        if name == "wandb":
            tracker = WandBTracker(logging_config.project, **{"name": run_name, "dir": str(output_dir),
                                                              **kwargs.get("wandb", {})})
        elif name == "trackio":
            tracker = TrackioTracker(logging_config.project, **{"name": run_name, **kwargs.get("trackio", {})})
        elif name == "mlflow":
            import mlflow

            if "MLFLOW_TRACKING_URI" not in os.environ:  # a local file store (in maintenance mode since MLflow 3.7)
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                mlflow.set_tracking_uri((Path(output_dir).resolve() / "mlruns").as_uri())
            tracker = MLflowTracker(logging_config.project, run_name=run_name, **kwargs.get("mlflow", {}))
        else:
            continue
        tracker.start()
        values = flat_config(config)
        tracker.store_init_configuration(values if name != "mlflow" else
                                         {mlflow_name(k): v for k, v in values.items()})
        trackers.append(tracker)
    return trackers


class MetricsWriter:
    """Writes one JSON object per logged step to metrics.jsonl, and the same scalars, under the same names, to
    TensorBoard and the recipe's other trackers (main process only)."""

    def __init__(self, output_dir: Path, logging_config, enabled: bool = True, append: bool = False,
                 config: Optional[dict] = None):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = None
        self.trackers: list = []
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not append:
            self.path.write_text("")
        if "tensorboard" in logging_config.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
        self.trackers = start_trackers(logging_config, Path(output_dir), config or {})

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
        scalars = {}
        for key, value in metrics.items():
            name = f"{prefix}/{key}" if prefix else key
            record[name] = value
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                scalars[name] = value
                if self._tb is not None:
                    self._tb.add_scalar(name, value, step)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._tb is not None:
            self._tb.flush()
        for tracker in self.trackers:
            tracker.log(scalars if tracker.name != "mlflow" else {mlflow_name(k): v for k, v in scalars.items()},
                        step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
