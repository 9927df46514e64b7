"""Entry points: ``prune_(model, config, calib=...)`` in place, and ``prune_checkpoint`` (load -> prune -> save)."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

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
    from .unstructured import prune_sequential

    bar = _bar(progress, len(model.model.layers), f"pruning ({config.method})")
    try:
        _unstructured(report, prune_sequential(model, config, calib, bar))
    finally:
        if bar:
            bar.close()


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
