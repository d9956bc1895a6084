"""bf16 base weights (`model.dtype: bfloat16` with LoRA): the frozen base is stored and multiplied in bf16, the
adapters, their gradients and the optimiser state stay fp32, the completion log-softmax is fp32; and the numbers
against fp32 on the same weights (docs/performance.md, "bf16 base weights")."""

from __future__ import annotations

import pytest
import torch

from helpers import recipe_from, tiny_recipe
from posttrain.core.logprobs import PolicyLogProbs
from posttrain.trainer import Trainer

# Stated tolerances on SmolLM2-135M (measured: see the test's message and docs/performance.md).
TOKEN_LOGP_MAX = 0.5  # nats, the largest per-token difference over the sequences
TOKEN_LOGP_MEAN = 0.1  # nats, the mean absolute per-token difference
DPO_LOSS_ABS = 5e-3  # the batch's mean DPO loss
MERGED_LOGP_MAX = 0.3  # nats: merged adapters against the adapter forward, both with bf16 base weights
MERGED_LOGP_MEAN = 0.12


def _sequences(tokenizer, n: int = 8):
    """(prompt ids, chosen ids, rejected ids) of the first built-in arithmetic pairs, chat template."""
    from posttrain.data.tasks import builtin_rows

    out = []
    for row in builtin_rows("arithmetic", "heldout", n):
        messages = [{"role": "user", "content": row.prompt}] if isinstance(row.prompt, str) else row.prompt
        prompt = tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                           add_special_tokens=False).input_ids
        answer = lambda text: tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]  # noqa: E731
        out.append((prompt, answer(row.chosen), answer(row.rejected)))
    return out


def _batch(sequences, pad_id):
    rows = [p + c for p, c, _ in sequences] + [p + r for p, _, r in sequences]
    starts = [len(p) for p, _, _ in sequences] * 2
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device="cpu")
    attention = torch.zeros_like(ids)
    loss_mask = torch.zeros_like(ids)
    for i, (row, start) in enumerate(zip(rows, starts)):
        ids[i, :len(row)] = torch.tensor(row, device="cpu")
        attention[i, :len(row)] = 1
        loss_mask[i, start:len(row)] = 1
    return ids, attention, loss_mask


def _policy(smollm2_dir, tmp_path, dtype: str, adapter_state=None):
    """The trainer's policy (posttrain.models.load_policy_and_reference) with a random LoRA on all linear layers; in
    fp32 its base weights are rounded to bf16, so that both precisions hold the same weights."""
    from posttrain.models import load_policy_and_reference

    raw = tiny_recipe(smollm2_dir, tmp_path / dtype, model={"dtype": dtype})
    torch.manual_seed(0)  # peft's initialisation of A
    model, _ = load_policy_and_reference(recipe_from(raw), needs_reference=False)
    with torch.no_grad():
        if dtype == "float32":
            for p in model.parameters():
                if not p.requires_grad:
                    p.copy_(p.to(torch.bfloat16).to(torch.float32))
        generator = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.01)
    if adapter_state is not None:
        model.load_state_dict(adapter_state, strict=False)
    return model.eval()


def test_bf16_base_weights_give_autocasts_numbers_and_stated_tolerances_to_fp32(smollm2_dir, tmp_path):
    """SmolLM2 with a random LoRA adapter, on the same weights (bf16-rounded) in three precisions: base weights
    stored in bf16 (`model.dtype: bfloat16`, which runs under autocast with an fp32 residual stream), fp32
    weights under autocast (`train.bf16`), and fp32. The first two give the same per-token log-probs; against fp32
    they are within the stated per-token and DPO-loss tolerances (adapter-off reference, beta 0.1)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    ids, attention, loss_mask = _batch(_sequences(tokenizer), tokenizer.pad_token_id or 0)
    fp32 = _policy(smollm2_dir, tmp_path, "float32")
    bf16 = _policy(smollm2_dir, tmp_path, "bfloat16", {k: v for k, v in fp32.state_dict().items() if "lora_" in k})
    assert {p.dtype for p in bf16.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in bf16.parameters() if not p.requires_grad} == {torch.bfloat16}

    def logps_and_loss(model, autocast):
        scorer = PolicyLogProbs(model)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            policy = scorer(ids, attention, loss_mask)
            with model.disable_adapter():
                reference = scorer(ids, attention, loss_mask)
        assert policy.dtype == torch.float32  # the log-softmax ran in fp32
        sums, ref_sums = policy.sum(-1).double(), reference.sum(-1).double()
        n = ids.shape[0] // 2
        margin = (sums[:n] - ref_sums[:n]) - (sums[n:] - ref_sums[n:])
        return policy.double(), float(-torch.nn.functional.logsigmoid(0.1 * margin).mean())

    exact, exact_loss = logps_and_loss(fp32, autocast=False)
    cast, cast_loss = logps_and_loss(fp32, autocast=True)
    half, half_loss = logps_and_loss(bf16, autocast=True)
    torch.testing.assert_close(half, cast, rtol=0, atol=1e-6)
    assert half_loss == pytest.approx(cast_loss, abs=1e-6)
    gap = (half - exact)[loss_mask[:, 1:].bool()].abs()
    message = (f"bf16 against fp32: per-token max {gap.max():.3g}, mean {gap.mean():.3g} nats; "
               f"DPO loss {half_loss:.6f} against {exact_loss:.6f}")
    print(message)
    assert gap.max() < TOKEN_LOGP_MAX and gap.mean() < TOKEN_LOGP_MEAN, message
    assert abs(half_loss - exact_loss) < DPO_LOSS_ABS, message
    assert gap.mean() > 1e-4  # the bf16 path did compute in bf16


def test_trainer_keeps_adapters_gradients_and_optimiser_state_fp32(tiny_model_dir, tmp_path):
    """Two DPO steps on a tiny model with `model.dtype: bfloat16`: the base weights stay bf16 and unchanged, the
    LoRA weights, their gradients and AdamW's moments are fp32, and the loss follows the fp32 run's."""
    def first_steps(dtype):
        raw = tiny_recipe(tiny_model_dir, tmp_path / dtype, model={"dtype": dtype},
                          data={"heldout": None}, train={"batch_size": 8, "micro_batch_size": 4, "lr": 5e-2},
                          logging={"progress_bar": False, "report_to": ["jsonl"]})
        trainer = Trainer(recipe_from(raw))
        trainer.setup()
        peft_model = trainer.peft_model
        frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
        records = [trainer.train_step(s) for s in range(2)]
        return trainer, peft_model, frozen, records

    trainer, model, frozen, records = first_steps("bfloat16")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    assert {p.grad.dtype for p in trainable if p.grad is not None} <= {torch.float32}
    moments = [s for s in trainer.optimizer.state.values() if "exp_avg" in s]
    assert moments and {s["exp_avg"].dtype for s in moments} == {torch.float32}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.dtype == torch.bfloat16 and torch.equal(p, frozen[name]), name
    _, _, _, reference = first_steps("float32")
    for a, b in zip(reference, records):
        assert b["loss"] == pytest.approx(a["loss"], abs=2e-2)


def test_merged_adapters_move_bf16_sampling_by_about_bf16s_own_error(smollm2_dir, tmp_path):
    """`rollout.merge_adapters: true` with bf16 base weights rounds W + s B A to bf16. On SmolLM2 with a random
    LoRA adapter the merged model's per-token log-probs are within the stated tolerances of the adapter forward:
    about as far as bf16 is from fp32 (above), which is why `auto` does not merge bf16 weights; and the engine
    does not merge them unless asked."""
    from transformers import AutoTokenizer

    from posttrain.rollout.merged import merge_is_exact, merged_adapter_weights

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    ids, attention, loss_mask = _batch(_sequences(tokenizer), tokenizer.pad_token_id or 0)
    model = _policy(smollm2_dir, tmp_path, "bfloat16")
    scorer = PolicyLogProbs(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        adapters = scorer(ids, attention, loss_mask).double()
        with merged_adapter_weights(model) as merged:
            merged_logps = scorer(ids, attention, loss_mask).double()
    assert merged is True
    gap = (merged_logps - adapters)[loss_mask[:, 1:].bool()].abs()
    message = f"merged against adapters, bf16 base weights: per-token max {gap.max():.3g}, mean {gap.mean():.3g} nats"
    print(message)
    assert gap.max() < MERGED_LOGP_MAX and gap.mean() < MERGED_LOGP_MEAN, message
    assert gap.max() > 0  # the merged weights were rounded to bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not merge_is_exact(model, "cpu")
    assert not merge_is_exact(model, "cpu")  # bf16 base weights
