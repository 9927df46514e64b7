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
    return quantize_joint_(model, [config], calib, progress)[0]


def quantize_joint_(model, configs: list[QuantConfig], calib=None, progress: bool = False) -> list[QuantReport]:
    """Several configs with disjoint selections (a per-layer mix of formats) in ONE layer-by-layer run:
    the calibration inputs are captured once and each layer is run through once per stream, whatever the
    number of formats (compress.quant.schemes.joint says the order within a layer). One report per config,
    as separate passes would give (kiln.json keeps a pass per config); each report's stats carry the run's
    time and, when there are several, ``joint``: the schemes of the run in order."""
    from ..sequential import InMemory

    configs = list(configs)
    if not configs:
        raise CompressError("quantize_joint_ needs at least one config")
    for c in configs:
        check(model.config, c, calib)
    loop = _as_loop(calib)
    names = [n for n, _ in layer_linears(model)]
    targets = [{n for n in names if c.selection(n)} for c in configs]
    head_float = _head_is_float(model)
    heads = [k for k, c in enumerate(configs) if c.selection("lm_head") and head_float]
    _check_joint(model, configs, targets, heads)
    if not any(targets) and not heads:
        if is_quantized(model):
            raise CompressError("this model is already quantized where the config selects; quantize the float "
                                "(or pruned) model, or select Linears that are still float")
        c = configs[0]
        raise CompressError(f"no Linear matches targets {list(c.targets)} minus ignore {list(c.ignore)}")
    before = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    hidden = model.config.hidden_size
    head = heads[0] if heads else None
    hc = configs[head] if head is not None else None
    hf = HeadFactor(model.model.norm, hidden, hc.damp) if hc is not None and HeadFactor.wanted(hc, True) else None
    stats = run_joint(InMemory(model), list(zip(configs, targets)), loop, progress, last=hf)
    head_rec = None
    if hc is not None:
        with torch.no_grad():
            head_rec = quantize_lm_head(model, hc.head_spec(hidden), hf.factor if hf else None)
    made = {n: m.spec for n, m in model.named_modules() if isinstance(m, QuantLinear) and n not in before}
    reports = []
    for k, (c, t) in enumerate(zip(configs, targets)):
        layers = {n: spec for n, spec in made.items() if n in t}
        if k == head:
            layers["lm_head"] = head_rec["spec"]
        reports.append(QuantReport(config=c, layers=layers, stats=stats[k]))
    state = quant_state(model)
    tied = head_rec if head_rec is not None and "codes" in head_rec else state["lm_head"]
    object.__setattr__(model, STATE_ATTR, {"passes": state["passes"] + reports, "lm_head": tied})
    return reports


def _check_joint(model, configs, targets: list[set], heads: list[int]) -> None:
    """One config per Linear (two that select the same one would leave it to whichever runs first); in a run
    of several, each selects something, and an input group read by a config that uses the float stream's
    statistics (smoothing, static scales, clip search) is not split with another config: those statistics
    are taken before the layer changes, so a split group's other config would see the wrong input."""
    for a in range(len(configs)):
        for b in range(a + 1, len(configs)):
            both = targets[a] & targets[b]
            if both:
                raise CompressError(f"{configs[a].scheme} and {configs[b].scheme} both select {min(both)}: "
                                    "a joint run takes disjoint selections")
    if len(heads) > 1:
        raise CompressError(f"{configs[heads[0]].scheme} and {configs[heads[1]].scheme} both select the lm_head: "
                            "a joint run takes disjoint selections")
    if len(configs) < 2:
        return
    from .calibrate import layer_groups
    from .schemes import streams_for

    for k, c in enumerate(configs):
        if not targets[k] and k not in heads:
            raise CompressError(f"{c.scheme} (targets {list(c.targets)} minus ignore {list(c.ignore)}) selects no "
                                "Linear that is still float: leave it out of the joint run")
    owner = {n: k for k, t in enumerate(targets) for n in t}
    for g in layer_groups(model):
        ks = sorted({owner[n] for n in g.linears if n in owner})
        if len(ks) > 1 and any("float" in streams_for(configs[k], True) for k in ks):
            raise CompressError(f"{g.name} is split between {' and '.join(configs[k].scheme for k in ks)}: a joint "
                                "run keeps an input group with smoothing, static scales or clip search in one "
                                "config; quantize them with separate quantize_ calls")


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
    return run_joint(source, [(config, targets)], loop, progress, done, activation_budget, last, observe)[0]


def _one(config: QuantConfig, ctx):
    """The transform of a run of one config: its registered transform."""
    f = QUANT_TRANSFORMS.get(config)

    def transform(job) -> None:
        f(job, config, ctx)
    return transform


def run_joint(source, parts: list, loop, progress: bool, done=None, activation_budget: int | None = None,
              last=None, observe=None) -> list[dict]:
    """run_pass for several (config, targets) at once, in one layer-by-layer run; the stats of each."""
    from ..sequential import run_sequential
    from .schemes import QuantContext, joint, streams_for

    cfg = source.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    ctxs = [QuantContext(targets=set(t), head_dim=head_dim, calibrated=loop is not None) for _, t in parts]
    configs = [c for c, _ in parts]
    rows = {getattr(c, "rows_per_batch", 0) for c in configs} - {0}
    if len(rows) > 1:
        raise CompressError("a joint run samples one number of rows per batch; these configs ask for "
                            f"{sorted(rows)}")
    transform = joint(list(zip(configs, ctxs))) if len(parts) > 1 else _one(configs[0], ctxs[0])
    own = frozenset().union(*(streams_for(c, loop is not None) for c in configs))
    streams = own | ({"quant"} if observe is not None else set())
    label = None
    if progress:
        label = f"{'gptq' if 'quant' in own else 'quantize'} {'+'.join(c.scheme for c in configs)}"
    run = run_sequential(source, transform, loop=loop, streams=streams, rows=max(rows, default=0), draw_seed=0,
                         progress=label, done=done, activation_budget=activation_budget, last=last,
                         observe=observe)
    for ctx in ctxs:
        if run["calibration_tokens"]:
            ctx.stats["calibration_tokens"] = run["calibration_tokens"]
        if run["activations_on_disk"]:
            ctx.stats["activations_on_disk"] = True
        ctx.stats["seconds"] = run["seconds"]
        if len(configs) > 1:
            ctx.stats["joint"] = [c.scheme for c in configs]
    return [ctx.stats for ctx in ctxs]
