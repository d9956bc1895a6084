"""`posttrain check RECIPE`: does the recipe's loss (a user's own included) give the same optimiser step however
the step is split? The commonest bug in every peer's tracker is a loss whose scale moves with gradient
accumulation, data parallelism or the micro-batch size (trl#3021, verl#3741, verl#7200, ms-swift#10117).

The recipe's first optimiser step (its first `train.batch_size` pairs, in file order) runs on a tiny random
Llama with the recipe's tokenizer, in float64, four ways: one micro-batch of B; B micro-batches of 1; an
uneven split (B-1 and 1); and, unless --no-processes, two processes (gloo, DDP). Each way's loss and
gradient (every trainable parameter, before the optimiser uses it) are compared with the first; a
relative difference above 1e-6 fails the check (exit status 1) with the likely cause.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from posttrain.config import recipe_to_dict
from posttrain.errors import PosttrainError
from posttrain.recipe import load_recipe

TOLERANCE = 1e-6
CAUSE = ("the loss changes with how the step is split: it likely normalises by a micro-batch or per-process "
         "quantity (a mean over the micro-batch's pairs or tokens, a .mean() over the batch). Return the paper "
         "loss unreduced, per pair or per token, with the right `level`, and let the core divide by the step's "
         "global counts (docs/losses.md, docs/custom_losses.md).")


def _tiny_model(tokenizer, directory: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                             tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
        LlamaForCausalLM(config).to(torch.float64).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def _variant(raw: dict, model_dir: Path, output_dir: Path, micro_batch_size: int) -> dict:
    raw = copy.deepcopy(raw)
    raw["model"].update({"name_or_path": str(model_dir), "dtype": "float64"})
    raw["run"].update({"output_dir": str(output_dir), "callbacks": []})
    raw["train"].update({"micro_batch_size": micro_batch_size, "max_steps": 1, "shuffle": False, "bf16": False,
                         "max_grad_norm": None})
    raw["eval"].update({"at_start": False, "at_end": False, "every": 0, "entanglement_every": 0})
    raw["logging"].update({"progress_bar": False, "report_to": ["jsonl"]})
    raw["reference"]["precompute"] = False
    raw["data"]["heldout"] = None
    return raw


def one_step(raw: dict) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss and the gradient of every trainable parameter of the recipe's first optimiser step."""
    from posttrain.trainer import Trainer

    trainer = Trainer(load_recipe(raw=raw), force=True)
    trainer.setup()
    grads: dict[str, torch.Tensor] = {}
    step = trainer.optimizer.step

    def capture(*args, **kwargs):
        for name, p in trainer.peft_model.named_parameters():
            if p.requires_grad and p.grad is not None:
                grads[name] = p.grad.detach().double().cpu().clone()
        return step(*args, **kwargs)

    trainer.optimizer.step = capture
    record = trainer.train_step(0)
    return float(record["loss"]), grads


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = max(float(b.abs().max()), 1e-30)
    return float((a - b).abs().max()) / scale


def _two_processes(raw: dict, work: Path, recipe_dir: str) -> tuple[float, dict[str, torch.Tensor]]:
    (work / "recipe.json").write_text(json.dumps(raw))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([recipe_dir, *sys.path])
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                             "--main_process_port", str(29600 + os.getpid() % 300), "-m", "posttrain.check",
                             str(work / "recipe.json"), str(work / "grads.pt")],
                            capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0:
        raise PosttrainError(f"posttrain check: the two-process run failed:\n{result.stderr[-2000:]}")
    saved = torch.load(work / "grads.pt", weights_only=True)
    return float(saved["loss"]), saved["grads"]


def run_check(recipe_path: str, overrides: list[str], processes: bool = True) -> tuple[list[dict], bool]:
    """The check's rows (way, loss, loss difference, gradient difference) and whether every way agrees."""
    from posttrain.losses import build_loss
    from posttrain.models import load_tokenizer

    recipe = load_recipe(recipe_path, overrides)
    recipe_dir = str(Path(recipe_path).resolve().parent)
    if recipe_dir not in sys.path:  # the recipe's own plug-ins, for the runs below (built from a dict, no path)
        sys.path.insert(0, recipe_dir)
    if build_loss(recipe.loss, [Path(recipe_dir)]).data_kind != "pairs":
        raise PosttrainError("posttrain check runs pair losses (offline data); a group loss's step depends on its "
                             "sampled rollouts, which differ between the ways the check runs the step.")
    batch = recipe.train.batch_size
    if batch < 2:
        raise PosttrainError("posttrain check needs train.batch_size >= 2 to split a step.")
    raw = recipe_to_dict(recipe)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="posttrain-check-") as tmp:
        work = Path(tmp)
        model_dir = _tiny_model(load_tokenizer(recipe.model.name_or_path, recipe.model.trust_remote_code),
                                work / "model")
        ways = [(f"1 micro-batch of {batch}", batch), (f"{batch} micro-batches of 1", 1),
                (f"uneven: {batch - 1} + 1", batch - 1)]
        reference: Optional[tuple[float, dict]] = None
        for i, (name, micro) in enumerate(ways):
            with contextlib.redirect_stdout(io.StringIO()):  # the inner runs' start and end lines
                loss, grads = one_step(_variant(raw, model_dir, work / f"run{i}", micro))
            reference = reference or (loss, grads)
            rows.append(_row(name, loss, grads, reference))
        if processes:
            loss, grads = _two_processes(_variant(raw, model_dir, work / "run-ddp", max(1, batch // 2)), work,
                                         recipe_dir)
            rows.append(_row("2 processes (gloo DDP)", loss, grads, reference))
    return rows, all(row["ok"] for row in rows)


def _row(name: str, loss: float, grads: dict, reference: tuple[float, dict]) -> dict:
    ref_loss, ref_grads = reference
    if grads.keys() != ref_grads.keys():
        raise PosttrainError(f"posttrain check: {name} trained other parameters than the first way.")
    loss_diff = abs(loss - ref_loss) / max(abs(ref_loss), 1e-30)
    grad_diff = max((_relative(grads[k], ref_grads[k]) for k in ref_grads), default=0.0)
    return {"way": name, "loss": loss, "loss_diff": loss_diff, "grad_diff": grad_diff,
            "ok": loss_diff <= TOLERANCE and grad_diff <= TOLERANCE and math.isfinite(loss)}


def format_table(rows: list[dict], ok: bool) -> str:
    lines = [f"{'way':28s} {'loss':>14s} {'loss rel. diff':>15s} {'grad rel. diff':>15s}"]
    for row in rows:
        lines.append(f"{row['way']:28s} {row['loss']:14.10f} {row['loss_diff']:15.2e} {row['grad_diff']:15.2e}"
                     f"{'' if row['ok'] else '  <- differs'}")
    lines.append(f"verdict: {'pass' if ok else 'FAIL'} (tolerance {TOLERANCE:g}, float64)"
                 + ("" if ok else f": {CAUSE}"))
    return "\n".join(lines)


def _worker(recipe_json: str, out: str) -> None:
    """Under `accelerate launch`: one step of the recipe; process 0 saves the loss and the (all-reduced) gradients."""
    loss, grads = one_step(json.loads(Path(recipe_json).read_text()))
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({"loss": torch.tensor(loss), "grads": grads}, out)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
