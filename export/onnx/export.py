"""export_onnx(source, out): the entry point — load, build the graph from the weights, validate, write atomically."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ExportError

FORMS = ("portable", "ort")
EXPORTERS = ("kiln", "optimum")
FUSED_OPSET = 23  # RMSNormalization / RotaryEmbedding / Attention
PLAIN_OPSET = 21  # the same math in plain ops (INT4 blocked DequantizeLinear needs 21)
DEFAULT_OPSET = FUSED_OPSET
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class OnnxExportConfig:
    form: str = "portable"
    opset: int | None = None
    validate: bool = True
    force: bool = False

    def __post_init__(self):
        if self.form not in FORMS:
            raise ExportError(f"--form must be one of {', '.join(FORMS)}, got {self.form!r}")
        if self.form == "ort" and self.opset not in (None, FUSED_OPSET):
            raise ExportError(f"--form ort is built at opset {FUSED_OPSET} (standard RotaryEmbedding and "
                              f"RMSNormalization beside the com.microsoft ops), got --opset {self.opset}")
        if self.opset is not None and self.opset not in (PLAIN_OPSET, 22, FUSED_OPSET):
            raise ExportError(f"--opset must be 21 or 22 (plain ops) or 23 (fused Attention/RoPE/RMSNorm), "
                              f"got {self.opset}")

    @property
    def resolved_opset(self) -> int:
        return self.opset or DEFAULT_OPSET

    @property
    def fused(self) -> bool:
        return self.resolved_opset >= FUSED_OPSET


def rope_tables(model, arch) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_position, head_dim/2] exactly as the torch model computes them (scaling included)."""
    import torch

    rtype = (arch.rope_scaling or {}).get("rope_type", (arch.rope_scaling or {}).get("type", "default"))
    if rtype not in STATIC_ROPE:
        raise ExportError(f"rope_scaling type {rtype!r} depends on the sequence length at run time and is not "
                          f"supported by the ONNX exporter; supported: {', '.join(STATIC_ROPE)} "
                          f"(an fp32 source can go through --exporter optimum)")
    rot = model.model.rotary_emb
    pos = torch.arange(arch.max_position, dtype=torch.int64)[None]
    with torch.no_grad():
        cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos)  # [1, maxpos, head_dim]
    half = arch.head_dim // 2
    return cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy()


def _scheme(info) -> str:
    qp = info.manifest.quant_pass() if info.manifest is not None else None
    return "fp32" if qp is None else qp.get("config", {}).get("scheme", "?")


def _check_graph(path: Path) -> None:
    """The ONNX checker (structure, types, external data refs): a malformed graph is an error here, not in TensorRT later."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as e:
        raise ExportError(f"the built graph fails the ONNX checker ({' '.join(str(e).split())[:300]})") from None


def _write_side_files(tmp: Path, model, tok) -> None:
    tok.save_pretrained(str(tmp))
    gc = getattr(model, "generation_config", None)
    if gc is not None:
        try:
            gc.save_pretrained(str(tmp))
        except Exception:
            pass


def write_artifact(tmp: Path, model, tok, info, arch, onnx_path: Path, scheme: str, io: dict, validate: bool,
                   before_rename=None, direct=None):
    """Everything after the graph: tokenizer and generation config (copied from ``direct``'s dir when the
    graph was read from the files), self-validation (unless ``validate`` is False), kiln.json with the files'
    checksums, then ``before_rename(tmp, manifest)``. Returns the Manifest."""
    from compress.checkpoint import source_record
    from runtime.manifest import Manifest

    if direct is not None:
        direct.copy_side_files(tmp)
    else:
        _write_side_files(tmp, model, tok)
    validation = None
    if validate:
        from .validate import validate as run_validation

        validation = run_validation(model, tok, onnx_path, arch, scheme)
    passes = list(info.manifest.passes) if info.manifest is not None else []
    manifest = Manifest(kind="onnx", architecture=arch, source=source_record(info), passes=passes, io=io,
                        validation=validation or {"skipped": True, "passed": None})
    manifest.record_files(tmp)
    manifest.save(tmp)
    if before_rename is not None:
        before_rename(tmp, manifest)
    return manifest


def _refuse_overwrite(out: Path, *paths) -> None:
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
    _refuse_overwrite(out, info.path)
    return info


def load_torch(info, out: Path, progress: bool):
    """Load the torch model of a resolved source. Returns (model, tokenizer, info, arch)."""
    from compress.loading import architecture_from_config, load_model

    model, tok, info = load_model(info, quiet=not progress)
    _refuse_overwrite(out, info.path, info.extra.get("converted"))
    return model, tok, info, architecture_from_config(model.config)


def load_source(source, out: Path, force: bool, progress: bool, check):
    """resolve_source + load_torch. Returns (model, tokenizer, info, arch)."""
    return load_torch(resolve_source(source, out, force, progress, check), out, progress)


def export_onnx(source, out, *, form: str = "portable", opset: int | None = None, validate: bool = True,
                force: bool = False, progress: bool = False, before_rename=None, exporter: str = "kiln",
                optimum_python: str | None = None):
    """Build ``out`` (model.onnx + model.onnx.data + tokenizer + kiln.json) from ``source``.

    ``source`` is anything ``compress.load_model`` accepts (alias, .gguf, HF dir, llmkiln checkpoint, SourceInfo).
    ``exporter="optimum"`` runs optimum-onnx's exporter in the interpreter ``optimum_python`` instead of the
    builder (fp32 only; see optimum_fallback). Returns the written Manifest. Raises ExportError (or
    CompressError for an unloadable source).
    """
    cfg = OnnxExportConfig(form=form, opset=opset, validate=validate, force=force)
    if exporter not in EXPORTERS:
        raise ExportError(f"--exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    if exporter == "optimum":
        if opset is not None:
            raise ExportError("--opset applies to --exporter kiln; optimum chooses its own opset")
        from .optimum_fallback import export_with_optimum

        return export_with_optimum(source, out, validate=validate, force=force, progress=progress,
                                   optimum_python=optimum_python, before_rename=before_rename)
    out = Path(out)
    from runtime.fsutil import atomic_dir

    from .decoder import build_decoder, io_spec
    from .graph import GraphBuilder
    from .direct import DIRECT_ROPE, direct_source, rope_tables_numpy, rope_type
    from .weights import Weights, precheck, weights_for

    t0 = time.perf_counter()
    info = resolve_source(source, out, force, progress, precheck)
    # float weights are read straight from the safetensors files (no torch import without validation);
    # the torch model is loaded only to validate against it, or for sources the direct reader declines
    direct = direct_source(info)
    model = tok = None
    if direct is None or cfg.validate:
        model, tok, info, arch = load_torch(info, out, progress)
        if direct is not None and direct.arch != arch:
            direct = None  # config.json read differently than transformers reads it: take its tensors instead
    if direct is not None:
        arch = direct.arch
        _refuse_overwrite(out, direct.root)
    if arch.hidden_act != "silu":
        raise ExportError(f"hidden_act {arch.hidden_act!r} is not supported by the ONNX exporter (silu only; "
                          "an fp32 source can go through --exporter optimum)")
    if arch.heads % arch.kv_heads:
        raise ExportError(f"heads {arch.heads} not divisible by kv_heads {arch.kv_heads}")
    scheme = _scheme(info)
    if cfg.form == "ort":
        from .ortform import check_scheme

        check_scheme(scheme)
    if scheme == "int4" and cfg.resolved_opset < 21:
        raise ExportError("int4 needs opset >= 21 (INT4 blocked DequantizeLinear)")
    w = Weights(str(info.path), direct.tensors) if direct is not None else weights_for(model, info)
    # direct sources only have these rope types; yarn and the like take transformers' own tables
    cos, sin = rope_tables_numpy(arch) if rope_type(arch) in DIRECT_ROPE else rope_tables(model, arch)
    t_load = time.perf_counter() - t0

    bar = None
    if progress:
        from runtime.progress import bar as make_bar

        bar = make_bar(arch.layers, "building graph")
    with atomic_dir(out, force=force, error=ExportError) as tmp:
        b = GraphBuilder(tmp, cfg.resolved_opset)
        try:
            build_decoder(b, w, arch, cos, sin, fused=cfg.fused, progress=bar.advance if bar else None,
                          form=cfg.form)
            onnx_path = b.finish("llmkiln_decoder", doc=f"llmkiln {arch.model_type} decoder ({scheme})",
                                 metadata={"scheme": scheme, "form": cfg.form})
        finally:
            b.abort()
            if bar:
                bar.close()
        _check_graph(onnx_path)
        t_build = time.perf_counter() - t0 - t_load
        io = io_spec(arch) | {"form": cfg.form, "opset": cfg.resolved_opset, "scheme": scheme,
                              "external_data": "model.onnx.data"}
        manifest = write_artifact(tmp, model, tok, info, arch, onnx_path, scheme, io, cfg.validate, before_rename,
                                  direct=direct)
        t_val = time.perf_counter() - t0 - t_load - t_build
    manifest.timings = {"load_s": round(t_load, 3), "build_s": round(t_build, 3), "validate_s": round(t_val, 3),
                        "weights_from": "safetensors files" if direct is not None else "torch model"}
    return manifest
