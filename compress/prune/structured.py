"""Structured pruning: a smaller model with uniform dimensions (MLP channels, whole GQA groups, layers).

Importance comes from one calibration pass over the unpruned model:
  MLP channel j of a layer:  ||a_j||_2 * ||down[:, j]||_2, a = act(gate(x)) * up(x) the down_proj input
  GQA group g:               ||z_g @ o_proj[:, g]^T||_2 summed over tokens, z_g the group's attention output
  decoder layer:             block influence 1 - cos(input, output), averaged over tokens
The lowest-scoring units are removed (ties: the lower index first), the same count in every layer.
"""
from __future__ import annotations

from ..errors import CompressError
from .capture import decoder_layers, run_calibration


def _lowest(scores, k: int) -> list[int]:
    import torch

    return sorted(torch.sort(scores, stable=True).indices[:k].tolist())


def _shrink(lin, rows=None, cols=None):
    """A new nn.Linear holding W[rows][:, cols] (and bias[rows])."""
    import torch

    w = lin.weight.detach()
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    new = torch.nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        new.weight.copy_(w)
        if lin.bias is not None:
            new.bias.copy_(lin.bias.detach() if rows is None else lin.bias.detach()[rows])
    return new


def _collect(model, calib, modules: dict, fn) -> dict:
    """Accumulate fn(module, input, output) over the calibration pass, per module name."""
    acc = {}

    def make(name):
        def hook(mod, args, out):
            v = fn(mod, args[0].detach(), out)
            acc[name] = acc[name] + v if name in acc else v
        return hook

    hooks = [m.register_forward_hook(make(n)) for n, m in modules.items()]
    try:
        run_calibration(model, calib)
    finally:
        for h in hooks:
            h.remove()
    return acc


def mlp_channel_scores(model, calib) -> list:
    """[layers] tensors [intermediate]: ||a_j|| * ||down[:, j]||."""
    layers = decoder_layers(model)
    sq = _collect(model, calib, {str(i): l.mlp.down_proj for i, l in enumerate(layers)},
                  lambda m, x, o: (x.reshape(-1, x.shape[-1]).double() ** 2).sum(0))
    return [sq[str(i)].sqrt() * l.mlp.down_proj.weight.detach().double().norm(dim=0) for i, l in enumerate(layers)]


def kv_group_scores(model, calib) -> list:
    """[layers] tensors [kv_heads]: sum over tokens of ||o_proj restricted to group g applied to its heads||."""
    import torch

    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv, heads = cfg.num_key_value_heads, cfg.num_attention_heads
    qpg = heads // kv

    def contrib(mod, x, out):
        z = x.reshape(-1, heads, hd)  # [N, heads, hd]
        w = mod.weight.detach().reshape(mod.out_features, heads, hd)  # [hidden, heads, hd]
        s = []
        for g in range(kv):
            hs = slice(g * qpg, (g + 1) * qpg)
            c = torch.einsum("nhd,ohd->no", z[:, hs].float(), w[:, hs].float())  # [N, hidden]
            s.append(c.double().norm(dim=1).sum())
        return torch.stack(s)

    layers = decoder_layers(model)
    acc = _collect(model, calib, {str(i): l.self_attn.o_proj for i, l in enumerate(layers)}, contrib)
    return [acc[str(i)] for i in range(len(layers))]


def remove_mlp_channels(model, removed: list[list[int]]) -> None:
    """Drop the given intermediate channels of every layer (the same count everywhere)."""
    layers = decoder_layers(model)
    inter = model.config.intermediate_size
    for layer, rm in zip(layers, removed):
        keep = [j for j in range(inter) if j not in set(rm)]
        mlp = layer.mlp
        mlp.gate_proj = _shrink(mlp.gate_proj, rows=keep)
        mlp.up_proj = _shrink(mlp.up_proj, rows=keep)
        mlp.down_proj = _shrink(mlp.down_proj, cols=keep)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(keep)
    model.config.intermediate_size = inter - len(removed[0])


def remove_kv_groups(model, removed: list[list[int]]) -> None:
    """Drop whole GQA groups (KV head g and its query heads) of every layer."""
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv, heads = cfg.num_key_value_heads, cfg.num_attention_heads
    qpg = heads // kv
    for layer, rm in zip(decoder_layers(model), removed):
        groups = [g for g in range(kv) if g not in set(rm)]
        kv_rows = [g * hd + d for g in groups for d in range(hd)]
        q_rows = [(g * qpg + j) * hd + d for g in groups for j in range(qpg) for d in range(hd)]
        at = layer.self_attn
        at.q_proj = _shrink(at.q_proj, rows=q_rows)
        at.k_proj = _shrink(at.k_proj, rows=kv_rows)
        at.v_proj = _shrink(at.v_proj, rows=kv_rows)
        at.o_proj = _shrink(at.o_proj, cols=q_rows)
        at.head_dim = hd
    k = len(removed[0])
    cfg.head_dim = hd  # explicit: hidden / heads no longer gives it
    cfg.num_key_value_heads = kv - k
    cfg.num_attention_heads = heads - k * qpg


def check_width(config, hf) -> int:
    """Validate StructuredWidth against a model config; returns the MLP channels to remove per layer."""
    inter = hf.intermediate_size
    kv = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    n_mlp = int(config.mlp * inter + 0.5)
    if config.mlp and not 0 < n_mlp < inter:
        raise CompressError(f"--mlp {config.mlp} removes {n_mlp} of {inter} MLP channels; choose a fraction "
                            f"that removes at least one and keeps at least one")
    if config.kv_groups >= kv:
        raise CompressError(f"--kv-groups {config.kv_groups}: the model has {kv} KV groups per layer; "
                            f"at most {kv - 1} can be removed")
    if config.kv_groups and hf.num_attention_heads % kv:
        raise CompressError("query heads are not a multiple of KV heads; cannot remove whole GQA groups")
    return n_mlp


def check_depth(config, hf) -> None:
    n = hf.num_hidden_layers
    if config.layers >= n:
        raise CompressError(f"--layers {config.layers}: the model has {n} decoder layers; at most {n - 1} can be removed")


def prune_width(model, config, calib) -> dict:
    """Apply StructuredWidth in place; returns {"mlp": [[removed channels] per layer], "kv_groups": [...]}."""
    n_mlp = check_width(config, model.config)
    removed = {}
    if n_mlp:
        removed["mlp"] = [_lowest(s, n_mlp) for s in mlp_channel_scores(model, calib)]
    if config.kv_groups:
        removed["kv_groups"] = [_lowest(s, config.kv_groups) for s in kv_group_scores(model, calib)]
    if "mlp" in removed:
        remove_mlp_channels(model, removed["mlp"])
    if "kv_groups" in removed:
        remove_kv_groups(model, removed["kv_groups"])
    return removed


def block_influence(model, calib):
    """[layers] tensor: mean over tokens of 1 - cos(layer input, layer output)."""
    import torch

    def bi(mod, x, out):
        y = out[0] if isinstance(out, tuple) else out
        cos = torch.nn.functional.cosine_similarity(x.double(), y.detach().double(), dim=-1)  # [1, S]
        return torch.stack([(1 - cos).sum(), torch.tensor(float(cos.numel()), dtype=torch.float64)])

    layers = decoder_layers(model)
    acc = _collect(model, calib, {str(i): l for i, l in enumerate(layers)}, bi)
    return torch.stack([acc[str(i)][0] / acc[str(i)][1] for i in range(len(layers))])


def remove_layers(model, removed: list[int]) -> None:
    import torch

    layers = decoder_layers(model)
    keep = [l for i, l in enumerate(layers) if i not in set(removed)]
    for i, l in enumerate(keep):
        if hasattr(l.self_attn, "layer_idx"):
            l.self_attn.layer_idx = i
        if hasattr(l, "layer_idx"):
            l.layer_idx = i
    model.model.layers = torch.nn.ModuleList(keep)
    cfg = model.config
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [t for i, t in enumerate(cfg.layer_types) if i not in set(removed)]
    cfg.num_hidden_layers = len(keep)


def prune_depth(model, config, calib) -> dict:
    check_depth(config, model.config)
    scores = block_influence(model, calib)
    removed = _lowest(scores, config.layers)
    remove_layers(model, removed)
    return {"layers": removed, "block_influence": [round(float(s), 6) for s in scores]}
