"""How much each input group's quantization costs in loss, per candidate format: a second-order (Fisher)
proxy from one forward and backward pass per calibration window, no quantized forward per candidate.

For a Linear with input X and output y = X Wᵀ, quantizing it to format f changes its output by
Δy_f = q_f(X) q_f(W)ᵀ − X Wᵀ. q_f(W) is the weight as the quantize pass makes it: by GPTQ for the formats in
``gptq`` (with the Hessian of the group's input in the float model), else round to nearest.
Activation formats also quantize X with a static scale at the calibration max, or per token; on the cpu
target, weight-only formats see X as ONNX Runtime's kernel re-quantizes it, to int8 per block of 32 inputs,
or 16 for ``int8-fine``. With G = ∂(Σ_t loss_t)/∂y from the float model, the loss change is
≈ ½ Σ_t (Σ_o G_t,o Δy_t,o)², summed here over the Linears of a group (they are quantized together) and
divided by the number of tokens: the predicted increase of the mean log-perplexity. The losses are taken for
next tokens drawn from the model's own distribution (the Fisher of its predictions, whose quadratic form is
the expected KL divergence to the float model); the text's own next tokens (the empirical Fisher,
``labels="data"``) predicted 2.2x (fp8) and 2.3x (int4) the measured whole-model loss on SmolLM2, these
1.34x and 1.17x (``python -m benchmarks.budget --runs rank``). Groups are assumed to add
up. ``head``: the lm_head's candidate formats (the cpu target's), scored the same way as group ``lm_head``.
``docs/QUANTIZATION.md`` shows how it ranks groups against measured perplexity.
"""
from __future__ import annotations

import torch

from ..quant import primitives as P
from ..quant.calibrate import layer_groups

ACT = {"fp8": "fp8", "int8-sq": "int8", "int8-dyn": "int8-dyn"}


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


def fake_input(x: torch.Tensor, fmt: str, amax: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """The input as format ``fmt`` computes with it: activation formats at their static (or per-token) scale;
    weight-only formats as the target's kernel re-quantizes it per ``block`` inputs (None: float)."""
    act = ACT.get(fmt)
    if act is None:
        return x if block is None else P.fake_quant_int8_blocks(x, block)
    if act == "int8-dyn":
        return P.fake_quant_int8_dynamic(x)
    return P.ACT_FAKE_QUANT[act](x, P.static_scale(amax, act))


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
    # the activation formats' static scales: the calibration max of each group's input; GPTQ's Hessians
    amax: dict[str, torch.Tensor] = {}
    hess = {g.name: HessianAccumulator(mods[g.linears[0]].in_features) for g in groups
            if any(f in gptq for f in fmts[g.name])}
    first = {g.name: mods[g.linears[0]] for g in groups}

    def see_amax(g):
        def f(_m, a):
            amax[g] = torch.maximum(amax.get(g, torch.tensor(0.0)), a[0].detach().abs().max().float())
        return f

    _forward(model, batches, [first[g].register_forward_pre_hook(see_amax(g)) for g in first])
    if hess:
        _forward(model, hessian_batches or batches, [first[g].register_forward_pre_hook(a) for g, a in hess.items()])
    wq = {}
    for g in groups:
        fac = factor(hess.pop(g.name).get()) if g.name in hess else None
        for n in g.linears:
            w = mods[n].weight.detach().float()
            for f in fmts[g.name]:
                wq[n, f] = gptq_weight(w, fac, f, group) if f in gptq else fake_weight(w, f, group)
        del fac
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
            for fmt in fmts[grp]:
                blk = blocks.get(fmt)
                xin = fake_input(x, fmt, amax[grp], blk if blk and x.shape[-1] % blk == 0 else None)
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
