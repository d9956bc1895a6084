"""The numbers of spec section 11 (Chen et al. 2024, "Preference Learning Algorithms Do Not Learn
Preference Rankings"), from summed completion log-probs and token counts. numpy only.

Per pair i, with S = summed log-prob, A = S / |y| (mean token log-prob), ref = the reference model:

    R_i      = 1[S_w >= S_l]                 (alpha_i = 0.5: tie, correct iff |S_w - S_l| < 0.01)
    R~_i     = 1[A_w >= A_l]                 (alpha_i = 0.5: correct iff |exp A_w - exp A_l| < 0.01)
    R*_i(b)  = 1[S_ref_w - S_ref_l + (1/b) log(alpha_i / max(1 - alpha_i, eps)) > 0]     (strict)
    R~*_i(b) = the same with A_ref
    c_i      = S_ref_l - S_ref_w             (difficulty; c > 0: the reference ranks the pair wrongly)
    thr_i(b) = -log sigmoid(b c_i)           (DPO loss the pair must reach to be ranked right, Thm 4.1)
    h_i      = (S_w - S_l) - (S_ref_w - S_ref_l);  L_DPO_i(b) = -log sigmoid(b h_i)
    implicit-reward accuracy = mean 1[h_i > 0]

The alignment gap is median over the betas of R* minus R (and of R~* minus R~).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

TIE_THRESHOLD = 0.01  # Chen et al. App. C / code `tie_threshold`
DEFAULT_BETAS = (0.01, 0.1, 1.0, 5.0, 10.0)  # Chen et al. Table 1
DEFAULT_EPS = 1e-3  # loser fraction used when alpha = 1 (paper App. C.4, code `a1/eps`)
EPS_SENSITIVITY = (1e-2, 1e-3, 1e-4, 1e-6)


def _array(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def alpha_array(alpha, n: int) -> np.ndarray:
    """Per-pair alpha from None (1 everywhere), a scalar, or a sequence (None entries -> 1)."""
    if alpha is None:
        return np.ones(n)
    if np.isscalar(alpha):
        return np.full(n, float(alpha))
    values = np.array([1.0 if a is None else float(a) for a in alpha], dtype=np.float64)
    if len(values) != n:
        raise ValueError(f"{len(values)} alpha values for {n} pairs")
    return values


def is_tie(alpha: np.ndarray) -> np.ndarray:
    return np.isclose(alpha, 0.5, rtol=0, atol=1e-12)


def ranking_correct(s_w, s_l, alpha=None, tie_threshold: float = TIE_THRESHOLD) -> np.ndarray:
    s_w, s_l = _array(s_w), _array(s_l)
    ties = is_tie(alpha_array(alpha, len(s_w)))
    return np.where(ties, np.abs(s_w - s_l) < tie_threshold, s_w >= s_l).astype(np.float64)


def normalised_ranking_correct(a_w, a_l, alpha=None, tie_threshold: float = TIE_THRESHOLD) -> np.ndarray:
    a_w, a_l = _array(a_w), _array(a_l)
    ties = is_tie(alpha_array(alpha, len(a_w)))
    return np.where(ties, np.abs(np.exp(a_w) - np.exp(a_l)) < tie_threshold, a_w >= a_l).astype(np.float64)


def log_odds(alpha: np.ndarray, eps: float = DEFAULT_EPS) -> np.ndarray:
    """log(alpha / (1 - alpha)) with the loser fraction floored at eps (alpha = 1 -> log(1/eps))."""
    return np.log(alpha) - np.log(np.maximum(1.0 - alpha, eps))


def idealised_correct(ref_w, ref_l, alpha, beta: float, eps: float = DEFAULT_EPS) -> np.ndarray:
    """R*_i (or R~*_i with mean log-probs) under the DPO/RLHF optimum, strict inequality."""
    ref_w, ref_l = _array(ref_w), _array(ref_l)
    a = alpha_array(alpha, len(ref_w))
    return ((ref_w - ref_l) + log_odds(a, eps) / beta > 0).astype(np.float64)


def difficulty(ref_w, ref_l) -> np.ndarray:
    """c = log pi_ref(y_l) - log pi_ref(y_w)."""
    return _array(ref_l) - _array(ref_w)


def neg_log_sigmoid(x) -> np.ndarray:
    """-log sigmoid(x) = log(1 + exp(-x)), stable."""
    return np.logaddexp(0.0, -_array(x))


def difficulty_threshold(c, beta: float) -> np.ndarray:
    """The DPO loss at or below which the pair is ranked right (Thm 4.1): -log sigmoid(beta c)."""
    return neg_log_sigmoid(beta * _array(c))


def dpo_margin(s_w, s_l, ref_w, ref_l) -> np.ndarray:
    """h = (S_w - S_l) - (S_ref_w - S_ref_l)."""
    return (_array(s_w) - _array(s_l)) - (_array(ref_w) - _array(ref_l))


def dpo_loss(h, beta: float) -> np.ndarray:
    return neg_log_sigmoid(beta * _array(h))


def bootstrap_ci(values, samples: int = 1000, seed: int = 0, level: float = 0.95,
                 statistic=None) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (or of `statistic(resampled index)`)."""
    values = _array(values)
    n = len(values)
    if n == 0 or samples <= 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    index = rng.integers(0, n, size=(samples, n))
    stats = values[index].mean(axis=1) if statistic is None else np.array([statistic(i) for i in index])
    low, high = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(low), float(high)


def _mean(x: np.ndarray) -> Optional[float]:
    return float(np.mean(x)) if len(x) else None


def _summary(x: np.ndarray) -> dict:
    if not len(x):
        return {"mean": None, "median": None, "p10": None, "p90": None}
    return {"mean": float(np.mean(x)), "median": float(np.median(x)), "p10": float(np.quantile(x, 0.1)),
            "p90": float(np.quantile(x, 0.9))}


def _min_median_max(values: dict) -> dict:
    v = np.array(list(values.values()), dtype=np.float64)
    return {"min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())}


def ranking_metrics(s_w, s_l, n_w, n_l, ref_w=None, ref_l=None, alpha=None, *,
                    betas: Sequence[float] = DEFAULT_BETAS, eps: float = DEFAULT_EPS,
                    tie_threshold: float = TIE_THRESHOLD, dpo_beta: float = 0.1,
                    reference_is_policy: bool = False, bootstrap: int = 1000, seed: int = 0,
                    eps_grid: Sequence[float] = EPS_SENSITIVITY) -> tuple[dict, dict]:
    """All section-11 numbers. Returns (metrics, per-pair arrays).

    `ref_w`/`ref_l` are the reference's summed log-probs; without them R*, the difficulty and the
    implicit reward are left out. `reference_is_policy` says the reference is the scored model itself
    (an untrained model): the implicit-reward accuracy and DPO losses are then not reported.
    """
    s_w, s_l, n_w, n_l = _array(s_w), _array(s_l), _array(n_w), _array(n_l)
    n = len(s_w)
    if n == 0:
        raise ValueError("no pairs to evaluate")
    if np.any(n_w <= 0) or np.any(n_l <= 0):
        raise ValueError("every response needs at least one token")
    betas = [float(b) for b in betas]
    if any(b <= 0 for b in betas) or dpo_beta <= 0:
        raise ValueError("betas must be positive")
    a = alpha_array(alpha, n)
    if np.any(a <= 0) or np.any(a > 1):
        raise ValueError("alpha (share of raters preferring the chosen response) must be in (0, 1]")
    a_w, a_l = s_w / n_w, s_l / n_l
    ties = is_tie(a)
    r = ranking_correct(s_w, s_l, a, tie_threshold)
    rn = normalised_ranking_correct(a_w, a_l, a, tie_threshold)
    pairs: dict = {"alpha": a, "tie": ties, "R": r, "R_normalised": rn, "margin": s_w - s_l,
                   "mean_margin": a_w - a_l}
    m: dict = {"pairs": n, "ties": int(ties.sum()),
               "ranking_accuracy": float(r.mean()), "ranking_accuracy_normalised": float(rn.mean()),
               "ranking_accuracy_ci95": list(bootstrap_ci(r, bootstrap, seed)),
               "ranking_accuracy_normalised_ci95": list(bootstrap_ci(rn, bootstrap, seed + 1)),
               "logps": {"chosen_mean": float(s_w.mean()), "rejected_mean": float(s_l.mean()),
                         "chosen_token_mean": float(a_w.mean()), "rejected_token_mean": float(a_l.mean())}}
    if ties.any():
        m["ranking_accuracy_non_tie"] = _mean(r[~ties])
        m["ranking_accuracy_ties"] = _mean(r[ties])
    longer, shorter, same = n_w > n_l, n_w < n_l, n_w == n_l
    m["length_split"] = {name: {"pairs": int(sel.sum()), "ranking_accuracy": _mean(r[sel]),
                                "ranking_accuracy_normalised": _mean(rn[sel])}
                         for name, sel in (("chosen_longer", longer), ("chosen_shorter", shorter),
                                           ("same_length", same))}
    if ref_w is None or ref_l is None:
        return m, pairs
    ref_w, ref_l = _array(ref_w), _array(ref_l)
    ref_aw, ref_al = ref_w / n_w, ref_l / n_l
    ideal = {b: idealised_correct(ref_w, ref_l, a, b, eps) for b in betas}
    ideal_n = {b: idealised_correct(ref_aw, ref_al, a, b, eps) for b in betas}
    star = {str(b): float(v.mean()) for b, v in ideal.items()}
    star_n = {str(b): float(v.mean()) for b, v in ideal_n.items()}
    m["idealised"] = {"betas": betas, "eps": eps, "R_star": star, "R_star_normalised": star_n,
                      "R_star_summary": _min_median_max(star), "R_star_normalised_summary": _min_median_max(star_n)}
    m["alignment_gap"] = m["idealised"]["R_star_summary"]["median"] - m["ranking_accuracy"]
    m["alignment_gap_normalised"] = m["idealised"]["R_star_normalised_summary"]["median"] - \
        m["ranking_accuracy_normalised"]
    stack, stack_n = np.stack([ideal[b] for b in betas]), np.stack([ideal_n[b] for b in betas])

    def gap(index, star_stack, acc):
        return float(np.median(star_stack[:, index].mean(axis=1)) - acc[index].mean())

    m["alignment_gap_ci95"] = list(bootstrap_ci(r, bootstrap, seed + 2, statistic=lambda i: gap(i, stack, r)))
    m["alignment_gap_normalised_ci95"] = list(bootstrap_ci(rn, bootstrap, seed + 3,
                                                           statistic=lambda i: gap(i, stack_n, rn)))
    # How much R* depends on eps, the loser fraction assumed where alpha = 1.
    sure = a >= 1.0 - 1e-12
    grid = sorted(set([float(e) for e in eps_grid] + [eps]), reverse=True)
    sens = {}
    for e in grid:
        per_beta = {str(b): float(idealised_correct(ref_w, ref_l, a, b, e).mean()) for b in betas}
        per_beta_n = {str(b): float(idealised_correct(ref_aw, ref_al, a, b, e).mean()) for b in betas}
        sens[str(e)] = {"R_star": per_beta, "R_star_median": _min_median_max(per_beta)["median"],
                        "R_star_normalised_median": _min_median_max(per_beta_n)["median"]}
    medians = [v["R_star_median"] for v in sens.values()]
    medians_n = [v["R_star_normalised_median"] for v in sens.values()]
    m["eps_sensitivity"] = {"pairs_with_alpha_1": int(sure.sum()), "by_eps": sens,
                            "R_star_median_range": [min(medians), max(medians)],
                            "R_star_normalised_median_range": [min(medians_n), max(medians_n)]}
    for b in betas:
        pairs[f"R_star@{b:g}"] = ideal[b]
        pairs[f"R_star_normalised@{b:g}"] = ideal_n[b]
    # Difficulty (Thm 4.1).
    c = difficulty(ref_w, ref_l)
    thr = {b: difficulty_threshold(c, b) for b in sorted(set(betas + [dpo_beta]))}
    correct = r.astype(bool)
    m["difficulty"] = {"dpo_beta": dpo_beta, "reference_wrong_share": float((c > 0).mean()),
                       "c": _summary(c), "c_ranked_right": _summary(c[correct]),
                       "c_ranked_wrong": _summary(c[~correct]),
                       "threshold": {str(b): _summary(t) for b, t in thr.items()}}
    pairs["c"] = c
    pairs["threshold"] = thr[dpo_beta]
    pairs["ref_margin"] = ref_w - ref_l
    if not reference_is_policy:
        h = dpo_margin(s_w, s_l, ref_w, ref_l)
        loss = dpo_loss(h, dpo_beta)
        plain = (s_w >= s_l)
        predicted = loss <= thr[dpo_beta]
        m["implicit_reward_accuracy"] = float((h > 0).mean())
        m["dpo_loss_mean"] = float(loss.mean())
        m["theorem_4_1_violations"] = int((plain != predicted).sum())
        pairs["h"] = h
        pairs["dpo_loss"] = loss
        pairs["implicit_correct"] = (h > 0).astype(np.float64)
    return m, pairs


def flat_metrics(m: dict) -> dict:
    """The scalars worth logging every evaluation during training (metrics.jsonl / TensorBoard)."""
    out = {"ranking_accuracy": m["ranking_accuracy"], "ranking_accuracy_normalised": m["ranking_accuracy_normalised"],
           "ranking_accuracy_ci_low": m["ranking_accuracy_ci95"][0],
           "ranking_accuracy_ci_high": m["ranking_accuracy_ci95"][1],
           "logps/chosen": m["logps"]["chosen_mean"], "logps/rejected": m["logps"]["rejected_mean"],
           "ties": m["ties"]}
    for name, part in m["length_split"].items():
        if part["pairs"]:
            out[f"length_split/{name}"] = part["ranking_accuracy"]
    if "idealised" in m:
        for key in ("min", "median", "max"):
            out[f"R_star/{key}"] = m["idealised"]["R_star_summary"][key]
            out[f"R_star_normalised/{key}"] = m["idealised"]["R_star_normalised_summary"][key]
        out["alignment_gap"] = m["alignment_gap"]
        out["alignment_gap_normalised"] = m["alignment_gap_normalised"]
        out["reference_wrong_share"] = m["difficulty"]["reference_wrong_share"]
    if "implicit_reward_accuracy" in m:
        out["implicit_reward_accuracy"] = m["implicit_reward_accuracy"]
        out["dpo_loss"] = m["dpo_loss_mean"]
        out["theorem_4_1_violations"] = m["theorem_4_1_violations"]
    return {k: v for k, v in out.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
