"""Shared harness of the claims scripts: build a recipe, train in-process, score extra splits,
save JSON and print a table. `--smoke` swaps SmolLM2 for a tiny random model (with the real
tokenizer) and the built-in `tiny` task, so CI checks that the script runs in seconds."""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from posttrain.config import DataSource  # noqa: E402
from posttrain.recipe import load_recipe  # noqa: E402
from posttrain.data.sources import load_pairs  # noqa: E402
from posttrain.trainer import Trainer  # noqa: E402


def parse_args(description: str, extra: list[tuple[str, dict]] = ()) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    for flag, options in extra:
        parser.add_argument(flag, **options)
    parser.add_argument("--smoke", action="store_true", help="tiny model, a few steps (CI)")
    parser.add_argument("--out", default=None, help="JSON output path (default benchmarks/results/<script>.json)")
    parser.add_argument("--workdir", default=None, help="where runs are written (default a temporary directory)")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def tiny_model_dir(workdir: Path) -> Path:
    """A tiny random Llama with the real SmolLM2 tokenizer, saved once."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from posttrain.models import ensure_smollm2_cached

    directory = workdir / "tiny-model"
    if (directory / "config.json").is_file():
        return directory
    tokenizer = AutoTokenizer.from_pretrained(str(ensure_smollm2_cached()))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=2, eos_token_id=2, bos_token_id=1)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def base_recipe(args, workdir: Path, name: str) -> dict:
    """The SmolLM2 arithmetic set-up of the main job, or its tiny smoke-test stand-in."""
    if args.smoke:
        return {
            "run": {"output_dir": str(workdir / name), "seed": 0, "num_threads": args.threads},
            "model": {"name_or_path": str(tiny_model_dir(workdir))},
            "lora": {"r": 8, "alpha": 16},
            "data": {"train": {"builtin": "tiny", "split": "train", "num_rows": 128},
                     "heldout": {"builtin": "tiny", "split": "heldout", "num_rows": 48},
                     "template": "plain", "max_length": 64},
            "train": {"lr": 2e-2, "batch_size": 16, "micro_batch_size": 16, "max_steps": 6,
                      "lr_scheduler": "constant"},
            "logging": {"progress_bar": False, "report_to": ["jsonl"]},
            "eval": {"batch_size": 64},
        }
    return {
        "run": {"output_dir": str(workdir / name), "seed": 0, "num_threads": args.threads},
        "model": {"name_or_path": "smollm2-135m-instruct"},
        "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
        "data": {"train": {"builtin": "arithmetic", "split": "train", "num_rows": 384},
                 "heldout": {"builtin": "arithmetic", "split": "heldout", "num_rows": 500},
                 "template": "chat", "max_length": 128},
        "train": {"lr": 5e-4, "batch_size": 16, "micro_batch_size": 16, "max_steps": 24, "warmup_steps": 2,
                  "lr_scheduler": "cosine"},
        "logging": {"progress_bar": False, "report_to": ["jsonl"]},
        "eval": {"batch_size": 64},
    }


def online_smoke(base: dict, workdir: Path, steps: int, **rollout) -> dict:
    """An online recipe's smoke-test stand-in: the tiny model, the `tiny` task (16 prompts, 8 held out), 4 new
    tokens, rewards in-process, `steps` steps; `rollout` overrides more of the rollout section."""
    return merge(base, model={"name_or_path": str(tiny_model_dir(workdir))},
                 data={"train": {"builtin": "tiny", "split": "train", "num_rows": 16},
                       "heldout": {"builtin": "tiny", "split": "heldout", "num_rows": 8},
                       "template": "plain", "max_length": 64},
                 rollout={**base["rollout"], "max_new_tokens": 4, "reward_workers": 0, **rollout},
                 train={"max_steps": steps, "lr": 1e-2})


def merge(base: dict, **sections) -> dict:
    out = copy.deepcopy(base)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "loss":
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def train(raw: dict, extra_splits: dict[str, dict] | None = None) -> dict:
    """Train one recipe; return its summary plus ranking accuracy on each extra split."""
    started = time.time()
    trainer = Trainer(load_recipe(raw=raw), force=True)
    summary = trainer.train()
    for name, source in (extra_splits or {}).items():
        pairs, _, _ = load_pairs(DataSource(**source), trainer.recipe.data, trainer.tokenizer, what=name)
        scores = trainer.score(pairs)
        summary[name] = {"ranking_accuracy": scores.ranking_accuracy(),
                         "ranking_accuracy_normalised": scores.normalised_ranking_accuracy(), "pairs": len(scores)}
    summary["wall_seconds"] = time.time() - started
    return summary


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error over seeds."""
    mean, std = mean_std(values)
    return mean, std / math.sqrt(len(values))


def save(args, name: str, result: dict) -> Path:
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"{name}{'_smoke' if args.smoke else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                         "load_average_at_end": os.getloadavg()[0], "smoke": args.smoke}
    out.write_text(json.dumps(result, indent=2))
    print(f"saved {out}")
    return out


def table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4f}"
        return str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join(lines)
