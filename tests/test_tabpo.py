"""TAB-PO (spec section 5): the worked example, the unified-core gradient against autograd of the
paper formula, the token weights (position vs LCS difference weights, JSON value weights with the
real SmolLM2 tokenizer, user spans), the PHEE pair builder on the real train.json, and training
through the Trainer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import SHARED_DATA, make_tiny_model
from helpers import recipe_from, tiny_recipe
from posttrain.config import LossTerm
from posttrain.core import PolicyLogProbs, StepCounts, backward_through_coefficients
from posttrain.data import phee
from posttrain.data.readers import PreferenceRow
from posttrain.data.token_weights import (TokenWeightConfig, completion_weights, diff_multipliers, lcs_membership,
                                          pair_token_weights, token_offsets, weight_pairs)
from posttrain.data.tokenize import tokenize_pairs
from posttrain.errors import DataError
from posttrain.losses import PairLossInputs, build_loss
from posttrain.losses.tabpo import TABPOLoss, normalised_weights

PHEE_TRAIN = SHARED_DATA / "phee" / "train.json"
F64 = torch.float64


def _t(values):
    return torch.tensor([values], dtype=F64)


# ---------------------------------------------------------------------------------------------- the loss
SPEC = dict(
    chosen=[-0.05, -0.10, -1.20, -0.02, -0.60], rejected=[-0.05, -0.10, -0.90, -0.02, -0.60],
    ref_chosen=[-0.05, -0.12, -1.00, -0.02, -0.55], ref_rejected=[-0.05, -0.12, -0.80, -0.02, -0.55],
    weights=[1.0, 1.0, 1.1 * 1.2, 1.0, 1.0],
)


def _spec_inputs(requires_grad=False):
    lp_w = _t(SPEC["chosen"]).requires_grad_(requires_grad)
    lp_l = _t(SPEC["rejected"]).requires_grad_(requires_grad)
    mask = torch.ones(1, 5, dtype=F64)
    w = _t(SPEC["weights"])
    return PairLossInputs(lp_w, lp_l, mask, mask, torch.ones(1, dtype=F64), _t(SPEC["ref_chosen"]),
                          _t(SPEC["ref_rejected"]), w, w.clone())


SPEC_COUNTS = StepCounts(examples=1, tokens=5)  # one pair, five chosen tokens


def test_spec_worked_example_float64():
    """Spec section 5's worked example, every intermediate value, to rtol 1e-9."""
    inputs = _spec_inputs(requires_grad=True)
    plugin = build_loss([LossTerm(name="tabpo")])  # the code defaults: beta 0.5, tau 0.66, lam 0.5
    out = plugin.step_loss(inputs, SPEC_COUNTS)
    assert plugin(inputs).loss.shape == (1,)  # the plug-in returns the paper loss per pair, unreduced
    # Independent arithmetic: w~ = w * n / sum w; s = sum(w~ lp) / n.
    w_tilde = [w * 5 / sum(SPEC["weights"]) for w in SPEC["weights"]]
    torch.testing.assert_close(normalised_weights(inputs.chosen_token_weights, inputs.chosen_mask)[0],
                               torch.tensor(w_tilde, dtype=F64), rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.tensor(w_tilde, dtype=F64),
                               torch.tensor([0.93985, 0.93985, 1.240602, 0.93985, 0.93985], dtype=F64),
                               rtol=0, atol=1e-5)  # the spec's table
    s = {k: sum(w * x for w, x in zip(w_tilde, SPEC[k])) / 5 for k in ("chosen", "rejected", "ref_chosen",
                                                                       "ref_rejected")}
    for key, table in (("chosen", -0.4424812), ("rejected", -0.3680451), ("ref_chosen", -0.3872180),
                       ("ref_rejected", -0.3375940)):
        assert s[key] == pytest.approx(table, abs=1e-7)
    z = (s["chosen"] - s["rejected"]) - (s["ref_chosen"] - s["ref_rejected"])
    assert z == pytest.approx(-0.0248120, abs=1e-7)
    m = out.metrics
    assert m["logps/chosen"].item() == pytest.approx(s["chosen"], rel=1e-9)
    assert m["logps/rejected"].item() == pytest.approx(s["rejected"], rel=1e-9)
    assert m["rewards/chosen"].item() == pytest.approx(0.5 * (s["chosen"] - s["ref_chosen"]), rel=1e-9)
    assert m["rewards/rejected"].item() == pytest.approx(0.5 * (s["rejected"] - s["ref_rejected"]), rel=1e-9)
    assert m["rewards/margins"].item() / 0.5 == pytest.approx(z, rel=1e-9)
    assert m["rewards/accuracies"].item() == 0.0
    assert m["tabpo/pref"].item() == pytest.approx(0.6993694266065075, rel=1e-9)
    assert m["tabpo/pref"].item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.5 * z))), rel=1e-12)
    assert m["tabpo/barrier"].item() == pytest.approx(0.9413793103448277, rel=1e-9)
    assert m["tabpo/gated_tokens"].item() == 2
    assert out.loss.item() == pytest.approx(1.1700590817789214, rel=1e-9)
    # The gate [0, 0, 1, 0, 1] (log 0.66 = -0.4155), seen in the gradient: the barrier adds
    # -lam w~_t g_t / max(1, sum w~ g) on the gated chosen tokens only.
    out.loss.backward()
    gate = [0, 0, 1, 0, 1]
    assert [int(x < math.log(0.66)) for x in SPEC["chosen"]] == gate
    denom = max(1.0, sum(w * g for w, g in zip(w_tilde, gate)))
    coef = 0.5 / (1 + math.exp(0.5 * z))  # beta sigma(-beta z)
    expected_w = [-coef * w / 5 - 0.5 * w * g / denom for w, g in zip(w_tilde, gate)]
    expected_l = [coef * w / 5 for w in w_tilde]
    torch.testing.assert_close(inputs.chosen_logps.grad[0], torch.tensor(expected_w, dtype=F64), rtol=1e-9, atol=0)
    torch.testing.assert_close(inputs.rejected_logps.grad[0], torch.tensor(expected_l, dtype=F64), rtol=1e-9,
                               atol=0)


def test_params_validate_and_missing_reference_is_an_error():
    with pytest.raises(ValueError, match="tau"):
        TABPOLoss(TABPOLoss.Params(tau=0.0))
    with pytest.raises(ValueError, match="beta"):
        TABPOLoss(TABPOLoss.Params(beta=0.0))
    inputs = _spec_inputs()
    inputs.ref_chosen_logps = inputs.ref_rejected_logps = None
    with pytest.raises(ValueError, match="reference"):
        TABPOLoss()(inputs)
    assert TABPOLoss().needs_reference


def test_no_token_weights_means_uniform_weights():
    """Without weights (or with weights summing to 0) s(y) is the plain mean log-prob."""
    inputs = _spec_inputs()
    inputs.chosen_token_weights = None
    inputs.rejected_token_weights = torch.zeros(1, 5, dtype=F64)
    out = TABPOLoss()(inputs)
    assert out.metrics["logps/chosen"].item() == pytest.approx(sum(SPEC["chosen"]) / 5, rel=1e-12)
    assert out.metrics["logps/rejected"].item() == pytest.approx(sum(SPEC["rejected"]) / 5, rel=1e-12)


VOCAB = 300


def _paper_loss(pc, pr, rc, rr, mc, mr, wc_raw, wr_raw, pair_weight, n_pairs, beta, tau, lam):
    """Spec section 5, written out directly (autograd differentiates it; the gate is a constant)."""
    def tilde(w, m):
        w = w * m
        return w * m.sum(-1, keepdim=True) / w.sum(-1, keepdim=True)

    wc, wr = tilde(wc_raw, mc), tilde(wr_raw, mr)
    s = lambda w, lp, m: (w * lp).sum(-1) / m.sum(-1)  # noqa: E731
    z = (s(wc, pc, mc) - s(wr, pr, mr)) - (s(wc, rc, mc) - s(wr, rr, mr))
    pref = -F.logsigmoid(beta * z)
    gate = ((pc.detach() < math.log(tau)) & (mc > 0)).to(pc.dtype)
    barrier = (wc * gate * -pc).sum(-1) / torch.clamp((wc * gate).sum(-1), min=1.0)
    return (pair_weight * (pref + lam * barrier)).sum() / n_pairs, gate


def test_unified_core_gradient_equals_autograd_of_paper_formula():
    """Through a real tiny model in float64: the plug-in's gradient through the unified core
    (`backward_through_coefficients`: per-token coefficients c = -dL/dlp by autograd, then the
    surrogate -sum c lp backpropagated through the model) equals autograd of the paper formula to
    1e-9; values agree to 1e-12. The gate threshold is set at the median chosen log-prob, so some
    tokens are gated and some are not."""
    model = make_tiny_model(VOCAB, dtype=F64, seed=1)
    g = torch.Generator().manual_seed(4)
    n, length, b = 6, 14, 3
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    attention = torch.ones(n, length, dtype=torch.long)
    loss_mask = torch.zeros(n, length, dtype=torch.long)
    for i in range(n):
        end = length - (i % 3) * 2
        attention[i, end:] = 0
        loss_mask[i, 3 + i % 2:end] = 1
    mask = loss_mask[:, 1:].to(F64)
    ref = -torch.rand(n, length - 1, dtype=F64, generator=g) * 6 * mask
    raw = (0.5 + torch.rand(n, length - 1, dtype=F64, generator=g)) * mask
    pair_weight = torch.tensor([1.0, 1.0, 0.0], dtype=F64)  # a filler row adds nothing
    with torch.no_grad():
        lp0 = PolicyLogProbs(model)(ids, attention, loss_mask)
    tau = math.exp(lp0[:b][mask[:b] > 0].median().item() + 1e-6)
    plugin = build_loss([LossTerm(name="tabpo", params={"beta": 0.7, "tau": tau, "lam": 0.8})])
    counts = StepCounts(examples=float(b - 1), tokens=mask[:b].sum().item())

    def run(use_plugin: bool):
        model.zero_grad()
        logps = PolicyLogProbs(model)(ids, attention, loss_mask)
        args = (logps[:b], logps[b:], ref[:b], ref[b:], mask[:b], mask[b:], raw[:b], raw[b:])
        if use_plugin:
            def step_loss(leaves):
                return plugin.step_loss(PairLossInputs(leaves["chosen_logps"], leaves["rejected_logps"], args[4],
                                                       args[5], pair_weight, args[2], args[3], args[6], args[7]),
                                        counts)

            out, _ = backward_through_coefficients(step_loss, {"chosen_logps": args[0], "rejected_logps": args[1]},
                                                   lambda surrogate: surrogate.backward())
            loss, gate = out.loss, None
        else:
            loss, gate = _paper_loss(*args, pair_weight, counts.examples, 0.7, tau, 0.8)
            loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()], gate

    value_core, grads_core, _ = run(True)
    value_paper, grads_paper, gate = run(False)
    on = gate[mask[:b] > 0]
    assert 0 < on.sum() < on.numel(), "the gate must be on for some chosen tokens and off for others"
    torch.testing.assert_close(value_core, value_paper, rtol=1e-12, atol=0)
    assert any(gp.abs().max() > 1e-6 for gp in grads_paper)
    for gc, gp in zip(grads_core, grads_paper):
        torch.testing.assert_close(gc, gp, rtol=1e-9, atol=1e-15)


# ---------------------------------------------------------------------------------------------- token weights
def test_difference_weights_position_aligned_versus_lcs():
    """One inserted token: position alignment marks every later position, LCS only the insertion."""
    chosen, rejected = [11, 12, 13, 14, 15], [11, 12, 99, 13, 14, 15]
    pc, pr = diff_multipliers(chosen, rejected, 1.2, "position")
    assert pc == [1, 1, 1.2, 1.2, 1.2]
    assert pr == [1, 1, 1.2, 1.2, 1.2, 1]  # positions beyond the shorter response are not compared
    lc, lr = diff_multipliers(chosen, rejected, 1.2, "lcs")
    assert lc == [1, 1, 1, 1, 1]
    assert lr == [1, 1, 1.2, 1, 1, 1]
    # A replacement inside a longer middle: LCS keeps both ends and marks only the changed tokens.
    in_a, in_b = lcs_membership([1, 2, 3, 4, 5, 6], [1, 7, 3, 5, 6, 8])
    assert in_a == [True, False, True, False, True, True] and in_b == [True, False, True, True, True, False]
    assert diff_multipliers(chosen, rejected, 1.0, "position") == ([1.0] * 5, [1.0] * 6)


def test_difference_weights_through_the_tokenizer_leave_eos_at_one(tokenizer):
    eos = tokenizer.eos_token_id
    chosen_text, rejected_text = "the drug caused a mild rash", "the drug quickly caused a mild rash"
    c = tokenizer(chosen_text, add_special_tokens=False)["input_ids"] + [eos]
    r = tokenizer(rejected_text, add_special_tokens=False)["input_ids"] + [eos]
    assert len(r) == len(c) + 1
    config = TokenWeightConfig(value_weights=False)
    wc, wr = pair_token_weights(tokenizer, c, r, chosen_text, rejected_text, config)
    assert wc[-1] == wr[-1] == 1.0
    assert wc[:2] == [1.0, 1.0] and all(w == 1.2 for w in wc[2:-1])
    wc, wr = pair_token_weights(tokenizer, c, r, chosen_text, rejected_text,
                                TokenWeightConfig(value_weights=False, diff_alignment="lcs"))
    assert wc == [1.0] * len(c)
    assert [tokenizer.decode([t]) for t, w in zip(r, wr) if w != 1.0] == [" quickly"]


PHEE_STYLE = ('[{"arguments": {"Effect": "skin rash", "Treatment.Drug": "penicillin", "Trigger": "after"}, '
              '"event_type": "Adverse_event"}]')


def _expected_char_weights(text: str, spans: dict[str, float]) -> list[float]:
    weights = [1.0] * len(text)
    for needle, w in spans.items():
        start = text.index(f'"{needle}"') + 1  # the quoted occurrence: the field itself
        for k in range(start, start + len(needle)):
            weights[k] = max(weights[k], w)
    return weights


@pytest.mark.parametrize("tokenisation", ["offsets", "cumulative_decoding"])
def test_json_value_weights_on_a_phee_string(tokenizer, tokenisation):
    """For PHEE: argument-role labels get 1.2, the event type and span texts 1.1, JSON syntax and the
    structural keys 1.0, EOS 1.0. Checked token by token against character classes, with the
    tokenizer's offsets and with the cumulative-decoding fallback (ids that are not the text's own
    tokenisation: one token per character)."""
    eos = tokenizer.eos_token_id
    if tokenisation == "offsets":
        ids = tokenizer(PHEE_STYLE, add_special_tokens=False)["input_ids"]
    else:
        ids = [i for ch in PHEE_STYLE for i in tokenizer(ch, add_special_tokens=False)["input_ids"]]
        assert ids != tokenizer(PHEE_STYLE, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == PHEE_STYLE
    weights = completion_weights(tokenizer, ids + [eos], PHEE_STYLE, TokenWeightConfig())
    assert weights[-1] == 1.0
    chars = _expected_char_weights(PHEE_STYLE, {"Effect": 1.2, "Treatment.Drug": 1.2, "Trigger": 1.2,
                                                "skin rash": 1.1, "penicillin": 1.1, "after": 1.1,
                                                "Adverse_event": 1.1})
    offsets = token_offsets(tokenizer, PHEE_STYLE, ids + [eos])
    assert offsets[-1] is None
    for (start, end), w in zip(offsets[:-1], weights[:-1]):
        assert w == max(chars[start:end]), (PHEE_STYLE[start:end], w)
    by_token = {tokenizer.decode([i]): w for i, w in zip(ids, weights)}
    if tokenisation == "offsets":
        assert by_token["Drug"] == 1.2 and by_token["arguments"] == 1.0 and by_token["pen"] == 1.1
    assert sorted(set(weights)) == [1.0, 1.1, 1.2]


def test_value_weights_for_the_authors_schema_truncated_json_and_switch_off(tokenizer):
    text = '{"Code": "C01", "Sub-code": "C01.2", "Span": "fever", "note": "C01"}'
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    weights = completion_weights(tokenizer, ids, text, TokenWeightConfig())
    offsets = token_offsets(tokenizer, text, ids)
    chars = [1.0] * len(text)
    for value, w in (("C01", 1.1), ("C01.2", 1.2), ("fever", 1.1)):
        start = text.index(f'"{value}"') + 1
        chars[start:start + len(value)] = [w] * len(value)
    for (start, end), w in zip(offsets, weights):
        assert w == max(chars[start:end]), (text[start:end], w)
    note = text.rindex('"C01"') + 1  # the same string outside a classified field is not upweighted
    assert all(w == 1.0 for (s, e), w in zip(offsets, weights) if s >= note)
    # A truncated response keeps the weights of what was read before the cut.
    cut = PHEE_STYLE[:PHEE_STYLE.index("penicillin") + 4]
    cut_ids = tokenizer(cut, add_special_tokens=False)["input_ids"]
    cut_weights = completion_weights(tokenizer, cut_ids, cut, TokenWeightConfig())
    assert 1.2 in cut_weights and 1.1 in cut_weights
    assert completion_weights(tokenizer, ids, text, TokenWeightConfig(value_weights=False)) == [1.0] * len(ids)


def test_user_weight_spans_from_the_data_row(tokenizer):
    chosen, rejected = "Take two tablets daily.", "Take ten tablets daily."
    extras = {"weight_spans_chosen": [[5, 8, 3.0]], "weight_spans_rejected": [[0, 4, 0.0], [5, 8, 2.0]]}
    rows = [PreferenceRow("How much?", chosen, rejected, "mem", 1, extras)]
    pairs, _, _ = tokenize_pairs(rows, tokenizer, "chat", 128)
    config = TokenWeightConfig(diff_weight=1.0)
    (pair,) = weight_pairs(pairs, tokenizer, config)
    assert pairs[0].chosen_weights is None  # the input is not changed
    decoded_c = [tokenizer.decode([i]) for i in pair.chosen_ids]
    decoded_r = [tokenizer.decode([i]) for i in pair.rejected_ids]
    assert dict(zip(decoded_c, pair.chosen_weights)) == {"Take": 1.0, " two": 3.0, " tablets": 1.0, " daily": 1.0,
                                                         ".": 1.0, "<|im_end|>": 1.0, "\n": 1.0}
    assert (pair.chosen_tail, pair.rejected_tail) == (2, 2)  # the chat template's "<|im_end|>\n" after the turn
    assert dict(zip(decoded_r, pair.rejected_weights))["Take"] == 0.0
    assert dict(zip(decoded_r, pair.rejected_weights))[" ten"] == 2.0
    # With the difference weights on, the user weight is multiplied by diff_weight where tokens differ.
    (pair,) = weight_pairs(pairs, tokenizer, TokenWeightConfig(diff_weight=1.5))
    assert dict(zip(decoded_c, pair.chosen_weights))[" two"] == pytest.approx(4.5)
    (pair,) = weight_pairs(pairs, tokenizer, TokenWeightConfig(diff_weight=1.0, use_data_spans=False))
    assert pair.chosen_weights == [1.0] * len(pair.chosen_ids)
    bad = [PreferenceRow("How much?", chosen, rejected, "mem", 2, {"weight_spans_chosen": [[5, 8]]})]
    bad_pairs, _, _ = tokenize_pairs(bad, tokenizer, "chat", 128)
    with pytest.raises(DataError, match="mem, row 2.*weight_spans_chosen"):
        weight_pairs(bad_pairs, tokenizer, config)


# ---------------------------------------------------------------------------------------------- PHEE
@pytest.fixture(scope="module")
def phee_rows():
    records = phee.read_phee(PHEE_TRAIN)[:200]
    rows, report = phee.build_pairs(records, seed=0)
    return records, rows, report


def test_phee_builder_on_real_train_rows(phee_rows):
    records, rows, report = phee_rows
    assert report["records"] == 200 and report["rows_written"] + report["no_valid_edit"] == 200
    assert len(rows) == 200  # every PHEE training sentence has at least one event
    kinds = set()
    for row in rows:
        chosen, rejected = phee.check_schema(row["chosen"]), phee.check_schema(row["rejected"])
        assert len(chosen) == len(rejected) >= 1
        assert [len(e["arguments"]) for e in chosen] == [len(e["arguments"]) for e in rejected]
        assert row["rejected"] != row["chosen"]
        assert 1 <= len(row["edit_kinds"]) <= 3
        kinds.update(row["edit_kinds"])
        spans = sum(2 if k == "swap" else 1 for k in row["edit_kinds"])
        assert len(row["edits_chosen"]) == len(row["edits_rejected"]) == spans
        for (a, b), (c, d) in zip(row["edits_chosen"], row["edits_rejected"]):
            assert row["chosen"][a - 1] == '"' and row["chosen"][b] == '"'  # a whole JSON string's content
            assert row["rejected"][c - 1] == '"' and row["rejected"][d] == '"'
            assert row["chosen"][a:b] != row["rejected"][c:d]
        assert row["prompt"].endswith("Sentence: " + records[rows.index(row)]["context"])
        assert json.dumps(chosen, sort_keys=True, ensure_ascii=False, separators=(", ", ": ")) == row["chosen"]
    assert kinds == set(phee.EDIT_KINDS)
    first = json.loads(rows[0]["chosen"])
    assert first == [{"arguments": {"Effect": "lipoatrophies", "Treatment": "insulin", "Treatment.Disorder": "diabetic",
                                    "Treatment.Drug": "insulin", "Trigger": "induced"}, "event_type": "Adverse_event"}]
    # Seeded: the same seed gives the same rows, another seed other edits.
    again, _ = phee.build_pairs(records[:20], seed=0)
    other, _ = phee.build_pairs(records[:20], seed=1)
    assert again == rows[:20]
    assert [r["rejected"] for r in other] != [r["rejected"] for r in rows[:20]]


def test_phee_rows_without_a_valid_edit_are_counted_and_reported(tmp_path, capsys):
    records = phee.read_phee(PHEE_TRAIN)[:3]
    empty = {"id": "no_events", "context": "Nothing happened.", "annotations": [{"events": []}]}
    source = tmp_path / "mini.json"
    source.write_text("".join(json.dumps(r) + "\n" for r in records + [empty]))
    out = tmp_path / "pairs.jsonl"
    assert phee.main(["--input", str(source), "--output", str(out), "--seed", "0",
                      "--report", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["no_valid_edit"] == 1 and report["no_valid_edit_ids"] == ["no_events"]
    assert report["rows_written"] == 3 and len(out.read_text().splitlines()) == 3
    assert "1 sentences had no valid edit" in capsys.readouterr().err


def test_phee_pairs_get_value_and_difference_weights(tokenizer, phee_rows):
    """The builder's rows through the tokenisation contract and TAB-PO's prepare_pairs: every token of
    an edited field carries its value/role weight; each pair has difference-weighted tokens inside its
    edit spans; LCS alignment puts most difference weight inside the edits, position alignment most
    of it after them (the spec's pitfall). EOS stays 1."""
    _, rows, _ = phee_rows
    prefs = [PreferenceRow(r["prompt"], r["chosen"], r["rejected"], "phee", i + 1,
                           {k: v for k, v in r.items() if k not in ("prompt", "chosen", "rejected")})
             for i, r in enumerate(rows[:40])]
    pairs, _, stats = tokenize_pairs(prefs, tokenizer, "chat", 640)
    assert stats.truncated == 0

    def sides(pair):
        return ((pair.chosen_ids, pair.chosen_text, pair.chosen_weights, pair.extras["edits_chosen"]),
                (pair.rejected_ids, pair.rejected_text, pair.rejected_weights, pair.extras["edits_rejected"]))

    plugin = build_loss([LossTerm(name="tabpo", params={"diff_weight": 1.0})])
    for pair in plugin.prepare_pairs(pairs, tokenizer):
        for ids, text, weights, edits in sides(pair):
            assert len(weights) == len(ids) and weights[-1] == 1.0
            offsets = token_offsets(tokenizer, text, ids)
            for a, b in edits:
                inside = [w for o, w in zip(offsets, weights) if o and o[0] < b and a < o[1]]
                assert inside and min(inside) >= 1.1, (text[a:b], inside)
    counts = {}
    for alignment in ("position", "lcs"):
        plugin = build_loss([LossTerm(name="tabpo", params={"diff_alignment": alignment, "value_weights": False})])
        inside_marked = outside_marked = 0
        for pair in plugin.prepare_pairs(pairs, tokenizer):
            pair_inside = 0
            for ids, text, weights, edits in sides(pair):
                assert weights[-1] == 1.0
                for o, w in zip(token_offsets(tokenizer, text, ids), weights):
                    if w > 1.0:
                        if o and any(o[0] < b and a < o[1] for a, b in edits):
                            pair_inside += 1
                        else:
                            outside_marked += 1
            assert pair_inside > 0, (alignment, pair.row)
            inside_marked += pair_inside
        counts[alignment] = (inside_marked, outside_marked)
    assert counts["lcs"][0] > 2 * counts["lcs"][1], counts
    assert counts["position"][1] > counts["position"][0], counts


# ---------------------------------------------------------------------------------------------- training
def test_tabpo_trains_the_tiny_task(tiny_model_dir, tmp_path):
    """TAB-PO through the Trainer raises held-out ranking accuracy by at least 25 points; the token
    weights reach the loss (the differing answer digit is upweighted, EOS is not)."""
    from posttrain.trainer import Trainer

    raw = tiny_recipe(tiny_model_dir, tmp_path / "run", loss={"name": "tabpo"},
                      train={"batch_size": 16, "micro_batch_size": 16, "max_steps": 24, "lr": 2e-2})
    trainer = Trainer(recipe_from(raw))
    summary = trainer.train()
    before = summary["heldout_before"]["ranking_accuracy"]
    after = summary["heldout_after"]["ranking_accuracy"]
    assert after >= before + 0.25, (before, after)
    pair = trainer.train_pairs[0]
    assert pair.chosen_weights == [1.2, 1.0] and pair.rejected_weights == [1.2, 1.0]
    lines = [json.loads(x) for x in (Path(tmp_path) / "run" / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "loss" in x]
    for key in ("tabpo/barrier", "tabpo/gated_tokens", "tabpo/pref", "rewards/margins"):
        assert key in train_lines[-1], key
    assert train_lines[-1]["rewards/margins"] > train_lines[0]["rewards/margins"]


def test_barrier_denominator_is_clamped_at_one_not_the_token_count():
    """One gated chosen token whose renormalised weight is below 1: L_bar = w~ (-lp) / 1."""
    inputs = _spec_inputs()
    inputs.chosen_logps = _t([-0.05, -0.10, -0.20, -0.02, -0.60])  # only the last token has p < 0.66
    inputs.chosen_token_weights = _t([1.0, 1.0, 2.0, 1.0, 1.0])  # w~ of the last token = 5/6
    out = TABPOLoss()(inputs)
    assert out.metrics["tabpo/gated_tokens"].item() == 1
    assert out.metrics["tabpo/barrier"].item() == pytest.approx(5 / 6 * 0.60, rel=1e-12)
