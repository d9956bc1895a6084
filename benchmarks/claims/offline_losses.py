"""Claim: each offline loss, trained with LoRA on SmolLM2-135M-Instruct on the built-in arithmetic
task, raises held-out ranking accuracy (length-normalised for SimPO).

Every loss gets the same data (384 training pairs, 24 steps of 16), LoRA, schedule and learning
rate (5e-4); hyperparameters are the paper defaults except where noted in the table. Held-out:
500 arithmetic pairs whose operands never occur in training.

    python benchmarks/claims/offline_losses.py            # full (SmolLM2, ~25 min on 2 CPU cores)
    python benchmarks/claims/offline_losses.py --smoke    # tiny model, seconds
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from _harness import base_recipe, merge, parse_args, save, table, train

from posttrain.losses import LOSSES

LOSS_SETTINGS = {
    "dpo": {"name": "dpo", "params": {"beta": 0.1}},
    "simpo": {"name": "simpo", "params": {"beta": 2.0, "gamma_beta_ratio": 0.25}},
    "rpo": {"name": "rpo", "params": {"beta": 0.1, "alpha": 0.005, "reduction": "sum_times_beta"}},
    "rdpo": {"name": "rdpo", "params": {"beta": 0.1, "eps": 0.1}},
    "tabpo": {"name": "tabpo", "params": {}},
    "sft": {"name": "sft"},
}


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0], extra=[("--only", {"default": None,
                                                                 "help": "comma-separated losses to run"})])
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="claims-losses-"))
    rows, results = [], {}
    chosen = args.only.split(",") if args.only else list(LOSS_SETTINGS)
    for name, loss in LOSS_SETTINGS.items():
        if name not in chosen:
            continue
        if loss["name"] not in LOSSES:
            print(f"skipping {name}: not registered")
            continue
        raw = merge(base_recipe(args, workdir, name), loss=loss)
        summary = train(raw)
        metric = "ranking_accuracy_normalised" if name == "simpo" else "ranking_accuracy"
        before, after = summary["heldout_before"][metric], summary["heldout_after"][metric]
        results[name] = {"loss": loss, "metric": metric, "before": before, "after": after,
                         "train_seconds": summary["train_seconds"], "summary": summary}
        rows.append([name, metric, before, after, 100 * (after - before), round(summary["train_seconds"])])
        print(f"{name}: {metric} {before:.4f} -> {after:.4f}", flush=True)
    print(table(["loss", "held-out metric", "before", "after", "points", "train s"], rows))
    save(args, "offline_losses" + (f"_{'_'.join(chosen)}" if args.only else ""), {"claim": "each loss raises held-out ranking accuracy", "results": results})


if __name__ == "__main__":
    main()
