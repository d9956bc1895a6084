"""`posttrain plot RUN`: PNGs of a run's logged metrics against step, from its metrics.jsonl.

One figure a panel, each only when the run logged its metrics: the training loss; the implicit rewards
(pairs: rewards/chosen, rewards/rejected, rewards/margins) or the sampled rewards (groups: reward/mean with
its std band); accuracy (pairs: rewards/accuracies, the reward accuracy; groups: pass@1 of the samples); the
held-out evaluations (eval/ranking_accuracy, its length-normalised form, R* and implicit-reward accuracy for
pairs; eval/pass@1 for groups).
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.errors import PosttrainError
from posttrain.eval.report import _plt, save_figure

PANELS = [  # file, title, y label, [(metric, legend)]
    ("loss.png", "Training loss", "loss", [("loss", "loss")]),
    ("rewards.png", "Implicit rewards (beta * log-ratio to the reference)", "reward",
     [("rewards/chosen", "chosen"), ("rewards/rejected", "rejected"), ("rewards/margins", "margin")]),
    ("rewards.png", "Sampled rewards", "reward", [("reward/mean", "mean reward"), ("pass@1", "pass@1 (samples)")]),
    ("accuracy.png", "Reward accuracy (share of pairs with r_w > r_l; not ranking accuracy)", "share",
     [("rewards/accuracies", "reward accuracy")]),
    ("heldout.png", "Held-out evaluation", "value",
     [("eval/ranking_accuracy", "ranking accuracy R"), ("eval/ranking_accuracy_normalised", "R~ (length-normalised)"),
      ("eval/R_star/median", "median R*"), ("eval/implicit_reward_accuracy", "implicit-reward accuracy"),
      ("eval/pass@1", "greedy pass@1")]),
]


def read_metrics(run: Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise PosttrainError(f"{run} holds no metrics.jsonl: give a run directory (run.output_dir of a recipe).")
    lines = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise PosttrainError(f"{path}, line {number}: invalid JSON ({exc.msg}).") from None
    return lines


def plot_run(run: Path, output: Path) -> list[Path]:
    """The panels the run has metrics for, written to `output`; returns their paths."""
    lines = read_metrics(run)
    output.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    plt = _plt()
    for name, title, ylabel, series in PANELS:
        present = [(key, label) for key, label in series if any(key in line for line in lines)]
        if not present or output / name in written:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label in present:
            points = sorted((line["step"], line[key]) for line in lines if key in line and "step" in line)
            ax.plot([s for s, _ in points], [v for _, v in points], marker="o" if len(points) < 30 else None,
                    label=label)
        if any("reward/std" in line for line in lines) and name == "rewards.png" and present[0][0] == "reward/mean":
            band = sorted((line["step"], line["reward/mean"], line["reward/std"]) for line in lines
                          if "reward/std" in line and "reward/mean" in line)
            ax.fill_between([s for s, _, _ in band], [m - d for _, m, d in band], [m + d for _, m, d in band],
                            alpha=0.2, label="mean +- std")
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        written.append(save_figure(fig, output / name))
    if not written:
        raise PosttrainError(f"{run}/metrics.jsonl has no step metrics to plot (loss, rewards, evaluations).")
    return written
