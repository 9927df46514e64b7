"""export_onnx(source, out): the entry point — load, build the graph from the weights, validate, write atomically."""
from __future__ import annotations

import sys
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
    kv_cache: str = "float"

    def __post_init__(self):
        if self.form not in FORMS:
            raise ExportError(f"--form must be one of {', '.join(FORMS)}, got {self.form!r}")
        from .kvcache import kv_format

        kv_format(self.kv_cache)
        if self.form == "ort" and self.kv_cache == "fp8":
            raise ExportError("--form ort takes --kv-cache int8 (static scales, calibrated at export), not fp8: "
                              "ONNX Runtime's CPU GroupQueryAttention has no FP8 cache; export --kv-cache fp8 "
                              "with --form portable (per-token scales in the graph)")
        if self.form == "ort" and self.opset not in (None, FUSED_OPSET):
            raise ExportError(f"--form ort is built at opset {FUSED_OPSET} (standard RotaryEmbedding and "
                              f"RMSNormalization beside the com.microsoft ops), got --opset {self.opset}")
        if self.opset is not None and self.opset not in (PLAIN_OPSET, 22, FUSED_OPSET):
            raise ExportError(f"--opset must be 21 or 22 (plain ops) or 23 (fused Attention/RoPE/RMSNorm), "
                              f"got {self.opset}")

    @property
    def static_kv(self) -> bool:
        """The ort form's int8 cache: scales calibrated at export, constants in the graph (kvstatic)."""
        return self.form == "ort" and self.kv_cache == "int8"

    @property
    def kv_io(self):
        """The cache as the artifact's IO states it (export.onnx.kvcache.KVFormat)."""
        from .kvcache import STATIC_INT8, kv_format

        return STATIC_INT8 if self.static_kv else kv_format(self.kv_cache)

    @property
    def kv_graph(self):
        """The cache the graph is built with: float for the static int8 cache, made int8 after calibration."""
        from .kvcache import FLOAT

        return FLOAT if self.static_kv else self.kv_io

    @property
    def kv_check(self) -> str:
        """The cache format as validation's tolerances name it (validate.KV_TOLERANCES)."""
        return "int8-static" if self.static_kv else self.kv_cache

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


VALIDATION_MODES = ("auto", "whole-model", "per-layer")


def export_onnx(source, out, *, form: str = "portable", opset: int | None = None, validate: bool = True,
                force: bool = False, progress: bool = False, before_rename=None, exporter: str = "kiln",
                optimum_python: str | None = None, validation: str = "auto", max_memory: int | None = None,
                kv_cache: str = "float", calib_corpus: str | None = None):
    """Build ``out`` (model.onnx + model.onnx.data + tokenizer + kiln.json) from ``source``.

    ``source`` is anything ``compress.load_model`` accepts (alias, .gguf, HF dir, llmkiln checkpoint, SourceInfo).
    ``exporter="optimum"`` runs optimum-onnx's exporter in the interpreter ``optimum_python`` instead of the
    builder (fp32 only; see optimum_fallback). ``validation``: ``auto`` (whole-model when the float32 torch
    model and the artifact fit ``max_memory``, default the memory available; else per layer),
    ``whole-model`` or ``per-layer``. Returns the written Manifest. Raises ExportError (or CompressError for
    an unloadable source). ``kv_cache``: ``float`` (IO contract 2) or ``int8`` / ``fp8`` (codes + per-token
    scales, IO contract 3; export.onnx.kvcache); with ``form="ort"``, ``int8`` is codes with static per-channel
    scales calibrated on ``calib_corpus`` (default builtin:pydoc; IO contract 4, export.onnx.kvstatic).
    """
    if validation not in VALIDATION_MODES:
        raise ExportError(f"validation must be one of {', '.join(VALIDATION_MODES)}, got {validation!r}")
    cfg = OnnxExportConfig(form=form, opset=opset, validate=validate, force=force, kv_cache=kv_cache)
    if exporter not in EXPORTERS:
        raise ExportError(f"--exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    if exporter == "optimum":
        if opset is not None:
            raise ExportError("--opset applies to --exporter kiln; optimum chooses its own opset")
        if kv_cache != "float":
            raise ExportError("--kv-cache applies to --exporter kiln; optimum's graph keeps a float cache")
        from .optimum_fallback import export_with_optimum

        return export_with_optimum(source, out, validate=validate, force=force, progress=progress,
                                   optimum_python=optimum_python, before_rename=before_rename)
    out = Path(out)
    from runtime.fsutil import atomic_dir

    from .artifact import (check_graph, layer_specs, load_torch, refuse_overwrite, resolve_source, validation_mode,
                           whole_model_validator, write_artifact)
    from .decoder import build_decoder, io_spec
    from .graph import GraphBuilder
    from .qdq import graph_block
    from .direct import DIRECT_ROPE, file_source, rope_tables_numpy, rope_type
    from .weights import Weights, precheck, weights_for

    t0 = time.perf_counter()
    info = resolve_source(source, out, force, progress, precheck)
    # weights are read straight from the safetensors files (no torch import without validation); the whole
    # torch model is loaded only to validate against it when it fits, or for sources the file reader declines
    direct = file_source(info)
    mode, mode_why = validation_mode(info, direct.arch, validation, max_memory) if (cfg.validate and direct) else \
        ("whole-model", "the source is read through transformers")
    model = tok = None
    if direct is None or (cfg.validate and mode == "whole-model"):
        model, tok, info, arch = load_torch(info, out, progress)
        if direct is not None and direct.arch != arch:
            direct = None  # config.json read differently than transformers reads it: take its tensors instead
    if direct is not None:
        arch = direct.arch
        refuse_overwrite(out, direct.root)
    if arch.hidden_act != "silu":
        raise ExportError(f"hidden_act {arch.hidden_act!r} is not supported by the ONNX exporter (silu only; "
                          "an fp32 source can go through --exporter optimum)")
    if arch.heads % arch.kv_heads:
        raise ExportError(f"heads {arch.heads} not divisible by kv_heads {arch.kv_heads}")
    specs = layer_specs(info)
    exact = sorted(n for n, s in specs.items() if s.kernel == "exact")
    if exact:
        raise ExportError(f"{len(exact)} Linear(s) ask for the exact weight-only kernel (e.g. {exact[0]}), which the "
                          "exporter does not build: ONNX Runtime's float-activation MatMulNBits measured 2x (int4) "
                          "to 137x (int8) slower than its fast kernel at batch 1; make those Linears float instead "
                          "(docs/QUANTIZATION.md)")
    if cfg.form == "ort":
        from .ortform import ort_form_refusal

        why = ort_form_refusal(specs)
        if why:
            raise ExportError(f"--form ort does not take this checkpoint: {why}; export it with --form portable")
    elif progress:
        from ..tensorrt.flags import tensorrt_blockers

        for why in tensorrt_blockers(specs, arch):
            print(f"llmkiln: note: TensorRT cannot build this graph: {why}", file=sys.stderr, flush=True)
    w = Weights(str(info.path), direct.tensors, specs) if direct is not None else weights_for(model, info)
    lazy = None
    if cfg.validate and model is None:
        from compress.lazy import LazyModel

        lazy = LazyModel(direct.root, specs)
    # direct sources only have these rope types; yarn and the like take transformers' own tables
    if rope_type(arch) in DIRECT_ROPE:
        cos, sin = rope_tables_numpy(arch)
    else:
        if lazy is None and model is None:
            from compress.lazy import LazyModel

            lazy = LazyModel(direct.root, specs)
        cos, sin = rope_tables(model if model is not None else lazy.skeleton, arch)
    recorded = None  # the checkpoint's static KV scales, read (and refused) before any graph is built
    if cfg.static_kv and info.manifest is not None and info.manifest.kv_cache is not None:
        from .kvstatic import load_checkpoint_scales

        recorded = (info.manifest.kv_cache, load_checkpoint_scales(Path(info.path), info.manifest.kv_cache, arch))
    t_load = time.perf_counter() - t0

    bar = None
    if progress:
        from runtime.progress import bar as make_bar

        bar = make_bar(arch.layers, "building graph")
    with atomic_dir(out, force=force, error=ExportError) as tmp:
        b = GraphBuilder(tmp, cfg.resolved_opset)
        try:
            build_decoder(b, w, arch, cos, sin, fused=cfg.fused, progress=bar.advance if bar else None,
                          form=cfg.form, kv=cfg.kv_graph)
            label = info.manifest.preset() if info.manifest is not None else "fp32"
            onnx_path = b.finish("llmkiln_decoder", doc=f"llmkiln {arch.model_type} decoder ({label})",
                                 metadata={"preset": label, "form": cfg.form,
                                           **({"kv_cache": cfg.kv_cache} if cfg.kv_cache != "float" else {})})
        finally:
            b.abort()
            if bar:
                bar.close()
        check_graph(onnx_path)
        kv_record = None
        if cfg.static_kv:
            kv_record = _static_kv(tmp, onnx_path, model, tok, direct, arch, recorded, calib_corpus, progress)
        t_build = time.perf_counter() - t0 - t_load
        blocks = [graph_block(s.group_size, s.kernel) for s in specs.values() if s.quantized]
        blocks = [k for k in blocks if k is not None]
        io = io_spec(arch, form=cfg.form, opset=cfg.resolved_opset, weight_block=min(blocks) if blocks else None,
                     kv=cfg.kv_io)
        validator = None
        if cfg.validate and model is not None:
            validator = whole_model_validator(model, tok, arch, specs)
            if cfg.kv_cache != "float":
                from .validate import validate as validate_graph

                validator = lambda p: validate_graph(model, tok, p, arch, specs, kv=cfg.kv_check)  # noqa: E731
        elif cfg.validate:
            validator = _layer_validator(b.boundaries, lazy, direct.root, arch, specs, mode_why, progress,
                                         cfg.kv_check)
        manifest = write_artifact(tmp, model, tok, info, arch, onnx_path, specs, io, validator, before_rename,
                                  direct=direct, kv_cache=kv_record)
        t_val = time.perf_counter() - t0 - t_load - t_build
    manifest.timings = {"load_s": round(t_load, 3), "build_s": round(t_build, 3), "validate_s": round(t_val, 3),
                        "weights_from": "safetensors files" if direct is not None else "torch model"}
    return manifest


def _static_kv(tmp, onnx_path, model, tok, direct, arch, recorded, corpus, progress):
    """Make the float-cache graph's cache int8 with static scales (export.onnx.kvstatic): ``recorded``, the
    checkpoint's (record, scales) from ``kiln compress quantize --kv-cache int8``, or, without them, scales
    calibrated here. Returns the artifact's KVCacheRecord."""
    import dataclasses

    from runtime.corpus import BUILTIN
    from runtime.records import KVCacheRecord

    from .artifact import write_side_files
    from .kvstatic import DEFAULT_WINDOWS, calibrate, make_static

    if recorded is not None:
        record, scales = recorded
        make_static(onnx_path, scales, arch)
        if progress:
            print(f"llmkiln: int8 KV cache: the checkpoint's scales ({record.windows} x {record.seq_len} tokens "
                  f"of {record.corpus}); --calib is not used", file=sys.stderr, flush=True)
        return dataclasses.replace(record, file=None)
    tok_dir = direct.root if direct is not None else tmp
    if direct is None:  # a source read through transformers: its tokenizer is saved where the artifact's goes
        write_side_files(tmp, model, tok)
    bar = None
    if progress:
        from runtime.progress import bar as make_bar

        bar = make_bar(DEFAULT_WINDOWS, "calibrating the int8 KV cache")
    try:
        scales = calibrate(onnx_path, tok_dir, arch, corpus, progress=bar.advance if bar else None)
    finally:
        if bar:
            bar.close()
    make_static(onnx_path, scales, arch)
    return KVCacheRecord(format="int8", calibrated_by="export", corpus=corpus or BUILTIN, windows=scales.windows,
                         seq_len=scales.seq_len)


def _layer_validator(boundaries, lazy, root, arch, specs, why, progress, kv="float"):
    def run(onnx_path):
        from compress.hfdir import quiet_transformers

        from .validate_layers import validate_layers

        with quiet_transformers():
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(root))
        bar = None
        if progress:
            from runtime.progress import bar as make_bar

            bar = make_bar(len(boundaries), "validating layer by layer")
        try:
            return validate_layers(onnx_path, boundaries, lazy, tok, arch, specs, why,
                                   progress=bar.advance if bar else None, kv=kv)
        finally:
            if bar:
                bar.close()

    return run
