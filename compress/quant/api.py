"""Entry point ``quantize_(model, config, calib=...)``: quantize a Llama-style model in place.

``calib`` is a ``forward_loop(model)`` callable (compress.calib.forward_loop) or a list of token tensors
[1, S]; the activation schemes and GPTQ require it, weight-only round to nearest uses it when given
(weighted clipping). Each scheme's transform is registered per config class (compress/quant/schemes.py).
A model may be quantized by several passes with different configs (a mixed checkpoint): each pass
quantizes the selected Linears that are still float.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..errors import CompressError
from ..passes import QuantReport
from ..registry import QUANT_TRANSFORMS
from . import schemes  # noqa: F401  (registers the transforms)
from .calibrate import Group, layer_groups
from .config import QuantConfig
from .modules import QuantLinear, layer_linears
from .transforms import quantize_lm_head

STATE_ATTR = "kiln_quant"


@dataclass
class QuantContext:
    """What a transform gets besides the model and its config."""

    groups: list[Group]
    targets: list[str]  # selected decoder Linears that are still float
    loop: object | None  # forward_loop(model) or None
    progress: bool = False
    stats: dict = field(default_factory=dict)


def _as_loop(calib):
    if calib is None or callable(calib):
        return calib
    if isinstance(calib, (list, tuple)) and calib and all(isinstance(b, torch.Tensor) for b in calib):
        from ..calib import forward_loop

        return forward_loop(list(calib))
    raise CompressError("calib must be a forward_loop(model) callable or a list of token tensors [1, S]")


def is_quantized(model) -> bool:
    return hasattr(model, STATE_ATTR) or any(isinstance(m, QuantLinear) for m in model.modules())


def quant_state(model) -> dict:
    """{"passes": [QuantPass or QuantReport, ...], "lm_head": {"spec", "codes", "scale"} or None} of a
    quantized model: the passes read from its checkpoint, then the reports of this process's passes."""
    return getattr(model, STATE_ATTR, None) or {"passes": [], "lm_head": None}


def _head_is_float(model) -> bool:
    head = model.get_output_embeddings()
    return head is not None and not isinstance(head, QuantLinear) and quant_state(model)["lm_head"] is None


def quantize_(model, config: QuantConfig, calib=None, progress: bool = False) -> QuantReport:
    """Quantize the selected, still float Linears of ``model`` in place; returns the pass report (also kept,
    with the passes before it, in ``model.kiln_quant``)."""
    if not isinstance(config, QuantConfig):
        raise CompressError(f"config must be a quantization config (Int8WeightOnly, Fp8, ...), got {config!r}")
    transform = QUANT_TRANSFORMS.get(config)
    loop = _as_loop(calib)
    if config.needs_calibration and loop is None:
        hint = "; pass calib= or use method='rtn'" if hasattr(config, "method") else ""
        raise CompressError(f"scheme {config.scheme}{' with method gptq' if hint else ''} needs calibration data "
                            f"(calib=forward_loop or token batches){hint}")
    sel = config.selection
    linears = [n for n, _ in layer_linears(model)]
    targets = [n for n in linears if sel(n)]
    head = sel("lm_head") and _head_is_float(model)
    if not targets and not head:
        if is_quantized(model):
            raise CompressError("this model is already quantized where the config selects; quantize the float "
                                "(or pruned) model, or select Linears that are still float")
        raise CompressError(f"no Linear matches targets {list(config.targets)} minus ignore {list(config.ignore)}")
    t0 = time.perf_counter()
    before = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    ctx = QuantContext(groups=layer_groups(model), targets=targets, loop=loop, progress=progress)
    head_rec = None
    with torch.no_grad():
        if targets:
            transform(model, config, ctx)
        if head:
            head_rec = quantize_lm_head(model, config.head_spec(model.config.hidden_size))
    layers = {n: m.spec for n, m in model.named_modules() if isinstance(m, QuantLinear) and n not in before}
    if head_rec is not None:
        layers["lm_head"] = head_rec["spec"]
    ctx.stats["seconds"] = round(time.perf_counter() - t0, 1)
    report = QuantReport(config=config, layers=layers, stats=ctx.stats)
    state = quant_state(model)
    tied = head_rec if head_rec is not None and "codes" in head_rec else state["lm_head"]
    object.__setattr__(model, STATE_ATTR, {"passes": state["passes"] + [report], "lm_head": tied})
    return report
