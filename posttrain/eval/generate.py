"""`posttrain eval --generate`: generate answers to prompt data and score them with a reward (default `math`).

Per prompt: one greedy completion, and n sampled completions (temperature, top-p) when n > 0. Reported:

    pass@1            the share of prompts whose greedy completion succeeds
    pass@1_sampled    the mean success over the n samples (the estimator below at k = 1)
    pass@k            the unbiased estimator of Chen et al. 2021 (Codex, eq. 1), per prompt with c of n samples
                      correct: 1 - C(n - c, k) / C(n, k), averaged over prompts, for k = 2, 4, 8, ... and n
    maj@n             the share of prompts whose most frequent extracted answer among the n samples (ties: the
                      answer seen first) is correct (self-consistency, Wang et al. 2023)

A completion succeeds when the reward's success component is at least `success_threshold` (the reward's
own score when it has one component), as in training. Every completion goes to `completions.jsonl`.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from posttrain.rollout import HFGenerateEngine, RolloutCollector, RolloutRecord, SamplingParams


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n, c of them correct, is correct)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_success(records: list[RolloutRecord]) -> bool:
    """Whether the most frequent extracted answer (first seen wins a tie) is a correct one; no answer: False."""
    answers = [rec.answer for rec in records if rec.answer is not None]
    if not answers:
        return False
    counts = Counter(answers)
    best = max(counts.values())
    winner = next(a for a in answers if counts[a] == best)
    return next(rec.success for rec in records if rec.answer == winner)


def generation_metrics(greedy: list[RolloutRecord], samples: dict[int, list[RolloutRecord]], n: int) -> dict:
    """The module docstring's metrics from one greedy record per prompt and n sampled records per prompt."""
    prompts = len(greedy)
    p1 = sum(rec.success for rec in greedy) / prompts
    out = {"prompts": prompts, "pass@1": p1, "pass@1_stderr": math.sqrt(p1 * (1 - p1) / prompts),
           "greedy_mean_reward": sum(rec.reward for rec in greedy) / prompts,
           "greedy_truncated_share": sum(rec.truncated for rec in greedy) / prompts}
    if n:
        correct = {i: sum(rec.success for rec in recs) for i, recs in samples.items()}
        out["samples_per_prompt"] = n
        out["pass@1_sampled"] = sum(correct.values()) / (n * prompts)
        for k in sorted({2 ** j for j in range(1, n.bit_length()) if 2 ** j <= n} | {n} - {1}):
            out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct.values()) / prompts
        out[f"maj@{n}"] = sum(majority_success(recs) for recs in samples.values()) / prompts
    return out


@dataclass
class GenerationSettings:
    samples: int = 8  # n sampled completions per prompt (0: greedy only)
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 256
    batch_size: int = 64
    seed: int = 0


def evaluate_generation(model, tokenizer, examples: list, prompt_ids: list[list[int]], rewards,
                        success_component: str, success_threshold: float, settings: GenerationSettings,
                        output: Optional[Path] = None) -> dict:
    """Generate and score (module docstring); with `output`, write completions.jsonl and report.json there."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token, so a generated completion could never end.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    engine = HFGenerateEngine(lambda: model, pad_id, [tokenizer.eos_token_id], settings.batch_size)
    collector = RolloutCollector(engine, rewards, examples, prompt_ids,
                                 lambda ids: tokenizer.decode(ids, skip_special_tokens=True), success_component,
                                 success_threshold)
    started = time.time()
    indices = list(range(len(examples)))
    greedy = collector.collect(indices, 1, SamplingParams(max_new_tokens=settings.max_new_tokens, greedy=True))
    samples: dict[int, list[RolloutRecord]] = {}
    if settings.samples:
        torch.manual_seed(settings.seed)
        params = SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                top_p=settings.top_p)
        for rec in collector.collect(indices, settings.samples, params):
            samples.setdefault(rec.index, []).append(rec)
    metrics = generation_metrics(greedy, samples, settings.samples)
    metrics["seconds"] = time.time() - started
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        with (output / "completions.jsonl").open("w", encoding="utf-8") as handle:
            for kind, records in (("greedy", greedy), ("sample", [r for recs in samples.values() for r in recs])):
                for rec in records:
                    example = examples[rec.index]
                    handle.write(json.dumps({"kind": kind, "source": example.source, "row": example.row,
                                             "prompt": example.prompt, "gold": example.answer,
                                             "completion": rec.text, "extracted": rec.answer, "reward": rec.reward,
                                             "success": rec.success, "truncated": rec.truncated}) + "\n")
        (output / "report.json").write_text(json.dumps({"metrics": metrics, "settings": settings.__dict__},
                                                       indent=2))
    return metrics


def load_policy(model_name: str, adapter_dir: Optional[Path], kind: Optional[str], dtype: str):
    """The causal LM to generate with: the model, with a peft adapter on top, or a full checkpoint's model."""
    from posttrain.models import load_causal_lm

    if kind == "full":
        return load_causal_lm(str(adapter_dir), dtype)
    model = load_causal_lm(model_name, dtype)
    if kind == "peft":
        import peft

        model = peft.PeftModel.from_pretrained(model, str(adapter_dir))
    return model


def run_generation_eval(args) -> int:
    """The body of `posttrain eval --generate` (see posttrain.cli for the options)."""
    from posttrain.config import RewardTerm
    from posttrain.data.prompts import load_prompt_examples
    from posttrain.data.readers import is_hub_id
    from posttrain.data.tokenize import example_prompt_ids
    from posttrain.errors import DataError, PosttrainError
    from posttrain.eval.api import eval_template, resolve_adapter
    from posttrain.models import load_tokenizer
    from posttrain.rewards import build_reward_set

    if args.samples < 0 or args.max_new_tokens < 1 or not args.temperature > 0:
        raise PosttrainError(f"--samples must be >= 0, --max-new-tokens >= 1 and --temperature > 0; got "
                             f"{args.samples}, {args.max_new_tokens} and {args.temperature}.")
    if args.threads:
        torch.set_num_threads(args.threads)
    adapter = resolve_adapter(args.adapter) if args.adapter else None
    template, why = eval_template(args, adapter[2] if adapter else None,
                                  ("auto", "the default: chat messages through the chat template, text as is"))
    path = args.data if args.data is not None else f"builtin:{args.builtin}"
    if args.data is not None and not Path(args.data).expanduser().exists() and not is_hub_id(args.data):
        raise DataError(f"--data {args.data!r} does not exist (working directory {Path.cwd()}).")
    examples, _ = load_prompt_examples(path, "auto", args.split or ("heldout" if args.builtin else "train"),
                                       args.start, args.max_prompts, what="--data" if args.data else "--builtin")
    rewards = build_reward_set([RewardTerm(name=args.reward)], num_workers=0)
    tokenizer = load_tokenizer(args.model)
    ids = [example_prompt_ids(tokenizer, e, template) for e in examples]
    print(f"format: {template} ({why}); {len(examples)} prompts; reward {args.reward}; greedy"
          + (f" and {args.samples} samples at temperature {args.temperature}" if args.samples else ""), flush=True)
    model = load_policy(args.model, adapter[1] if adapter else None, adapter[0] if adapter else None, args.dtype)
    settings = GenerationSettings(samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                                  max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed)
    try:
        metrics = evaluate_generation(model, tokenizer, examples, ids, rewards, rewards.names[0], args.threshold,
                                      settings, Path(args.output) if args.output else None)
    finally:
        rewards.close()
    print(f"prompts: {metrics['prompts']}  greedy pass@1: {metrics['pass@1']:.4f} "
          f"(+- {metrics['pass@1_stderr']:.4f})")
    for key, value in metrics.items():
        if key.startswith(("pass@", "maj@")) and key not in ("pass@1", "pass@1_stderr"):
            print(f"{key}: {value:.4f}")
    if args.output:
        print(f"report: {Path(args.output) / 'report.json'}; completions: {Path(args.output) / 'completions.jsonl'}")
    return 0
