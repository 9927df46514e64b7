"""The quantize transforms, one per config class, registered in ``QUANT_TRANSFORMS``.

A transform quantizes one decoder layer (a ``compress.sequential.LayerJob``): the selected Linears of that
layer that are still float (``ctx.live(job)``), each to ``config.layer_spec``. ``streams_for`` says which
calibration streams the pass reads, so the sequential runner carries only those.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..registry import QUANT_TRANSFORMS
from .config import ActivationScheme, Int4, Int8Grouped, Int8WeightOnly, QuantConfig
from .gptq import factor, gptq
from .modules import QuantLinear
from .smooth import search
from .transforms import fold_smoothing, quantize_int8_linear, quantize_static_linear, replace_linear, round_to_nearest


@dataclass
class QuantContext:
    """What a transform gets besides the layer and its config."""

    targets: set  # selected decoder Linears (full names) that are still float
    head_dim: int
    calibrated: bool = False
    stats: dict = field(default_factory=dict)

    def live(self, job) -> list[str]:
        return [n for g in job.groups for n in g.linears if n in self.targets]


def streams_for(config: QuantConfig, calibrated: bool) -> frozenset:
    """The calibration streams a pass of ``config`` reads: "float" (statistics of the unmodified model),
    "quant" (inputs after the layers already quantized, for GPTQ)."""
    s = set()
    if isinstance(config, ActivationScheme):
        s.add("float")
    if getattr(config, "method", "rtn") == "gptq":
        s.add("quant")
    if isinstance(config, Int8WeightOnly) and config.weight_clip_search and calibrated:
        s.add("float")
    return frozenset(s)


def _spec(job, config, name):
    return config.layer_spec(name, job.get_submodule(name).in_features)


def gptq_layer(job, config, names: list[str], extra=lambda n: (None, None)) -> None:
    """GPTQ for ``names`` of this layer, each to ``config``'s spec (gptq_mixed)."""
    gptq_mixed(job, {n: config for n in names}, extra)


def gptq_mixed(job, configs: dict, extra=lambda n: (None, None)) -> None:
    """GPTQ for the Linears ``configs`` names, each to its own config's spec: Hessians on the quant stream
    through the layer as it is (float), in one run through it; one factorisation per group of Linears
    sharing an input (per damping), then each Linear's codes."""
    hess = job.hessians(list(configs))
    for g in job.groups:
        live = [n for n in g.linears if n in hess]
        if not live:
            continue
        h = hess.pop(live[0])
        damps = list(dict.fromkeys(configs[n].damp for n in live))
        factors = {d: factor(h.clone() if k < len(damps) - 1 else h, d) for k, d in enumerate(damps)}
        del h
        for n in live:
            hess.pop(n, None)
            spec = _spec(job, configs[n], n)
            codes, s = gptq(job.get_submodule(n).weight, factors[configs[n].damp], spec.weight, spec.group_size or 0)
            replace_linear(job, n, codes, s, spec, *extra(n))


def joint(parts: list) -> Callable:
    """The transform of several configs quantized in one layer-by-layer run (``parts``: [(config, ctx)],
    disjoint selections): per layer, the activation schemes first (in order; their smoothing folds into ops
    still float), then every weight-only GPTQ config's Linears by gptq_mixed (one Hessian run), then the
    weight-only ones rounded to nearest."""
    acts = [(QUANT_TRANSFORMS.get(c), c, x) for c, x in parts if isinstance(c, ActivationScheme)]
    wo = [(c, x) for c, x in parts if not isinstance(c, ActivationScheme)]
    gptq_wo = [(c, x) for c, x in wo if getattr(c, "method", "rtn") == "gptq"]
    rtn_wo = [(QUANT_TRANSFORMS.get(c), c, x) for c, x in wo if getattr(c, "method", "rtn") != "gptq"]

    def transform(job) -> None:
        for f, c, x in acts:
            f(job, c, x)
        mixed = {n: c for c, x in gptq_wo for n in x.live(job)}
        if mixed:
            gptq_mixed(job, mixed)
        for f, c, x in rtn_wo:
            f(job, c, x)
    return transform


def _rtn(job, config, names) -> None:
    for n in names:
        spec = _spec(job, config, n)
        codes, s = round_to_nearest(job.get_submodule(n).weight.detach().float(), spec)
        replace_linear(job, n, codes, s, spec)


@QUANT_TRANSFORMS.register(Int8WeightOnly)
def int8_weight_only(job, config: Int8WeightOnly, ctx: QuantContext) -> None:
    live = ctx.live(job)
    if config.method == "gptq":
        return gptq_layer(job, config, live)
    h = {}
    if job.float_stats and config.weight_clip_search:
        for g in job.groups:
            for n in g.linears:
                h[n] = job.float_stats[g.linears[0]].mean_sq
    for n in live:
        quantize_int8_linear(job, n, h.get(n), _spec(job, config, n))


@QUANT_TRANSFORMS.register(Int8Grouped)
def int8_grouped(job, config: Int8Grouped, ctx: QuantContext) -> None:
    live = ctx.live(job)
    (gptq_layer if config.method == "gptq" else _rtn)(job, config, live)


@QUANT_TRANSFORMS.register(Int4)
def int4(job, config: Int4, ctx: QuantContext) -> None:
    live = ctx.live(job)
    (gptq_layer if config.method == "gptq" else _rtn)(job, config, live)


@QUANT_TRANSFORMS.register(ActivationScheme)
def activation_scheme(job, config: ActivationScheme, ctx: QuantContext) -> None:
    """SmoothQuant factors and static activation scales searched per input group on the float stream's
    statistics, folded into the producing op, then weights by round to nearest or GPTQ."""
    act = "int8-dyn" if config.act_granularity == "token" else config.act_format
    specs = {n: _spec(job, config, n) for n in ctx.live(job)}
    chosen = {}
    for g in job.groups:
        live = [n for n in g.linears if n in specs]
        if not live or all(specs[n].float_input for n in live):  # weight-only group: no smoothing, no scale
            continue
        # smoothing folds into every Linear of the group and into the op before it: not into quantized ones
        foldable = not any(isinstance(job.get_submodule(n), QuantLinear) for n in g.linears + [g.prev])
        s0 = job.float_stats[g.linears[0]]
        w = torch.cat([job.get_submodule(n).weight.detach().float() for n in live])
        c = search(s0.sample(), s0.amax, w, config.weight_format, act, config.alphas, config.clips,
                   config.smooth and foldable, g.repeat, ctx.head_dim, config.headroom)
        chosen[g.name] = c
        ctx.stats.setdefault("groups", []).append(
            {"group": g.name, "alpha": c.alpha, "clip": c.clip, "rel_err": round(c.err, 6),
             "rel_err_plain": round(c.base_err, 6)})
    for g in job.groups:  # fold every factor first: o_in / down_in fold into v_proj / up_proj rows
        c = chosen.get(g.name)
        if c is not None and c.smooth is not None:
            fold_smoothing(job, g, c.smooth, ctx.head_dim)
    by_linear = {n: chosen.get(g.name) for g in job.groups for n in g.linears if n in specs}

    def act_args(n):  # (input_scale, smooth) of Linear n
        c = by_linear[n]
        smooth = None if c is None else c.smooth
        return (None if specs[n].float_input or c is None else c.input_scale), smooth

    if config.method != "gptq":
        for n in by_linear:
            quantize_static_linear(job, n, specs[n], *act_args(n))
        return
    gptq_layer(job, config, list(by_linear), act_args)
