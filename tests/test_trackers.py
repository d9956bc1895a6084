"""Trackers: one run reports to TensorBoard, wandb (offline), trackio (local) and mlflow (a local file store)
through accelerate's trackers, and each logged value is read back from what that tracker wrote, under the
same names as metrics.jsonl. A tracker that is not installed, or an unknown one, is a recipe error."""

from __future__ import annotations

import json
import math

import pytest

from helpers import recipe_from, tiny_recipe
from posttrain.errors import RecipeError

CHECKED = ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "grad_norm", "learning_rate", "num_tokens")


def _jsonl_steps(run) -> dict[int, dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line for line in lines if "loss" in line}


def _tensorboard(run) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _wandb_records(path):
    """The protobuf records of a wandb transaction log (run-*.wandb): a 7-byte header (":W&B", 0xBEE1, version),
    then 32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last),
    as LevelDB's log format. wandb no longer ships a Python reader for it."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, position, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk, position = data[position + 7:position + 7 + length], position + 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _wandb_offline(run) -> dict[str, dict[int, float]]:
    """History rows of the offline run's transaction log (run-*.wandb)."""
    [log] = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    out: dict[str, dict[int, float]] = {}
    for record in _wandb_records(log):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        for key, value in row.items():
            if not key.startswith("_"):
                out.setdefault(key, {})[int(row["_step"])] = value
    return out


def _trackio(directory, project: str, run_name: str) -> dict[str, dict[int, float]]:
    from trackio.sqlite_storage import SQLiteStorage

    out: dict[str, dict[int, float]] = {}
    for row in SQLiteStorage.get_logs(project, run_name):
        for key, value in row.items():
            if key not in ("step", "timestamp") and isinstance(value, (int, float)):
                out.setdefault(key, {})[int(row["step"])] = value
    return out


def _mlflow(run) -> tuple[dict[str, dict[int, float]], dict]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    [experiment] = [e for e in client.search_experiments() if e.name == "posttrain-test"]
    [found] = client.search_runs([experiment.experiment_id])
    metrics = {key: {m.step: m.value for m in client.get_metric_history(found.info.run_id, key)}
               for key in found.data.metrics}
    return metrics, found.data.params


@pytest.mark.slow
def test_every_tracker_gets_the_same_values_under_the_same_names(tiny_model_dir, tmp_path, monkeypatch):
    from posttrain.trainer import Trainer

    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    raw = tiny_recipe(tiny_model_dir, run, train={"max_steps": 3, "batch_size": 8, "micro_batch_size": 8},
                      logging={"progress_bar": False, "project": "posttrain-test", "run_name": "trackers",
                               "report_to": ["jsonl", "tensorboard", "wandb", "trackio", "mlflow"],
                               "tracker_kwargs": {"wandb": {"mode": "offline"}}})
    Trainer(recipe_from(raw)).train()
    expected = _jsonl_steps(run)
    assert sorted(expected) == [1, 2, 3]
    mlflow_metrics, mlflow_params = _mlflow(run)
    written = {"tensorboard": _tensorboard(run), "wandb": _wandb_offline(run),
               "trackio": _trackio(tmp_path / "trackio", "posttrain-test", "trackers"), "mlflow": mlflow_metrics}
    for tracker, values in written.items():
        for name in CHECKED:
            for step, line in expected.items():
                assert math.isclose(values[name][step], line[name], rel_tol=1e-6, abs_tol=1e-7), (tracker, name, step)
    # the held-out evaluation's metrics too (eval/ prefix, before and after), with '@' renamed only for mlflow
    assert math.isclose(written["wandb"]["eval/ranking_accuracy"][0],
                        json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["eval/ranking_accuracy"])
    assert mlflow_params["loss.0.params.beta"] == "0.1" and mlflow_params["train.max_steps"] == "3"


@pytest.mark.parametrize("report_to, words", [
    (["jsonl", "wandbb"], "unknown tracker 'wandbb'"),
    (["comet"], "unknown tracker 'comet'; posttrain reports to jsonl, tensorboard, wandb, trackio, mlflow"),
])
def test_unknown_trackers_are_recipe_errors(tiny_model_dir, tmp_path, report_to, words):
    raw = tiny_recipe(tiny_model_dir, tmp_path / "run", logging={"report_to": report_to})
    with pytest.raises(RecipeError, match=words):
        recipe_from(raw)


def test_a_tracker_that_is_not_installed_names_the_package_before_any_model_loads(tiny_model_dir, tmp_path,
                                                                               monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    raw = tiny_recipe(tiny_model_dir, tmp_path / "run", logging={"report_to": ["jsonl", "mlflow"]})
    with pytest.raises(RecipeError, match=r"logging.report_to: 'mlflow' needs the 'mlflow' package, which is not "
                                          r"installed: pip install mlflow"):
        recipe_from(raw)
    assert not (tmp_path / "run").exists()
