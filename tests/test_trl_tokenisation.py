"""By default posttrain tokenises TRL's three preference formats token for token as TRL 1.16's `DPOTrainer`
prepares them (its own `_prepare_dataset`, run by a real trainer), on real HH-RLHF pairs with SmolLM2's
tokenizer and chat template: standard (strings), conversational (messages) and implicit prompt (whole
conversations in chosen/rejected)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import SHARED_DATA, make_tiny_model
from posttrain.config import DataConfig, DataSource
from posttrain.data.readers import HH_SPLIT
from posttrain.data.sources import load_pairs
from posttrain.data.tokenize import hh_to_messages

HH_HELPFUL = SHARED_DATA / "hh-rlhf" / "helpful-base" / "test.jsonl"


def _hh_rows(n: int) -> list[tuple[str, str, str]]:
    """(prompt dialogue, chosen response, rejected response) of the first n HH rows with distinct responses."""
    rows = []
    for line in HH_HELPFUL.read_text(encoding="utf-8").split("\n"):
        if not line.strip():
            continue
        record = json.loads(line)
        cut = record["chosen"].rfind(HH_SPLIT) + len(HH_SPLIT)
        prompt, chosen, rejected = record["chosen"][:cut], record["chosen"][cut:], record["rejected"][cut:]
        if record["rejected"][:cut] == prompt and chosen.strip() and rejected.strip() and \
                chosen.strip() != rejected.strip():
            rows.append((prompt, chosen, rejected))
        if len(rows) == n:
            return rows
    raise AssertionError("not enough HH rows")


def _formats(rows):
    standard = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in rows]
    conversational, implicit = [], []
    for p, c, r in rows:
        messages = hh_to_messages(p)
        chosen, rejected = [{"role": "assistant", "content": c.strip()}], [{"role": "assistant", "content": r.strip()}]
        conversational.append({"prompt": messages, "chosen": chosen, "rejected": rejected})
        implicit.append({"chosen": messages + chosen, "rejected": messages + rejected})
    return {"standard": standard, "conversational": conversational, "implicit_prompt": implicit}


def _trl_prepared(records, tokenizer, tmp_path):
    from accelerate.state import AcceleratorState
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False,
                     max_length=None, save_strategy="no", logging_strategy="no", seed=0,
                     gradient_checkpointing=False)
    try:
        model = make_tiny_model(len(tokenizer), dtype=torch.float32)
        trainer = DPOTrainer(model=model, ref_model=make_tiny_model(len(tokenizer), dtype=torch.float32), args=args,
                             train_dataset=Dataset.from_list(records), processing_class=tokenizer)
        return [(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) for row in trainer.train_dataset]
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("fmt", ["standard", "conversational", "implicit_prompt"])
def test_default_tokenisation_equals_trl_dpo_trainer(fmt, tokenizer, tmp_path, monkeypatch):
    pytest.importorskip("trl", minversion="1.16")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    records = _formats(_hh_rows(24))[fmt]
    path = tmp_path / f"{fmt}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    pairs, stats, invalid = load_pairs(DataSource(path=str(path)), DataConfig(max_length=100_000), tokenizer)
    assert invalid == [] and len(pairs) == len(records)
    assert stats.chat_rows == (0 if fmt == "standard" else len(records))  # strings stay raw text, as in TRL
    ours = [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs]
    theirs = _trl_prepared(records, tokenizer, tmp_path)
    for k, (a, b) in enumerate(zip(ours, theirs)):
        assert a == b, f"{fmt} row {k + 1}: posttrain {[tokenizer.decode(x) for x in a]} != TRL " \
                       f"{[tokenizer.decode(x) for x in b]}"
    if fmt != "standard":  # the chat template's end of turn is kept whole: "<|im_end|>\n"
        assert tokenizer.decode(pairs[0].chosen_ids[-2:]) == "<|im_end|>\n" and pairs[0].chosen_tail == 2
    else:
        assert pairs[0].chosen_ids[-1] == tokenizer.eos_token_id and pairs[0].chosen_tail == 1
