"""Module transforms for unstructured and N:M pruning (Magnitude, Wanda, SparseGPT): zeros in place."""
from __future__ import annotations

from .capture import InputStats
from .config import SparseGPT, Wanda
from .masks import check_divisible, magnitude_scores, mask_for, sparsegpt_prune, wanda_scores


def target_linears(model, config) -> dict:
    """{name: nn.Linear} selected by the config's targets/ignore (ignore wins)."""
    import torch

    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    found = {n: linears[n] for n in config.selection.pick(linears)}
    for n, m in found.items():
        check_divisible(m.in_features, config.sparsity, n)
    return found


def _apply(lin, new_w, keep) -> None:
    import torch

    with torch.no_grad():
        lin.weight.copy_(torch.where(keep, new_w.to(lin.weight.dtype), torch.zeros((), dtype=lin.weight.dtype)))


def prune_magnitude(model, config, progress=None) -> dict:
    """Per output row, drop the weights with the smallest |W|. Returns {name: keep-mask}."""
    masks = {}
    for name, lin in target_linears(model, config).items():
        keep = mask_for(magnitude_scores(lin.weight.detach()), config.sparsity)
        _apply(lin, lin.weight.detach(), keep)
        masks[name] = keep
        if progress:
            progress.advance()
    return masks


def prune_layer(job, config, targets: set) -> dict:
    """Magnitude, Wanda or SparseGPT on the selected Linears of one decoder layer (a
    compress.sequential.LayerJob); Wanda and SparseGPT read the quant stream (outputs of the layers already
    pruned). Returns {name: keep-mask}."""
    import torch

    mods = {n: job.get_submodule(n) for g in job.groups for n in g.linears if n in targets}
    if not mods:
        return {}
    for n, m in mods.items():
        check_divisible(m.in_features, config.sparsity, n)
    masks = {}
    if not isinstance(config, (Wanda, SparseGPT)):
        for n, lin in mods.items():
            keep = mask_for(magnitude_scores(lin.weight.detach()), config.sparsity)
            _apply(lin, lin.weight.detach(), keep)
            masks[n] = keep
        return masks
    kind = "hessian" if isinstance(config, SparseGPT) else "sqnorm"
    stats = InputStats(mods, kind)
    try:
        with torch.no_grad():
            for hs, kw in job.quant_in:
                stats.new_call()
                job.layer(hs, **kw)
    finally:
        stats.remove()
    for n, lin in mods.items():
        w = lin.weight.detach()
        if kind == "sqnorm":
            keep = mask_for(wanda_scores(w, stats.get(n)), config.sparsity)
            new_w = w
        else:
            new_w, keep = sparsegpt_prune(w, stats.get(n), config.sparsity, config.blocksize, config.damp)
        _apply(lin, new_w, keep)
        masks[n] = keep
    return masks


def layer_targets(config, num_layers: int, linear_names: list[str]) -> set:
    """The selected decoder Linears (full names); a selected Linear outside the decoder layers is refused:
    layer-by-layer pruning reaches only those."""
    names = [f"model.layers.{i}.{n}" for i in range(num_layers) for n in linear_names]
    return set(config.selection.pick(names))
