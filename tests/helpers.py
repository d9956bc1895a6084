"""Helpers shared by tests: recipes for tiny models, and data files with varied lengths."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from posttrain.recipe import load_recipe


def tiny_recipe(model_dir: Path, output_dir: Path, **sections) -> dict:
    raw = {
        "run": {"output_dir": str(output_dir), "seed": 0, "num_threads": 1, "callbacks": ["tests.callbacks:EnvProbes"]},
        "model": {"name_or_path": str(model_dir), "attn_implementation": "sdpa"},
        "lora": {"enabled": True, "r": 8, "alpha": 16, "target_modules": "all-linear"},
        "data": {"train": {"builtin": "tiny", "split": "train", "num_rows": 256},
                 "heldout": {"builtin": "tiny", "split": "heldout", "num_rows": 64},
                 "template": "plain", "max_length": 64},
        "loss": {"name": "dpo", "params": {"beta": 0.1}},
        "train": {"lr": 1e-2, "batch_size": 16, "micro_batch_size": 8, "epochs": 1, "lr_scheduler": "constant"},
        "logging": {"progress_bar": False, "report_to": ["jsonl", "tensorboard"]},
        "eval": {"batch_size": 64},
    }
    for section, values in sections.items():
        if section != "loss" and isinstance(values, dict) and isinstance(raw.get(section), dict):
            raw[section] = {**raw[section], **values}
        else:
            raw[section] = values
    return copy.deepcopy(raw)


def recipe_from(raw: dict):
    return load_recipe(raw=raw)


def write_varied_pairs(path: Path, n: int = 8) -> Path:
    """Pairs whose responses have very different lengths (1 to ~40 tokens)."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
    with path.open("w") as handle:
        for i in range(n):
            chosen = " ".join(words[(i + k) % len(words)] for k in range(1 + (i * 7) % 23))
            rejected = " ".join(words[(i * 3 + k) % len(words)] for k in range(2 + (i * 5) % 17))
            handle.write(json.dumps({"prompt": f"Question {i}: list some words.", "chosen": " " + chosen,
                                     "rejected": " " + rejected}) + "\n")
    return path


def perturbed_lora_adapter(smollm2_dir: Path, directory: Path) -> Path:
    """A LoRA adapter on SmolLM2 with small random A and B, so that it changes some answers but not all."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir))
    config = LoraConfig(r=8, lora_alpha=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(directory)
    return directory
