"""Calibration plumbing: which Linears share an input, activation statistics from a forward loop, and a
layer-by-layer runner (capture the first decoder layer's inputs once, then push them through layer by layer).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import CompressError


@dataclass
class Group:
    """Linears that read the same input, and the float op that produces that input (where smoothing folds).

    prev_kind: "norm" (RMSNorm weight [in]) or "linear" (rows of a Linear producing the input channels).
    """

    name: str  # e.g. model.layers.3.attn_in
    linears: list[str]
    prev: str
    prev_kind: str
    repeat: int = 1  # o_proj input = v_proj output channels repeated per query-head group (GQA)


def _groups(cfg, i: int) -> list[Group]:
    rep = cfg.num_attention_heads // (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    p = f"model.layers.{i}"
    return [
        Group(f"{p}.attn_in", [f"{p}.self_attn.{x}_proj" for x in "qkv"], f"{p}.input_layernorm", "norm"),
        Group(f"{p}.o_in", [f"{p}.self_attn.o_proj"], f"{p}.self_attn.v_proj", "linear", rep),
        Group(f"{p}.mlp_in", [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], f"{p}.post_attention_layernorm", "norm"),
        Group(f"{p}.down_in", [f"{p}.mlp.down_proj"], f"{p}.mlp.up_proj", "linear"),
    ]


def _check_modules(groups: list[Group], names) -> None:
    for g in groups:
        for n in g.linears + [g.prev]:
            if n not in names:
                raise CompressError(f"module {n} not found; llmkiln quantizes Llama-style decoders "
                                    "(q/k/v/o_proj, gate/up/down_proj, input/post_attention_layernorm)")


def layer_groups(model) -> list[Group]:
    """The four input groups of each Llama-style decoder layer."""
    out = [g for i in range(model.config.num_hidden_layers) for g in _groups(model.config, i)]
    _check_modules(out, dict(model.named_modules()))
    return out


def layer_groups_of(cfg, i: int, layer: nn.Module) -> list[Group]:
    """The four input groups of decoder layer ``i`` (full module names), checked against the layer module."""
    out = _groups(cfg, i)
    _check_modules(out, {f"model.layers.{i}.{n}" for n, _ in layer.named_modules()})
    return out


@dataclass
class InputStats:
    """Statistics of one Linear input over all calibration tokens, plus a sample of whole rows (tokens)."""

    amax: torch.Tensor | None = None  # [in] max |x| per channel
    sq_sum: torch.Tensor | None = None  # [in] sum of x^2 per channel (diagonal of the Hessian, unnormalized)
    tokens: int = 0
    rows: list = field(default_factory=list)  # [r, in] chunks

    def add(self, x: torch.Tensor, keep: int, perm: torch.Tensor | None = None) -> None:
        """Accumulate x [..., in]; keep ``keep`` rows: the first 4, then ``perm`` (a permutation of the rest,
        drawn by the caller so that the order of draws does not depend on the order of layers)."""
        x = x.detach().reshape(-1, x.shape[-1]).float()  # [T, in]
        a = x.abs().amax(dim=0)
        self.amax = a if self.amax is None else torch.maximum(self.amax, a)
        s = (x * x).sum(dim=0)
        self.sq_sum = s if self.sq_sum is None else self.sq_sum + s
        self.tokens += x.shape[0]
        keep = min(keep, x.shape[0])
        if keep > 0:
            head = min(4, x.shape[0], keep)  # the first tokens often carry the largest activations
            idx = perm[: keep - head] + head
            self.rows.append(torch.cat([x[:head], x[idx]]).clone())

    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows) if self.rows else torch.empty(0)

    @property
    def mean_sq(self) -> torch.Tensor:
        return self.sq_sum / max(self.tokens, 1)


def collect_stats(model, forward_loop, names: list[str], rows_per_batch: int = 0, seed: int = 0) -> dict:
    """Run ``forward_loop(model)`` once with hooks on the named Linears; {name: InputStats} of their inputs."""
    mods = dict(model.named_modules())
    stats = {n: InputStats() for n in names}
    gen = torch.Generator().manual_seed(seed)

    def hook(name):
        def f(_mod, args):
            t = args[0].numel() // args[0].shape[-1]
            k = min(rows_per_batch, t)
            perm = torch.randperm(t - min(4, t, k), generator=gen) if k > 0 else None
            stats[name].add(args[0], rows_per_batch, perm)
        return f

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        forward_loop(model)
    finally:
        for h in handles:
            h.remove()
    if not stats or next(iter(stats.values())).tokens == 0:
        raise CompressError("the calibration forward loop did not run the model; pass calibration data")
    return stats


class _Stop(Exception):
    pass


class _Catcher:
    """Stands in for the model during capture: runs it and swallows the stop signal after layer 0's inputs."""

    def __init__(self, model):
        self._model = model

    def __call__(self, *a, **k):
        try:
            self._model(*a, **k)
        except _Stop:
            pass

    def __getattr__(self, name):
        return getattr(self._model, name)


def capture_layer_inputs(model, forward_loop) -> list[tuple[torch.Tensor, dict]]:
    """Inputs (hidden [1, S, H], kwargs) of the first decoder layer for each calibration batch."""
    first = model.model.layers[0]
    caught: list = []

    def pre(_mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "hidden_states")}
        kw["use_cache"] = False
        caught.append((hidden.detach(), kw))
        raise _Stop

    h = first.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        forward_loop(_Catcher(model))
    finally:
        h.remove()
    if not caught:
        raise CompressError("the calibration forward loop did not run the model; pass calibration data")
    return caught


def run_layer(layer: nn.Module, inputs: list[tuple[torch.Tensor, dict]]) -> list[tuple[torch.Tensor, dict]]:
    """Push captured inputs through one decoder layer; its outputs are the next layer's inputs."""
    with torch.inference_mode():
        return [(layer(h, **kw), kw) for h, kw in inputs]
