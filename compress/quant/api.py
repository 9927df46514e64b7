"""Entry point ``quantize_(model, config, calib=...)``: quantize a Llama-style model in place.

``calib`` is a ``forward_loop(model)`` callable (compress.calib.forward_loop) or a list of token tensors
[1, S]; the activation schemes and GPTQ require it, weight-only round to nearest uses it when given
(weighted clipping). Each scheme's transform is registered per config class (compress/quant/schemes.py).
A model may be quantized by several passes with different configs (a mixed checkpoint): each pass
quantizes the selected Linears that are still float.
"""
from __future__ import annotations

import torch

from ..errors import CompressError
from ..passes import QuantReport
from ..registry import QUANT_TRANSFORMS
from . import schemes  # noqa: F401  (registers the transforms)
from .config import QuantConfig
from .gptq import HeadFactor
from .modules import QuantLinear, layer_linears
from .transforms import quantize_lm_head

STATE_ATTR = "kiln_quant"


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
    """Quantize the selected, still float Linears of ``model`` in place, decoder layer by decoder layer;
    returns the pass report (also kept, with the passes before it, in ``model.kiln_quant``)."""
    from ..sequential import InMemory

    check(model.config, config, calib)
    loop = _as_loop(calib)
    sel = config.selection
    targets = {n for n, _ in layer_linears(model) if sel(n)}
    head = sel("lm_head") and _head_is_float(model)
    if not targets and not head:
        if is_quantized(model):
            raise CompressError("this model is already quantized where the config selects; quantize the float "
                                "(or pruned) model, or select Linears that are still float")
        raise CompressError(f"no Linear matches targets {list(config.targets)} minus ignore {list(config.ignore)}")
    before = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    hidden = model.config.hidden_size
    hf = HeadFactor(model.model.norm, hidden, config.damp) if HeadFactor.wanted(config, head) else None
    stats = run_pass(InMemory(model), config, targets, loop, progress, last=hf)
    head_rec = None
    if head:
        with torch.no_grad():
            head_rec = quantize_lm_head(model, config.head_spec(hidden), hf.factor if hf else None)
    layers = {n: m.spec for n, m in model.named_modules() if isinstance(m, QuantLinear) and n not in before}
    if head_rec is not None:
        layers["lm_head"] = head_rec["spec"]
    report = QuantReport(config=config, layers=layers, stats=stats)
    state = quant_state(model)
    tied = head_rec if head_rec is not None and "codes" in head_rec else state["lm_head"]
    object.__setattr__(model, STATE_ATTR, {"passes": state["passes"] + [report], "lm_head": tied})
    return report


def check(hf_config, config: QuantConfig, calib) -> None:
    """Refuse what cannot run before any work: a non-config, a calibrated scheme without calibration data."""
    if not isinstance(config, QuantConfig):
        raise CompressError(f"config must be a quantization config (Int8WeightOnly, Fp8, ...), got {config!r}")
    QUANT_TRANSFORMS.get(config)
    if config.needs_calibration and calib is None:
        hint = "; pass calib= or use method='rtn'" if getattr(config, "method", None) == "gptq" else ""
        raise CompressError(f"scheme {config.scheme}{' with method gptq' if hint else ''} needs calibration data "
                            f"(calib=forward_loop or token batches){hint}")


def run_pass(source, config: QuantConfig, targets: set, loop, progress: bool, done=None,
             activation_budget: int | None = None, last=None, observe=None) -> dict:
    """Quantize ``targets`` of every decoder layer of ``source`` (compress.sequential); ``last(stream)`` gets
    the quant stream after the last layer; ``observe(i, layer)`` wraps the quant stream's run through each
    finished layer (a quant stream is carried for it when the scheme needs none). Returns the stats."""
    from ..sequential import run_sequential
    from .schemes import QuantContext, streams_for

    cfg = source.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    ctx = QuantContext(targets=set(targets), head_dim=head_dim, calibrated=loop is not None)
    transform = QUANT_TRANSFORMS.get(config)
    own = streams_for(config, loop is not None)
    streams = own | ({"quant"} if observe is not None else set())
    label = f"{'gptq' if 'quant' in own else 'quantize'} {config.scheme}" if progress else None
    run = run_sequential(source, lambda job: transform(job, config, ctx), loop=loop, streams=streams,
                         rows=getattr(config, "rows_per_batch", 0), draw_seed=0, progress=label, done=done,
                         activation_budget=activation_budget, last=last, observe=observe)
    if run["calibration_tokens"]:
        ctx.stats["calibration_tokens"] = run["calibration_tokens"]
    if run["activations_on_disk"]:
        ctx.stats["activations_on_disk"] = True
    ctx.stats["seconds"] = run["seconds"]
    return ctx.stats
