"""Module transforms: fold smoothing factors, swap nn.Linear for QuantLinear, quantize the tied embedding."""
from __future__ import annotations

import torch
from torch import nn

from runtime.layerspec import LayerSpec

from . import primitives as P
from .calibrate import Group
from .gptq import gptq
from .modules import QuantLinear, is_tied, set_module
from .smooth import kv_part, quantize_weight

WEIGHT_CLIPS = (1.0, 0.98, 0.96, 0.94, 0.92, 0.9, 0.88, 0.85, 0.8)


def int8_scale_search(w: torch.Tensor, h: torch.Tensor | None, clips=WEIGHT_CLIPS) -> torch.Tensor:
    """Per output channel INT8 scale minimizing sum_j h_j (w_ij - q(w_ij))^2 over clip candidates.
    w: [out, in]; h: [in] mean x_j^2 of the input (None: plain max)."""
    base = P.int8_weight_scale(w)
    if h is None:
        return base
    def err(s):
        d = P.dequantize(P.quantize_int8(w, s), s) - w
        return (d * d * h[None, :]).sum(dim=1)  # [out]

    return P.pick_lowest_error((base * c, err(base * c)) for c in clips)


def replace_linear(model, name: str, codes, scale, spec: LayerSpec, input_scale=None, smooth=None) -> QuantLinear:
    lin = model.get_submodule(name)
    q = QuantLinear(codes, scale, spec, input_scale, lin.bias, smooth)
    set_module(model, name, q)
    return q


def round_to_nearest(w: torch.Tensor, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale) of a float weight [out, in] rounded to the nearest code of ``spec``'s weight format."""
    if spec.weight == "int4":
        s = P.int4_scale(w, spec.group_size)
        return P.quantize_int4(w, s), s
    if spec.weight == "int8":
        s = P.int8_group_scale(w, spec.group_size) if spec.group_size else P.int8_weight_scale(w)
        return P.quantize_int8(w, s), s
    return quantize_weight(w, spec.weight)


INT8 = LayerSpec("int8")


def quantize_int8_linear(model, name: str, h: torch.Tensor | None = None, spec: LayerSpec = INT8) -> QuantLinear:
    w = model.get_submodule(name).weight.detach().float()
    s = int8_scale_search(w, h)
    return replace_linear(model, name, P.quantize_int8(w, s), s, spec)


@torch.no_grad()
def fold_smoothing(model, group: Group, s: torch.Tensor, head_dim: int) -> None:
    """X' = X / s in the producing op, W' = W * s in every Linear of the group (outputs unchanged)."""
    prev = model.get_submodule(group.prev)
    if group.prev_kind == "norm":
        prev.weight.div_(s)
    else:
        r = kv_part(s, group.repeat, head_dim)  # [prev_out]
        prev.weight.div_(r[:, None])
        if prev.bias is not None:
            prev.bias.div_(r)
    for n in group.linears:
        model.get_submodule(n).weight.mul_(s[None, :])


def quantize_static_linear(model, name: str, spec: LayerSpec, input_scale, smooth) -> QuantLinear:
    w = model.get_submodule(name).weight.detach().float()
    codes, sc = quantize_weight(w, spec.weight)
    return replace_linear(model, name, codes, sc, spec, input_scale, smooth)


def head_codes(w: torch.Tensor, spec: LayerSpec, factor=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale) of lm_head rows ``w`` in weight-only ``spec``: by GPTQ with a ``HeadFactor``'s factor (rows
    are independent, so any block of rows), else round to nearest."""
    if factor is not None:
        return gptq(w, factor, spec.weight, spec.group_size or 0)
    return round_to_nearest(w, spec)


@torch.no_grad()
def quantize_lm_head(model, spec: LayerSpec, factor=None) -> dict:
    """Quantize the lm_head weight-only to ``spec``: by GPTQ with ``factor`` (compress.quant.gptq.HeadFactor),
    else round to nearest. Tied: the embedding table serves both (dequantized in place). Returns {"spec": ...,
    "codes": ..., "scale": ...} for saving."""
    if spec.act is not None:
        raise ValueError("the lm_head is quantized weight-only")
    codes, s = head_codes(model.get_output_embeddings().weight.detach().float(), spec, factor)
    if is_tied(model):
        model.get_input_embeddings().weight.copy_(P.dequantize(codes, s))
        return {"spec": spec, "codes": codes, "scale": s}
    replace_linear(model, "lm_head", codes, s, spec)
    return {"spec": spec}


def float_linear_from(q: QuantLinear) -> nn.Linear:
    """Back to a float nn.Linear holding the dequantized weight (used by GPTQ's layer runner)."""
    lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
    lin.weight.data.copy_(q.weight)
    if q.bias is not None:
        lin.bias.data.copy_(q.bias)
    return lin
