"""The quantize transforms, one per config class, registered in ``QUANT_TRANSFORMS``.

A transform quantizes ``ctx.targets`` (selected decoder Linears, still float) of the model in place; the
LayerSpec of each comes from ``config.layer_spec``. ``layerwise`` is the shared GPTQ runner.
"""
from __future__ import annotations

import torch

from ..errors import CompressError
from ..registry import QUANT_TRANSFORMS
from .calibrate import capture_layer_inputs, collect_stats, run_layer
from .config import ActivationScheme, Int4, Int8Grouped, Int8WeightOnly
from .gptq import HessianAccumulator, gptq
from .modules import QuantLinear
from .smooth import search
from .transforms import fold_smoothing, quantize_int8_linear, quantize_static_linear, replace_linear, round_to_nearest


def _spec(model, config, name):
    return config.layer_spec(name, model.get_submodule(name).in_features)


def _gptq_linear(model, config, name, hess, input_scale=None, smooth=None):
    spec = _spec(model, config, name)
    codes, s = gptq(model.get_submodule(name).weight, hess, spec.weight, spec.group_size or 0, config.damp)
    replace_linear(model, name, codes, s, spec, input_scale, smooth)


def _rtn_all(model, config, ctx) -> None:
    for n in ctx.targets:
        spec = _spec(model, config, n)
        codes, s = round_to_nearest(model.get_submodule(n).weight.detach().float(), spec)
        replace_linear(model, n, codes, s, spec)


@QUANT_TRANSFORMS.register(Int8WeightOnly)
def int8_weight_only(model, config: Int8WeightOnly, ctx) -> None:
    if config.method == "gptq":
        return layerwise(model, ctx, ctx.targets, lambda n, h: _gptq_linear(model, config, n, h), "gptq int8")
    h = {}
    if ctx.loop is not None and config.weight_clip_search:
        firsts = [g.linears[0] for g in ctx.groups]
        st = collect_stats(model, ctx.loop, firsts)
        for g in ctx.groups:
            for n in g.linears:
                h[n] = st[g.linears[0]].mean_sq
        ctx.stats["calibration_tokens"] = st[firsts[0]].tokens
    for n in ctx.targets:
        quantize_int8_linear(model, n, h.get(n))


@QUANT_TRANSFORMS.register(Int8Grouped)
def int8_grouped(model, config: Int8Grouped, ctx) -> None:
    if config.method == "gptq":
        return layerwise(model, ctx, ctx.targets, lambda n, h: _gptq_linear(model, config, n, h), "gptq int8/g")
    _rtn_all(model, config, ctx)


@QUANT_TRANSFORMS.register(Int4)
def int4(model, config: Int4, ctx) -> None:
    for n in ctx.targets:  # the group rule is checked for every Linear before any work
        _spec(model, config, n)
    if config.method == "rtn":
        return _rtn_all(model, config, ctx)
    layerwise(model, ctx, ctx.targets, lambda n, h: _gptq_linear(model, config, n, h), "gptq int4")


@QUANT_TRANSFORMS.register(ActivationScheme)
def activation_scheme(model, config: ActivationScheme, ctx) -> None:
    """SmoothQuant factors and static activation scales searched per input group on calibration statistics,
    folded into the producing op, then weights by round to nearest or GPTQ."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    act = "int8-dyn" if config.act_granularity == "token" else config.act_format
    firsts = [g.linears[0] for g in ctx.groups]
    st = collect_stats(model, ctx.loop, firsts, rows_per_batch=config.rows_per_batch)
    ctx.stats["calibration_tokens"] = st[firsts[0]].tokens
    specs = {n: _spec(model, config, n) for n in ctx.targets}
    chosen, errs = {}, []
    for g in ctx.groups:
        live = [n for n in g.linears if n in specs]
        if not live or all(specs[n].float_input for n in live):  # weight-only group: no smoothing, no scale
            continue
        # smoothing folds into every Linear of the group and into the op before it: not into quantized ones
        foldable = not any(isinstance(model.get_submodule(n), QuantLinear) for n in g.linears + [g.prev])
        s0 = st[g.linears[0]]
        w = torch.cat([model.get_submodule(n).weight.detach().float() for n in live])
        c = search(s0.sample(), s0.amax, w, config.weight_format, act, config.alphas, config.clips,
                   config.smooth and foldable, g.repeat, head_dim, config.headroom)
        chosen[g.name] = c
        errs.append({"group": g.name, "alpha": c.alpha, "clip": c.clip, "rel_err": round(c.err, 6),
                     "rel_err_plain": round(c.base_err, 6)})
    for g in ctx.groups:  # fold every factor first: o_in / down_in fold into v_proj / up_proj rows
        c = chosen.get(g.name)
        if c is not None and c.smooth is not None:
            fold_smoothing(model, g, c.smooth, head_dim)
    ctx.stats["groups"] = errs
    by_linear = {n: chosen.get(g.name) for g in ctx.groups for n in g.linears if n in specs}

    def act_args(n):  # (input_scale, smooth) of Linear n
        c = by_linear[n]
        smooth = None if c is None else c.smooth
        return (None if specs[n].float_input or c is None else c.input_scale), smooth

    if config.method != "gptq":
        for n in by_linear:
            quantize_static_linear(model, n, specs[n], *act_args(n))
        return
    layerwise(model, ctx, list(by_linear), lambda n, h: _gptq_linear(model, config, n, h, *act_args(n)),
              f"gptq {config.weight_format}")


def layerwise(model, ctx, targets, finish, label) -> None:
    """Decoder layer by layer: accumulate each target's input Hessian on the outputs of the already-quantized
    layers before it, call ``finish(name, H)`` for each target, then feed the quantized layer forward."""
    if ctx.loop is None:
        raise CompressError("GPTQ needs calibration data")
    inputs = capture_layer_inputs(model, ctx.loop)
    ctx.stats["calibration_tokens"] = sum(h.shape[0] * h.shape[1] for h, _ in inputs)
    layers = model.model.layers
    bar = None
    if ctx.progress:
        from runtime.progress import bar as make_bar

        bar = make_bar(len(layers), label)
    for i, layer in enumerate(layers):
        prefix = f"model.layers.{i}."
        accs, handles = {}, []
        for g in ctx.groups:
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
