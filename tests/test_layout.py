"""Row layouts (posttrain.data.layout): shared prompt and packing give the plain path's numbers.

In float64 on a tiny Llama, every layout's per-token log-probs of every response, the DPO loss and
its gradient w.r.t. every weight equal those of the plain layout (one padded row per sequence) to
1e-9; the plain layout itself equals a forward of each sequence alone. The trainer with each switch
takes the same steps (loss, gradient norm), with the reference live or precomputed.

transformers' LlamaRMSNorm computes in float32 whatever the model's dtype, and so does its backward:
the shared prompt adds the two responses' gradients before the norm's backward, the plain path after
it, which differ by float32 rounding (~1e-7). The `float64_norm` fixture makes the norm compute in
the model's dtype, so the comparison measures the layouts and not that cast. Eager attention's
softmax is float32 too, with the same effect on gradients: its stated tolerance is rtol 1e-6, atol 1e-7.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest
import torch

from conftest import make_tiny_model
from helpers import recipe_from, tiny_recipe
from posttrain.config import LossTerm
from posttrain.core import PolicyLogProbs, StepCounts, backward_through_coefficients
from posttrain.data.layout import build_pair_rows, pack, shared_length
from posttrain.data.tokenize import TokenizedPair
from posttrain.losses import PairLossInputs, build_loss
from posttrain.trainer import Trainer

TOL = dict(rtol=1e-9, atol=1e-9)
VOCAB = 120


@pytest.fixture
def float64_norm(monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    monkeypatch.setattr(LlamaRMSNorm, "forward", forward)


def _pairs(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)

    def ids(low, high):
        return torch.randint(3, VOCAB, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()

    pairs = [TokenizedPair(ids(1, 15), ids(1, 20), ids(1, 20), "synthetic", i + 1) for i in range(n)]
    pairs[0].prompt_ids = pairs[0].prompt_ids[:1]  # a one-token prompt: the repeated token is the whole prompt
    return pairs


def _dpo_step(model, pairs, **layout):
    """Per-token log-probs, DPO loss and gradients of one batch in a layout (fixed reference values)."""
    model.zero_grad(set_to_none=True)
    rows = build_pair_rows(pairs, pad_id=2, attention=model.config._attn_implementation,
                           mask_dtype=torch.float64, **layout)
    logps = PolicyLogProbs(model)(*rows.model_inputs())
    chosen, rejected = rows.split(logps)
    mask_w, mask_l = rows.chosen_mask.double(), rows.rejected_mask.double()
    b = len(pairs)
    g = torch.Generator().manual_seed(1)
    ref_w = -torch.rand(mask_w.shape, generator=g, dtype=torch.float64) * mask_w
    ref_l = -torch.rand(mask_l.shape, generator=g, dtype=torch.float64) * mask_l
    inputs = PairLossInputs(chosen, rejected, mask_w, mask_l, torch.ones(b, dtype=torch.float64), ref_w, ref_l)
    counts = StepCounts(examples=b, tokens=float(mask_w.sum()))
    plugin = build_loss([LossTerm(name="dpo", params={"beta": 0.5})])
    # the trainer's gradient path: coefficients c = -dL/dlp on the log-probs, backpropagated through the model
    out, _ = backward_through_coefficients(
        lambda leaves: plugin.step_loss(replace(inputs, **leaves), counts),
        {"chosen_logps": chosen, "rejected_logps": rejected}, lambda surrogate: surrogate.backward())
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return rows, chosen.detach(), rejected.detach(), out.loss, grads


def _alone(model, prompt, response):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].double()
    return logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None])[:, 0]


LAYOUTS = [dict(share_prompt=True), dict(pack_tokens=40), dict(pack_tokens=10_000),
           dict(share_prompt=True, pack_tokens=60), dict(share_prompt=True, pack_tokens=10_000)]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_every_layout_gives_the_plain_log_probs_loss_and_gradients(attention, float64_norm):
    model = make_tiny_model(VOCAB, dtype=torch.float64)
    model.set_attn_implementation(attention)
    pairs = _pairs()
    plain_rows, plain_w, plain_l, plain_loss, plain_grads = _dpo_step(model, pairs)
    assert plain_rows.position_ids is None and plain_rows.attention_mask.dim() == 2
    tol = TOL if attention == "sdpa" else dict(rtol=1e-6, atol=1e-7)  # eager: float32 softmax (docstring)
    for b, p in enumerate(pairs[:3]):  # the plain path is each sequence alone
        torch.testing.assert_close(plain_w[b, :len(p.chosen_ids)], _alone(model, p.prompt_ids, p.chosen_ids), **tol)
        torch.testing.assert_close(plain_l[b, :len(p.rejected_ids)], _alone(model, p.prompt_ids, p.rejected_ids),
                                   **tol)
    for layout in LAYOUTS:
        rows, chosen, rejected, loss, grads = _dpo_step(model, pairs, **layout)
        assert rows.attention_mask.dim() == 4, layout
        torch.testing.assert_close(chosen, plain_w, **TOL)
        torch.testing.assert_close(rejected, plain_l, **TOL)
        torch.testing.assert_close(rows.chosen_mask, plain_rows.chosen_mask, rtol=0, atol=0)
        torch.testing.assert_close(loss, plain_loss, **TOL)
        assert plain_loss.item() > 0
        for name, grad in plain_grads.items():
            assert grad.abs().max() > 0, name
            torch.testing.assert_close(grads[name], grad, **tol, msg=lambda m, n=name, l=layout: f"{l} {n}: {m}")


def test_rows_hold_the_tokens_each_layout_promises():
    pairs = _pairs()
    separate = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    plain = build_pair_rows(pairs, pad_id=2)
    assert plain.input_ids.shape[0] == 2 * len(pairs) and plain.real_tokens == separate
    assert plain.total_positions > separate  # padded to the longest sequence
    one_row = build_pair_rows(pairs, pad_id=2, pack_tokens=10_000)
    assert one_row.input_ids.shape == (1, separate) and one_row.total_positions == separate  # no padding at all
    assert (one_row.position_ids == 0).sum() == 2 * len(pairs)  # positions restart at every sequence
    shared = build_pair_rows(pairs, pad_id=2, share_prompt=True, pack_tokens=10_000)
    assert shared.total_positions == shared.real_tokens == sum(shared_length(p) for p in pairs)
    assert shared.real_tokens == separate - sum(len(p.prompt_ids) - 1 for p in pairs)
    budget = build_pair_rows(pairs, pad_id=2, share_prompt=True, pack_tokens=60)
    assert budget.input_ids.shape[0] == -(-shared.real_tokens // 60)
    assert budget.input_ids.shape[1] < 60 + max(shared_length(p) for p in pairs)
    # the mask: a rejected token sees the prompt and the rejected branch, never the chosen response
    p = pairs[1]
    row = build_pair_rows([p], pad_id=2, share_prompt=True)
    P, C = len(p.prompt_ids), len(p.chosen_ids)
    seen = row.attention_mask[0, 0, P + C + 1].nonzero()[:, 0].tolist()
    assert seen == list(range(P - 1)) + [P + C, P + C + 1]
    assert row.position_ids[0, P + C:P + C + 2].tolist() == [P - 1, P]


def test_pack_balances_rows_longest_first():
    assert pack([5, 3, 8, 2, 9], 10) == [[4], [2, 3], [0, 1]]  # 27 positions: 3 rows, 9 | 8+2 | 5+3
    assert pack([6, 6, 5, 5], 12) == [[0, 2], [1, 3]]  # 11 + 11, where filling rows in turn gives 12 + 10
    assert pack([12, 3], 10) == [[0], [1]]
    assert pack([4, 4, 4], 100) == [[0, 1, 2]]


def test_token_weights_follow_the_responses():
    pairs = _pairs(3)
    pairs[1].chosen_weights = [0.5 + k for k in range(len(pairs[1].chosen_ids))]
    rows = build_pair_rows(pairs, pad_id=2, share_prompt=True, pack_tokens=10_000)
    assert rows.chosen_weights[1, :len(pairs[1].chosen_ids)].tolist() == pairs[1].chosen_weights
    assert (rows.chosen_weights[0] == rows.chosen_mask[0]).all() and (rows.rejected_weights == rows.rejected_mask).all()
    pairs[2].rejected_weights = [1.0]
    with pytest.raises(ValueError, match="token weights"):
        build_pair_rows(pairs, pad_id=2)


def _two_steps(tiny_model_dir, tmp_path, name, train=None, reference=None):
    raw = tiny_recipe(tiny_model_dir, tmp_path / name, model={"dtype": "float64"},
                      data={"train": {"builtin": "tiny", "split": "train", "num_rows": 32}, "heldout": None},
                      train={"batch_size": 8, "micro_batch_size": 4, "lr": 5e-2, **(train or {})},
                      reference=reference or {}, logging={"progress_bar": False, "report_to": ["jsonl"]})
    trainer = Trainer(recipe_from(raw))
    trainer.setup()
    return [trainer.train_step(s) for s in range(3)]


def test_trainer_switches_take_the_same_steps(tiny_model_dir, tmp_path, float64_norm):
    plain = _two_steps(tiny_model_dir, tmp_path, "plain", {"share_prompt": False, "packing": False})
    assert plain[2]["rewards/margins"] != 0  # LoRA has moved: step 0 alone would be trivially equal
    for k, (train, reference) in enumerate([({"share_prompt": True, "packing": False}, None),
                                            ({"share_prompt": False, "packing": True}, None),
                                            ({"share_prompt": True, "packing": True, "pack_tokens": 48},
                                             {"precompute": True}),
                                            ({}, None)]):  # auto: shared and packed on sdpa
        other = _two_steps(tiny_model_dir, tmp_path, f"r{k}", train, reference)
        for a, b in zip(plain, other):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-9)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-9)
            assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], rel=1e-7, abs=1e-12)
            assert b["num_tokens"] == a["num_tokens"]


def test_trainer_refuses_the_layouts_where_the_mask_would_not_be_honoured(tiny_model_dir, tmp_path):
    from posttrain.errors import RecipeError

    raw = tiny_recipe(tiny_model_dir, tmp_path / "run", model={"attn_implementation": "flex_attention"},
                      data={"train": {"builtin": "tiny", "split": "train", "num_rows": 8}, "heldout": None},
                      train={"share_prompt": True}, logging={"progress_bar": False, "report_to": ["jsonl"]})
    with pytest.raises(RecipeError, match="train.share_prompt needs a custom 4-D attention mask, which model.attn_implementation 'flex_attention'"):
        Trainer(recipe_from(raw)).setup()


@pytest.mark.parametrize("attention", ["sdpa", "eager", "flex_attention"])
def test_auto_layout_is_the_fastest_the_kernel_honours_and_says_so(tiny_model_dir, tmp_path, attention, capsys):
    """The default (`auto`): the shared prompt where the kernel takes a custom 4-D mask, packing where the cost
    model says it pays, the plain layout otherwise (no error), and one log line saying which and why."""
    raw = tiny_recipe(tiny_model_dir, tmp_path / attention, model={"attn_implementation": attention},
                      data={"train": {"builtin": "tiny", "split": "train", "num_rows": 8}, "heldout": None},
                      logging={"progress_bar": False, "report_to": ["jsonl"]})
    trainer = Trainer(recipe_from(raw))
    trainer.setup()
    captured = capsys.readouterr()
    said = captured.err + captured.out
    shared, packed = trainer.context.share_prompt, trainer.context.pack_tokens is not None
    assert shared == (attention != "flex_attention")
    state = lambda on: "on" if on else "off"  # noqa: E731
    assert (f"row layout: shared prompt {state(shared)}, packing {state(packed)} (train.share_prompt / "
            f"train.packing auto: ") in said
    if shared:
        assert f"packing {'pays' if packed else 'does not pay'} for these lengths" in said


def test_packing_pays_where_lengths_vary_and_not_where_they_are_alike():
    """The cost model on SmolLM2-135M's shape (135M weights, 30 layers, attention width 576): 16 arithmetic-like
    segments of about 50 positions per micro-batch stack with almost no padding, so packing them into rows of
    1,024 only adds attention; 4 HH-like segments of 100 to 500 positions waste most of a padded batch. Attended
    segment by segment, packing saves the padding and costs nothing."""
    import random

    from posttrain.data.layout import packing_pays

    shape = dict(weights=135_000_000, layers=30, attention_width=576)
    assert not packing_pays([[50, 51, 52, 49] * 4] * 10, 1024, **shape)
    generator = random.Random(0)
    varied = [[generator.randint(100, 500) for _ in range(4)] for _ in range(20)]
    assert packing_pays(varied, 1024, **shape)
    assert not packing_pays(varied, 1024, margin=0.0, **shape)  # the margin is honoured
    # attended by segment (sdpa, posttrain.core.segments) packing adds no attention: what is left is the padding
    assert not packing_pays([[50, 51, 52, 49] * 4] * 10, 1024, by_segment=True, **shape)  # about 3% padding
    assert packing_pays([[50, 51, 52, 49, 35, 60] * 3] * 10, 1024, by_segment=True, **shape)  # about 17%
    assert packing_pays(varied, 1024, by_segment=True, **shape)


# ---------------------------------------------------------------------------------------------- groups
def _groups(n_groups=3, size=4, seed=2):
    g = torch.Generator().manual_seed(seed)

    def ids(low, high):
        return torch.randint(3, VOCAB, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()

    sequences, keys = [], []
    for k in range(n_groups):
        prompt = ids(1, 12) if k else ids(1, 2)  # group 0: a one-token prompt
        for _ in range(size):
            sequences.append((prompt, ids(1, 9)))
            keys.append(k)
    return sequences, keys


@pytest.mark.parametrize("layout", [dict(share=True), dict(pack_tokens=30), dict(share=True, pack_tokens=25),
                                    dict(share=True, pack_tokens=10_000)])
def test_group_layouts_give_the_plain_log_probs_and_gradients(layout, float64_norm):
    """A group's G completions sharing one prompt segment (and packed) score and differentiate like G
    separate rows: a policy-gradient surrogate sum(A_i * logp_it) on random advantages."""
    from posttrain.data.layout import build_sequence_rows, segment_length

    model = make_tiny_model(VOCAB, dtype=torch.float64)
    sequences, keys = _groups()
    advantages = torch.randn(len(sequences), 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def step(**kw):
        model.zero_grad(set_to_none=True)
        rows = build_sequence_rows(sequences, pad_id=2, mask_dtype=torch.float64, **kw)
        logps = rows.gather(PolicyLogProbs(model)(*rows.model_inputs()))
        (logps * advantages).sum().backward()
        return rows, logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_rows, plain, plain_grads = step()
    for i, (prompt, completion) in enumerate(sequences[:5]):
        torch.testing.assert_close(plain[i, :len(completion)], _alone(model, prompt, completion), **TOL)
    rows, logps, grads = step(shared_by=keys if layout.get("share") else None, pack_tokens=layout.get("pack_tokens"))
    torch.testing.assert_close(rows.completion_mask, plain_rows.completion_mask, rtol=0, atol=0)
    torch.testing.assert_close(logps, plain, **TOL)
    for name, grad in plain_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads[name], grad, **TOL, msg=lambda m, n=name: f"{layout} {n}: {m}")
    if layout.get("share"):  # each group's prompt once: G - 1 repeated last tokens instead of G - 1 prompts
        by_group = {}
        for (prompt, completion), k in zip(sequences, keys):
            by_group.setdefault(k, (prompt, []))[1].append(completion)
        assert rows.real_tokens == sum(segment_length(p, cs) for p, cs in by_group.values())
        assert rows.real_tokens == plain_rows.real_tokens - sum((len(p) - 1) * (len(cs) - 1)
                                                                for p, cs in by_group.values())


def test_online_layouts_take_the_same_grpo_steps(tiny_model_dir, tmp_path, monkeypatch, float64_norm):
    """The online trainer with train.share_prompt / train.packing takes GRPO's plain steps (float64, KL to the
    adapter-off reference on, two updates per rollout batch so pi_old comes from a sampling pass, two groups
    per micro-batch, the same seeded rollouts)."""
    import shutil
    from pathlib import Path

    from test_online_distributed import DETERMINISTIC_ENGINE, _grpo_raw

    (tmp_path / "seeded_engine.py").write_text(DETERMINISTIC_ENGINE)
    shutil.copy(Path(__file__).parent / "online_rewards.py", tmp_path / "online_rewards.py")
    monkeypatch.syspath_prepend(str(tmp_path))

    def steps(name, **train):
        raw = _grpo_raw(tiny_model_dir, tmp_path / name)
        raw["train"].update({"max_steps": 3, "micro_batch_size": 2, "lr": 0.2, **train})
        raw["rollout"].update({"updates_per_batch": 2})
        trainer = Trainer(recipe_from(raw))
        trainer.setup()
        return [trainer.train_step(s) for s in range(3)]

    plain = steps("plain")
    assert plain[2]["kl"] > 0
    for k, train in enumerate([{"share_prompt": True}, {"packing": True, "pack_tokens": 24},
                               {"share_prompt": True, "packing": True}]):
        other = steps(f"r{k}", **train)
        for a, b in zip(plain, other):
            assert b["reward/mean"] == a["reward/mean"]  # the same rollouts
            for key in ("loss", "grad_norm", "kl", "update2/loss", "update2/grad_norm"):
                assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-12), (train, key)


def _mask_of(pieces, width: int) -> torch.Tensor:
    """The [W, W] mask a row's pieces (posttrain.core.segments.row_pieces) attend by."""
    mask = torch.zeros(width, width, dtype=torch.bool)
    for q0, q1, keys, piece_mask in pieces:
        columns = torch.cat([torch.arange(k0, k1) for k0, k1 in keys])
        n = q1 - q0
        mask[q0:q1, columns] = torch.ones(n, n, dtype=torch.bool).tril() if piece_mask is None else piece_mask[0, 0]
    return mask


def test_segment_attention_cuts_packed_rows_at_their_segments_and_gives_the_whole_rows_numbers(
        float64_norm, monkeypatch):
    """posttrain.core.segments: sdpa piece by piece over packed shared-prompt rows. The pieces attend by exactly the
    row's mask (the prompt and first response one causal piece, each later response its own queries over the
    prompt's keys and its own), they start where the layout's segments start (position id 0; each padding position
    once MIN_BLOCK allows it), a mask that lets a query see a later block is not cut, and log-probs and gradients
    equal sdpa's over whole rows to 1e-9 in float64; under gradient checkpointing (recomputed outside the forward)
    rows stay whole."""
    import posttrain.core.logprobs as logprobs_module
    from posttrain.core import segments

    monkeypatch.setattr(segments, "MIN_BLOCK", 1)
    monkeypatch.setattr(segments, "CALL_PRODUCTS", 1)
    model = make_tiny_model(VOCAB, dtype=torch.float64)
    pairs = _pairs()
    layout = dict(share_prompt=True, pack_tokens=60)
    rows, chosen, rejected, loss, grads = _dpo_step(model, pairs, **layout)
    cut = [(r, row) for r, row in enumerate(rows.attention_mask._posttrain_pieces) if row is not None]
    assert len(cut) == len(rows.input_ids)
    for r, row in cut:
        assert torch.equal(_mask_of(row, rows.input_ids.shape[1]), rows.attention_mask[r, 0])
        starts = [q0 for q0, *_ in row]
        assert set((rows.position_ids[r] == 0).nonzero().flatten().tolist()) <= set(starts)
    assert any(len(keys) == 2 for _, row in cut for _, _, keys, _ in row)  # responses over the prompt's keys

    by_segment = logprobs_module.segment_attention_for
    monkeypatch.setattr(logprobs_module, "segment_attention_for", lambda *args: contextlib.nullcontext())
    whole_rows, whole_w, whole_l, whole_loss, whole_grads = _dpo_step(model, pairs, **layout)
    assert not hasattr(whole_rows.attention_mask, "_posttrain_pieces")
    torch.testing.assert_close(chosen, whole_w, **TOL)
    torch.testing.assert_close(rejected, whole_l, **TOL)
    torch.testing.assert_close(loss, whole_loss, **TOL)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(grads[name], grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")

    ahead = torch.eye(8, dtype=torch.bool)
    ahead[:4, 4:] = True  # queries 0-3 see keys 4-7
    assert segments.row_pieces(ahead) is None
    assert segments.row_pieces(torch.ones(8, 8, dtype=torch.bool).tril()) == [(0, 8, ((0, 8),), None)]
    two = torch.zeros(8, 8, dtype=torch.bool)
    two[:4, :4] = two[4:, 4:] = torch.ones(4, 4, dtype=torch.bool).tril()
    assert segments.row_pieces(two) == [(0, 4, ((0, 4),), None), (4, 8, ((4, 8),), None)]  # 44 products saved
    monkeypatch.setattr(segments, "CALL_PRODUCTS", 45)
    assert segments.row_pieces(two) is None  # not worth an extra call

    monkeypatch.setattr(logprobs_module, "segment_attention_for", by_segment)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    checkpointed_rows, checkpointed_w, *_ = _dpo_step(model, pairs, **layout)
    assert not hasattr(checkpointed_rows.attention_mask, "_posttrain_pieces")
    torch.testing.assert_close(checkpointed_w, chosen, **TOL)
