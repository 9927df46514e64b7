"""What every ONNX exporter shares around its graph: resolving and loading the source, the ONNX checker,
the tokenizer and generation config beside the graph, self-validation and kiln.json."""
from __future__ import annotations

from pathlib import Path

from ..errors import ExportError


def layer_specs(info) -> dict:
    """The LayerSpecs of a resolved source ({} for a float model)."""
    return info.manifest.layer_specs() if info.manifest is not None else {}


def check_graph(path: Path) -> None:
    """The ONNX checker (structure, types, external data refs): a malformed graph is an error here, not in TensorRT later."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as e:
        raise ExportError(f"the built graph fails the ONNX checker ({' '.join(str(e).split())[:300]})") from None


def write_side_files(tmp: Path, model, tok, direct=None) -> None:
    """Tokenizer and generation config into ``tmp``: copied from ``direct``'s dir, else saved from ``model``/``tok``."""
    if direct is not None:
        direct.copy_side_files(tmp)
        return
    tok.save_pretrained(str(tmp))
    gc = getattr(model, "generation_config", None)
    if gc is not None:
        try:
            gc.save_pretrained(str(tmp))
        except Exception:
            pass


def write_artifact(tmp: Path, model, tok, info, arch, onnx_path: Path, specs: dict, io, validator,
                   before_rename=None, direct=None, kv_cache=None):
    """Everything after the graph: tokenizer and generation config (copied from ``direct``'s dir when the
    graph was read from the files), self-validation (``validator(onnx_path) -> Validation``, or None to skip),
    kiln.json with the files' checksums (and ``kv_cache``, the static KV scales' record), then
    ``before_rename(tmp, manifest)``. Returns the Manifest."""
    from compress.checkpoint import source_record
    from runtime.manifest import Manifest
    from runtime.records import Validation

    write_side_files(tmp, model, tok, direct)
    validation = validator(onnx_path) if validator is not None else None
    passes = list(info.manifest.passes) if info.manifest is not None else []
    manifest = Manifest(kind="onnx", architecture=arch, source=source_record(info), passes=passes, io=io,
                        validation=validation or Validation(passed=None, skipped=True), kv_cache=kv_cache)
    manifest.record_files(tmp)
    manifest.save(tmp)
    if before_rename is not None:
        before_rename(tmp, manifest)
    return manifest


def refuse_overwrite(out: Path, *paths) -> None:
    for p in paths:
        if p is not None and Path(p).resolve() == out.resolve():
            raise ExportError(f"{out}: output would overwrite the source; choose another -o")


def resolve_source(source, out: Path, force: bool, progress: bool, check):
    """Refuse an existing ``out`` without ``force``, resolve ``source``, run ``check(info)`` (before any weights
    load) and refuse an ``out`` that is the source itself. Returns the SourceInfo."""
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    from compress.sources import SourceInfo, resolve

    info = source if isinstance(source, SourceInfo) else resolve(str(source), quiet=not progress)
    check(info)
    refuse_overwrite(out, info.path)
    return info


def load_torch(info, out: Path, progress: bool):
    """Load the torch model of a resolved source. Returns (model, tokenizer, info, arch)."""
    from compress.hfdir import architecture_from_config
    from compress.loading import load_model

    model, tok, info = load_model(info, quiet=not progress)
    refuse_overwrite(out, info.path, info.extra.get("converted"))
    return model, tok, info, architecture_from_config(model.config)


def load_source(source, out: Path, force: bool, progress: bool, check):
    """resolve_source + load_torch. Returns (model, tokenizer, info, arch)."""
    return load_torch(resolve_source(source, out, force, progress, check), out, progress)


def whole_model_validator(model, tok, arch, specs):
    from .validate import validate

    return lambda onnx_path: validate(model, tok, onnx_path, arch, specs)


def validation_mode(info, arch, requested: str, max_memory: int | None) -> tuple[str, str]:
    """(``whole-model`` or ``per-layer``, why). Whole-model validation holds the checkpoint as a float32 torch
    model and the artifact in ONNX Runtime at once; it runs when that fits ``max_memory`` (default: the
    memory available now), else each layer is validated alone."""
    from compress.memory import available_bytes, gib

    params = arch.vocab * arch.hidden * (1 if arch.tied_embeddings else 2) + arch.layers * (
        arch.hidden * arch.head_dim * (2 * arch.heads + 2 * arch.kv_heads) + 3 * arch.hidden * arch.intermediate)
    try:
        stored = sum(p.stat().st_size for p in info.weight_files())
    except Exception:
        stored = params * 4
    need = params * 4 + stored + (1 << 30)
    budget = max_memory if max_memory is not None else available_bytes()
    if requested in ("whole-model", "per-layer"):
        return requested, "asked for"
    if need <= budget:
        return "whole-model", f"the float32 model and the artifact need about {gib(need)} of {gib(budget)}"
    return "per-layer", f"the float32 model and the artifact would need about {gib(need)}, over {gib(budget)}"
