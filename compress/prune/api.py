"""Entry points: ``prune_(model, config, calib=...)`` in place, and ``prune_checkpoint`` (load -> prune -> save)."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

from runtime.layerspec import LayerSpec
from runtime.records import PrunePass

from ..errors import CompressError
from ..passes import PassReport
from ..registry import PRUNE_TRANSFORMS
from .config import METHODS, Depth, Magnitude, Recover, SparseGPT, StructuredWidth, Wanda


@dataclass
class PruneReport(PassReport):
    """What ``prune_`` did: the config, the LayerSpec of each pruned Linear (unstructured / N:M), removed
    units (structured) or keep-masks (unstructured), stats."""

    removed: dict = field(default_factory=dict)
    masks: dict = field(default_factory=dict)
    recover: Recover | None = None

    def to_pass(self, calibration: dict | None = None) -> PrunePass:
        """The kiln.json ``passes`` entry."""
        cfg = self.config.to_dict()
        if calibration:
            cfg["calibration"] = calibration
        if self.recover is not None:
            cfg["recover"] = self.recover.to_dict()
        pattern = next((s.sparsity for s in self.layers.values()), None)
        return PrunePass(config=cfg, pattern=pattern, layers=tuple(self.layers), stats=dict(self.stats))


def count_parameters(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _bar(progress: bool, n: int, label: str):
    if not progress:
        return None
    from runtime.progress import bar as make_bar

    return make_bar(n, label)


def _unstructured(report: PruneReport, masks: dict) -> None:
    report.masks = masks
    spec = LayerSpec(sparsity=report.config.pattern)
    report.layers = {n: spec for n in masks}
    total = sum(k.numel() for k in masks.values())
    kept = sum(int(k.sum()) for k in masks.values())
    report.stats = {"matrices": len(masks), "weights": total, "zeros": total - kept,
                    "sparsity": round((total - kept) / total, 6)}


@PRUNE_TRANSFORMS.register(Magnitude)
def _magnitude(model, config, calib, report, progress) -> None:
    from .unstructured import prune_magnitude, target_linears

    bar = _bar(progress, len(target_linears(model, config)), f"pruning ({config.method})")
    try:
        _unstructured(report, prune_magnitude(model, config, bar))
    finally:
        if bar:
            bar.close()


@PRUNE_TRANSFORMS.register(Wanda)
@PRUNE_TRANSFORMS.register(SparseGPT)
def _sequential(model, config, calib, report, progress) -> None:
    from ..sequential import InMemory
    from .unstructured import target_linears

    targets = target_linears(model, config)
    outside = [n for n in targets if not n.startswith("model.layers.")]
    if outside:
        raise CompressError(f"{config.method} prunes Linear layers inside decoder layers only; "
                            f"add {outside[0]!r} to ignore or use magnitude")
    _unstructured(report, run_unstructured(InMemory(model), config, set(targets), calib, progress))


def run_unstructured(source, config, targets: set, calib, progress: bool, done=None) -> dict:
    """Magnitude / Wanda / SparseGPT over every decoder layer of ``source`` (compress.sequential); returns
    the keep-masks."""
    from ..calib import forward_loop
    from ..sequential import run_sequential
    from .unstructured import prune_layer

    masks: dict = {}
    loop = forward_loop(calib) if isinstance(calib, list) else calib
    streams = frozenset({"quant"}) if config.needs_calibration else frozenset()
    run_sequential(source, lambda job: masks.update(prune_layer(job, config, targets)), loop=loop,
                   streams=streams, progress=f"pruning ({config.method})" if progress else None, done=done)
    return masks


@PRUNE_TRANSFORMS.register(StructuredWidth)
def _width(model, config, calib, report, progress) -> None:
    from .structured import prune_width

    report.removed = prune_width(model, config, calib)


@PRUNE_TRANSFORMS.register(Depth)
def _depth(model, config, calib, report, progress) -> None:
    from .structured import prune_depth

    report.removed = prune_depth(model, config, calib)
    report.stats["removed_layers"] = report.removed["layers"]


def prune_(model, config, calib=None, recover: Recover | None = None, recover_data=None,
           progress: bool = False) -> PruneReport:
    """Prune ``model`` in place with ``config`` (Magnitude, Wanda, SparseGPT, StructuredWidth, Depth).

    ``calib``: a list of [1, S] int64 token tensors or a ``forward_loop(model)`` callable.
    ``recover``: distil from a frozen copy of the unpruned model on ``recover_data`` (list of [1, S] tensors;
    default: ``calib`` when it is a list) after pruning.
    """
    if not isinstance(config, tuple(METHODS.values())):
        raise CompressError(f"unknown pruning config {config!r}; use one of {', '.join(c.__name__ for c in METHODS.values())}")
    transform = PRUNE_TRANSFORMS.get(config)
    if recover is not None and not isinstance(recover, Recover):
        raise CompressError("recover must be a Recover(...) config")
    if recover is not None:
        recover_data = recover_data if recover_data is not None else (calib if isinstance(calib, list) else None)
        if not recover_data:
            raise CompressError("recovery needs token windows: pass recover_data=[tensor [1, S], ...]")
    if config.needs_calibration and calib is None:
        raise CompressError(f"{config.method} pruning needs calibration data (token windows or a forward_loop)")
    check_fits(config, model.config)
    teacher = copy.deepcopy(model).eval() if recover is not None else None
    params_before = count_parameters(model)
    report = PruneReport(config=config, recover=recover)
    transform(model, config, calib, report, progress)
    report.stats |= {"parameters_before": params_before, "parameters_after": count_parameters(model)}
    if recover is not None:
        from .distill import distill_

        report.stats["recover"] = distill_(model, teacher, recover_data, recover, masks=report.masks,
                                           progress=progress)
        del teacher
    return report


def check_fits(config, hf) -> None:
    """Refuse a config the model's dimensions cannot take (``hf``: a transformers config or config.json as an
    object), before any weights are loaded."""
    from .config import DEFAULT_TARGETS, NM
    from .structured import check_depth, check_width

    if isinstance(config, StructuredWidth):
        check_width(config, hf)
    elif isinstance(config, Depth):
        check_depth(config, hf)
    elif isinstance(config.sparsity, NM) and config.targets == DEFAULT_TARGETS:
        hd = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        for what, dim in (("hidden_size", hf.hidden_size), ("heads x head_dim", hf.num_attention_heads * hd),
                          ("intermediate_size", hf.intermediate_size)):
            if dim % config.sparsity.m:
                raise CompressError(f"pattern {config.sparsity} needs the input dimension to be a multiple of "
                                    f"{config.sparsity.m}, but {what} is {dim}")


def _preflight(source: str, config, allow_pickle: bool) -> None:
    """Check the config against config.json of a directory source without loading weights."""
    import json
    import types
    from pathlib import Path

    p = Path(str(source))
    try:
        cfg = json.loads((p / "config.json").read_text()) if (p / "config.json").is_file() else None
    except (OSError, ValueError):
        return  # load_model reports unreadable configs
    if isinstance(cfg, dict) and all(k in cfg for k in ("hidden_size", "num_attention_heads", "num_hidden_layers",
                                                         "intermediate_size")):
        check_fits(config, types.SimpleNamespace(**cfg))


def prune_checkpoint(source, out, config, *, text: str = "builtin:pydoc", calib_samples: int = 64,
                     calib_seq_len: int = 512, recover: Recover | None = None, force: bool = False,
                     allow_pickle: bool = False, progress: bool = True) -> dict:
    """Load ``source``, prune it, optionally recover, and write an llmkiln checkpoint to ``out`` atomically.

    Earlier passes of an llmkiln checkpoint are kept first in kiln.json. Returns a summary dict.
    """
    from runtime.corpus import CorpusError, corpus_name

    from ..calib import calibration_batches
    from ..checkpoint import save_checkpoint, source_record
    from ..evaluate import corpus_ids
    from ..loading import load_model

    t0 = time.perf_counter()
    if calib_samples < 1 or calib_seq_len < 2:
        raise CompressError("--calib-samples must be >= 1 and --calib-seq-len >= 2")
    _preflight(source, config, allow_pickle)
    if isinstance(config, (Magnitude, Wanda, SparseGPT)) and recover is None:
        return prune_streamed(source, out, config, text=text, calib_samples=calib_samples,
                              calib_seq_len=calib_seq_len, force=force, progress=progress, t0=t0)
    _whole_model_fits(source, config, recover, allow_pickle)
    model, tok, info = load_model(source, allow_pickle=allow_pickle, quiet=not progress)
    prev = list(info.manifest.passes) if info.manifest is not None else []
    if info.manifest is not None and info.manifest.quantized:
        raise CompressError(f"{source} is quantized; prune the float model first, then quantize "
                            "(kiln compress prune ... then kiln compress quantize ...)")
    calib = None
    calibration = None
    tokens: list = []

    def ids() -> list[int]:  # the corpus tokenized once, for calibration and recovery alike
        if not tokens:
            try:
                tokens.extend(corpus_ids(tok, text))
            except CorpusError as e:
                raise CompressError(str(e)) from None
        return tokens
    if config.needs_calibration:
        calib = calibration_batches(tok, text, calib_samples, calib_seq_len, ids=ids())
        calibration = {"text": str(text), "samples": calib_samples, "seq_len": calib_seq_len}
    recover_data = None
    if recover is not None:
        recover_data = calibration_batches(tok, text, recover.steps, recover.seq_len, ids=ids(), cap=True)
    report = prune_(model, config, calib=calib, recover=recover, recover_data=recover_data, progress=progress)
    if recover is not None:
        report.stats["recover"] |= {"text": corpus_name(text), "windows": len(recover_data)}
    entry = report.to_pass(calibration)
    manifest = save_checkpoint(model, tok, out, source=source_record(info), passes=prev + [entry], force=force)
    size = sum(f.size for f in manifest.files.values())
    return {"out": str(out), "method": config.method, "passes": [p.kind for p in manifest.passes],
            "stats": report.stats, "bytes_on_disk": size, "seconds": round(time.perf_counter() - t0, 2)}


def _whole_model_fits(source, config, recover, allow_pickle: bool) -> None:
    """Structured pruning and distillation hold the whole model in float32 (and the unpruned teacher with
    distillation): refuse in one line, before loading, when that cannot fit in the memory available."""
    from ..memory import available_bytes, gib, parameter_count
    from ..sources import resolve

    info = resolve(str(source), allow_pickle=allow_pickle, quiet=True)
    root = Path(info.extra.get("converted") or info.path)
    if info.kind == "gguf" or not (root / "config.json").is_file():
        return
    import json
    import types

    cfg = types.SimpleNamespace(**json.loads((root / "config.json").read_text()))
    try:
        need = parameter_count(cfg) * 4 * (2 if recover is not None else 1) * 3 // 2
    except AttributeError:
        return
    have = available_bytes()
    if need > have:
        what = f"{config.method} pruning" + (" with distillation" if recover is not None else "")
        raise CompressError(f"{what} holds the whole model in float32{' twice (student and teacher)' if recover else ''}"
                            f": about {gib(need)} here, and {gib(have)} is available; magnitude, wanda and "
                            "sparsegpt without --recover-steps run one decoder layer at a time")


def prune_streamed(source, out, config, *, text: str, calib_samples: int, calib_seq_len: int, force: bool,
                   progress: bool, t0: float) -> dict:
    """Magnitude / Wanda / SparseGPT one decoder layer at a time: the source read layer by layer, each pruned
    layer written at once (compress.quant.entry's writer; pruned weights keep the source's dtype when it holds
    them exactly)."""
    from transformers import AutoTokenizer

    from runtime.fsutil import atomic_dir
    from runtime.manifest import Manifest

    from ..calib import calibration_batches
    from ..checkpoint import source_record
    from ..hfdir import architecture_from_config, quiet_transformers
    from ..lazy import LazyModel
    from ..quant.entry import SIDE_FILES, layer_tensors, open_float_source, write_tables
    from ..sequential import Streamed
    from ..tensorfile import ShardWriter
    from .unstructured import layer_targets

    out = Path(out)
    info, root = open_float_source(source, out, force, progress, "prune the float model first, then quantize "
                                   "(kiln compress prune ... then kiln compress quantize ...)")
    lazy = LazyModel(root)
    check_fits(config, lazy.config)
    targets = layer_targets(config, lazy.num_layers, lazy.linear_names)
    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(str(root))
    calib, calibration = None, None
    if config.needs_calibration:
        calib = calibration_batches(tok, text, calib_samples, calib_seq_len)
        calibration = {"text": str(text), "samples": calib_samples, "seq_len": calib_seq_len}
    report = PruneReport(config=config)
    params = parameter_count_of(lazy)
    with atomic_dir(out, force=force, error=CompressError) as tmp:
        writer = ShardWriter(tmp)
        masks = run_unstructured(Streamed(lazy), config, targets, calib, progress,
                                 done=lambda i, layer: writer.add(layer_tensors(lazy, i, layer)))
        write_tables(lazy, writer, None)
        writer.close()
        _unstructured(report, masks)
        report.stats |= {"parameters_before": params, "parameters_after": params}
        lazy.config.save_pretrained(str(tmp))
        for name in SIDE_FILES:
            if (root / name).is_file():
                (tmp / name).write_bytes((root / name).read_bytes())
        tok.save_pretrained(str(tmp))
        prev = list(info.manifest.passes) if info.manifest is not None else []
        manifest = Manifest(kind="checkpoint", architecture=architecture_from_config(lazy.config),
                            source=source_record(info), passes=prev + [report.to_pass(calibration)])
        manifest.record_files(tmp)
        manifest.save(tmp)
    size = sum(f.size for f in manifest.files.values())
    return {"out": str(out), "method": config.method, "passes": [p.kind for p in manifest.passes],
            "stats": report.stats, "bytes_on_disk": size, "seconds": round(time.perf_counter() - t0, 2)}


def parameter_count_of(lazy) -> int:
    """Parameters stored in a checkpoint (a tied table once)."""
    import math

    return sum(math.prod(lazy.files.shape(n)) for n in lazy.files.keys())
