"""How much each input group's quantization costs in loss, per candidate format: a second-order (Fisher)
proxy from one forward and backward pass per calibration window, no quantized forward per candidate.

For a Linear with input X and output y = X Wᵀ, quantizing it to format f changes its output by
Δy_f = q_f(X) q_f(W)ᵀ − X Wᵀ (round-to-nearest weights; activation formats also quantize X with a static
scale at the calibration max, or per token; on the cpu target, weight-only formats see X as ONNX Runtime's
kernel re-quantizes it, to int8 per block of 32 inputs, or 16 for ``int8-fine``). With G = ∂(Σ_t loss_t)/∂y from the float model, the loss
change is ≈ ½ Σ_t (Σ_o G_t,o Δy_t,o)², summed here over the Linears of a group (they are quantized
together) and divided by the number of tokens: the predicted increase of the mean log-perplexity. Groups are
assumed to add up. ``docs/QUANTIZATION.md`` shows how it ranks groups against measured perplexity.
"""
from __future__ import annotations

import torch

from ..quant import primitives as P
from ..quant.calibrate import layer_groups

ACT = {"fp8": "fp8", "int8-sq": "int8", "int8-dyn": "int8-dyn"}


def fake_weight(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """Round-to-nearest dequantized weight [out, in] of format ``fmt``."""
    if fmt in ("int8-wo", "int8-fine", "int8-sq", "int8-dyn"):
        s = P.int8_weight_scale(w)
        return P.dequantize(P.quantize_int8(w, s), s)
    if fmt == "int8-group":
        s = P.int8_group_scale(w, P.group_size_for(w.shape[1]))
        return P.dequantize(P.quantize_int8(w, s), s)
    if fmt == "int4":
        s = P.int4_scale(w, P.group_size_for(w.shape[1]))
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


def group_scores(model, batches: list[torch.Tensor], formats: list[str],
                 blocks: dict[str, int] | None = None) -> dict[str, dict[str, float]]:
    """{group name: {format: predicted increase of mean log-perplexity}} for every input group of the decoder
    (compress.quant.calibrate.layer_groups), on the calibration windows ``batches`` ([1, S] token tensors).
    ``blocks``: {weight-only format: inputs per activation scale of the target's kernel}
    (compress.budget.search.KERNEL_BLOCKS); formats not in it see a float input."""
    blocks = blocks or {}
    groups = layer_groups(model)
    formats = [f for f in formats if f != "float"]
    mods = dict(model.named_modules())
    member = {n: g for g in groups for n in g.linears}
    # the activation formats' static scales: the calibration max of each group's input
    amax: dict[str, torch.Tensor] = {}
    hooks = [mods[g.linears[0]].register_forward_pre_hook(
        lambda _m, a, g=g: amax.__setitem__(g.name, torch.maximum(amax.get(g.name, torch.tensor(0.0)),
                                                                   a[0].detach().abs().max().float())))
        for g in groups]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b)
    for h in hooks:
        h.remove()
    wq = {(n, f): fake_weight(mods[n].weight.detach().float(), f) for n in member for f in formats}
    scores = {g.name: {f: 0.0 for f in formats} for g in groups}
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
            for fmt in formats:
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
        for b in batches:
            per_token.clear()
            h = emb(b).detach().requires_grad_(True)  # gradients flow to every Linear's output from here
            logits = model(inputs_embeds=h).logits[0, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits, b[0, 1:], reduction="sum")
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
