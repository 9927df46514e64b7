"""Fake-quant modules: the torch model that reproduces the stored low-precision numerics exactly.

``QuantLinear`` keeps the stored codes and scales (non-persistent buffers) and a float32 ``weight`` equal to
``dequantize(codes, scale)``; its forward fake-quantizes the input as the ONNX QDQ graph does, then runs a
float matmul.
"""
from __future__ import annotations

import torch
from torch import nn

from runtime.layerspec import LayerSpec

from . import primitives as P


class QuantLinear(nn.Module):
    """y = act_fq(x) @ dequant(codes, weight_scale).T + bias.   x: [..., in] -> [..., out].

    ``spec`` (a runtime.layerspec.LayerSpec) says what the codes are and how the input is quantized."""

    def __init__(self, codes: torch.Tensor, weight_scale: torch.Tensor, spec: LayerSpec,
                 input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 smooth_factor: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(spec, LayerSpec) or not spec.quantized:
            raise ValueError(f"QuantLinear needs a quantized LayerSpec, got {spec!r}")
        if spec.static_act and input_scale is None:
            raise ValueError("static activation quantization needs an input_scale")
        self.spec = spec
        self.register_buffer("codes", codes, persistent=False)  # int8 / fp8 [out, in]; int4 unpacked as int8
        self.register_buffer("weight_scale", weight_scale.float(), persistent=False)  # [out] or [out, in/g]
        self.register_buffer("weight", P.dequantize(codes, weight_scale))  # float32 [out, in]
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float().reshape(()),
                             persistent=False)
        self.register_buffer("smooth_factor", smooth_factor, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.out_features, self.in_features = codes.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.dynamic_act:
            x = P.fake_quant_int8_dynamic(x)
        elif self.spec.static_act:
            x = P.ACT_FAKE_QUANT[self.spec.act](x, self.input_scale)
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.spec.label()}"


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def layer_linears(model) -> list[tuple[str, nn.Linear]]:
    """Every nn.Linear inside the decoder layers, in order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{n}"]


def is_tied(model) -> bool:
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    return head is not None and emb is not None and head.weight is emb.weight
