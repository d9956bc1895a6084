"""Sampling from merged LoRA weights (`rollout.merge_adapters`, docs/performance.md, "Generation").

A LoRA linear layer computes W x + s B A x: beside the base product, two thin products per layer, their casts
under autocast, a scale and an add, which at one token per row cost a decode step about as much as the base
matmuls of the attention block. For the length of one generate call the hf engine samples from

    W' = W + s B A    (one addmm in W's dtype: A and B rounded to it, as autocast rounds them in the adapter
                       path; products accumulated in fp32),

with the adapters switched off, and puts W back afterwards (about 0.1 s for SmolLM2's 210 layers here). W' is a
separate tensor: W itself is never written, so nothing drifts (merging and unmerging in place rounds bf16
weights twice). In fp32 the merged forward equals the adapter forward up to float rounding; with bf16 base
weights W' is rounded to bf16 where the adapter path adds its bf16 product to the base product, so the sampling
distribution moves by bf16 rounding (on SmolLM2 about as far as bf16 is from fp32: tests/test_bf16.py). So
`rollout.merge_adapters: auto` merges only where it is exact to rounding: fp32 or float64 base weights and no
autocast. Old-policy log-probs come from the trainer's forward, as for any engine.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def mergeable_lora_layers(model) -> list:
    """The model's LoRA linear layers, when every adapter of the model is plain LoRA on linear layers (no DoRA,
    no fully trained `modules_to_save`, which switching adapters off would also swap out); else []."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    layers = []
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            return []
        if isinstance(module, BaseTunerLayer):
            if type(module) is not LoraLinear or module.fan_in_fan_out or any(module.use_dora.values()):
                return []
            layers.append(module)
    return layers if hasattr(model, "disable_adapter") else []


def merge_is_exact(model, device_type: str) -> bool:
    """Whether W + s B A computes what the adapters compute up to fp32 rounding: base weights of at least fp32
    precision, and no autocast (which would round the merged weight to bf16 at every product)."""
    return _exact(mergeable_lora_layers(model), device_type)


def _exact(layers: list, device_type: str) -> bool:
    wide = all(layer.get_base_layer().weight.dtype in (torch.float32, torch.float64) for layer in layers)
    return wide and not torch.is_autocast_enabled(device_type)


@contextlib.contextmanager
def merged_adapter_weights(model, exact_only: bool = False):
    """Inside: `model` with its adapters off and each LoRA layer's base weight replaced by W + s B A of its active
    adapters. Yields whether it merged (False: a model without plain LoRA layers, or with `exact_only` one where
    merging is not exact to rounding (`merge_is_exact`); left as it is)."""
    layers = mergeable_lora_layers(model)
    device_type = layers[0].get_base_layer().weight.device.type if layers else "cpu"
    if not layers or (exact_only and not _exact(layers, device_type)):
        yield False
        return
    originals = []
    try:
        with torch.no_grad(), torch.autocast(device_type, enabled=False):  # W' in W's dtype
            for layer in layers:
                base = layer.get_base_layer()
                weight = merged = base.weight
                for name in layer.active_adapters:
                    if name in layer.lora_A:
                        merged = torch.addmm(merged, layer.lora_B[name].weight.to(weight.dtype),
                                             layer.lora_A[name].weight.to(weight.dtype), alpha=layer.scaling[name])
                originals.append((base, weight))
                base._parameters["weight"] = nn.Parameter(merged, requires_grad=False)
        with model.disable_adapter():
            yield True
    finally:
        for base, weight in originals:
            base._parameters["weight"] = weight
