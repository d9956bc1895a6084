"""`posttrain eval`: any model, adapter or checkpoint on any preference data the loaders read.

The policy is `--model`, with `--adapter` on top (a peft adapter directory, a run directory (its
`final/`), or a checkpoint `checkpoints/step-N[/adapter]`; a full fine-tuning checkpoint holding a
model is loaded as the policy). The reference for R*, the difficulty and the implicit reward is,
in order: `--reference` (another model), the base model with the adapter switched off when an
adapter is given, else the scored model itself (an untrained model is its own reference).
"""

from __future__ import annotations

import datetime
import json
import random
import re
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch

from posttrain.data.readers import is_hub_id
from posttrain.data.tokenize import TokenizedPair
from posttrain.errors import DataError, ModelError, PosttrainError
from posttrain.eval.metrics import ranking_metrics
from posttrain.eval.ranking import PairScores
from posttrain.eval.votes import pair_alpha


class AdapterOff(torch.nn.Module):
    """A PolicyLogProbs over a peft model, scoring with every adapter switched off (the base model)."""

    def __init__(self, logprobs: torch.nn.Module):
        super().__init__()
        self.module = logprobs

    def forward(self, *args, **kwargs):
        with self.module.model.disable_adapter():
            return self.module(*args, **kwargs)


def pair_alphas(pairs: list[TokenizedPair], default: float) -> np.ndarray:
    return np.array([pair_alpha(p.extras, default) for p in pairs], dtype=np.float64)


def pair_records(pairs: list[TokenizedPair], policy: PairScores, reference: Optional[PairScores], arrays: dict,
                 tokenizer=None) -> list[dict]:
    """One dict per pair with its texts, scores and every per-pair quantity of the metrics."""
    records = []
    for i, p in enumerate(pairs):
        rec = {"index": i, "source": p.source, "row": p.row}
        if tokenizer is not None:
            rec["prompt"] = tokenizer.decode(p.prompt_ids)
        rec.update({"chosen_text": p.chosen_text, "rejected_text": p.rejected_text, "truncated": p.truncated,
                    "chosen_tokens": int(policy.chosen_lengths[i]), "rejected_tokens": int(policy.rejected_lengths[i]),
                    "logp_chosen": float(policy.chosen_logps[i]), "logp_rejected": float(policy.rejected_logps[i]),
                    "mean_logp_chosen": float(policy.chosen_means[i]),
                    "mean_logp_rejected": float(policy.rejected_means[i])})
        if reference is not None:
            rec["ref_logp_chosen"] = float(reference.chosen_logps[i])
            rec["ref_logp_rejected"] = float(reference.rejected_logps[i])
        for key, values in arrays.items():
            value = values[i]
            rec[key] = bool(value) if key == "tie" else float(value)
        if "votes" in (p.extras or {}):
            rec["votes"] = p.extras["votes"]
        records.append(rec)
    return records


def build_report(pairs: list[TokenizedPair], policy: PairScores, reference: Optional[PairScores], alpha,
                 inputs: dict, *, betas, eps: float, tie_threshold: float, dpo_beta: float, bootstrap: int,
                 seed: int, reference_is_policy: bool, tokenizer=None) -> tuple[dict, list[dict]]:
    ref_w = reference.chosen_logps if reference is not None else None
    ref_l = reference.rejected_logps if reference is not None else None
    metrics, arrays = ranking_metrics(policy.chosen_logps, policy.rejected_logps, policy.chosen_lengths,
                                      policy.rejected_lengths, ref_w, ref_l, alpha, betas=betas, eps=eps,
                                      tie_threshold=tie_threshold, dpo_beta=dpo_beta,
                                      reference_is_policy=reference_is_policy, bootstrap=bootstrap, seed=seed)
    scoring = {}
    if policy.stats is not None:
        scoring["policy"] = policy.stats.to_dict()
    if reference is not None and reference is not policy and reference.stats is not None:
        scoring["reference"] = reference.stats.to_dict()
    report = {"inputs": {**inputs, "betas": list(betas), "alpha_eps": eps, "tie_threshold": tie_threshold,
                         "dpo_beta": dpo_beta, "bootstrap_samples": bootstrap, "seed": seed},
              "metrics": metrics, "scoring": scoring}
    return report, pair_records(pairs, policy, reference, arrays, tokenizer)


# ---------------------------------------------------------------------------------------------- CLI helpers


def resolve_adapter(path: str) -> tuple[str, Path, Optional[Path], Optional[int]]:
    """(kind, directory, run directory, step) for --adapter: kind is 'peft' or 'full'."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ModelError(f"--adapter {path!r} is not a directory.")
    for candidate in (p, p / "adapter", p / "final"):
        if (candidate / "adapter_config.json").is_file():
            kind, directory = "peft", candidate
            break
        if (candidate / "config.json").is_file() and any(candidate.glob("*.safetensors")):
            kind, directory = "full", candidate
            break
    else:
        raise ModelError(f"--adapter {path!r} holds no peft adapter (adapter_config.json) and no model (config.json "
                         f"and safetensors), nor an adapter/ or final/ directory with one.")
    step = None
    run_dir = None
    for parent in [directory, *directory.parents][:5]:
        match = re.fullmatch(r"step-(\d+)", parent.name)
        if match and step is None:
            step = int(match.group(1))
        if (parent / "metrics.jsonl").is_file():
            run_dir = parent
            break
    return kind, directory, run_dir, step


def training_history(run_dir: Optional[Path], up_to: Optional[int] = None) -> list[dict]:
    """The held-out evaluations a run logged (metrics.jsonl lines with eval/ranking_accuracy)."""
    if run_dir is None or not (Path(run_dir) / "metrics.jsonl").is_file():
        return []
    by_step = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if "eval/ranking_accuracy" not in record:
            continue
        if up_to is not None and record["step"] > up_to:
            continue
        point = {"step": record["step"]}
        point.update({k[len("eval/"):]: v for k, v in record.items() if k.startswith("eval/")})
        by_step[record["step"]] = point
    return [by_step[s] for s in sorted(by_step)]


def run_recipe_value(run_dir: Optional[Path], section: str, key: str):
    """`section.key` of the recipe a run recorded (RUN/recipe.yaml), or None when there is none."""
    recipe = Path(run_dir) / "recipe.yaml" if run_dir is not None else None
    if recipe is None or not recipe.is_file():
        return None
    import yaml

    return ((yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get(section) or {}).get(key)


def eval_template(args, run_dir: Optional[Path],
                  default: tuple[str, str] = ("plain", "the default: prompt + response as text, as Chen et al. "
                                                       "scored")) -> tuple[str, str]:
    """(template, why): --format if given, else the run's own data.template (from its recipe.yaml), else `default`."""
    if args.template is not None:
        return args.template, "--format"
    template = run_recipe_value(run_dir, "data", "template")
    if template:
        return template, f"the run's data.template ({Path(run_dir) / 'recipe.yaml'})"
    return default


def _exclusion_reason(item) -> str:
    return f"{item.field}: {item.reason.split(' (')[0]}"


def _read_eval_rows(args, limit: Optional[int]) -> tuple[list, list, bool]:
    """(valid rows, invalid rows, whether the source was read to its end) reading at most `limit` valid rows."""
    from posttrain.data.readers import load_preference_rows
    from posttrain.data.tasks import builtin_rows

    if args.builtin is not None:
        rows = builtin_rows(args.builtin, args.split or "heldout", None, args.seed)
        return (rows if limit is None else rows[:limit]), [], limit is None or len(rows) <= limit
    rows, invalid = load_preference_rows(args.data, "auto", args.split or "train", limit)
    return rows, invalid, limit is None or len(rows) < limit


class EvalPairs(NamedTuple):
    pairs: list[TokenizedPair]
    excluded: dict  # reason -> number of rows
    alpha_source: str
    votes: Optional[dict]
    rows_read: int


def _load_eval_pairs(args, tokenizer, template: str) -> EvalPairs:
    """Tokenised pairs, what was excluded (reason -> rows) and where alpha comes from. With --max-pairs N, rows are
    read until N pairs can be scored (rows after them are not read, nor validated)."""
    from posttrain.data.tokenize import tokenize_pairs
    from posttrain.eval.votes import is_pandalm, pandalm_rows

    excluded: dict = {}
    vote_counts = None
    if args.data is not None and Path(args.data).expanduser().is_file() and is_pandalm(args.data):
        rows, votes = pandalm_rows(args.data)
        rows = rows[args.start:]
        pairs, too_long, _ = tokenize_pairs(rows, tokenizer, template, args.max_length)
        vote_counts = votes.to_dict()
        excluded.update({"a majority tie between the annotators": votes.majority_tie,
                         "no majority among the annotators": votes.no_majority,
                         "an empty or identical response": votes.unusable})
        excluded = {why: n for why, n in excluded.items() if n}
        invalid, rows_read = [], votes.rows
        source = "annotator votes (PandaLM: share of the votes for the majority response; majority ties excluded)"
    else:
        want = args.max_pairs
        limit = None if want is None else args.start + want
        while True:
            rows, invalid, exhausted = _read_eval_rows(args, limit)
            pairs, too_long, _ = tokenize_pairs(rows[args.start:], tokenizer, template, args.max_length)
            if want is None or len(pairs) >= want or exhausted:
                break
            limit += 2 * (want - len(pairs))
        rows_read = len(rows) + len(invalid)
        with_alpha = sum(1 for p in pairs if (p.extras or {}).get("alpha") is not None)
        source = (f"the data's alpha field ({with_alpha} of {len(pairs)} pairs), alpha = {args.alpha:g} elsewhere"
                  if with_alpha else f"alpha = {args.alpha:g} for every pair (the data has no votes)")
    if args.max_pairs is not None and len(pairs) > args.max_pairs:
        last_row = pairs[args.max_pairs - 1].row
        pairs = pairs[:args.max_pairs]
        invalid = [i for i in invalid if i.row <= last_row]
        too_long = [i for i in too_long if i.row <= last_row]
        rows_read = sum(1 for row in rows if row.row <= last_row) + len(invalid)
    for item in invalid:
        excluded[_exclusion_reason(item)] = excluded.get(_exclusion_reason(item), 0) + 1
    if too_long:
        excluded[f"too long for --max-length {args.max_length} (the prompt fills it)"] = len(too_long)
    if not pairs:
        raise DataError(f"posttrain eval: no pairs left to score (excluded: "
                        f"{'; '.join(f'{n} {why}' for why, n in excluded.items()) or 'none'}).")
    if args.sample is not None and args.sample < len(pairs):
        chosen = sorted(random.Random(args.seed).sample(range(len(pairs)), args.sample))
        excluded["not in the --sample"] = len(pairs) - len(chosen)
        pairs = [pairs[i] for i in chosen]
    return EvalPairs(pairs, excluded, source, vote_counts, rows_read)


def run_eval(args) -> int:
    """The body of `posttrain eval` (see posttrain.cli for the options)."""
    from posttrain.core import PolicyLogProbs
    from posttrain.eval.ranking import score_pairs
    from posttrain.eval.report import write_report
    from posttrain.models import load_causal_lm, load_tokenizer

    if (args.data is None) == (args.builtin is None):
        raise PosttrainError("posttrain eval: give exactly one of --data PATH or --builtin TASK.")
    if args.threads:
        torch.set_num_threads(args.threads)
    betas = [float(b) for b in args.betas.split(",") if b.strip()]
    if not betas or any(b <= 0 for b in betas):
        raise PosttrainError(f"--betas must be positive numbers separated by commas, got {args.betas!r}.")
    if not 0 < args.alpha <= 1:
        raise PosttrainError(f"--alpha must be in (0, 1], got {args.alpha}.")
    if args.data is not None and not Path(args.data).expanduser().exists() and not is_hub_id(args.data):
        raise DataError(f"--data {args.data!r} does not exist (working directory {Path.cwd()}).")
    adapter = resolve_adapter(args.adapter) if args.adapter else None
    template, template_source = eval_template(args, adapter[2] if adapter else None)
    tokenizer = load_tokenizer(args.model)
    pairs, excluded, alpha_source, votes, rows_read = _load_eval_pairs(args, tokenizer, template)  # before any model
    print(f"format: {template} ({template_source}); {rows_read} rows read, {len(pairs)} pairs to score"
          + (f"; excluded: {'; '.join(f'{n} {why}' for why, n in excluded.items())}" if excluded else ""))
    base = load_causal_lm(args.model, args.dtype)
    reference_model, reference_name = None, None
    if adapter and adapter[0] == "peft":
        import peft

        model = peft.PeftModel.from_pretrained(base, str(adapter[1]))
        if args.dtype == "float64":
            model = model.double()
        policy = PolicyLogProbs(model)
        reference_name = "the base model with the adapter switched off"
        reference_model = AdapterOff(policy)
    elif adapter:  # a full fine-tuning checkpoint
        policy = PolicyLogProbs(load_causal_lm(str(adapter[1]), args.dtype))
        reference_model, reference_name = PolicyLogProbs(base), f"the base model {args.model}"
    else:
        policy = PolicyLogProbs(base)
    if args.reference:
        reference_model = PolicyLogProbs(load_causal_lm(args.reference, args.dtype))
        reference_name = f"the model {args.reference}"
    alpha = pair_alphas(pairs, args.alpha)
    progress = not args.no_progress
    padding = args.max_padding if args.max_padding < 1 else None
    scores = score_pairs(policy, pairs, tokenizer.pad_token_id, args.batch_size, progress=progress, layout=args.layout,
                         max_padding=padding, autocast_bf16=args.bf16)
    if reference_model is not None:
        reference = score_pairs(reference_model, pairs, tokenizer.pad_token_id, args.batch_size, progress=progress,
                                layout=args.layout, max_padding=padding, autocast_bf16=args.bf16)
    else:
        reference, reference_name = scores, "the scored model itself (no adapter: it is its own reference)"
    inputs = {"model": args.model, "adapter": str(adapter[1]) if adapter else None,
              "adapter_kind": adapter[0] if adapter else None, "reference": reference_name,
              "data": args.data or f"builtin:{args.builtin}", "format": template, "format_source": template_source,
              "max_length": args.max_length,
              "start": args.start, "max_pairs": args.max_pairs, "sample": args.sample, "dtype": args.dtype,
              "bf16_autocast": args.bf16,
              "batch_size": args.batch_size, "max_padding": args.max_padding, "alpha_source": alpha_source,
              "default_alpha": args.alpha,
              "rows_read": rows_read, "excluded": excluded, "votes": votes, "truncated_pairs": int(sum(p.truncated for p in pairs)),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    report, records = build_report(pairs, scores, reference, alpha, inputs, betas=betas, eps=args.alpha_eps,
                                   tie_threshold=args.tie_threshold, dpo_beta=args.beta, bootstrap=args.bootstrap,
                                   seed=args.seed, reference_is_policy=reference is scores, tokenizer=tokenizer)
    m = report["metrics"]
    print(f"pairs: {m['pairs']}  format: {template}  ties (alpha = 0.5): {m['ties']}")
    lo, hi = m["ranking_accuracy_ci95"]
    print(f"ranking accuracy R: {m['ranking_accuracy']:.4f}  (95% bootstrap interval {lo:.4f} to {hi:.4f})")
    lo, hi = m["ranking_accuracy_normalised_ci95"]
    print(f"length-normalised ranking accuracy R~: {m['ranking_accuracy_normalised']:.4f}  "
          f"(95% bootstrap interval {lo:.4f} to {hi:.4f})")
    s, sn = m["idealised"]["R_star_summary"], m["idealised"]["R_star_normalised_summary"]
    print(f"idealised R* min/median/max over beta {','.join(f'{b:g}' for b in betas)}: "
          f"{s['min']:.4f} / {s['median']:.4f} / {s['max']:.4f}")
    print(f"idealised R~* min/median/max: {sn['min']:.4f} / {sn['median']:.4f} / {sn['max']:.4f}")
    print(f"alignment gap (median R* - R): {m['alignment_gap']:+.4f}   length-normalised: "
          f"{m['alignment_gap_normalised']:+.4f}")
    r_range = m["eps_sensitivity"]["R_star_median_range"]
    print(f"median R* over eps in {list(m['eps_sensitivity']['by_eps'])}: {r_range[0]:.4f} to {r_range[1]:.4f} "
          f"({m['eps_sensitivity']['pairs_with_alpha_1']} pairs with alpha = 1)")
    print(f"reference ranks wrongly (c > 0): {m['difficulty']['reference_wrong_share']:.4f}")
    if "implicit_reward_accuracy" in m:
        print(f"implicit-reward accuracy: {m['implicit_reward_accuracy']:.4f}  "
              f"Theorem 4.1 violations: {m['theorem_4_1_violations']}")
    for name, part in m["length_split"].items():
        if part["pairs"]:
            print(f"R, {name.replace('_', ' ')}: {part['ranking_accuracy']:.4f} ({part['pairs']} pairs)")
    print(f"scoring: {scores.stats.pairs_per_second:.2f} pairs/s ({scores.stats.layout} layout, "
          f"{100 * scores.stats.padding_share:.1f}% padding)")
    if args.output:
        history = training_history(adapter[2], adapter[3]) if adapter else []
        files = write_report(args.output, report, records, history)
        print(f"report: {files['summary']} (and report.json, pairs.jsonl, plots) in {args.output}")
    return 0
