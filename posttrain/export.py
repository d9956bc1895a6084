"""`posttrain export RUN_OR_ADAPTER --output DIR [--merge] [--dtype bfloat16] [--model BASE]`: a model to share or
serve with no posttrain installed.

Without --merge the peft adapter is copied as it is (its adapter_config.json names a portable base model)
with the tokenizer and chat template. With --merge the adapter is folded into the base weights
(`merge_and_unload`) and the result saved as a plain transformers model in safetensors, with the tokenizer,
the chat template and the generation config, so `AutoModelForCausalLM.from_pretrained(DIR)` and
`vllm serve DIR` load it. The base model is `--model`, else the run's own `model.name_or_path` (its
recipe.yaml), else the adapter's `base_model_name_or_path`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from posttrain.errors import ModelError, PosttrainError
from posttrain.eval.api import resolve_adapter, run_recipe_value
from posttrain.models import load_causal_lm, load_tokenizer

DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16",
               "fp16": "float16"}


def base_model_of(adapter_dir: Path, run_dir: Optional[Path], given: Optional[str]) -> str:
    name = given or run_recipe_value(run_dir, "model", "name_or_path")
    if name:
        return name
    config = adapter_dir / "adapter_config.json"
    if config.is_file():
        return json.loads(config.read_text())["base_model_name_or_path"]
    raise ModelError(f"{adapter_dir}: cannot tell the base model; pass --model.")


def load_merged(source: str, model: Optional[str] = None):
    """(float32 model with any adapter folded in, the directory it came from, the base model's name)."""
    kind, directory, run_dir, _ = resolve_adapter(source)
    if kind != "peft":
        return load_causal_lm(str(directory), "float32"), directory, str(directory)
    import peft

    base_name = base_model_of(directory, run_dir, model)
    merged = peft.PeftModel.from_pretrained(load_causal_lm(base_name, "float32"), str(directory)).merge_and_unload()
    return merged, directory, base_name


def export(source: str, output: str, merge: bool = False, dtype: str = "float32", model: Optional[str] = None) -> Path:
    """Write the export to `output` (which must not exist yet, or be empty) and return it."""
    import torch

    if dtype not in DTYPE_NAMES:
        raise PosttrainError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}.")
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise PosttrainError(f"--output {output!r} exists and is not empty; choose a new directory.")
    kind, directory, _, _ = resolve_adapter(source)
    if kind == "peft" and not merge:
        shutil.copytree(directory, out, dirs_exist_ok=True)
        return out
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[DTYPE_NAMES[dtype]]
    merged, directory, base_name = load_merged(source, model)
    merged = merged.to(torch_dtype)
    merged.config.use_cache = True
    merged.save_pretrained(out, safe_serialization=True)
    load_tokenizer(str(directory) if (directory / "tokenizer_config.json").is_file() else base_name).save_pretrained(out)
    return out

