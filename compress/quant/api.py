"""Entry point ``quantize_(model, config, calib=...)``: quantize a Llama-style model in place.

``calib`` is a ``forward_loop(model)`` callable (compress.calib.forward_loop) or a list of token tensors
[1, S]; weight-only INT8 and round-to-nearest INT4 use it too when given (weighted clipping), the
activation schemes and GPTQ require it.
"""
from __future__ import annotations

import time

import torch

from ..errors import CompressError
from .calibrate import capture_layer_inputs, collect_stats, layer_groups, run_layer
from .config import Int4, Int8WeightOnly, QuantConfig, _ActQuant, matches
from .gptq import HessianAccumulator, gptq
from .modules import QuantLinear, layer_linears
from . import primitives as P
from .smooth import search
from .transforms import fold_smoothing, quantize_int8_linear, quantize_lm_head, quantize_static_linear, replace_linear

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


def quantize_(model, config: QuantConfig, calib=None, progress: bool = False) -> dict:
    """Quantize ``model`` in place; returns the kiln.json pass record (also kept as ``model.kiln_quant``)."""
    if not isinstance(config, QuantConfig):
        raise CompressError(f"config must be a quantization config (Int8WeightOnly, Fp8, ...), got {config!r}")
    if is_quantized(model):
        raise CompressError("this model is already quantized; quantize the float (or pruned) model instead")
    loop = _as_loop(calib)
    needs = isinstance(config, _ActQuant) or (isinstance(config, Int4) and config.method == "gptq")
    if isinstance(config, Int8WeightOnly) and config.method == "gptq" and loop is None:
        raise CompressError("int8-wo with method 'gptq' needs calibration data; pass calib= or use method='rtn'")
    if needs and loop is None:
        raise CompressError(f"scheme {config.scheme} needs calibration data (calib=forward_loop or token batches)")
    t0 = time.perf_counter()
    groups = layer_groups(model)
    targets = [n for n, _ in layer_linears(model) if not config.keeps_float(n)]
    stats: dict = {}
    with torch.no_grad():
        if isinstance(config, Int8WeightOnly):
            _int8_wo(model, config, groups, targets, loop, stats, progress)
        elif isinstance(config, Int4):
            _int4(model, config, groups, targets, loop, stats, progress)
        else:
            _act_scheme(model, config, groups, targets, loop, stats, progress)
        head = None
        if not config.keeps_float("lm_head") and model.get_output_embeddings() is not None:
            fmt = config.lm_head if isinstance(config, Int4) else "int8"
            head = quantize_lm_head(model, fmt, getattr(config, "group_size", 128))
    layers = {n: m.spec() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if head is not None:
        layers["lm_head"] = head["spec"]
    stats["seconds"] = round(time.perf_counter() - t0, 1)
    record = {"kind": "quantize", "config": config.to_dict(), "layers": layers, "stats": stats}
    object.__setattr__(model, STATE_ATTR, {"record": record, "lm_head": head})
    return record


def _int8_wo(model, config, groups, targets, loop, stats, progress) -> None:
    if config.method == "gptq" and loop is not None:
        return _gptq(model, config, groups, targets, loop, stats, progress, "int8", lambda n: None)
    h = {}
    if loop is not None and config.weight_clip_search:
        firsts = [g.linears[0] for g in groups]
        st = collect_stats(model, loop, firsts)
        for g in groups:
            for n in g.linears:
                h[n] = st[g.linears[0]].mean_sq
        stats["calibration_tokens"] = st[firsts[0]].tokens
    for n in targets:
        quantize_int8_linear(model, n, h.get(n))


def _act_scheme(model, config, groups, targets, loop, stats, progress) -> None:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    firsts = [g.linears[0] for g in groups]
    st = collect_stats(model, loop, firsts, rows_per_batch=config.rows_per_batch)
    stats["calibration_tokens"] = st[firsts[0]].tokens
    chosen, errs = {}, []
    float_in = {n for n in targets if matches(n, config.float_inputs)}
    for g in groups:
        live = [n for n in g.linears if n in targets]
        if not live or all(n in float_in for n in live):  # weight-only group: no smoothing, no input scale
            continue
        s0 = st[g.linears[0]]
        w = torch.cat([model.get_submodule(n).weight.detach().float() for n in live])
        c = search(s0.sample(), s0.amax, w, config.weight, config.act, config.alphas, config.clips,
                   config.smooth, g.repeat, head_dim, config.headroom)
        chosen[g.name] = c
        errs.append({"group": g.name, "alpha": c.alpha, "clip": c.clip, "rel_err": round(c.err, 6),
                     "rel_err_plain": round(c.base_err, 6)})
    for g in groups:  # fold every factor first: o_in / down_in fold into v_proj / up_proj rows
        c = chosen.get(g.name)
        if c is not None and c.smooth is not None:
            fold_smoothing(model, g, c.smooth, head_dim)
    stats["groups"] = errs
    by_linear = {n: chosen.get(g.name) for g in groups for n in g.linears if n in targets}

    def act_args(n):  # (act, input_scale, smooth) of Linear n
        c = by_linear[n]
        if n in float_in:
            return None, None, None if c is None else c.smooth
        return config.act, c.input_scale, c.smooth

    if not config.gptq:
        for n in by_linear:
            quantize_static_linear(model, n, config.weight, *act_args(n))
        return

    def finish(n, hess):
        codes, sc = gptq(model.get_submodule(n).weight, hess, config.weight, 0, config.damp)
        replace_linear(model, n, codes, sc, config.weight, *act_args(n))

    layerwise(model, groups, list(by_linear), loop, {}, progress, finish, f"gptq {config.weight}")


def _int4(model, config, groups, targets, loop, stats, progress) -> None:
    def gsize(n):
        try:
            return P.int4_group_size(model.get_submodule(n).in_features, config.group_size)
        except ValueError as e:
            raise CompressError(f"{n}: {e}") from None

    if config.method == "rtn" or loop is None:
        for n in targets:
            w = model.get_submodule(n).weight.detach().float()
            g = gsize(n)
            s = P.int4_scale(w, g)
            replace_linear(model, n, P.quantize_int4(w, s), s, "int4", group_size=g)
        return
    _gptq(model, config, groups, targets, loop, stats, progress, "int4", gsize)


def _gptq(model, config, groups, targets, loop, stats, progress, fmt, gsize) -> None:
    def finish(n, hess):
        g = gsize(n)
        codes, s = gptq(model.get_submodule(n).weight, hess, fmt, g or 0, config.damp)
        replace_linear(model, n, codes, s, fmt, group_size=g)

    layerwise(model, groups, targets, loop, stats, progress, finish, f"gptq {fmt}")


def layerwise(model, groups, targets, loop, stats, progress, finish, label) -> None:
    """Decoder layer by layer: accumulate each target's input Hessian on the outputs of the already-quantized
    layers before it, call ``finish(name, H)`` for each target, then feed the quantized layer forward."""
    inputs = capture_layer_inputs(model, loop)
    stats["calibration_tokens"] = sum(h.shape[0] * h.shape[1] for h, _ in inputs)
    layers = model.model.layers
    bar = None
    if progress:
        from runtime.progress import bar as make_bar

        bar = make_bar(len(layers), label)
    for i, layer in enumerate(layers):
        prefix = f"model.layers.{i}."
        accs, handles = {}, []
        for g in groups:
            live = [n for n in g.linears if n in targets] if g.name.startswith(prefix) else []
            if live:
                first = model.get_submodule(g.linears[0])
                acc = HessianAccumulator(first.in_features)
                handles.append(first.register_forward_pre_hook(acc))
                for n in live:
                    accs[n] = acc
        try:
            run_layer(layer, inputs)
        finally:
            for hd in handles:
                hd.remove()
        for n, acc in accs.items():
            finish(n, acc.get())
        inputs = run_layer(layer, inputs)
        if bar:
            bar.advance()
    if bar:
        bar.close()
