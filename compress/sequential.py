"""Decoder layer by decoder layer: the loop every calibrated pass runs, in memory or streamed from disk.

A ``LayerSource`` gives layer ``i`` (``InMemory``: the loaded model's own modules; ``Streamed``: built from
the files by ``compress.lazy.LazyModel``, released after). Calibration activations are carried between layers
in up to two streams: ``float`` (what the unmodified model computes: statistics for smoothing and static
scales) and ``quant`` (the outputs of the layers already compressed: GPTQ / SparseGPT / Wanda inputs). Each
layer gets a ``LayerJob``; the pass transforms it, then the streams advance through it.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import CompressError
from .quant.calibrate import Group, InputStats, layer_groups_of

Inputs = list  # [(hidden [1, S, H], kwargs)] as a decoder layer receives them


class Stream:
    """Calibration activations between two layers: (hidden [1, S, H], kwargs) per window, held in memory, or
    in files under ``directory`` once their total passes ``budget`` bytes (then one window is in memory at a
    time). ``advance(layer)`` is the same stream one layer further."""

    def __init__(self, items: Inputs, budget: int | None = None, directory=None):
        self.budget, self.directory = budget, directory
        self.nbytes = sum(h.numel() * h.element_size() for h, _ in items)
        self._items = [self._keep(h, kw) for h, kw in items] if self._spill() else list(items)

    def _spill(self) -> bool:
        return self.budget is not None and self.directory is not None and self.nbytes > self.budget

    def _keep(self, h: torch.Tensor, kw: dict):
        import tempfile

        fd, path = tempfile.mkstemp(suffix=".pt", dir=self.directory)
        with open(fd, "wb") as f:
            torch.save(h.detach().cpu(), f)
        return path, kw, h.device

    @property
    def on_disk(self) -> bool:
        return bool(self._items) and isinstance(self._items[0][0], str)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        for a, kw, *dev in self._items:
            yield (torch.load(a).to(dev[0]) if isinstance(a, str) else a), kw

    def advance(self, layer) -> "Stream":
        """This stream through ``layer`` (the files of this one are removed once read)."""
        out = Stream([], self.budget, self.directory)
        out.nbytes = self.nbytes
        spill = out._spill()
        with torch.inference_mode():
            for item in self._items:
                a, kw = item[0], item[1]
                h = torch.load(a).to(item[2]) if isinstance(a, str) else a
                y = layer(h, **kw)
                out._items.append(out._keep(y, kw) if spill else (y, kw))
                if isinstance(a, str):
                    os.remove(a)
        return out


class InMemory:
    """The layers of a model that is loaded whole."""

    def __init__(self, model):
        self.model = model
        self.config = model.config
        self.num_layers = len(model.model.layers)

    def layer(self, i: int) -> nn.Module:
        return self.model.model.layers[i]

    def release(self, i: int) -> None:
        pass

    def capture(self, loop) -> Inputs:
        from .quant.calibrate import capture_layer_inputs

        return capture_layer_inputs(self.model, loop)


class Streamed:
    """The layers of a checkpoint on disk, one at a time (compress.lazy.LazyModel)."""

    def __init__(self, lazy):
        self.lazy = lazy
        self.config = lazy.config
        self.num_layers = lazy.num_layers

    def layer(self, i: int) -> nn.Module:
        return self.lazy.layer(i)

    def release(self, i: int) -> None:
        self.lazy.release(i)

    def capture(self, loop) -> Inputs:
        from .quant.calibrate import capture_layer_inputs

        return to_device(capture_layer_inputs(self.lazy.skeleton, loop), self.lazy.device)


def to_device(inputs: Inputs, device) -> Inputs:
    """Captured layer inputs (hidden states and their kwargs' tensors) moved to ``device``."""
    device = torch.device(device)
    if device.type == "cpu":
        return inputs

    def move(v):
        if isinstance(v, torch.Tensor):
            return v.to(device)
        if isinstance(v, tuple):
            return tuple(move(x) for x in v)
        return v

    return [(h.to(device), {k: move(v) for k, v in kw.items()}) for h, kw in inputs]


class OrderedDraws:
    """The random rows a statistics sample keeps, drawn in the order a whole-model forward would draw them
    (batch by batch, then each layer's groups in forward order), so a layer-by-layer run keeps the same rows
    as a whole-model one."""

    def __init__(self, seed: int, tokens: list[int], layers: int, groups: int, keep: int):
        gen = torch.Generator().manual_seed(seed)
        self.perms: dict[tuple[int, int, int], torch.Tensor] = {}
        for b, t in enumerate(tokens):
            k = min(keep, t)
            head = min(4, t, k)
            for i in range(layers):
                for g in range(groups):
                    if k > 0:
                        self.perms[b, i, g] = torch.randperm(t - head, generator=gen)

    def get(self, b: int, i: int, g: int) -> torch.Tensor | None:
        return self.perms.get((b, i, g))


@dataclass
class LayerJob:
    """One decoder layer while a pass works on it. Names are full module names (``model.layers.3.mlp.up_proj``)."""

    index: int
    layer: nn.Module
    groups: list[Group]
    float_in: Stream | None
    quant_in: Stream | None
    float_stats: dict = field(default_factory=dict)  # group's first Linear -> InputStats (float stream)
    float_out: Stream | None = None

    @property
    def prefix(self) -> str:
        return f"model.layers.{self.index}."

    def get_submodule(self, name: str) -> nn.Module:
        """The module of full name ``name`` (this layer's own or one inside it): jobs stand in for the model
        in the module transforms (replace_linear, fold_smoothing)."""
        if name == self.prefix[:-1]:
            return self.layer
        if not name.startswith(self.prefix):
            raise CompressError(f"{name} is not in decoder layer {self.index}")
        return self.layer.get_submodule(name[len(self.prefix):])

    module = get_submodule

    def hessians(self, targets: list[str], dtype=torch.float32) -> dict[str, torch.Tensor]:
        """{target: H = mean x x^T of its input} on the quant stream through the layer as it is now; Linears
        that read the same input (a group) share one matrix."""
        from .quant.gptq import HessianAccumulator

        if self.quant_in is None:
            raise CompressError("this pass needs calibration data (its inputs were not captured)")
        accs, handles = {}, []
        for g in self.groups:
            live = [n for n in g.linears if n in targets]
            if live:
                first = self.module(g.linears[0])
                acc = HessianAccumulator(first.in_features, dtype)
                handles.append(first.register_forward_pre_hook(acc))
                for n in live:
                    accs[n] = acc
        try:
            with torch.inference_mode():
                for h, kw in self.quant_in:
                    self.layer(h, **kw)
        finally:
            for h in handles:
                h.remove()
        means: dict[int, torch.Tensor] = {}
        for a in accs.values():  # get() divides in place: once per accumulator, however many Linears share it
            if id(a) not in means:
                means[id(a)] = a.get()
        return {n: means[id(a)] for n, a in accs.items()}


def run_float(job: LayerJob, rows: int, draws: OrderedDraws | None) -> None:
    """The float stream through the unmodified layer, collecting statistics of each group's input (amax,
    mean square, ``rows`` sampled tokens per batch); its outputs become the next layer's float stream."""
    stats = {g.linears[0]: InputStats() for g in job.groups}
    where = {g.linears[0]: k for k, g in enumerate(job.groups)}
    batch = [0]

    def hook(name):
        def f(_mod, args):
            perm = draws.get(batch[0], job.index, where[name]) if draws is not None else None
            stats[name].add(args[0], rows, perm)
        return f

    handles = [job.module(n).register_forward_pre_hook(hook(n)) for n in stats]
    counter = iter(range(len(job.float_in)))

    class Counted(nn.Module):  # the same layer, telling the hooks which window they see
        def forward(self, h, **kw):
            batch[0] = next(counter)
            return job.layer(h, **kw)

    try:
        out = job.float_in.advance(Counted())
    finally:
        for hd in handles:
            hd.remove()
    job.float_stats, job.float_out = stats, out


def run_sequential(source, transform, *, loop=None, streams: frozenset = frozenset(), rows: int = 0,
                   draw_seed: int | None = None, progress: str | None = None, done=None,
                   activation_budget: int | None = None, last=None, observe=None) -> dict:
    """Run ``transform(job)`` on every decoder layer of ``source`` in order; ``done(i, layer)`` after each
    (streamed: write it out). ``streams``: which calibration streams the pass reads ("float", "quant"); a
    stream bigger than ``activation_budget`` bytes is kept in temporary files. ``last(stream)``: called with
    the quant stream after the last layer (the final norm's input), when the pass carries one.
    ``observe(i, layer)``: a context manager around the quant stream's run through each finished layer (the
    KV-cache scales' hooks). Returns {"calibration_tokens", "seconds", "activations_on_disk"}."""
    import tempfile

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kiln-activations-") as spill:
        return _run(source, transform, loop, streams, rows, draw_seed, progress, done, activation_budget, spill, t0,
                    last, observe)


def _run(source, transform, loop, streams, rows, draw_seed, progress, done, budget, spill, t0, last,
         observe) -> dict:
    inputs = None
    if streams:
        if loop is None:
            raise CompressError("this pass needs calibration data (calib=forward_loop or token batches)")
        inputs = source.capture(loop)
    tokens = sum(h.shape[0] * h.shape[1] for h, _ in inputs) if inputs else 0
    sizes = [h.shape[0] * h.shape[1] for h, _ in inputs] if inputs else []
    share = budget // max(len(streams), 1) if budget is not None else None
    float_in = Stream(inputs, share, spill) if "float" in streams else None
    quant_in = Stream(inputs, share, spill) if "quant" in streams else None
    del inputs
    draws = None
    if float_in is not None and rows and draw_seed is not None:
        draws = OrderedDraws(draw_seed, sizes, source.num_layers, 4, rows)
    bar = None
    if progress:
        from runtime.progress import bar as make_bar

        bar = make_bar(source.num_layers, progress)
    try:
        for i in range(source.num_layers):
            layer = source.layer(i)
            job = LayerJob(i, layer, layer_groups_of(source.config, i, layer), float_in, quant_in)
            if float_in is not None:
                run_float(job, rows, draws)
            transform(job)
            if quant_in is not None:
                with observe(i, layer) if observe is not None else contextlib.nullcontext():
                    quant_in = quant_in.advance(layer)
            float_in = job.float_out
            if done is not None:
                done(i, layer)
            source.release(i)
            if bar:
                bar.advance()
    finally:
        if bar:
            bar.close()
    if last is not None and quant_in is not None:
        last(quant_in)
    on_disk = any(s is not None and s.on_disk for s in (float_in, quant_in))
    return {"calibration_tokens": tokens, "seconds": round(time.perf_counter() - t0, 1), "activations_on_disk": on_disk}
