"""Evaluation (spec sections 11 and 12): the worked example, ties and the eps rule, scores equal to a
direct transformers forward (float64 tiny model, SmolLM2 fp32 on HH-RLHF), Theorem 4.1 on a trained
policy, metrics during training, reports and plots, PandaLM votes, gradient entanglement."""

from __future__ import annotations

import json
import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import SHARED_DATA, make_tiny_model
from helpers import recipe_from, tiny_recipe
from posttrain.cli import main
from posttrain.core import PolicyLogProbs
from posttrain.data.tokenize import TokenizedPair
from posttrain.errors import RecipeError
from posttrain.eval.entanglement import EntanglementDiagnostic, entanglement_metrics, gradient_entanglement
from posttrain.eval.metrics import bootstrap_ci, idealised_correct, ranking_metrics
from posttrain.eval.ranking import batches, score_pairs
from posttrain.eval.report import plot_difficulty, plot_ranking_vs_beta, plot_training_curve

HH = SHARED_DATA / "hh-rlhf" / "helpful-base" / "test.jsonl"
BETAS = [0.01, 0.1, 1.0, 5.0, 10.0]


# ---------------------------------------------------------------------------------------------- section 11 numbers


def test_worked_example_of_section_11_gives_the_spec_numbers():
    # (sum log-prob w, length w, sum log-prob l, length l, alpha); the same log-probs serve as the reference.
    data = [(-40.0, 20, -30.0, 10, 0.75), (-12.0, 6, -15.0, 5, 1.0), (-50.0, 25, -49.0, 28, 0.5)]
    s_w, n_w, s_l, n_l, alpha = (np.array(x) for x in zip(*data))
    m, pairs = ranking_metrics(s_w, s_l, n_w, n_l, s_w, s_l, alpha, betas=BETAS, dpo_beta=0.1,
                               reference_is_policy=True, bootstrap=200)
    assert pairs["R"].tolist() == [0, 1, 0] and m["ranking_accuracy"] == pytest.approx(1 / 3, abs=1e-15)
    assert pairs["R_normalised"].tolist() == [1, 1, 0]
    assert m["ranking_accuracy_normalised"] == pytest.approx(2 / 3, abs=1e-15)
    star = m["idealised"]["R_star"]
    assert [star[str(b)] for b in BETAS] == pytest.approx([2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3], abs=1e-15)
    assert m["idealised"]["R_star_summary"] == pytest.approx({"min": 1 / 3, "median": 1 / 3, "max": 2 / 3})
    assert m["alignment_gap"] == pytest.approx(0.0, abs=1e-15)
    assert pairs["c"].tolist() == [10.0, -3.0, 1.0]
    assert pairs["threshold"] == pytest.approx([0.3132617, 0.8543552, 0.6443967], abs=5e-8)
    # d1 flips because -10 + log(3)/beta > 0 iff beta < log(3)/10 = 0.10986
    a = np.array([0.75])
    assert idealised_correct([-40.0], [-30.0], a, 0.1098) == [1.0]
    assert idealised_correct([-40.0], [-30.0], a, 0.1099) == [0.0]
    assert m["ties"] == 1 and m["difficulty"]["reference_wrong_share"] == pytest.approx(2 / 3)


def test_ties_only_for_alpha_one_half_and_the_eps_rule():
    s_w = np.array([-10.0, -10.0, -10.0, -10.0])
    s_l = np.array([-10.005, -10.02, -10.005, -9.995])
    n = np.ones(4)
    tie = np.array([0.5, 0.5, 1.0, 1.0])
    m, pairs = ranking_metrics(s_w, s_l, n, n, alpha=tie, bootstrap=0)
    # alpha = 0.5: correct iff |S_w - S_l| < 0.01, whatever the order; otherwise S_w >= S_l.
    assert pairs["R"].tolist() == [1, 0, 1, 0]
    # R~ ties compare geometric-mean probabilities exp(A): |e^-10 - e^-10.02| is far below 0.01.
    assert pairs["R_normalised"].tolist() == [1, 1, 1, 0]
    assert m["ties"] == 2 and m["ranking_accuracy_ties"] == 0.5
    # R* is strict: a tie pair whose reference is indifferent is not counted correct.
    assert idealised_correct([-5.0], [-5.0], [0.5], 1.0).tolist() == [0.0]
    # alpha = 1 uses the loser fraction eps: log(1/eps)/beta = 6.91 (eps 1e-3) or 9.21 (eps 1e-4) against -8.
    assert idealised_correct([-18.0], [-10.0], [1.0], 1.0, eps=1e-3).tolist() == [0.0]
    assert idealised_correct([-18.0], [-10.0], [1.0], 1.0, eps=1e-4).tolist() == [1.0]
    ref_w, ref_l = np.array([-18.0, -10.0, -30.0]), np.array([-10.0, -12.0, -20.0])
    m, _ = ranking_metrics(ref_w, ref_l, np.ones(3), np.ones(3), ref_w, ref_l, None, betas=[1.0], bootstrap=0)
    sens = m["eps_sensitivity"]
    assert sens["pairs_with_alpha_1"] == 3
    assert sens["by_eps"]["0.001"]["R_star_median"] == pytest.approx(1 / 3)
    assert sens["by_eps"]["0.0001"]["R_star_median"] == pytest.approx(2 / 3)
    assert sens["by_eps"]["1e-06"]["R_star_median"] == 1.0  # log(1e6) = 13.8 > 10 flips the third pair too
    assert sens["R_star_median_range"] == pytest.approx([1 / 3, 1.0])
    # Votes 2 of 3: log odds = log 2.
    assert idealised_correct([-10.0 - 0.99 * math.log(2)], [-10.0], [2 / 3], 1.0).tolist() == [1.0]
    assert idealised_correct([-10.0 - 1.01 * math.log(2)], [-10.0], [2 / 3], 1.0).tolist() == [0.0]


def test_length_split_implicit_reward_and_difficulty():
    s_w = np.array([-5.0, -9.0, -3.0, -8.0])
    s_l = np.array([-6.0, -7.0, -4.0, -2.0])
    n_w = np.array([4.0, 2.0, 3.0, 3.0])
    n_l = np.array([2.0, 4.0, 3.0, 1.0])
    ref_w = np.array([-6.0, -8.0, -3.5, -7.0])
    ref_l = np.array([-5.0, -8.0, -4.0, -3.0])
    m, pairs = ranking_metrics(s_w, s_l, n_w, n_l, ref_w, ref_l, None, betas=[0.1], dpo_beta=0.1, bootstrap=0)
    split = m["length_split"]
    assert split["chosen_longer"] == {"pairs": 2, "ranking_accuracy": 0.5, "ranking_accuracy_normalised": 0.5}
    assert split["chosen_shorter"]["pairs"] == 1 and split["chosen_shorter"]["ranking_accuracy"] == 0.0
    assert split["same_length"]["ranking_accuracy"] == 1.0
    # h = (S_w - S_l) - (ref_w - ref_l) = [2, -2, 0.5, -2]
    assert pairs["h"].tolist() == [2.0, -2.0, 0.5, -2.0]
    assert m["implicit_reward_accuracy"] == 0.5
    assert pairs["c"].tolist() == [1.0, 0.0, -0.5, 4.0]
    assert m["difficulty"]["reference_wrong_share"] == 0.5
    assert m["theorem_4_1_violations"] == 0


def test_bootstrap_interval():
    rng = np.random.default_rng(1)
    small, large = rng.random(100) < 0.4, rng.random(2000) < 0.4
    lo, hi = bootstrap_ci(small, 1000, seed=3)
    assert lo < small.mean() < hi and 0.2 < lo and hi < 0.6
    assert bootstrap_ci(small, 1000, seed=3) == (lo, hi)  # seeded
    lo2, hi2 = bootstrap_ci(large, 1000, seed=3)
    assert hi2 - lo2 < (hi - lo) / 2  # sqrt(20) times more data, a much narrower interval
    # binomial standard error 0.011 at n = 2000: a 95% interval about 0.043 wide
    assert 0.03 < hi2 - lo2 < 0.06


# ---------------------------------------------------------------------------------------------- scoring


def _direct_logp(model, prompt: list[int], completion: list[int]) -> float:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].double()
    logp = torch.log_softmax(logits, -1)
    targets = ids[0, len(prompt):]
    return float(logp[torch.arange(len(prompt) - 1, ids.shape[1] - 1), targets].sum())


def _random_pairs(n: int, vocab: int, seed: int = 0) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(seed)

    def ids(low, high):
        return torch.randint(3, vocab, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()

    return [TokenizedPair(ids(1, 14), ids(1, 20), ids(1, 20), "synthetic", i + 1) for i in range(n)]


@pytest.mark.parametrize("layout, batch_size, max_padding", [("shared", 4, None), ("shared", 1, None),
                                                              ("separate", 5, None), ("separate", 1, None),
                                                              ("shared", 6, 0.15)])
def test_scores_equal_a_direct_forward_float64(layout, batch_size, max_padding):
    model = make_tiny_model(120, dtype=torch.float64).eval()
    pairs = _random_pairs(11, 120)
    scores = score_pairs(PolicyLogProbs(model), pairs, pad_id=2, batch_size=batch_size, layout=layout,
                         max_padding=max_padding)
    for i, p in enumerate(pairs):
        assert scores.chosen_logps[i].item() == pytest.approx(_direct_logp(model, p.prompt_ids, p.chosen_ids),
                                                              abs=1e-9, rel=0)
        assert scores.rejected_logps[i].item() == pytest.approx(_direct_logp(model, p.prompt_ids, p.rejected_ids),
                                                                abs=1e-9, rel=0)
    assert scores.chosen_lengths.tolist() == [len(p.chosen_ids) for p in pairs]
    s = scores.stats
    rows = len(pairs) if layout == "shared" else 2 * len(pairs)
    if max_padding is None:
        assert s.layout == layout and s.rows == rows and s.forward_passes == math.ceil(rows / batch_size)
    else:
        assert s.forward_passes > math.ceil(rows / batch_size) and s.padding_share <= max_padding
    assert s.pairs_per_second > 0 and 0 <= s.padding_share < 1
    if batch_size == 1:
        assert s.padding_share == 0
    if layout == "shared":  # the prompt is computed once per pair (plus one repeated token)
        assert s.real_tokens == sum(len(p.prompt_ids) + len(p.chosen_ids) + 1 + len(p.rejected_ids) for p in pairs)
    else:
        assert s.real_tokens == sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)


def test_batches_are_sorted_capped_and_padding_limited():
    lengths = [30, 5, 6, 7, 100, 8, 31, 29, 6]
    plain = batches(lengths, 4)
    assert [[lengths[i] for i in b] for b in plain] == [[5, 6, 6, 7], [8, 29, 30, 31], [100]]
    limited = batches(lengths, 4, max_padding=0.2)
    assert sorted(i for b in limited for i in b) == list(range(len(lengths)))
    for b in limited:
        widths = [lengths[i] for i in b]
        assert len(b) <= 4 and 1 - sum(widths) / (max(widths) * len(b)) <= 0.2
    assert [[lengths[i] for i in b] for b in limited] == [[5, 6, 6, 7], [8], [29, 30, 31], [100]]


def test_smollm2_fp32_scores_equal_transformers_on_hh_pairs(smollm2_dir):
    from transformers import AutoModelForCausalLM

    from posttrain.config import DataConfig, DataSource
    from posttrain.data.sources import load_pairs
    from posttrain.models import load_tokenizer

    tokenizer = load_tokenizer(str(smollm2_dir))
    source = DataSource(path=str(HH), limit=60)
    pairs, _, _ = load_pairs(source, DataConfig(train=source, template="plain", max_length=512,
                                                invalid_rows="skip"), tokenizer)
    # the four shortest of the first 60 pairs (single-sequence forwards are slow on a busy CPU)
    pairs = sorted(pairs, key=lambda p: len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids))[:4]
    assert len({len(p.prompt_ids) + len(p.chosen_ids) for p in pairs}) > 1  # a batch with padding
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    scores = score_pairs(PolicyLogProbs(model), pairs, tokenizer.pad_token_id, batch_size=4)
    assert scores.stats.layout == "shared"
    for i, p in enumerate(pairs):
        for got, completion in ((scores.chosen_logps[i], p.chosen_ids), (scores.rejected_logps[i], p.rejected_ids)):
            want = _direct_logp(model, p.prompt_ids, completion)
            assert got.item() == pytest.approx(want, rel=1e-5), (i, got.item(), want)


# ---------------------------------------------------------------------------------------------- training + CLI


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    from posttrain.trainer import Trainer

    out = tmp_path_factory.mktemp("eval-run")
    raw = tiny_recipe(tiny_model_dir, out / "run", train={"batch_size": 16, "micro_batch_size": 16, "max_steps": 8,
                                                          "lr": 2e-2},
                      data={"heldout": {"builtin": "tiny", "split": "heldout", "num_rows": 40}},
                      eval={"batch_size": 16, "every": 4, "entanglement_pairs": 4, "bootstrap": 200})
    summary = Trainer(recipe_from(raw)).train()
    return out / "run", summary


def test_metrics_during_training_are_logged_with_reports(trained_run):
    run, summary = trained_run
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = {x["step"]: x for x in lines if "eval/ranking_accuracy" in x}
    assert sorted(evals) == [0, 4, 8]
    for key in ("eval/ranking_accuracy_normalised", "eval/R_star/median", "eval/R_star_normalised/max",
                "eval/alignment_gap", "eval/alignment_gap_normalised", "eval/implicit_reward_accuracy",
                "eval/reference_wrong_share", "eval/ranking_accuracy_ci_low", "eval/pairs_per_second"):
        assert key in evals[8], key
    # The reference does not move: R* is the same at every evaluation; the policy does.
    assert evals[0]["eval/R_star/median"] == evals[8]["eval/R_star/median"]
    assert evals[0]["eval/implicit_reward_accuracy"] == 0.0  # LoRA starts at zero: policy = reference
    assert evals[8]["eval/implicit_reward_accuracy"] > 0.6
    assert evals[8]["eval/alignment_gap"] == pytest.approx(evals[8]["eval/R_star/median"]
                                                           - evals[8]["eval/ranking_accuracy"])
    assert summary["heldout_after"]["ranking_accuracy"] == evals[8]["eval/ranking_accuracy"]
    # Gradient entanglement every eval.every steps, on the fixed diagnostic batch.
    ent = {x["step"]: x for x in lines if "entanglement/cosine" in x}
    assert sorted(ent) == [4, 8]
    for record in ent.values():
        assert -1 <= record["entanglement/cosine"] <= 1 and record["entanglement/pairs"] == 4
        ip, nw, nl = (record[f"entanglement/{k}"] for k in ("inner_product", "grad_norm_chosen", "grad_norm_rejected"))
        assert record["entanglement/cosine"] == pytest.approx(ip / (nw * nl))
        assert record["entanglement/both_move_together"] == float(ip >= min(nw, nl) ** 2)
    files = {p.name for p in (run / "eval").iterdir()}
    assert {"report.json", "pairs.jsonl", "summary.md", "training_curve.png", "ranking_vs_beta.png",
            "difficulty.png"} <= files
    report = json.loads((run / "eval" / "report.json").read_text())
    assert [h["step"] for h in report["history"]] == [0, 4, 8]


def test_theorem_4_1_holds_for_every_pair_of_a_trained_policy(trained_run, tiny_model_dir, tmp_path, capsys):
    run, summary = trained_run
    out = tmp_path / "report"
    code = main(["eval", "--model", str(tiny_model_dir), "--adapter", str(run), "--builtin", "tiny",
                 "--max-pairs", "40", "--format", "plain", "--beta", "0.1", "--bootstrap", "200", "--no-progress",
                 "--output", str(out)])
    assert code == 0
    stdout = capsys.readouterr().out
    r = float(stdout.split("ranking accuracy R:")[1].split()[0])
    assert r == pytest.approx(summary["heldout_after"]["ranking_accuracy"], abs=1e-12)
    records = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(records) == 40
    beta = 0.1
    ranked_right = wrong = 0
    for rec in records:
        s_w, s_l = rec["logp_chosen"], rec["logp_rejected"]
        ref_w, ref_l = rec["ref_logp_chosen"], rec["ref_logp_rejected"]
        assert ref_w != s_w  # a trained policy, scored against the base model with the adapter off
        h = torch.tensor((s_w - s_l) - (ref_w - ref_l), dtype=torch.float64)
        c = torch.tensor(ref_l - ref_w, dtype=torch.float64)
        loss, threshold = -F.logsigmoid(beta * h).item(), -F.logsigmoid(beta * c).item()
        assert (s_w >= s_l) == (loss <= threshold), rec
        assert rec["R"] == float(s_w >= s_l) and rec["dpo_loss"] == pytest.approx(loss, rel=1e-12)
        ranked_right += s_w >= s_l
        wrong += s_w < s_l
    assert ranked_right > 0
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["theorem_4_1_violations"] == 0
    assert report["inputs"]["format"] == "plain" and report["inputs"]["adapter_kind"] == "peft"
    assert "adapter switched off" in report["inputs"]["reference"]
    # The worst-ranked pairs come first.
    margins = [rec["margin"] for rec in records]
    assert margins == sorted(margins)
    # The CLI found the run's history: the training curve is drawn.
    for name in ("report.json", "pairs.jsonl", "summary.md", "training_curve.png", "ranking_vs_beta.png",
                 "difficulty.png"):
        assert (out / name).stat().st_size > 0, name
    summary_md = (out / "summary.md").read_text()
    assert "| ranking accuracy R |" in summary_md and "alignment gap" in summary_md
    import matplotlib.image as mpimg

    for name in ("training_curve.png", "ranking_vs_beta.png", "difficulty.png"):
        image = mpimg.imread(out / name)
        assert image.shape[0] > 200 and image.shape[1] > 300


def test_adapter_paths_resolve_to_the_run_and_step(trained_run):
    from posttrain.eval.api import resolve_adapter, training_history

    run, _ = trained_run
    (step_dir,) = list((run / "checkpoints").iterdir())
    assert resolve_adapter(str(step_dir)) == ("peft", step_dir / "adapter", run, 8)
    assert resolve_adapter(str(run)) == ("peft", run / "final", run, None)
    assert resolve_adapter(str(run / "final")) == ("peft", run / "final", run, None)
    assert [h["step"] for h in training_history(run, 4)] == [0, 4]
    with pytest.raises(Exception, match="holds no peft adapter"):
        resolve_adapter(str(run / "tensorboard"))


def test_the_entanglement_diagnostic_leaves_training_unchanged(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from posttrain.trainer import Trainer

    weights = []
    for every in (0, 2):
        raw = tiny_recipe(tiny_model_dir, tmp_path / f"run{every}", train={"batch_size": 8, "micro_batch_size": 8,
                                                                           "max_steps": 4, "lr": 2e-2},
                          data={"heldout": {"builtin": "tiny", "split": "heldout", "num_rows": 8}},
                          eval={"at_start": False, "at_end": False, "entanglement_every": every, "report": False},
                          logging={"report_to": ["jsonl"], "progress_bar": False})
        Trainer(recipe_from(raw)).train()
        lines = (tmp_path / f"run{every}" / "metrics.jsonl").read_text().splitlines()
        assert sum("entanglement/cosine" in x for x in lines) == (2 if every else 0)
        weights.append(load_file(str(tmp_path / f"run{every}" / "final" / "adapter_model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_plots_have_labelled_axes_and_titles():
    m, pairs = ranking_metrics(np.array([-5.0, -3.0, -9.0]), np.array([-4.0, -6.0, -2.0]), np.ones(3) * 3,
                               np.ones(3) * 2, np.array([-5.5, -3.0, -8.0]), np.array([-4.0, -6.5, -2.5]), None,
                               betas=BETAS, bootstrap=0)
    history = [{"step": 0, "ranking_accuracy": 0.3, "ranking_accuracy_normalised": 0.4},
               {"step": 10, "ranking_accuracy": 0.5, "ranking_accuracy_normalised": 0.45}]
    figures = [plot_training_curve(history, m), plot_ranking_vs_beta(m), plot_difficulty(pairs["c"], pairs["R"])]
    for fig in figures:
        ax = fig.axes[0]
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
        assert ax.get_legend() is not None
    curve = figures[0].axes[0]
    assert any("R*" in t.get_text() for t in curve.get_legend().get_texts())
    import matplotlib.pyplot as plt

    for fig in figures:
        plt.close(fig)


def test_pandalm_votes_give_alpha_and_majority_ties_are_excluded(tiny_model_dir, tmp_path, capsys):
    rows = [
        {"index": "1", "instruction": "Name a colour.", "input": "", "response1": "blue", "response2": "seven",
         "label_0": "1", "label_1": "1", "label_2": "1"},
        {"index": "2", "instruction": "Add the numbers.", "input": "2 and 3", "response1": "6", "response2": "5",
         "label_0": "2", "label_1": "2", "label_2": "1"},
        {"index": "3", "instruction": "Say hi.", "input": "", "response1": "hi", "response2": "hello",
         "label_0": "0", "label_1": "0", "label_2": "1"},
        {"index": "4", "instruction": "Pick one.", "input": "", "response1": "a", "response2": "b",
         "label_0": "1", "label_1": "2", "label_2": "0"},
        {"index": "5", "instruction": "Count to two.", "input": "", "response1": "1 2", "response2": "1 3",
         "label_0": 1, "label_1": 0, "label_2": 1},
    ]
    path = tmp_path / "testset-v1.json"
    path.write_text(json.dumps(rows))
    out = tmp_path / "report"
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(path), "--bootstrap", "50", "--no-progress",
                 "--output", str(out)]) == 0
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    votes, excluded = report["inputs"]["votes"], report["inputs"]["excluded"]
    assert votes["rows"] == 5 and votes["kept"] == 3
    assert votes["excluded_majority_tie"] == 1 and votes["excluded_no_majority"] == 1
    assert excluded == {"a majority tie between the annotators": 1, "no majority among the annotators": 1}
    assert "Excluded before scoring: 1 a majority tie between the annotators; 1 no majority among the annotators." \
        in (out / "summary.md").read_text()
    assert "votes" in report["inputs"]["alpha_source"]
    records = {r["row"]: r for r in map(json.loads, (out / "pairs.jsonl").read_text().splitlines())}
    assert sorted(records) == [1, 2, 5]
    assert records[1]["alpha"] == 1.0 and records[1]["chosen_text"] == " blue"
    assert records[2]["alpha"] == pytest.approx(2 / 3) and records[2]["chosen_text"] == " 5"  # majority said 2
    assert records[5]["alpha"] == pytest.approx(2 / 3) and records[5]["votes"] == [1, 0, 1]
    assert report["metrics"]["eps_sensitivity"]["pairs_with_alpha_1"] == 1


def test_eval_recipe_fields_are_validated():
    from posttrain.recipe import load_recipe

    assert load_recipe(raw={}).eval.betas == BETAS
    with pytest.raises(RecipeError, match="eval.betas"):
        load_recipe(raw={"eval": {"betas": [0.1, -1]}})
    with pytest.raises(RecipeError, match="eval.alpha"):
        load_recipe(raw={"eval": {"alpha": 0}})
    with pytest.raises(RecipeError, match="entanglement_pairs"):
        load_recipe(raw={"eval": {"entanglement_pairs": 0}})


# ---------------------------------------------------------------------------------------------- section 12


def test_entanglement_worked_example_of_section_12():
    out = entanglement_metrics(torch.tensor([1.0, 0.5]), torch.tensor([0.8, 0.6]), eta=0.1)
    assert out["inner_product"] == pytest.approx(1.1)
    assert out["grad_norm_chosen"] ** 2 == pytest.approx(1.25) and out["grad_norm_rejected"] ** 2 == pytest.approx(1.0)
    assert out["cosine"] == pytest.approx(0.98387, abs=5e-6)
    assert out["delta_logp_chosen"] == pytest.approx(0.015) and out["delta_logp_rejected"] == pytest.approx(0.010)
    assert out["ratio_rejected"] == pytest.approx(1.1)
    assert out["chosen_up"] == 1.0 and out["rejected_down"] == 0.0
    assert out["both_move_together"] == 1.0 and out["both_up"] == 1.0
    apart = entanglement_metrics(torch.tensor([1.0, 0.0]), torch.tensor([-0.5, 1.0]))
    assert apart["both_move_together"] == 0.0 and apart["chosen_up"] == 1.0 and apart["rejected_down"] == 1.0


def test_gradient_entanglement_equals_separate_backward_passes():
    import peft

    model = make_tiny_model(120, dtype=torch.float64)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model = model.double()
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    policy = PolicyLogProbs(model).train()
    pairs = _random_pairs(3, 120, seed=5)
    out = gradient_entanglement(policy, pairs, pad_id=2)
    lora = [p for n, p in policy.named_parameters() if "lora_" in n]
    assert all(p.grad is None for p in lora) and policy.training  # no .grad written, mode restored

    def grad_of(which: str) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        total = torch.stack([_direct_logp_grad(model, p.prompt_ids, getattr(p, which)) for p in pairs]).sum()
        total.backward()
        g = torch.cat([p.grad.flatten() for p in lora])
        model.zero_grad(set_to_none=True)
        return g

    g_w, g_l = grad_of("chosen_ids"), grad_of("rejected_ids")
    want = entanglement_metrics(g_w, g_l)
    for key in ("inner_product", "grad_norm_chosen", "grad_norm_rejected", "cosine"):
        assert out[key] == pytest.approx(want[key], rel=1e-9), key
    assert out["parameters"] == sum(p.numel() for p in lora)


def _direct_logp_grad(model, prompt, completion) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    model.eval()
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
    return logp[torch.arange(len(prompt) - 1, ids.shape[1] - 1), ids[0, len(prompt):]].sum()


def test_entanglement_is_switched_off_under_zero3_with_a_message(caplog):
    plugin = SimpleNamespace(zero_stage=3)
    log = logging.getLogger("posttrain.test-zero3")
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), is_main_process=True)
    diagnostic = EntanglementDiagnostic(accelerator, None, [], 2, False, None, log)
    with caplog.at_level(logging.WARNING, logger="posttrain.test-zero3"):
        assert diagnostic(4) is None
        assert diagnostic(8) is None
    messages = [r.getMessage() for r in caplog.records if "ZeRO-3" in r.getMessage()]
    assert len(messages) == 1  # said once
