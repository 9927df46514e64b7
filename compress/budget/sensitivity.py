"""How much each input group's quantization costs in loss, per candidate format: a second-order (Fisher)
proxy from one forward and backward pass per calibration window, no quantized forward per candidate.

For a Linear with input X and output y = X Wᵀ, quantizing it to format f changes its output by
Δy_f = q_f(X) q_f(W)ᵀ − X Wᵀ. q_f(W) is the weight as the quantize pass makes it: by GPTQ for the formats in
``gptq`` (with the Hessian of the group's input in the float model), else round to nearest.
Activation formats (fp8, int8-sq, int8-dyn) take the smoothing factors and activation clip their preset's pass
would choose for the group (compress.quant.smooth.search on the group's input max per channel and a sample of
its rows): X / s at that static scale (or per token) against q(W · s), rounded to nearest; on the cpu
target, weight-only formats see X as ONNX Runtime's kernel re-quantizes it, to int8 per block of 32 inputs,
or 16 for ``int8-fine``. With G = ∂(Σ_t loss_t)/∂y from the float model, the loss change is
≈ ½ Σ_t (Σ_o G_t,o Δy_t,o)², summed here over the Linears of a group (they are quantized together) and
divided by the number of tokens: the predicted increase of the mean log-perplexity. The losses are taken for
next tokens drawn from the model's own distribution (the Fisher of its predictions, whose quadratic form is
the expected KL divergence to the float model); the text's own next tokens (the empirical Fisher,
``labels="data"``) over-predicted the measured whole-model loss on SmolLM2 about twice as much
(docs/BENCHMARKS.md, ``python -m benchmarks.budget --runs rank``). Groups are assumed to add
up. ``head``: the lm_head's candidate formats (the cpu target's), scored the same way as group ``lm_head``.
``docs/QUANTIZATION.md`` shows how it ranks groups against measured perplexity.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant import primitives as P
from ..quant import smooth as S
from ..quant.calibrate import layer_groups
from ..quant.config import Fp8, Int8Dynamic, SmoothQuantInt8

ACT = {"fp8": "fp8", "int8-sq": "int8", "int8-dyn": "int8-dyn"}
ACT_CONFIGS = {"fp8": Fp8, "int8-sq": SmoothQuantInt8, "int8-dyn": Int8Dynamic}  # their presets' searches


def fake_weight(w: torch.Tensor, fmt: str, group: int = 128) -> torch.Tensor:
    """Round-to-nearest dequantized weight [out, in] of format ``fmt`` (grouped formats: ``group`` inputs per
    scale, or the largest of 64/32 below it that divides the input dim)."""
    if fmt in ("int8-wo", "int8-fine", "int8-sq", "int8-dyn"):
        s = P.int8_weight_scale(w)
        return P.dequantize(P.quantize_int8(w, s), s)
    if fmt == "int8-group":
        s = P.int8_group_scale(w, P.group_size_for(w.shape[1], group))
        return P.dequantize(P.quantize_int8(w, s), s)
    if fmt == "int4":
        s = P.int4_scale(w, P.group_size_for(w.shape[1], group))
        return P.dequantize(P.quantize_int4(w, s), s)
    if fmt == "fp8":
        s = P.fp8_weight_scale(w)
        return P.dequantize(P.quantize_fp8(w, s), s)
    raise ValueError(fmt)


def fake_input(x: torch.Tensor, fmt: str, block: int | None = None, act: "ActChoice | None" = None
               ) -> torch.Tensor:
    """The input as format ``fmt`` computes with it: activation formats divided by their smoothing factors and
    quantized at their chosen static scale (or per token), from ``act``; weight-only formats as the target's
    kernel re-quantizes it per ``block`` inputs (None: float)."""
    if fmt not in ACT:
        return x if block is None else P.fake_quant_int8_blocks(x, block)
    xs = x if act.smooth is None else x / act.smooth
    return S.fake_act(xs, act.act, act.input_scale)


@dataclass
class ActChoice:
    """An activation format's choice for one group, as the quantize pass makes it (compress.quant.smooth.search):
    smoothing factors [in] (None: none), static input scale (None: per token), the activation format."""
    act: str
    smooth: torch.Tensor | None
    input_scale: torch.Tensor | None


ACT_SAMPLE_ROWS = 64  # input rows per window kept for the activation formats' smoothing / clip search


def act_choice(fmt: str, x: torch.Tensor, amax_x: torch.Tensor, w: torch.Tensor, repeat: int, head_dim: int
               ) -> ActChoice:
    """What the ``fmt`` preset's pass chooses for a group with input sample ``x`` [R, in], per-channel input
    max ``amax_x`` [in] and concatenated weights ``w`` [out, in]: alpha (or none) and clip by output error."""
    cfg = ACT_CONFIGS[fmt]()
    act = "int8-dyn" if cfg.act_granularity == "token" else cfg.act_format
    c = S.search(x, amax_x, w, cfg.weight_format, act, cfg.alphas, cfg.clips, cfg.smooth, repeat, head_dim,
                 cfg.headroom)
    return ActChoice(act, c.smooth, c.input_scale)


WEIGHT_FORMATS = {"int8-wo": "int8", "int8-fine": "int8", "int8-group": "int8", "int4": "int4"}  # GPTQ's fmt


def gptq_weight(w: torch.Tensor, fac, fmt: str, group: int = 128) -> torch.Tensor:
    """The dequantized weight [out, in] GPTQ makes of ``w`` in weight-only format ``fmt`` given a Factor."""
    from ..quant.gptq import gptq

    group = P.group_size_for(w.shape[1], group) if fmt in ("int8-group", "int4") else 0
    codes, scale = gptq(w, fac, WEIGHT_FORMATS[fmt], group)
    return P.dequantize(codes, scale)


def _forward(model, batches, hooks) -> None:
    """The float model on ``batches`` with ``hooks`` registered, removed after."""
    try:
        with torch.no_grad():
            for b in batches:
                model(input_ids=b)
    finally:
        for h in hooks:
            h.remove()


def group_scores(model, batches: list[torch.Tensor], formats: list[str],
                 blocks: dict[str, int] | None = None, gptq: frozenset = frozenset(),
                 head: list[str] | None = None, hessian_batches: list[torch.Tensor] | None = None,
                 labels: str = "model", group: int = 128) -> dict[str, dict[str, float]]:
    """{group name: {format: predicted increase of mean log-perplexity}} for every input group of the decoder
    (compress.quant.calibrate.layer_groups), on the calibration windows ``batches`` ([1, S] token tensors).
    ``blocks``: {weight-only format: inputs per activation scale of the target's kernel}
    (compress.budget.search.KERNEL_BLOCKS); formats not in it see a float input. ``gptq``: the weight-only
    formats whose weights are made by GPTQ, with Hessians from ``hessian_batches`` (default ``batches``; other
    windows keep the prediction out of GPTQ's own sample). ``head``: also score the lm_head in these formats
    (group ``lm_head``). ``labels``: the next tokens the gradients are taken for: ``data`` (the text's own,
    the empirical Fisher) or ``model`` (drawn from the float model's own distribution at each position, whose
    expectation is the Fisher of the model's predictive distribution, i.e. the second-order term of the
    expected KL divergence). ``group``: the grouped formats' inputs per scale (int4, int8-group)."""
    from ..quant.calibrate import Group
    from ..quant.gptq import HessianAccumulator, factor

    if labels not in ("data", "model"):
        raise ValueError(f"labels: data or model, got {labels!r}")

    blocks = blocks or {}
    groups = layer_groups(model)
    formats = [f for f in formats if f != "float"]
    mods = dict(model.named_modules())
    fmts = {g.name: formats for g in groups}
    if head is not None:
        groups = groups + [Group("lm_head", ["lm_head"], "model.norm", "norm")]
        fmts["lm_head"] = [f for f in head if f != "float"]
    member = {n: g for g in groups for n in g.linears}
    # the activation formats' choices (smoothing, clip) from each group's input max per channel and a sample of
    # its rows, as the quantize pass makes them; GPTQ's Hessians
    acts = {g.name for g in groups if any(f in ACT for f in fmts[g.name])}
    amax: dict[str, torch.Tensor] = {}
    sample: dict[str, list[torch.Tensor]] = {g: [] for g in acts}
    hess = {g.name: HessianAccumulator(mods[g.linears[0]].in_features) for g in groups
            if any(f in gptq for f in fmts[g.name])}
    first = {g.name: mods[g.linears[0]] for g in groups}

    def see_input(g):
        def f(_m, a):
            x = a[0].detach().float().reshape(-1, a[0].shape[-1])
            m = x.abs().amax(dim=0)
            amax[g] = torch.maximum(amax[g], m) if g in amax else m
            sample[g].append(x[torch.linspace(0, x.shape[0] - 1, min(ACT_SAMPLE_ROWS, x.shape[0])).long()])
        return f

    if acts:
        _forward(model, batches, [first[g].register_forward_pre_hook(see_input(g)) for g in acts])
    if hess:
        _forward(model, hessian_batches or batches, [first[g].register_forward_pre_hook(a) for g, a in hess.items()])
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    wq, choice = {}, {}
    for g in groups:
        fac = factor(hess.pop(g.name).get()) if g.name in hess else None
        ws = [mods[n].weight.detach().float() for n in g.linears]
        for f in fmts[g.name]:
            if f in ACT:
                c = choice[g.name, f] = act_choice(f, torch.cat(sample[g.name]), amax[g.name], torch.cat(ws),
                                                   g.repeat, head_dim)
                for n, w in zip(g.linears, ws):  # weights in the smoothed space, rounded to nearest
                    wq[n, f] = fake_weight(w if c.smooth is None else w * c.smooth, f, group)
            else:
                for n, w in zip(g.linears, ws):
                    wq[n, f] = gptq_weight(w, fac, f, group) if f in gptq else fake_weight(w, f, group)
        del fac
    sample.clear()
    scores = {g.name: {f: 0.0 for f in fmts[g.name]} for g in groups}
    tokens = 0
    inputs: dict[str, torch.Tensor] = {}
    per_token: dict[tuple[str, str], torch.Tensor] = {}

    def fwd(name):
        def f(_m, a):
            inputs[name] = a[0].detach()
        return f

    def bwd(name):
        def f(_m, _gin, gout):
            g = gout[0].detach().float()[0]  # [S, out]
            x = inputs.pop(name).float()[0]  # [S, in]
            w = mods[name].weight.detach().float()
            y = x @ w.T
            grp = member[name].name
            seen: dict[int | None, torch.Tensor] = {}  # weight-only formats' inputs by kernel block: made once
            for fmt in fmts[grp]:
                blk = blocks.get(fmt)
                blk = blk if blk and x.shape[-1] % blk == 0 else None
                if fmt in ACT:
                    xin = fake_input(x, fmt, blk, choice[grp, fmt])
                else:
                    xin = seen[blk] if blk in seen else seen.setdefault(blk, fake_input(x, fmt, blk))
                dy = xin @ wq[name, fmt].T - y
                key = (grp, fmt)
                per_token[key] = per_token.get(key, 0) + (g * dy).sum(dim=1)  # [S]
        return f

    handles = []
    for n in member:
        handles.append(mods[n].register_forward_pre_hook(fwd(n)))
        handles.append(mods[n].register_full_backward_hook(bwd(n)))
    params = [p for p in model.parameters()]
    was = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        emb = model.get_input_embeddings()
        gen = torch.Generator().manual_seed(0)
        for b in batches:
            per_token.clear()
            h = emb(b).detach().requires_grad_(True)  # gradients flow to every Linear's output from here
            logits = model(inputs_embeds=h).logits[0, :-1].float()
            if labels == "model":
                target = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1, generator=gen)[:, 0]
            else:
                target = b[0, 1:]
            loss = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
            loss.backward()
            for (grp, fmt), v in per_token.items():
                scores[grp][fmt] += 0.5 * float((v.double() ** 2).sum())
            tokens += b.shape[1] - 1
    finally:
        for hd in handles:
            hd.remove()
        for p, r in zip(params, was):
            p.requires_grad_(r)
    return {g: {f: v / max(tokens, 1) for f, v in fs.items()} | {"float": 0.0} for g, fs in scores.items()}
