"""Claim: online DPO from groups (best against worst completion by reward) trains the addition task as GRPO does.

Set-up, fixed before the full run: recipes/grpo_smollm2_addition.yaml (the built-in `addition` task, LoRA r 16,
lr 3e-4 constant, bf16 autocast, `math` reward), 32 steps of 4 prompts x G = 8 completions at temperature 0.7
and at most 16 new tokens, seeds 0 and 1. GRPO: the recipe's loss (DAPO aggregation, clip 0.2 / 0.28, no KL).
Online DPO: `online_dpo` with DPO beta 0.1 against the run's reference (the base model), the group's
highest-reward completion against its lowest (ties and groups of equal rewards dropped). Both generate the
same number of rollouts per step. Held-out greedy pass@1 on the 300 held-out prompts after training, measured
with `posttrain eval --generate` (float32) for both. The claim holds when online DPO's held-out pass@1 is
within 5 points of GRPO's or above it, averaged over the seeds; the untrained pass@1 is about 0.31.

    python benchmarks/claims/online_dpo_vs_grpo.py            # full run on SmolLM2 (about 40 minutes, one thread)
    python benchmarks/claims/online_dpo_vs_grpo.py --smoke    # tiny model, a few steps (CI)
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import yaml

from _harness import ROOT, merge, online_smoke, parse_args, save, table
from hpt_vs_grpo_sft import heldout_greedy

from posttrain.recipe import load_recipe
from posttrain.trainer import Trainer

RECIPE = ROOT / "recipes" / "grpo_smollm2_addition.yaml"
LOSSES = {"grpo": None, "online_dpo": {"name": "online_dpo", "params": {"pair_loss": "dpo",
                                                                        "pair_params": {"beta": 0.1},
                                                                        "pairing": "best_worst"}}}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], [("--seeds", {"type": int, "default": 2}),
                                                ("--steps", {"type": int, "default": 32})])
    workdir = Path(args.workdir) if args.workdir else ROOT / "runs" / "claims"
    base = yaml.safe_load(RECIPE.read_text())
    base = merge(base, train={"batch_size": 4, "micro_batch_size": 4, "max_steps": args.steps},
                 eval={**base["eval"], "at_start": False, "at_end": False}, checkpoint={"every": 0},
                 logging={"progress_bar": not args.smoke, "report_to": ["jsonl"]})
    seeds = list(range(args.seeds))
    if args.smoke:
        seeds = [0]
        base = online_smoke(base, workdir, 2, group_size=4)
    heldout = base["data"]["heldout"]
    base["data"]["heldout"] = {**heldout, "num_rows": heldout.get("num_rows", 300)}
    max_new_tokens = base["rollout"]["max_new_tokens"]
    runs: dict[str, list[dict]] = {name: [] for name in LOSSES}
    for seed in seeds:
        for name, loss in LOSSES.items():
            raw = merge(base, run={"output_dir": str(workdir / f"online_dpo_claim_{name}_{seed}"), "seed": seed,
                                   "num_threads": args.threads})
            if loss is not None:
                raw = merge(raw, loss=loss)
            started = time.time()
            summary = Trainer(load_recipe(raw=raw), force=True).train()
            train_seconds = time.time() - started
            run_dir = Path(raw["run"]["output_dir"])
            metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            steps = [m for m in metrics if "reward/mean" in m]
            after = heldout_greedy(raw, run_dir / "final", run_dir / "heldout_greedy", max_new_tokens)
            runs[name].append({"steps": summary["steps"], "train_seconds": train_seconds,
                               "heldout_after": after["pass@1"],
                               "train_pass@1_by_step": [m["pass@1"] for m in steps],
                               "zero_variance_share": statistics.fmean(m["groups/zero_variance_share"] for m in steps)})
            print(f"{name} seed {seed}: held-out pass@1 {after['pass@1']:.3f}, {train_seconds / 60:.1f} min", flush=True)
    untrained = heldout_greedy(base, None, workdir / "online_dpo_claim_untrained", max_new_tokens)["pass@1"]
    rows, result = [], {"claim": "online DPO's held-out greedy pass@1 is within 5 points of GRPO's or above it",
                        "seeds": seeds, "steps": base["train"]["max_steps"], "runs": runs,
                        "heldout_pass@1_untrained": untrained}
    for name in LOSSES:
        values = [r["heldout_after"] for r in runs[name]]
        result[name] = {"heldout_pass@1_mean": statistics.fmean(values),
                        "heldout_pass@1_std": statistics.stdev(values) if len(values) > 1 else 0.0}
        last = [statistics.fmean(r["train_pass@1_by_step"][-8:]) for r in runs[name]]
        rows.append([name, " / ".join(f"{v:.3f}" for v in values), result[name]["heldout_pass@1_mean"],
                     statistics.fmean(last), statistics.fmean(r["train_seconds"] for r in runs[name]) / 60])
    result["holds"] = result["online_dpo"]["heldout_pass@1_mean"] >= result["grpo"]["heldout_pass@1_mean"] - 0.05
    save(args, "online_dpo_vs_grpo", result)
    print(f"untrained held-out greedy pass@1: {untrained:.3f}")
    print(table(["loss", "held-out pass@1 per seed", "mean", "training pass@1, last 8 steps", "minutes"], rows))
    print(f"holds: {result['holds']}")


if __name__ == "__main__":
    main()
