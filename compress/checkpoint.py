"""Compressed checkpoint dirs: HF config + safetensors weights + tokenizer + kiln.json (kind "checkpoint").

Float and pruned checkpoints are ordinary Hugging Face dirs (plain transformers loads them). Quantized ones
store the real low-precision tensors (compress.quant.checkpoint); ``compress.load_model`` reads both.
"""
from __future__ import annotations

from runtime.fsutil import atomic_dir
from runtime.manifest import Manifest
from runtime.records import Pass

from .errors import CompressError
from .hfdir import architecture_from_config, quiet_transformers, state_for_saving


def source_record(info) -> dict:
    """The manifest ``source`` block for a SourceInfo, carrying provenance through every stage."""
    if info.kind == "checkpoint" and info.manifest is not None:
        return dict(info.manifest.source)
    rec = info.to_dict()
    rec["sha256"] = info.extra.get("sha256") or info.weights_sha256()
    return rec


def save_checkpoint(model, tokenizer, out, *, source: dict, passes: list[Pass], force: bool = False,
                    tensors: dict | None = None, before_rename=None) -> Manifest:
    """Write a checkpoint dir atomically. ``tensors`` overrides the model's state (quantized weights)."""
    from safetensors.torch import save_file

    arch = architecture_from_config(model.config)
    with atomic_dir(out, force=force, error=CompressError) as tmp, quiet_transformers():
        save_file(tensors if tensors is not None else state_for_saving(model), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        model.config.save_pretrained(str(tmp))
        if getattr(model, "generation_config", None) is not None:
            try:
                model.generation_config.save_pretrained(str(tmp))
            except Exception:
                pass
        tokenizer.save_pretrained(str(tmp))
        manifest = Manifest(kind="checkpoint", architecture=arch, source=source, passes=list(passes))
        manifest.record_files(tmp)
        manifest.save(tmp)
        if before_rename is not None:
            before_rename(tmp, manifest)
    return manifest
