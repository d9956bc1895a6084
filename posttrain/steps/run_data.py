"""A run's data, read, validated and tokenised with the tokenizer alone, before any model loads: the
training and held-out pairs of an offline run, or the prompts (with their token ids) of an online one.
`posttrain train`, `posttrain validate` and `posttrain inspect` all load it here, so a data mistake
(a missing path, broken JSON, a missing field, a prompt without the answer its reward compares with) is
reported in a second, never after a model load or mid-run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from posttrain.data.readers import InvalidRow, handle_invalid, row_kind, write_skipped_rows
from posttrain.data.sources import load_pairs
from posttrain.errors import DataError, RecipeError
from posttrain.rewards import get_reward
from posttrain.steps import online_setup


@dataclass
class RunData:
    """Offline runs fill the pairs, online runs the prompt examples and their token ids."""

    train_pairs: list = field(default_factory=list)
    heldout_pairs: list = field(default_factory=list)
    train_examples: list = field(default_factory=list)
    heldout_examples: list = field(default_factory=list)
    train_prompt_ids: list = field(default_factory=list)
    heldout_prompt_ids: list = field(default_factory=list)

    @property
    def train_items(self) -> list:
        return self.train_examples or self.train_pairs

    def summary(self) -> str:
        if self.train_examples:
            return f"{len(self.train_examples)} training prompts, {len(self.heldout_examples)} held-out prompts"
        return f"{len(self.train_pairs)} training pairs, {len(self.heldout_pairs)} held-out pairs"


def load_run_data(recipe, loss, tokenizer, search_dirs: list[Path], skipped: Optional[Path] = None) -> RunData:
    """The recipe's data for `loss` (its `data_kind` says pairs or prompts), tokenised by `tokenizer`."""
    if loss.data_kind == "groups":
        return _prompts(recipe, loss, tokenizer, search_dirs, skipped)
    r = recipe
    train, _, _ = load_pairs(r.data.train, r.data, tokenizer, r.run.seed, "data.train", skipped)
    wrong = next((row_kind(p) for p in train if row_kind(p) not in loss.row_kinds), "pair")
    _check_row_kinds(train, loss.row_kinds, f"loss {r.loss[0].name!r} trains on",
                     f"Train on it with {KIND_LOSSES[wrong]}, or give loss {r.loss[0].name!r} the data it takes.")
    heldout = []
    if r.data.heldout is not None:
        heldout, _, _ = load_pairs(r.data.heldout, r.data, tokenizer, r.run.seed, "data.heldout", skipped)
        _check_row_kinds(heldout, ("pair",), "the held-out evaluation (ranking accuracy) scores",
                         "Give preference pairs there, or set `data.heldout: null`.")
        heldout = loss.prepare_pairs(heldout[:r.eval.max_pairs], tokenizer)
    return RunData(train_pairs=loss.prepare_pairs(train, tokenizer), heldout_pairs=heldout)


KIND_NAMES = {"pair": "preference pairs (prompt, chosen, rejected)",
              "demonstration": "SFT data (messages, or prompt and completion; no rejected response)",
              "unpaired": "unpaired KTO data (prompt, completion, label)"}
KIND_LOSSES = {"pair": "a pair loss (dpo, simpo, ...)", "demonstration": "`loss: sft`", "unpaired": "`loss: kto`"}


def _check_row_kinds(pairs: list, accepted: tuple[str, ...], user: str, fix: str) -> None:
    """A DataError naming the first row of a kind that `user` ("loss 'dpo' trains on") does not take, the
    kinds it takes, and `fix`."""
    wrong = next((p for p in pairs if row_kind(p) not in accepted), None)
    if wrong is not None:
        raise DataError(f"{wrong.source}, row {wrong.row}: {KIND_NAMES[row_kind(wrong)]}, but {user} "
                        f"{' or '.join(KIND_NAMES[k] for k in accepted)}. {fix}")


def _prompts(recipe, loss, tokenizer, search_dirs: list[Path], skipped: Optional[Path]) -> RunData:
    r = recipe
    if not r.rewards:
        raise RecipeError(f"loss {r.loss[0].name!r} trains on sampled groups and needs at least one reward: add "
                          f"a `rewards:` section (for example `rewards: [{{name: math}}]`; see docs/rewards.md).")
    answering = [t.name for t in r.rewards if getattr(get_reward(t.name, search_dirs), "needs_answer", False)]
    train = _with_answers(online_setup.load_examples(r.data.train, r.data.invalid_rows, skipped, "data.train"),
                          answering, r.data.invalid_rows, skipped, "data.train")
    heldout = []
    if r.data.heldout:
        heldout = _with_answers(online_setup.load_examples(r.data.heldout, r.data.invalid_rows, skipped,
                                                           "data.heldout"), answering, r.data.invalid_rows, skipped,
                                "data.heldout")[:r.eval.max_pairs]
    if r.train.batch_size > len(train):
        raise RecipeError(f"train.batch_size={r.train.batch_size} prompts per step, but data.train has only "
                          f"{len(train)} prompts.")
    loss.prepare_examples(train, tokenizer, r.data.template)
    tokenize = lambda examples: online_setup.tokenize_prompts(examples, tokenizer, r.data.template,  # noqa: E731
                                                              r.data.max_prompt_length)
    return RunData(train_examples=train, heldout_examples=heldout, train_prompt_ids=tokenize(train),
                   heldout_prompt_ids=tokenize(heldout))


def _with_answers(examples: list, answering: list[str], policy: str, skipped: Optional[Path], what: str) -> list:
    """The examples that have the answer every reward in `answering` compares with; the others are invalid rows."""
    if not answering:
        return examples
    missing = [InvalidRow(e.source, e.row, "answer", f"no answer, which reward {answering[0]!r} compares the "
                                                     f"completion with")
               for e in examples if e.answer is None or not str(e.answer).strip()]
    handle_invalid(missing, policy, what)
    write_skipped_rows(missing, skipped, what)
    kept = [e for e in examples if e.answer is not None and str(e.answer).strip()]
    if not kept:
        raise DataError(f"{what}: no prompt has an answer, which reward {answering[0]!r} needs.")
    return kept
