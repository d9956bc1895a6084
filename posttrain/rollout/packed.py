"""Sampling through bf16 linear weights prepacked for oneDNN (`rollout.prepack_weights`, docs/performance.md,
"Generation").

On a CPU, a bf16 `F.linear` hands oneDNN a row-major weight at every call. oneDNN also multiplies a weight that
was reordered once into its own blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, the layout inductor's
CPU freezing uses) through `torch.ops.mkldnn._linear_pointwise`, with the same products bit for bit and less
time per call: at SmolLM2's decode shapes here (32 rows, 576 x 1536 and the 49,152-row head) 20-25% less. For
one generate call the hf engine reorders every bf16 linear layer's weight once and runs the layer on that copy;
the layer's own weight is left as it is. Inputs are cast to bf16 as bf16 autocast casts them.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def prepacking_supported(device: torch.device) -> bool:
    """Whether this build's oneDNN multiplies bf16 on this CPU (never on another device)."""
    return (device.type == "cpu" and torch.backends.mkldnn.is_available()
            and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def packable_linear_layers(model) -> list[nn.Linear]:
    """The model's linear layers with bf16 weights on a CPU whose oneDNN supports bf16."""
    return [module for module in model.modules()
            if type(module) is nn.Linear and module.weight.dtype == torch.bfloat16
            and prepacking_supported(module.weight.device)]


def _packed_forward(layer: nn.Linear, rows_hint: int):
    """`layer`'s forward on its weight reordered once for oneDNN; an input that is not bf16 outside bf16 autocast
    goes to the layer's own forward (which says what is wrong)."""
    own_forward = layer.forward
    packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), rows_hint)
    bias = None if layer.bias is None else layer.bias.detach()

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            if not (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16):
                return own_forward(x)
            x = x.to(torch.bfloat16)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    return forward


@contextlib.contextmanager
def prepacked_linear_weights(model, rows_hint: int):
    """Inside: every packable linear layer of `model` (`packable_linear_layers`) multiplies a copy of its weight
    reordered for oneDNN, chosen for `rows_hint` rows per product (the decode steps' batch; other row counts give
    the same result). Yields how many layers it packed. Weights changed inside are not seen: pack after merging."""
    layers = packable_linear_layers(model)
    saved = [(layer, layer.__dict__.get("forward")) for layer in layers]
    try:
        with torch.no_grad():
            for layer in layers:
                layer.forward = _packed_forward(layer, rows_hint)
        yield len(layers)
    finally:
        for layer, own in saved:
            if own is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = own
