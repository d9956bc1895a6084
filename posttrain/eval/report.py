"""Reports a person reads: `report.json` (every number and its inputs), `pairs.jsonl` (one line per
pair, worst-ranked first), `summary.md` (tables) and PNG plots:

- `training_curve.png`: held-out R and R~ over training steps against R* / R~* (when there is a history);
- `ranking_vs_beta.png`: R* and R~* for each beta against R and R~;
- `difficulty.png`: histogram of the difficulty c, split by pairs ranked right and wrong.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _num(x, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


# ---------------------------------------------------------------------------------------------- plots


def plot_training_curve(history: list[dict], metrics: Optional[dict] = None):
    """R and R~ over steps (`history`: dicts with step, ranking_accuracy, ranking_accuracy_normalised and,
    when known, R_star/min|median|max and R_star_normalised/median) against the idealised accuracies."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["ranking_accuracy"] for h in history], "o-", color="C0", label="R (summed log-probs)")
    ax.plot(steps, [h.get("ranking_accuracy_normalised") for h in history], "s--", color="C1",
            label="R~ (mean token log-probs)")
    last = {**(history[-1] if history else {})}
    if metrics and "idealised" in metrics:
        s, sn = metrics["idealised"]["R_star_summary"], metrics["idealised"]["R_star_normalised_summary"]
        last.update({"R_star/min": s["min"], "R_star/median": s["median"], "R_star/max": s["max"],
                     "R_star_normalised/median": sn["median"]})
    if "R_star/median" in last:
        lo, hi = (steps[0], steps[-1]) if steps else (0, 1)
        ax.axhline(last["R_star/median"], color="C2", label="R* (median over beta)")
        ax.fill_between([lo, hi], last["R_star/min"], last["R_star/max"], color="C2", alpha=0.15,
                        label="R* min to max over beta")
        ax.axhline(last["R_star_normalised/median"], color="C3", linestyle=":", label="R~* (median over beta)")
    ax.set_xlabel("training step")
    ax.set_ylabel("ranking accuracy on held-out pairs")
    ax.set_title("Ranking accuracy during training vs idealised R*")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def plot_ranking_vs_beta(metrics: dict):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ideal = metrics["idealised"]
    betas = ideal["betas"]
    ax.plot(betas, [ideal["R_star"][str(b)] for b in betas], "o-", color="C2", label="R* (idealised, summed)")
    ax.plot(betas, [ideal["R_star_normalised"][str(b)] for b in betas], "s--", color="C3",
            label="R~* (idealised, length-normalised)")
    ax.axhline(metrics["ranking_accuracy"], color="C0", label=f"R = {_pct(metrics['ranking_accuracy'])}")
    ax.axhline(metrics["ranking_accuracy_normalised"], color="C1", linestyle=":",
               label=f"R~ = {_pct(metrics['ranking_accuracy_normalised'])}")
    ax.set_xscale("log")
    ax.set_xlabel("beta (DPO/RLHF KL strength)")
    ax.set_ylabel("ranking accuracy")
    ax.set_title("Idealised ranking accuracy R* per beta vs the model's R")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def plot_difficulty(c: np.ndarray, correct: np.ndarray):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    c, correct = np.asarray(c, dtype=float), np.asarray(correct).astype(bool)
    finite = np.isfinite(c)
    values = c[finite]
    bins = np.histogram_bin_edges(values, bins=min(40, max(5, int(np.sqrt(max(len(values), 1)))))) \
        if len(values) else 10
    ax.hist(c[finite & correct], bins=bins, alpha=0.6, color="C2", label=f"ranked right (R=1): {int(correct.sum())}")
    ax.hist(c[finite & ~correct], bins=bins, alpha=0.6, color="C3",
            label=f"ranked wrong (R=0): {int((~correct).sum())}")
    ax.axvline(0.0, color="black", linewidth=1, label="c = 0 (reference indifferent)")
    ax.set_xlabel("difficulty c = log pi_ref(y_l) - log pi_ref(y_w)  (nats; c > 0: reference ranks wrongly)")
    ax.set_ylabel("number of pairs")
    ax.set_title("Difficulty of the pairs, by whether the model ranks them right")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def save_figure(fig, path: Path) -> Path:
    plt = _plt()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- markdown


def markdown_summary(report: dict, worst: list[dict], plots: list[str]) -> str:
    m, inputs = report["metrics"], report["inputs"]
    lines = ["# Ranking-accuracy evaluation", ""]
    adapter = f", adapter `{inputs['adapter']}`" if inputs.get("adapter") else ""
    lines.append(f"Model `{inputs.get('model')}`{adapter}; reference: {inputs.get('reference')}.")
    why = f" ({inputs['format_source']})" if inputs.get("format_source") else ""
    lines.append(f"Data `{inputs.get('data')}`, format **{inputs.get('format')}**{why}, {m['pairs']} pairs"
                 f" ({m['ties']} ties with alpha = 0.5); alpha: {inputs.get('alpha_source')}.")
    read = f"{inputs['rows_read']} rows read. " if inputs.get("rows_read") is not None else ""
    if inputs.get("excluded"):
        reasons = "; ".join(f"{n} {why}" for why, n in inputs["excluded"].items())
        lines.append(f"{read}Excluded before scoring: {reasons}.")
    elif read:
        lines.append(f"{read}None excluded.")
    lines += ["", "| metric | value | 95% bootstrap interval |", "|---|---|---|"]
    ci = m["ranking_accuracy_ci95"]
    lines.append(f"| ranking accuracy R | {_pct(m['ranking_accuracy'])} | {_pct(ci[0])} to {_pct(ci[1])} |")
    ci = m["ranking_accuracy_normalised_ci95"]
    lines.append(f"| length-normalised R~ | {_pct(m['ranking_accuracy_normalised'])} | "
                 f"{_pct(ci[0])} to {_pct(ci[1])} |")
    if "idealised" in m:
        s, sn = m["idealised"]["R_star_summary"], m["idealised"]["R_star_normalised_summary"]
        lines.append(f"| idealised R* (min / median / max over beta) | {_pct(s['min'])} / {_pct(s['median'])} / "
                     f"{_pct(s['max'])} | |")
        lines.append(f"| idealised R~* (min / median / max) | {_pct(sn['min'])} / {_pct(sn['median'])} / "
                     f"{_pct(sn['max'])} | |")
        g, gn = m["alignment_gap_ci95"], m["alignment_gap_normalised_ci95"]
        lines.append(f"| alignment gap (median R* - R) | {100 * m['alignment_gap']:+.1f} points | "
                     f"{100 * g[0]:+.1f} to {100 * g[1]:+.1f} |")
        lines.append(f"| alignment gap, length-normalised | {100 * m['alignment_gap_normalised']:+.1f} points | "
                     f"{100 * gn[0]:+.1f} to {100 * gn[1]:+.1f} |")
        lines.append(f"| pairs the reference ranks wrongly (c > 0) | "
                     f"{_pct(m['difficulty']['reference_wrong_share'])} | |")
    if "implicit_reward_accuracy" in m:
        lines.append(f"| implicit-reward accuracy (policy vs reference) | {_pct(m['implicit_reward_accuracy'])} | |")
        lines.append(f"| mean DPO loss (beta = {m['difficulty']['dpo_beta']:g}) | {_num(m['dpo_loss_mean'])} | |")
        lines.append(f"| pairs breaking Theorem 4.1 (should be 0) | {m['theorem_4_1_violations']} | |")
    if "idealised" in m:
        ideal = m["idealised"]
        lines += ["", f"## Idealised accuracy per beta (eps = {ideal['eps']:g} where alpha = 1)", "",
                  "| beta | R* | R~* |", "|---|---|---|"]
        for b in ideal["betas"]:
            lines.append(f"| {b:g} | {_pct(ideal['R_star'][str(b)])} | {_pct(ideal['R_star_normalised'][str(b)])} |")
        sens = m["eps_sensitivity"]
        lines += ["", f"How much R* depends on eps ({sens['pairs_with_alpha_1']} pairs have alpha = 1):", "",
                  "| eps | median R* | median R~* |", "|---|---|---|"]
        for e, v in sens["by_eps"].items():
            lines.append(f"| {float(e):g} | {_pct(v['R_star_median'])} | {_pct(v['R_star_normalised_median'])} |")
        d = m["difficulty"]
        lines += ["", "## Difficulty c = log pi_ref(y_l) - log pi_ref(y_w)", "",
                  "| pairs | mean c | median c | 10th pct | 90th pct |", "|---|---|---|---|---|"]
        for name, key in (("all", "c"), ("ranked right", "c_ranked_right"), ("ranked wrong", "c_ranked_wrong")):
            s = d[key]
            lines.append(f"| {name} | {_num(s['mean'])} | {_num(s['median'])} | {_num(s['p10'])} | {_num(s['p90'])} |")
        t = d["threshold"][str(d["dpo_beta"])] if str(d["dpo_beta"]) in d["threshold"] else None
        if t:
            lines.append("")
            lines.append(f"DPO-loss threshold -log sigmoid(beta c) at beta = {d['dpo_beta']:g}: median "
                         f"{_num(t['median'])}, mean {_num(t['mean'])} (a pair is ranked right iff its DPO loss is at "
                         f"most its threshold).")
    lines += ["", "## Ranking accuracy by length", "", "| pairs | n | R | R~ |", "|---|---|---|---|"]
    for name, part in m["length_split"].items():
        lines.append(f"| {name.replace('_', ' ')} | {part['pairs']} | {_pct(part['ranking_accuracy'])} | "
                     f"{_pct(part['ranking_accuracy_normalised'])} |")
    if worst:
        lines += ["", "## Worst-ranked pairs (largest log pi(y_l) - log pi(y_w))", "",
                  "| source row | S_w - S_l | c | chosen (start) | rejected (start) |", "|---|---|---|---|---|"]
        for w in worst:
            clip = lambda s: (s or "").strip().replace("\n", " ").replace("|", "\\|")[:60]  # noqa: E731
            lines.append(f"| {w.get('row')} | {_num(w['margin'])} | {_num(w.get('c'))} | "
                         f"{clip(w.get('chosen_text'))} | {clip(w.get('rejected_text'))} |")
    if report.get("scoring"):
        lines += ["", "## Scoring", ""]
        for name, s in report["scoring"].items():
            lines.append(f"- {name}: {s['pairs']} pairs in {s['seconds']:.1f} s ({s['pairs_per_second']:.2f} pairs/s), "
                         f"layout {s['layout']}, {s['forward_passes']} forward passes, "
                         f"{100 * s['padding_share']:.1f}% padded positions")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- files


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def write_report(out_dir, report: dict, pair_records: list[dict], history: Optional[list[dict]] = None,
                 worst: int = 10) -> dict:
    """Write report.json, pairs.jsonl, summary.md and the plots into `out_dir`; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = report["metrics"]
    ordered = sorted(pair_records, key=lambda p: p["margin"])  # worst-ranked first
    files = {"report": out / "report.json", "pairs": out / "pairs.jsonl", "summary": out / "summary.md"}
    with files["pairs"].open("w", encoding="utf-8") as handle:
        for record in ordered:
            handle.write(json.dumps(_jsonable(record), ensure_ascii=False) + "\n")
    plots = []
    if history:
        files["training_curve"] = save_figure(plot_training_curve(history, m), out / "training_curve.png")
        plots.append("training_curve.png")
    if "idealised" in m:
        files["ranking_vs_beta"] = save_figure(plot_ranking_vs_beta(m), out / "ranking_vs_beta.png")
        plots.append("ranking_vs_beta.png")
        c = np.array([p["c"] for p in pair_records], dtype=float)
        correct = np.array([p["R"] for p in pair_records], dtype=float)
        files["difficulty"] = save_figure(plot_difficulty(c, correct), out / "difficulty.png")
        plots.append("difficulty.png")
    report = {**report, "files": {k: str(v) for k, v in files.items()}}
    if history:
        report["history"] = history
    files["report"].write_text(json.dumps(_jsonable(report), indent=2, ensure_ascii=False))
    files["summary"].write_text(markdown_summary(report, ordered[:worst], plots), encoding="utf-8")
    return {k: str(v) for k, v in files.items()}
