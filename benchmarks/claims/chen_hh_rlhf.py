"""Claim (Chen et al. 2024, "Preference Learning Algorithms Do Not Learn Preference Rankings"; spec section 11):
on real preference data DPO barely changes ranking accuracy R, while the implicit-reward accuracy it optimises
climbs and the alignment gap stays large; and pairs the reference ranks wrong by a large margin c are almost never
flipped (issue 15, items 1 and 2).

Set-up, fixed before the full run:
- data: `../shared/data/hh-rlhf/helpful-base/test.jsonl` (format hh, read in place). Rows whose chosen and rejected
  dialogues are identical (they can neither be ranked right nor flipped) and the loader's invalid rows are left out
  and counted. Of the remaining rows, in file order, the first 1,100 train (at least 1,000 pairs once the loader's
  invalid rows and prompts that leave no room within max_length are left out) and rows 1,200 to 1,455 (256) are
  held out: never trained on. The first 128 training pairs are also scored before and after.
- SmolLM2-135M-Instruct, LoRA r 16 / alpha 32 on all linear layers, DPO beta 0.1 (the reference is the adapter-off
  base), AdamW lr 5e-4 with 4 warm-up steps and cosine decay, 16 pairs a step, one epoch (about 66 steps),
  `data.max_length` 384 (keep_start truncation, counted), seed 0.
- two rows: `template: plain` (the raw "Human: ... Assistant:" text, as the paper scores) and `template: chat` (the
  dialogue split into turns and rendered with SmolLM2's chat template).
- held-out R, R~ and implicit-reward accuracy every 20 steps (the trainer's evaluation); before and after, on the
  held-out and the scored training pairs: R, R~, median R*, the alignment gap (bootstrap 95% intervals, 1,000
  resamples), implicit-reward accuracy, the pairs whose ranking flipped each way, and Theorem 4.1's check on every
  pair (ranked right iff its DPO loss is at most its threshold -log sigmoid(beta c)).
- difficulty c = S_ref(y_l) - S_ref(y_w) in bins (-inf, -5], (-5, 0], (0, 2], (2, 5], (5, 10], (10, 20], (20, inf)
  nats: per bin the pairs, the share flipped to right (of those the reference ranked wrong) and to wrong (of those
  it ranked right).

    python benchmarks/claims/chen_hh_rlhf.py                 # both rows, one after the other
    python benchmarks/claims/chen_hh_rlhf.py --templates plain --threads 1 --out benchmarks/results/chen_hh_rlhf_plain.json
    python benchmarks/claims/chen_hh_rlhf.py --smoke         # tiny model, 32 pairs, seconds
    python benchmarks/claims/chen_hh_rlhf.py --combine A.json,B.json   # plot rows of separate runs together
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
from _harness import ROOT, merge, parse_args, save, table, tiny_model_dir

from posttrain.eval.metrics import bootstrap_ci, ranking_metrics
from posttrain.recipe import load_recipe
from posttrain.trainer import Trainer

HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "helpful-base" / "test.jsonl"
BETA = 0.1
FULL = {"train": 1100, "heldout_start": 1200, "heldout": 256, "scored_train": 128, "eval_every": 20}
SMOKE = {"train": 32, "heldout_start": 40, "heldout": 16, "scored_train": 16, "eval_every": 1}
BIN_EDGES = (-math.inf, -5.0, 0.0, 2.0, 5.0, 10.0, 20.0, math.inf)


def distinct_pairs_file(workdir: Path) -> tuple[Path, int]:
    """The HH rows whose two dialogues differ, written (unchanged) to the work directory; how many were left out."""
    out = workdir / "helpful-base-distinct.jsonl"
    kept, identical = [], 0
    for line in HH.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("chosen") == record.get("rejected"):
            identical += 1
            continue
        kept.append(line)
    out.write_text("\n".join(kept) + "\n", encoding="utf-8")
    return out, identical


def recipe(args, workdir: Path, data: Path, template: str, sizes: dict) -> dict:
    source = {"path": str(data), "format": "hh"}
    raw = {
        "run": {"output_dir": str(workdir / template), "seed": 0, "num_threads": args.threads},
        "model": {"name_or_path": "smollm2-135m-instruct"},
        "lora": {"enabled": True, "r": 16, "alpha": 32, "target_modules": "all-linear"},
        "data": {"train": {**source, "limit": sizes["train"]},
                 "heldout": {**source, "start": sizes["heldout_start"], "limit": sizes["heldout"]},
                 "template": template, "max_length": 384, "invalid_rows": "skip"},
        "loss": {"name": "dpo", "params": {"beta": BETA}},
        "train": {"lr": 5e-4, "batch_size": 16, "micro_batch_size": 8, "epochs": 1, "warmup_steps": 4,
                  "lr_scheduler": "cosine"},
        "logging": {"progress_bar": False, "report_to": ["jsonl"]},
        "eval": {"every": sizes["eval_every"], "at_start": False, "at_end": False, "batch_size": 16, "report": False},
        "checkpoint": {"every": 0},
    }
    if args.smoke:
        raw = merge(raw, model={"name_or_path": str(tiny_model_dir(workdir))},
                    data={**raw["data"], "max_length": 128}, train={**raw["train"], "lr": 2e-2, "max_steps": 2,
                                                                   "warmup_steps": 0})
    return raw


def flips(before: np.ndarray, after: np.ndarray) -> dict:
    return {"to_right": int((~before & after).sum()), "to_wrong": int((before & ~after).sum()),
            "wrong_before": int((~before).sum()), "right_before": int(before.sum())}


def difficulty_bins(c: np.ndarray, before: np.ndarray, after: np.ndarray) -> list[dict]:
    rows = []
    for low, high in zip(BIN_EDGES[:-1], BIN_EDGES[1:]):
        inside = (c > low) & (c <= high)
        wrong, right = inside & ~before, inside & before
        rows.append({"bin": f"({low:g}, {high:g}]", "c_low": low if math.isfinite(low) else None,
                     "c_high": high if math.isfinite(high) else None, "pairs": int(inside.sum()),
                     "wrong_before": int(wrong.sum()), "flipped_to_right": int((wrong & after).sum()),
                     "share_flipped_to_right": float((wrong & after).sum() / wrong.sum()) if wrong.any() else None,
                     "right_before": int(right.sum()), "flipped_to_wrong": int((right & ~after).sum()),
                     "share_flipped_to_wrong": float((right & ~after).sum() / right.sum()) if right.any() else None})
    return rows


def before_after(name: str, reference, policy) -> dict:
    """Section-11 numbers before (the policy is its reference) and after training, on one set of pairs."""
    arrays = lambda s: [s.chosen_logps.numpy(), s.rejected_logps.numpy(), s.chosen_lengths.numpy(),  # noqa: E731
                        s.rejected_lengths.numpy()]
    ref_w, ref_l = reference.chosen_logps.numpy(), reference.rejected_logps.numpy()
    m0, p0 = ranking_metrics(*arrays(reference), ref_w, ref_l, dpo_beta=BETA, reference_is_policy=True)
    m1, p1 = ranking_metrics(*arrays(policy), ref_w, ref_l, dpo_beta=BETA)
    right0, right1 = p0["R"].astype(bool), p1["R"].astype(bool)
    implicit = p1["implicit_correct"]
    summary = lambda m: {  # noqa: E731
        "R": m["ranking_accuracy"], "R_ci95": m["ranking_accuracy_ci95"],
        "R_normalised": m["ranking_accuracy_normalised"], "R_normalised_ci95": m["ranking_accuracy_normalised_ci95"],
        "R_star_median": m["idealised"]["R_star_summary"]["median"], "alignment_gap": m["alignment_gap"],
        "alignment_gap_ci95": m["alignment_gap_ci95"]}
    return {"set": name, "pairs": len(ref_w), "before": summary(m0),
            "after": {**summary(m1), "implicit_reward_accuracy": m1["implicit_reward_accuracy"],
                      "implicit_reward_accuracy_ci95": list(bootstrap_ci(implicit, 1000, 1)),
                      "dpo_loss_mean": m1["dpo_loss_mean"], "theorem_4_1_violations": m1["theorem_4_1_violations"]},
            "flips": flips(right0, right1), "difficulty_bins": difficulty_bins(p1["c"], right0, right1),
            "median_c": float(np.median(p1["c"]))}


def run(args, workdir: Path, data: Path, template: str, sizes: dict) -> dict:
    started = time.time()
    trainer = Trainer(load_recipe(raw=recipe(args, workdir, data, template, sizes)), force=True)
    trainer.setup()
    scored_train = trainer.train_pairs[:sizes["scored_train"]]
    heldout = trainer.heldout_pairs
    reference = {"heldout": trainer.score(heldout), "train": trainer.score(scored_train)}  # fresh LoRA = reference
    summary = trainer.train()
    policy = {"heldout": trainer.score(heldout), "train": trainer.score(scored_train)}
    sets = {name: before_after(name, reference[name], policy[name]) for name in ("heldout", "train")}
    lines = [json.loads(line) for line in (workdir / template / "metrics.jsonl").read_text().splitlines()]
    # before and after come from the scores above (at step 0 every implicit margin is exactly 0: no accuracy)
    held = sets["heldout"]
    point = lambda step, r, r_normalised, implicit: {  # noqa: E731
        "step": step, "R": r, "R_normalised": r_normalised, "implicit_reward_accuracy": implicit}
    end = trainer.plan.total_steps
    curve = ([point(0, held["before"]["R"], held["before"]["R_normalised"], None)]
             + [point(m["step"], m["eval/ranking_accuracy"], m["eval/ranking_accuracy_normalised"],
                      m.get("eval/implicit_reward_accuracy")) for m in lines
                if "eval/ranking_accuracy" in m and m["step"] < end]
             + [point(end, held["after"]["R"], held["after"]["R_normalised"],
                      held["after"]["implicit_reward_accuracy"])])
    losses = [{"step": m["step"], "loss": m["loss"], "train_implicit_accuracy": m.get("rewards/accuracies")}
              for m in lines if "loss" in m and "eval/ranking_accuracy" not in m]
    return {"template": template, "train_pairs": len(trainer.train_pairs), "heldout_pairs": len(heldout),
            "steps": trainer.plan.total_steps, "wall_seconds": time.time() - started,
            "train_seconds": summary["train_seconds"],
            "sets": sets, "curve": curve, "losses": losses}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for result in results:
        curve, template = result["curve"], result["template"]
        steps = [c["step"] for c in curve]
        left.plot(steps, [c["R"] for c in curve], "o-", label=f"{template}: ranking accuracy R")
        left.plot(steps, [c["implicit_reward_accuracy"] if c["implicit_reward_accuracy"] is not None else float("nan")
                          for c in curve], "s--", label=f"{template}: implicit-reward accuracy")
        steps, losses = [m["step"] for m in result["losses"]], [m["loss"] for m in result["losses"]]
        right.plot(steps, losses, alpha=0.3, label=f"{template}: per step")
        window = 8
        right.plot(steps, [sum(losses[max(0, i - window + 1):i + 1]) / min(i + 1, window) for i in range(len(losses))],
                   label=f"{template}: mean of the last {window} steps")
    left.set(xlabel="step", ylabel="held-out accuracy", title="held-out pairs", ylim=(0, 1))
    left.legend(fontsize=7)
    right.set(xlabel="step", ylabel="DPO loss", title="training loss")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bins(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / (2 * len(results))
    k = 0
    for result in results:
        for name, sets in result["sets"].items():
            bins = [b for b in sets["difficulty_bins"] if b["c_low"] is not None and b["c_low"] >= 0]
            shares = [b["share_flipped_to_right"] if b["share_flipped_to_right"] is not None else 0.0 for b in bins]
            ax.bar(np.arange(len(bins)) + k * width, shares, width, label=f"{result['template']}, {name}")
            k += 1
    ax.set_xticks(np.arange(len(bins)) + 0.4 - width / 2, [b["bin"] for b in bins])
    ax.set(xlabel="difficulty c = S_ref(y_l) - S_ref(y_w) (nats)", ylabel="share flipped to right",
           title="pairs the reference ranked wrong: flipped by DPO")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_all(results: list[dict], out: Path) -> None:
    """The accuracy and loss curves and the difficulty bars, next to the result JSON `out`."""
    plot(results, out.with_suffix(".png"))
    plot_bins(results, out.with_name(out.stem + "_difficulty.png"))


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0], extra=[
        ("--templates", {"default": "plain,chat"}),
        ("--combine", {"default": None, "help": "comma-separated result JSONs: plot their rows together, train nothing"})])
    if args.combine:
        results = [r for path in args.combine.split(",") for r in json.loads(Path(path).read_text())["results"]]
        plot_all(results, Path(args.out) if args.out else ROOT / "benchmarks" / "results" / "chen_hh_rlhf.json")
        return
    if not HH.is_file():
        raise SystemExit(f"{HH} is missing: this claim reads the shared HH-RLHF data (../shared/data/README.md).")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="claims-chen-"))
    workdir.mkdir(parents=True, exist_ok=True)
    sizes = SMOKE if args.smoke else FULL
    data, identical = distinct_pairs_file(workdir)
    results = []
    for template in args.templates.split(","):
        results.append(run(args, workdir, data, template, sizes))
        print(f"{template}: done in {results[-1]['wall_seconds'] / 60:.1f} min", flush=True)
    rows = []
    for result in results:
        for name, s in result["sets"].items():
            b, a, f = s["before"], s["after"], s["flips"]
            rows.append([result["template"], name, s["pairs"], b["R"], a["R"], b["R_normalised"], a["R_normalised"],
                         a["implicit_reward_accuracy"], a["R_star_median"], a["alignment_gap"],
                         f"+{f['to_right']} / -{f['to_wrong']}", a["theorem_4_1_violations"]])
    print(table(["template", "pairs", "n", "R before", "R after", "R~ before", "R~ after", "implicit acc after",
                 "median R* after", "gap after", "flips", "Thm 4.1 violations"], rows))
    verdicts = {}
    for result in results:
        held = result["sets"]["heldout"]
        moved = held["after"]["R"] - held["before"]["R"]
        verdicts[result["template"]] = {
            "R_change_points": 100 * moved,
            "implicit_minus_R_points": 100 * (held["after"]["implicit_reward_accuracy"] - held["after"]["R"]),
            "holds": abs(moved) <= 0.05 and held["after"]["implicit_reward_accuracy"] >= held["after"]["R"] + 0.1
            and held["after"]["alignment_gap"] >= 0.1}
        print(f"{result['template']}: R moved {100 * moved:+.1f} points; implicit-reward accuracy "
              f"{held['after']['implicit_reward_accuracy']:.3f} vs R {held['after']['R']:.3f}; gap "
              f"{held['after']['alignment_gap']:.3f}: claim {'holds' if verdicts[result['template']]['holds'] else 'does NOT hold'}")
    out = save(args, "chen_hh_rlhf", {
        "claim": "DPO barely moves R on HH-RLHF while implicit-reward accuracy rises; hard pairs are not flipped",
        "verdicts": verdicts, "identical_rows_left_out": identical, "sizes": sizes, "beta": BETA,
        "results": results})
    plot_all(results, out)


if __name__ == "__main__":
    main()
