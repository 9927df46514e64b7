"""Calibration plumbing: run calibration through a model, capture decoder-layer inputs, collect statistics.

``calib`` is either a list of token tensors [1, S] (int64) or a ``forward_loop(model)`` callable
(compress.calib.forward_loop). Layer-by-layer methods capture the inputs of the first decoder layer once
and then run one layer at a time, so every layer is calibrated on the outputs of the already-pruned layers
before it.
"""
from __future__ import annotations

from ..errors import CompressError


class _Stop(Exception):
    pass


def decoder_layers(model):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise CompressError("pruning needs a Llama-style decoder (model.model.layers)")
    return layers


def run_calibration(model, calib) -> None:
    """Run every calibration batch (or the caller's forward_loop) through the model without gradients."""
    import torch

    if calib is None:
        raise CompressError("this pruning method needs calibration data (token windows or a forward_loop)")
    if callable(calib):
        calib(model)
        return
    with torch.inference_mode():
        for b in calib:
            model(input_ids=b, use_cache=False)


def _detach(v):
    import torch

    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, tuple):
        return tuple(_detach(x) for x in v)
    return v


def capture_layer_inputs(model, calib) -> list[tuple]:
    """[(hidden [1, S, hidden], kwargs)] as the first decoder layer sees them, one per calibration batch."""
    import torch

    if calib is None:
        raise CompressError("this pruning method needs calibration data (token windows or a forward_loop)")
    layer0 = decoder_layers(model)[0]
    store: list[tuple] = []
    stop = not callable(calib)

    def hook(mod, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        kw = {k: _detach(v) for k, v in kwargs.items()
              if k not in ("hidden_states", "cache", "past_key_values", "use_cache")}
        store.append((hs.detach().clone(), kw))
        if stop:
            raise _Stop

    h = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        if callable(calib):
            calib(model)
        else:
            with torch.inference_mode():
                for b in calib:
                    try:
                        model(input_ids=b, use_cache=False)
                    except _Stop:
                        pass
    finally:
        h.remove()
    if not store:
        raise CompressError("calibration ran no tokens through the model")
    return store


def run_layer(layer, inputs: list[tuple]) -> list:
    """Outputs of one decoder layer for each captured input: [1, S, hidden] each."""
    import torch

    outs = []
    with torch.no_grad():
        for hs, kw in inputs:
            o = layer(hs, **kw)
            outs.append(o[0] if isinstance(o, tuple) else o)
    return outs


class InputStats:
    """Per-Linear input statistics collected with forward pre-hooks.

    ``kind="sqnorm"``: sum over tokens of x_j^2 ([in], float64) — Wanda.
    ``kind="hessian"``: sum over tokens of x^T x ([in, in], float32) — SparseGPT.
    Linears that receive the very same input tensor (q/k/v, gate/up) share one accumulator.
    """

    def __init__(self, modules: dict, kind: str):
        self.kind = kind
        self.acc: dict[str, object] = {}
        self.alias: dict[str, str] = {}
        self.tokens = 0
        self._current: dict[int, tuple] = {}
        self._hooks = [m.register_forward_pre_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name):
        def fn(mod, args):
            x = args[0]
            owner = self._current.setdefault(id(x), (x, name))[1]  # keeps x alive: ids stay unique
            if owner != name:
                self.alias[name] = owner
                return
            x2 = x.detach().reshape(-1, x.shape[-1]).float()  # [N, in]
            if self.kind == "sqnorm":
                add = (x2.double() ** 2).sum(0)
            else:
                add = x2.t() @ x2
            self.acc[name] = self.acc[name] + add if name in self.acc else add
        return fn

    def new_call(self) -> None:
        """Call before each forward of the hooked modules' parent (ids are matched within one call)."""
        self._current.clear()

    def get(self, name):
        return self.acc[self.alias.get(name, name)]

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._current.clear()
