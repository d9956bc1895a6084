"""Gradient entanglement diagnostic (Yuan et al. 2024; spec section 12).

With g_w = grad sum_i log pi(y_w,i) and g_l = grad sum_i log pi(y_l,i) over a fixed diagnostic batch
(taken over the trainable LoRA parameters), a margin loss whose gradient is -(d_w g_w - d_l g_l)
changes the two log-probs, to first order with learning rate eta, by

    Delta log pi_w = eta (d_w ||g_w||^2 - d_l <g_w,g_l>)
    Delta log pi_l = eta (d_w <g_w,g_l> - d_l ||g_l||^2)

so the chosen log-prob rises iff <g_w,g_l>/||g_w||^2 < d_w/d_l and the rejected one falls iff
<g_w,g_l>/||g_l||^2 < d_l/d_w. When one of the two fails, both move the same way (both up or both
down): the entanglement the paper describes. For DPO (and cDPO, rDPO, IPO on summed log-probs)
d_w = d_l, so the ratio is 1; that is the default here.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from posttrain.data.tokenize import TokenizedPair
from posttrain.eval.ranking import separate_rows
from posttrain.zero import zero_stage


def entanglement_metrics(g_w: torch.Tensor, g_l: torch.Tensor, d_w: float = 1.0, d_l: float = 1.0,
                         eta: Optional[float] = None) -> dict:
    """Inner product, norms, cosine, ratios and the direction flags of spec section 12."""
    g_w, g_l = g_w.detach().double().flatten(), g_l.detach().double().flatten()
    ip = float(g_w @ g_l)
    norm_w2, norm_l2 = float(g_w @ g_w), float(g_l @ g_l)
    denom = math.sqrt(norm_w2 * norm_l2)
    ratio_w = ip / norm_w2 if norm_w2 > 0 else float("nan")
    ratio_l = ip / norm_l2 if norm_l2 > 0 else float("nan")
    chosen_up = bool(ratio_w < d_w / d_l)
    rejected_down = bool(ratio_l < d_l / d_w)
    out = {"inner_product": ip, "grad_norm_chosen": math.sqrt(norm_w2), "grad_norm_rejected": math.sqrt(norm_l2),
           "cosine": ip / denom if denom > 0 else float("nan"), "ratio_chosen": ratio_w, "ratio_rejected": ratio_l,
           "chosen_up": float(chosen_up), "rejected_down": float(rejected_down),
           "both_move_together": float(not (chosen_up and rejected_down)),
           "both_up": float(chosen_up and not rejected_down), "both_down": float(rejected_down and not chosen_up)}
    if eta is not None:
        out["delta_logp_chosen"] = eta * (d_w * norm_w2 - d_l * ip)
        out["delta_logp_rejected"] = eta * (d_w * ip - d_l * norm_l2)
    return out


def diagnostic_parameters(logprob_model) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable LoRA parameters, or every trainable parameter when there are no LoRA ones."""
    trainable = [(n, p) for n, p in logprob_model.named_parameters() if p.requires_grad]
    lora = [(n, p) for n, p in trainable if "lora_" in n]
    return lora or trainable


def gradient_entanglement(logprob_model, pairs: list[TokenizedPair], pad_id: int, d_w: float = 1.0,
                          d_l: float = 1.0, autocast_bf16: bool = False) -> dict:
    """Spec section 12 on one batch of pairs: one forward, one backward for each of g_w and g_l.

    Runs with the model in eval mode (no dropout, no random numbers drawn) and leaves `.grad` alone
    (torch.autograd.grad), so the training state is untouched.
    """
    if not pairs:
        raise ValueError("gradient_entanglement needs at least one pair")
    named = diagnostic_parameters(logprob_model)
    if not named:
        raise ValueError("gradient_entanglement: the model has no trainable parameters")
    params = [p for _, p in named]
    sequences = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    device = next(iter(params)).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in separate_rows(sequences, pad_id).items()}
    was_training = logprob_model.training
    logprob_model.eval()
    try:
        with torch.enable_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
            logps = logprob_model(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
            sums = logps.float().sum(-1) if logps.dtype == torch.bfloat16 else logps.sum(-1)
            k = len(pairs)
            chosen, rejected = sums[:k].sum(), sums[k:].sum()
        g_w = torch.autograd.grad(chosen, params, retain_graph=True, allow_unused=True)
        g_l = torch.autograd.grad(rejected, params, allow_unused=True)
    finally:
        logprob_model.train(was_training)
    flat = lambda grads: torch.cat([(g if g is not None else torch.zeros_like(p)).double().flatten()  # noqa: E731
                                    for g, p in zip(grads, params)])
    out = entanglement_metrics(flat(g_w), flat(g_l), d_w, d_l)
    out["pairs"] = len(pairs)
    out["parameters"] = int(sum(p.numel() for p in params))
    out["logp_chosen"] = float(chosen.detach())
    out["logp_rejected"] = float(rejected.detach())
    return out


def entanglement_due(eval_cfg, done: int) -> bool:
    """Whether the diagnostic runs after step `done`: every `eval.entanglement_every` steps
    (null: every `eval.every` steps; 0: never)."""
    every = eval_cfg.entanglement_every
    if every is None:
        every = eval_cfg.every
    return bool(every) and done % every == 0


class EntanglementDiagnostic:
    """The diagnostic on a fixed batch during training, written to the metrics as `entanglement/...`: the first
    `eval.entanglement_pairs` held-out pairs (training pairs without a held-out split). Under DeepSpeed ZeRO-3
    the parameters are partitioned over processes; the diagnostic is switched off there, with a message, once."""

    def __init__(self, accelerator, model, pairs: list[TokenizedPair], pad_id: int, bf16: bool, metrics, log):
        self.accelerator, self.model, self.pairs, self.pad_id = accelerator, model, pairs, pad_id
        self.bf16, self.metrics, self.log = bf16, metrics, log
        self.said_off = False

    def __call__(self, step: int) -> Optional[dict]:
        acc = self.accelerator
        if (zero_stage(acc) or 0) >= 3:
            if acc.is_main_process and not self.said_off:
                self.said_off = True
                self.log.warning("gradient-entanglement diagnostic switched off: under DeepSpeed ZeRO-3 each process "
                                 "holds a shard of the parameters; set eval.entanglement_every: 0 to silence this.")
            return None
        if not acc.is_main_process:  # every process holds the same parameters; one computes and logs
            return None
        result = gradient_entanglement(acc.unwrap_model(self.model), self.pairs, self.pad_id, autocast_bf16=self.bf16)
        self.metrics.write(step, result, prefix="entanglement")
        return result
