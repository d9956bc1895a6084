"""Claim (Chowdhury et al. 2024, rDPO; spec section 4): when a known share of preference labels is flipped and DPO
trains long enough to fit them, the debiased rDPO loss keeps the true ranking better than DPO (issue 15, item 3).

Set-up, fixed before the full run (the earlier run, one short epoch at 30% flips, is in docs/results.md):
- SmolLM2-135M-Instruct, LoRA r 16 / alpha 32 on all linear layers, the built-in arithmetic task with the chat
  template, beta 0.1.
- per seed, 128 training pairs drawn from the training split (after the dev split); a seeded share of them flipped
  (chosen and rejected swapped): 20% and 40%.
- 4 epochs (32 steps of 16 pairs, cosine schedule, 2 warm-up steps), so that DPO can fit the flipped labels; the
  reference log-probs are computed once before training (`reference.precompute`, the same numbers).
- methods: DPO; rDPO with eps at the true flip rate; rDPO with eps at half of it (misspecified); clean-label DPO
  (nothing flipped) as the ceiling.
- the learning rate of each method and flip rate from {2e-4, 1e-3}, by ranking accuracy on a clean dev split (150
  training-split pairs never trained on), with seed 0 (the only runs scored on it); then seeds 0 to 4 at that rate.
- reported: held-out R on 300 held-out pairs (operands never seen in training), mean and standard error over the
  5 seeds; the curve of R on the flipped training pairs scored with their true labels, every 4 steps.
- every finished run is saved at once: the same command with the same --out goes on where it stopped.

    python benchmarks/claims/rdpo_label_noise.py --threads 2   # full: 42 runs of 2.5 to 4 min on the 2-core CPU
    python benchmarks/claims/rdpo_label_noise.py --smoke       # tiny model, seconds
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from pathlib import Path

from _harness import ROOT, base_recipe, mean_se, merge, parse_args, save, table

from posttrain.callbacks import Callback
from posttrain.config import DataSource
from posttrain.data.sources import load_pairs
from posttrain.data.tasks import builtin_rows
from posttrain.recipe import load_recipe
from posttrain.trainer import Trainer

BETA = 0.1
FULL = {"flip_rates": (0.2, 0.4), "seeds": (0, 1, 2, 3, 4), "lrs": (2e-4, 1e-3), "train": 128, "dev": 150,
        "heldout": 300, "epochs": 4, "curve_every": 4}
SMOKE = {"flip_rates": (0.25,), "seeds": (0,), "lrs": (1e-2, 2e-2), "train": 32, "dev": 32, "heldout": 48,
         "epochs": 2, "curve_every": 1}


def configurations(flip_rates) -> list[dict]:
    """(method, flip rate, loss) of every arm: clean DPO once, then DPO and rDPO (true and half eps) per rate."""
    arms = [{"arm": "dpo_clean", "flip_rate": 0.0, "loss": {"name": "dpo", "params": {"beta": BETA}}}]
    for rate in flip_rates:
        arms += [{"arm": "dpo", "flip_rate": rate, "loss": {"name": "dpo", "params": {"beta": BETA}}},
                 {"arm": "rdpo_true_eps", "flip_rate": rate,
                  "loss": {"name": "rdpo", "params": {"beta": BETA, "eps": rate}}},
                 {"arm": "rdpo_half_eps", "flip_rate": rate,
                  "loss": {"name": "rdpo", "params": {"beta": BETA, "eps": rate / 2}}}]
    return arms


def write_pairs(rows, path: Path, flipped: set[int]) -> None:
    with path.open("w") as handle:
        for i, row in enumerate(rows):
            chosen, rejected = (row.rejected, row.chosen) if i in flipped else (row.chosen, row.rejected)
            handle.write(json.dumps({"prompt": row.prompt, "chosen": chosen, "rejected": rejected}) + "\n")


class FlippedPairsCurve(Callback):
    """R of the flipped training pairs under their true labels, every `every` steps."""

    def __init__(self, trainer: Trainer, pairs: list, every: int):
        self.trainer, self.pairs, self.every = trainer, pairs, every
        self.points = [{"step": 0, "R": trainer.score(pairs).ranking_accuracy()}] if pairs else []

    def on_step_end(self, event) -> None:
        if self.pairs and event.step % self.every == 0:
            self.points.append({"step": event.step, "R": self.trainer.score(self.pairs).ranking_accuracy()})


def run(args, workdir: Path, sizes: dict, pool, dev_path: Path, arm: dict, lr: float, seed: int) -> dict:
    started = time.perf_counter()
    name = f"{arm['arm']}_flip{arm['flip_rate']:g}_lr{lr:g}_seed{seed}"
    rows = random.Random(f"rows/{seed}").sample(pool[sizes["dev"]:], sizes["train"])
    flipped = set(random.Random(f"flip/{arm['flip_rate']}/{seed}").sample(range(len(rows)),
                                                                         round(arm["flip_rate"] * len(rows))))
    train_path, true_path = workdir / f"{name}.jsonl", workdir / f"{name}_flipped_true.jsonl"
    write_pairs(rows, train_path, flipped)
    write_pairs([rows[i] for i in sorted(flipped)], true_path, set())
    base = base_recipe(args, workdir, name)
    steps = sizes["epochs"] * math.ceil(sizes["train"] / base["train"]["batch_size"])
    raw = merge(base, loss=arm["loss"], run={"seed": seed}, reference={"precompute": True},
                train={"lr": lr, "max_steps": steps, "warmup_steps": 0 if args.smoke else 2},
                data={"train": {"path": str(train_path)},
                      "heldout": {**base["data"]["heldout"], "num_rows": sizes["heldout"]}},
                eval={"at_start": False})
    trainer = Trainer(load_recipe(raw=raw), force=True)
    trainer.setup()
    data_cfg = trainer.recipe.data
    flipped_pairs = load_pairs(DataSource(path=str(true_path)), data_cfg, trainer.tokenizer, what="flipped")[0] \
        if flipped else []
    curve = FlippedPairsCurve(trainer, flipped_pairs, sizes["curve_every"])
    trainer.callbacks.append(curve)
    summary = trainer.train()
    dev_R = None
    if seed == sizes["seeds"][0]:
        dev_pairs = load_pairs(DataSource(path=str(dev_path)), data_cfg, trainer.tokenizer, what="dev")[0]
        dev_R = trainer.score(dev_pairs).ranking_accuracy()
    return {"arm": arm["arm"], "flip_rate": arm["flip_rate"], "lr": lr, "seed": seed, "flipped": len(flipped),
            "steps": steps, "heldout_R": summary["heldout_after"]["ranking_accuracy"],
            "dev_R": dev_R, "flipped_true_R_curve": curve.points,
            "train_seconds": summary["train_seconds"], "wall_seconds": time.perf_counter() - started}


def summarise(arms: list[dict], runs: list[dict], selected: dict) -> tuple[list[list], dict]:
    rows, summary = [], {}
    for arm in arms:
        key = f"{arm['arm']}@{arm['flip_rate']:g}"
        final = [r for r in runs if f"{r['arm']}@{r['flip_rate']:g}" == key and r["lr"] == selected.get(key)]
        if not final:
            continue
        mean, se = mean_se([r["heldout_R"] for r in final])
        curve_end = [r["flipped_true_R_curve"][-1]["R"] for r in final if r["flipped_true_R_curve"]]
        summary[key] = {"lr": selected[key], "seeds": len(final), "heldout_R_mean": mean, "heldout_R_se": se,
                        "flipped_true_R_end_mean": mean_se(curve_end)[0] if curve_end else None}
        rows.append([arm["arm"], f"{arm['flip_rate']:.0%}", f"{selected[key]:g}", len(final), mean,
                     summary[key]["heldout_R_se"], summary[key]["flipped_true_R_end_mean"] or float("nan")])
    return rows, summary


def plot(arms: list[dict], runs: list[dict], selected: dict, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted({a["flip_rate"] for a in arms if a["flip_rate"] > 0})
    fig, axes = plt.subplots(1, len(rates) + 1, figsize=(5 * (len(rates) + 1), 3.6), squeeze=False)
    colours = {"dpo_clean": "grey", "dpo": "C0", "rdpo_true_eps": "C1", "rdpo_half_eps": "C2"}
    bars = [(a, summary[f"{a['arm']}@{a['flip_rate']:g}"]) for a in arms if f"{a['arm']}@{a['flip_rate']:g}" in summary]
    held_out = axes[0][0]
    held_out.bar(range(len(bars)), [s["heldout_R_mean"] for _, s in bars], yerr=[s["heldout_R_se"] for _, s in bars],
                 capsize=3, color=[colours[a["arm"]] for a, _ in bars])
    held_out.set_xticks(range(len(bars)), [f"{a['arm']}\n{a['flip_rate']:.0%}" for a, _ in bars], fontsize=6)
    held_out.set(title="held-out R (mean +- s.e. over seeds)", ylim=(0.5, 1))
    for ax, rate in zip(axes[0][1:], rates):
        for arm in (a for a in arms if a["flip_rate"] == rate):
            key = f"{arm['arm']}@{rate:g}"
            final = [r for r in runs if f"{r['arm']}@{r['flip_rate']:g}" == key and r["lr"] == selected.get(key)]
            if not final:
                continue
            steps = [p["step"] for p in final[0]["flipped_true_R_curve"]]
            means = [sum(r["flipped_true_R_curve"][i]["R"] for r in final) / len(final) for i in range(len(steps))]
            ax.plot(steps, means, "o-", label=f"{arm['arm']} (lr {selected[key]:g}, {len(final)} seeds)")
        ax.set(title=f"{rate:.0%} of labels flipped", xlabel="step",
               ylabel="R of flipped pairs, true labels", ylim=(0, 1))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0])
    sizes = SMOKE if args.smoke else FULL
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="claims-rdpo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        f"rdpo_label_noise{'_smoke' if args.smoke else ''}.json")
    done = json.loads(out.read_text()) if out.is_file() else {}
    runs, selected = done.get("runs", []), done.get("selected_lr", {})
    pool = builtin_rows("tiny" if args.smoke else "arithmetic", "train", seed=0)
    dev_path = workdir / "dev.jsonl"
    write_pairs(pool[:sizes["dev"]], dev_path, set())
    arms = configurations(sizes["flip_rates"])

    def save_all() -> None:
        save(args, "rdpo_label_noise", {"claim": "rDPO keeps the true ranking better than DPO under flipped labels",
                                        "sizes": sizes, "beta": BETA, "selected_lr": selected,
                                        "summary": summarise(arms, runs, selected)[1], "runs": runs})

    def run_once(arm: dict, lr: float, seed: int) -> dict:
        for r in runs:
            if (r["arm"], r["flip_rate"], r["lr"], r["seed"]) == (arm["arm"], arm["flip_rate"], lr, seed):
                return r
        runs.append(run(args, workdir, sizes, pool, dev_path, arm, lr, seed))
        save_all()
        dev = "" if runs[-1]["dev_R"] is None else f", dev R {runs[-1]['dev_R']:.4f}"
        print(f"{runs[-1]['arm']} flip {arm['flip_rate']:g} lr {lr:g} seed {seed}: held-out R "
              f"{runs[-1]['heldout_R']:.4f}{dev} ({runs[-1]['wall_seconds'] / 60:.1f} min)", flush=True)
        return runs[-1]

    for arm in arms:
        key = f"{arm['arm']}@{arm['flip_rate']:g}"
        trials = [run_once(arm, lr, sizes["seeds"][0]) for lr in sizes["lrs"]]
        selected[key] = max(trials, key=lambda r: r["dev_R"])["lr"]
        for seed in sizes["seeds"][1:]:
            run_once(arm, selected[key], seed)
    save_all()
    rows, summary = summarise(arms, runs, selected)
    print(table(["arm", "flipped", "lr", "seeds", "held-out R mean", "s.e.", "flipped pairs R (true) at end"], rows))
    for rate in sizes["flip_rates"]:
        dpo, rdpo = summary[f"dpo@{rate:g}"], summary[f"rdpo_true_eps@{rate:g}"]
        gap = rdpo["heldout_R_mean"] - dpo["heldout_R_mean"]
        se = math.hypot(rdpo["heldout_R_se"], dpo["heldout_R_se"])
        print(f"{rate:.0%} flipped: rDPO (true eps) - DPO = {100 * gap:+.1f} points (s.e. {100 * se:.1f}): "
              f"{'rDPO better by more than 2 s.e.' if gap > 2 * se else 'not shown'}")
    plot(arms, runs, selected, summary, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
