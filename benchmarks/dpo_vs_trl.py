"""DPO speed: posttrain against TRL's DPOTrainer on the same work (issue 7; docs/performance.md).

Same model (one safetensors directory), same plain-text HH-RLHF helpful-base pairs in the same order
(TRL with `train_sampling_strategy="sequential"`, posttrain with `train.shuffle: false`), 4 pairs per
step, max length 512, LoRA r=16 / alpha 32 / all linear layers / no dropout, fp32, AdamW at a constant
learning rate. Every configuration runs in its own process, one after the other; each child reports
its step times, losses, reference precomputation time and peak RSS (getrusage of the child itself).

Protocol: `--steps` steps (>= 16) per run, the first `--drop` (2) dropped from the s/step, median over
`--repeats` (2) repeats, torch.set_num_threads(--threads) in every child, the 1-minute load average
recorded before every run, and a run flagged `loaded` when other processes used more than 0.3 of a core
during it (benchmarks/common.py says why that, not the load average, is the test).

Rates are over one epoch of the run's pairs, reference precomputation included (each pair is
precomputed once and trained once):  time = precompute + steps x s/step,  pairs/s = pairs / time,
tokens/s = non-padding tokens / time, where the non-padding tokens of a pair are those of its two
sequences, prompt + chosen and prompt + rejected (the same count for every layout and for TRL).

Model FLOP/s (achieved, as a share of the matmul peak measured by a probe in the same run, fp32 for fp32
rows and bf16 for bf16 rows):
per non-padding token, 2N for the policy forward, 2N for the input-gradient backward (LoRA freezes the
base weights, whose weight gradients are not computed) and 2N for a reference pass when one runs (live
or precomputed); N counts the weights used in matmuls (every layer and the output layer, not the input
embedding lookup; LoRA's are included). Attention adds, per sequence of length L, 2 x layers x
d_attn x L(L+1) for the causal QK^T and AV of a forward, twice that for their backward. Recomputation
(gradient checkpointing) and padding are not counted: both sides are credited with the same work.

Numerics (a child of its own): TRL trains `--numerics-steps` steps with precomputed reference
log-probs; then on TRL's own collated next batch and TRL's current weights, posttrain's best layout
(shared prompt, packed) gives the per-sequence summed log-probs of TRL's forward, the reference sums
of TRL's precomputation, and TRL's DPO loss, to rtol 1e-5 (fp32).

    python benchmarks/dpo_vs_trl.py                  # the full run on SmolLM2-135M-Instruct (long: see docs)
    python benchmarks/dpo_vs_trl.py --smoke          # a tiny model, a few steps, one repeat (< 1 minute)
    python benchmarks/dpo_vs_trl.py --rows trl_best,posttrain_best   # a subset of the rows
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (LOAD_LIMIT, matmul_peak, model_shape, peak_rss_mb, protocol, protocol_parser,  # noqa: E402
                               run_as_child, run_child, run_rows, save_record, tiny_model_dir)

SCRIPT = Path(__file__).resolve()
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "helpful-base" / "test.jsonl"
HH_SPLIT = "\n\nAssistant:"
RTOL = 1e-5

BEST = {"share_prompt": True, "packing": True, "precompute": True, "gradient_checkpointing": False, "bf16": False}
# name -> settings; posttrain rows are BEST with one feature toggled (ablations), plus the plain path.
ROWS = {
    "trl_default": {"side": "trl", "gradient_checkpointing": True, "precompute": False},
    "trl_best": {"side": "trl", "gradient_checkpointing": False, "precompute": True},
    "trl_best_bf16": {"side": "trl", "gradient_checkpointing": False, "precompute": True, "bf16": True},
    "posttrain_plain": {"side": "posttrain", "share_prompt": False, "packing": False, "precompute": False,
                        "gradient_checkpointing": False, "bf16": False},
    "posttrain_best": {"side": "posttrain", **BEST},
    "posttrain_best_without_share_prompt": {"side": "posttrain", **BEST, "share_prompt": False},
    "posttrain_best_without_packing": {"side": "posttrain", **BEST, "packing": False},
    "posttrain_best_without_precompute": {"side": "posttrain", **BEST, "precompute": False},
    "posttrain_best_with_gradient_checkpointing": {"side": "posttrain", **BEST, "gradient_checkpointing": True},
    "posttrain_best_with_bf16": {"side": "posttrain", **BEST, "bf16": True},
    "posttrain_best_bf16_weights": {"side": "posttrain", **BEST, "bf16": True, "dtype": "bfloat16"},
}
SMOKE_ROWS = ["trl_best", "posttrain_plain", "posttrain_best"]


# ---------------------------------------------------------------------------------------------- data


def hh_pairs(tokenizer, count: int, max_length: int) -> list[dict]:
    """The first `count` usable helpful-base test pairs as plain text {prompt, chosen, rejected}, split at the
    last Assistant turn. Left out (both trainers would treat them differently): dialogues whose prompt differs
    between chosen and rejected, identical responses, and prompts that leave fewer than 8 tokens for a response."""
    pairs = []
    with HH.open() as handle:
        for line in handle:
            record = json.loads(line)
            c, r = record["chosen"], record["rejected"]
            cut_c, cut_r = c.rfind(HH_SPLIT), r.rfind(HH_SPLIT)
            if cut_c < 0 or cut_r < 0 or c[:cut_c] != r[:cut_r]:
                continue
            prompt, chosen, rejected = c[:cut_c + len(HH_SPLIT)], c[cut_c + len(HH_SPLIT):], r[cut_r + len(HH_SPLIT):]
            if not chosen.strip() or not rejected.strip() or chosen.strip() == rejected.strip():
                continue
            if len(tokenizer(prompt)["input_ids"]) > max_length - 8:
                continue
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            if len(pairs) == count:
                return pairs
    raise SystemExit(f"only {len(pairs)} usable pairs in {HH}")


# ---------------------------------------------------------------------------------------------- children


def _lora_kwargs(spec: dict) -> dict:
    return {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}


def _trl_trainer(spec: dict, output_dir: str, max_steps: int):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    pairs = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation="sdpa")
    args = DPOConfig(output_dir=output_dir, beta=0.1, loss_type="sigmoid", learning_rate=spec["lr"],
                     lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                     per_device_train_batch_size=spec["pairs_per_step"], gradient_accumulation_steps=1,
                     max_length=spec["max_length"], max_steps=max_steps, num_train_epochs=1,
                     gradient_checkpointing=spec["gradient_checkpointing"],
                     precompute_ref_log_probs=spec["precompute"], precompute_ref_batch_size=spec["pairs_per_step"],
                     train_sampling_strategy="sequential", use_cpu=True, bf16=spec.get("bf16", False), fp16=False, seed=0,
                     report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
                     dataloader_num_workers=0)
    dataset = Dataset.from_list(pairs)
    started = time.perf_counter()
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=LoraConfig(**_lora_kwargs(spec), task_type="CAUSAL_LM"))
    return trainer, time.perf_counter() - started


def run_trl(spec: dict) -> dict:
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl import DPOTrainer

    torch.set_num_threads(spec["threads"])
    precompute = {"s": 0.0}
    original = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *args, **kwargs):  # runs inside DPOTrainer.__init__
        started = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            precompute["s"] += time.perf_counter() - started

    DPOTrainer._precompute_ref_logps = timed_precompute
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        trainer, _ = _trl_trainer(spec, tmp, spec["steps"])
        assert isinstance(trainer._get_train_sampler(), SequentialSampler)
        # TRL tokenises in its own preprocessing: count what its collator keeps (max_length, keep_start).
        L = spec["max_length"]
        sequences = [[min(len(ex["prompt_ids"]) + len(ex["chosen_ids"]), L),
                      min(len(ex["prompt_ids"]) + len(ex["rejected_ids"]), L)] for ex in trainer.train_dataset]
        step_times, losses = [], []

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                self.t = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                step_times.append(time.perf_counter() - self.t)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    losses.append(float(logs["loss"]))

        trainer.add_callback(Clock())
        setup_s = time.perf_counter() - t0
        trainer.train()
    return {"step_times": step_times, "losses": losses, "sequences": sequences, "precompute_s": precompute["s"],
            "setup_s": setup_s, "peak_rss_mb": peak_rss_mb()}


def posttrain_recipe(spec: dict, output_dir: str) -> dict:
    return {
        "run": {"output_dir": output_dir, "seed": 0, "num_threads": spec["threads"]},
        "model": {"name_or_path": spec["model"], "dtype": spec.get("dtype", "float32"), "attn_implementation": "sdpa",
                  "gradient_checkpointing": spec["gradient_checkpointing"]},
        "lora": {"enabled": True, "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "reference": {"kind": "adapter_off", "precompute": spec["precompute"]},
        "data": {"train": {"path": spec["data"], "format": "trl"}, "heldout": None, "template": "plain",
                 "max_length": spec["max_length"], "truncation": "keep_start", "invalid_rows": "error"},
        "loss": {"name": "dpo", "params": {"beta": 0.1}},
        "train": {"optimizer": "adamw", "lr": spec["lr"], "lr_scheduler": "constant", "warmup_steps": 0,
                  "batch_size": spec["pairs_per_step"], "micro_batch_size": spec["pairs_per_step"],
                  "max_steps": spec["steps"], "max_grad_norm": 1.0, "shuffle": False, "bf16": spec["bf16"],
                  "share_prompt": spec["share_prompt"], "packing": spec["packing"]},
        "logging": {"progress_bar": False, "report_to": ["jsonl"]},
        "eval": {"at_start": False, "at_end": False, "batch_size": spec["pairs_per_step"]},
    }


def run_posttrain(spec: dict) -> dict:
    import torch

    from posttrain.recipe import load_recipe
    from posttrain.steps.pairs import PairStep
    from posttrain.trainer import Trainer

    torch.set_num_threads(spec["threads"])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        trainer = Trainer(load_recipe(raw=posttrain_recipe(spec, tmp)))
        precompute = {"s": 0.0}
        original = PairStep._precompute_reference

        def timed_precompute(step, batch_size):
            started = time.perf_counter()
            try:
                return original(step, batch_size)
            finally:
                precompute["s"] = time.perf_counter() - started

        PairStep._precompute_reference = timed_precompute
        trainer.setup()
        torch.set_num_threads(spec["threads"])
        setup_s = time.perf_counter() - t0
        sequences = [[len(p.prompt_ids) + len(p.chosen_ids), len(p.prompt_ids) + len(p.rejected_ids)]
                     for p in trainer.train_pairs]
        trainer.model.train()
        step_times, losses = [], []
        for step in range(trainer.plan.total_steps):
            started = time.perf_counter()
            record = trainer.train_step(step)
            step_times.append(time.perf_counter() - started)
            losses.append(record["loss"])
    return {"step_times": step_times, "losses": losses, "sequences": sequences, "precompute_s": precompute["s"],
            "setup_s": setup_s, "peak_rss_mb": peak_rss_mb()}


def run_numerics(spec: dict) -> dict:
    """posttrain's best layout on TRL's weights and TRL's collated batch, after a few TRL steps."""
    import torch

    from posttrain.config import LossTerm
    from posttrain.core import PolicyLogProbs, StepCounts
    from posttrain.data.layout import build_pair_rows
    from posttrain.data.tokenize import TokenizedPair
    from posttrain.losses import PairLossInputs, build_loss

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    k, steps = spec["pairs_per_step"], spec["numerics_steps"]
    with tempfile.TemporaryDirectory() as tmp:
        trainer, _ = _trl_trainer({**spec, "precompute": True, "gradient_checkpointing": False}, tmp, max(steps, 1))
        if steps:
            trainer.train()
        model = trainer.model
        model.eval()
        dataset = trainer.train_dataset
        batch = trainer.data_collator([dataset[i] for i in range(steps * k, (steps + 1) * k)])
        ids, attention, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        labels = ids.masked_fill(completion == 0, -100)
        with torch.no_grad():
            trl_token_logps = model(input_ids=ids, attention_mask=attention, labels=labels, use_cache=False,
                                    fused_lm_head=True).log_probs
        trl_sums = trl_token_logps.double().sum(-1)
        trl_ref = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).double()
        trainer._metrics["train"].clear()
        with torch.no_grad():
            trl_loss = trainer._compute_loss(model, batch, return_outputs=False).item()

        # TRL's rows as posttrain pairs: prompt = the tokens before the completion, response = the completion.
        def parts(row):
            real = ids[row][attention[row].bool()].tolist()
            start = int(completion[row].nonzero()[0])
            return real[:start], real[start:]

        pairs = []
        for b in range(k):
            prompt, chosen = parts(b)
            prompt_l, rejected = parts(k + b)
            assert prompt == prompt_l
            pairs.append(TokenizedPair(prompt, chosen, rejected))
        rows = build_pair_rows(pairs, trainer.processing_class.pad_token_id, share_prompt=True, pack_tokens=1024)
        logprobs = PolicyLogProbs(model)
        with torch.no_grad():
            chosen, rejected = rows.split(logprobs(*rows.model_inputs()))
            with model.disable_adapter():
                ref_chosen, ref_rejected = rows.split(logprobs(*rows.model_inputs()))
        ours = torch.cat([chosen.sum(-1), rejected.sum(-1)]).double()
        ours_ref = torch.cat([ref_chosen.sum(-1), ref_rejected.sum(-1)]).double()
        inputs = PairLossInputs(chosen, rejected, rows.chosen_mask, rows.rejected_mask, torch.ones(k), ref_chosen,
                                ref_rejected)
        counts = StepCounts(examples=k, tokens=float(rows.chosen_mask.sum()))  # the step is this one batch
        our_loss = build_loss([LossTerm(name="dpo", params={"beta": 0.1})]).step_loss(inputs, counts).loss.item()
    moved = bool((trl_sums - trl_ref).abs().max() > 1e-3)  # the policy has left its reference
    diffs = {"policy_sums": ((ours - trl_sums).abs() / trl_sums.abs()).max().item(),
             "reference_sums": ((ours_ref - trl_ref).abs() / trl_ref.abs()).max().item(),
             "loss": abs(our_loss - trl_loss) / abs(trl_loss)}
    return {"trl_steps_before": steps, "pairs": k, "rtol": RTOL, "relative_differences": diffs,
            "policy_moved_from_reference": moved, "trl_loss": trl_loss, "posttrain_loss": our_loss,
            "trl_policy_sums": trl_sums.tolist(), "posttrain_policy_sums": ours.tolist(),
            "passed": (moved or steps == 0) and all(v <= RTOL for v in diffs.values())}


CHILDREN = {"trl": run_trl, "posttrain": run_posttrain, "numerics": run_numerics}


# ---------------------------------------------------------------------------------------------- parent


def model_flops(sequence_lengths: list[int], shape: dict, reference: bool = True) -> float:
    """Model FLOPs of one epoch over sequences of these lengths (see the module docstring): per token 4N
    (+2N for the reference pass), plus attention, per sequence of length L, 2 x layers x d_attn x L(L+1)
    forward and twice that backward (+ one more forward for the reference)."""
    N, layers, d_attn = shape["N"], shape["layers"], shape["d_attn"]
    per_token = 4 * N + (2 * N if reference else 0)
    attention_forward = sum(2 * layers * d_attn * L * (L + 1) for L in sequence_lengths)
    return sum(sequence_lengths) * per_token + attention_forward * (3 + (1 if reference else 0))


def summarise(name: str, settings: dict, repeats: list[dict], drop: int, pairs_per_step: int, shape: dict,
              peak_gflops: float) -> dict:
    per_repeat = []
    for run in repeats:
        kept = run["step_times"][drop:]
        s_per_step = statistics.mean(kept)
        precompute = run.get("precompute_s", 0.0)
        steps = len(run["step_times"])
        total = precompute + steps * s_per_step
        pairs = steps * pairs_per_step
        lengths = [L for pair in run["sequences"][:pairs] for L in pair]
        tokens = sum(lengths)
        flops = model_flops(lengths, shape, reference=True)  # DPO: a reference pass, live or precomputed
        per_repeat.append({"s_per_step": s_per_step, "precompute_s": precompute, "run_s": total,
                           "pairs_per_s": pairs / total, "tokens_per_s": tokens / total,
                           "model_gflops_per_s": flops / total / 1e9, "peak_rss_mb": run["peak_rss_mb"],
                           "load_average": run["load"]["load_average"], "other_cpu": run["load"]["other_cpu"],
                           "losses": run["losses"]})
    median = {key: statistics.median(r[key] for r in per_repeat)
              for key in ("s_per_step", "precompute_s", "run_s", "pairs_per_s", "tokens_per_s", "model_gflops_per_s",
                          "peak_rss_mb")}
    median["mfu"] = median["model_gflops_per_s"] / peak_gflops
    loads = [r["load_average"] for r in per_repeat]
    others = [r["other_cpu"] for r in per_repeat]
    return {"name": name, "settings": settings, **median, "losses": per_repeat[0]["losses"],
            "load_averages": loads, "other_cpu": others, "loaded": any(x > LOAD_LIMIT for x in others),
            "repeats": per_repeat}


def print_table(rows: list[dict], numerics: dict | None) -> None:
    head = ("| row | s/step | precompute s | pairs/s | tokens/s | peak RSS MB | model GFLOP/s | share of peak "
            "| pairs/s vs TRL best (same precision) | RSS vs TRL best | other load |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        ratio = r.get("vs_trl_best", {})
        print(f"| {r['name']} | {r['s_per_step']:.3f} | {r['precompute_s']:.2f} | {r['pairs_per_s']:.3f} "
              f"| {r['tokens_per_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['model_gflops_per_s']:.2f} "
              f"| {100 * r['mfu']:.1f}% | {ratio.get('pairs_per_s', float('nan')):.2f}x "
              f"| {ratio.get('peak_rss_mb', float('nan')):.2f}x "
              f"| {max(r['other_cpu']):.2f}{' (loaded)' if r['loaded'] else ''} |")
    if numerics is not None:
        d = numerics["relative_differences"]
        print(f"\nnumerics after {numerics['trl_steps_before']} TRL steps, on TRL's next batch: relative differences "
              f"policy sums {d['policy_sums']:.2e}, reference sums {d['reference_sums']:.2e}, DPO loss {d['loss']:.2e} "
              f"(rtol {numerics['rtol']:g}): {'passed' if numerics['passed'] else 'FAILED'}")


def main() -> None:
    parser = protocol_parser(__doc__.split("\n\n")[0], ROWS, full_steps=16, smoke_steps=3, out_name="dpo_vs_trl")
    parser.add_argument("--pairs-per-step", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=None, help="default 512; smoke 128")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--numerics-steps", type=int, default=None, help="TRL steps before the numerics check "
                                                                           "(default 3; smoke 2)")
    args = parser.parse_args()
    if run_as_child(args, CHILDREN):
        return
    steps, drop, repeats, names = protocol(args, ROWS, SMOKE_ROWS)
    args.max_length = args.max_length or (128 if args.smoke else 512)
    if args.numerics_steps is None:
        args.numerics_steps = 2 if args.smoke else 3
    from transformers import AutoTokenizer

    from posttrain.models import resolve_model_path

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_dir = str(tiny_model_dir(workdir)) if args.smoke else resolve_model_path(args.model)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        count = (steps + 1) * args.pairs_per_step  # + one batch for the numerics check
        pairs = hh_pairs(tokenizer, max(count, (args.numerics_steps + 1) * args.pairs_per_step), args.max_length)
        data = workdir / "pairs.jsonl"
        data.write_text("".join(json.dumps(p) + "\n" for p in pairs[:steps * args.pairs_per_step]))
        numerics_data = workdir / "numerics_pairs.jsonl"
        numerics_data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
        base = {"model": model_dir, "data": str(data), "steps": steps, "pairs_per_step": args.pairs_per_step,
                "max_length": args.max_length, "lr": args.lr, "threads": args.threads,
                "numerics_steps": args.numerics_steps}
        peak, peak_bf16 = matmul_peak(args.threads), matmul_peak(args.threads, "bfloat16")
        print(f"matmul probe: fp32 {peak:.1f}, bf16 {peak_bf16:.1f} GFLOP/s on {args.threads} threads; load average "
              f"{os.getloadavg()[0]:.2f}", flush=True)
        shape = model_shape(model_dir)
        results = run_rows(SCRIPT, names, ROWS, repeats,
                           lambda name, settings, k: {**base, **{key: v for key, v in settings.items() if key != "side"}},
                           lambda run: f"{statistics.mean(run['step_times'][drop:]):.3f} s/step")
        # Both sides must have trained on the same tokens: equal non-padding counts per sequence of every pair.
        reference_tokens = results[names[0]][1][0]["sequences"]
        for name, (_, runs) in results.items():
            if any(run["sequences"] != reference_tokens for run in runs):
                raise SystemExit(f"{name} saw other tokens than {names[0]}: the comparison is void")
        numerics, _ = run_child(SCRIPT, "numerics", {**base, "data": str(numerics_data)})

    rows = [summarise(n, s, r, drop, args.pairs_per_step, shape, peak_bf16 if s.get("bf16") else peak)
            for n, (s, r) in results.items()]
    by_name = {r["name"]: r for r in rows}
    for r in rows:  # bf16 rows against TRL's best in bf16, fp32 rows against TRL's best in fp32, when it ran
        trl_name = "trl_best_bf16" if r["settings"].get("bf16", False) else "trl_best"
        if trl_name in by_name:
            trl_best = by_name[trl_name]
            r["vs_trl_best"] = {"row": trl_best["name"], "pairs_per_s": r["pairs_per_s"] / trl_best["pairs_per_s"],
                                "tokens_per_s": r["tokens_per_s"] / trl_best["tokens_per_s"],
                                "s_per_step": r["s_per_step"] / trl_best["s_per_step"],
                                "peak_rss_mb": r["peak_rss_mb"] / trl_best["peak_rss_mb"]}
    if "trl_default" in by_name:
        trl_default = by_name["trl_default"]
        for r in rows:
            r["vs_trl_default"] = {"pairs_per_s": r["pairs_per_s"] / trl_default["pairs_per_s"],
                                   "peak_rss_mb": r["peak_rss_mb"] / trl_default["peak_rss_mb"]}
    print()
    print_table(rows, numerics)
    save_record(args, {"matmul_fp32_gflops": peak, "matmul_bf16_gflops": peak_bf16},
                {"steps": steps, "dropped_steps": drop, "repeats": repeats, "pairs_per_step": args.pairs_per_step,
                 "max_length": args.max_length, "lr": args.lr,
                 "model": args.model if not args.smoke else "tiny random Llama (SmolLM2 tokenizer)",
                 "data": str(HH.relative_to(ROOT.parent)), "pairs": steps * args.pairs_per_step,
                 "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
                 "model_N": shape["N"]}, rows, numerics=numerics)
    if not numerics["passed"]:
        raise SystemExit("numerics check failed")


if __name__ == "__main__":
    main()
