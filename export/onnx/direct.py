"""Read an unquantized model straight from its files, without torch: config.json, safetensors, RoPE tables.

Used for float HF dirs, float/pruned llmkiln checkpoints and GGUFs whose de-quantized copy is already cached.
``direct_source(info)`` returns None whenever anything is unusual (bin weights, an unknown dtype or RoPE type,
a config that leaves fields to transformers' defaults, no tokenizer.json), and the exporter then loads the
torch model instead, so both roads build the same graph from the same tensors.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

_REQUIRED = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
             "vocab_size", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings")
DIRECT_ROPE = (None, "default", "linear", "llama3")
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "chat_template.json", "generation_config.json")


def config_namespace(cfg: dict) -> SimpleNamespace | None:
    """config.json as the attributes architecture_from_config reads, or None if it relies on class defaults."""
    if any(k not in cfg for k in _REQUIRED):
        return None
    if "rope_theta" not in cfg and not isinstance(cfg.get("rope_parameters"), dict):
        return None
    fields = dict(cfg)
    fields.setdefault("rope_scaling", None)
    return SimpleNamespace(**fields)


def rope_type(arch) -> str | None:
    s = arch.rope_scaling
    return None if not s else s.get("rope_type", s.get("type"))


def rope_tables_numpy(arch) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_position, head_dim/2] as transformers' default, linear and llama3 RoPE compute them
    (inverse frequencies in float32 as there, cos/sin correctly rounded to float32)."""
    dim = arch.head_dim
    inv = (1.0 / (np.float32(arch.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))
    inv = inv.astype(np.float32)
    kind, s = rope_type(arch), arch.rope_scaling or {}
    if kind == "linear":
        inv = (inv / np.float32(s["factor"])).astype(np.float32)
    elif kind == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = (2 * math.pi / inv).astype(np.float32)
        scaled = np.where(wavelen > old / lo, inv / np.float32(factor), inv).astype(np.float32)
        smooth = ((old / wavelen - lo) / (hi - lo)).astype(np.float32)
        smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    elif kind not in (None, "default"):
        raise ValueError(f"RoPE type {kind!r} has no numpy table here")
    freqs = np.arange(arch.max_position, dtype=np.float32)[:, None] * inv[None, :]  # float32, as torch
    f64 = freqs.astype(np.float64)
    return np.cos(f64).astype(np.float32), np.sin(f64).astype(np.float32)


@dataclass
class DirectSource:
    root: Path  # the dir holding config.json, *.safetensors and the tokenizer files
    arch: object
    tensors: object  # compress.tensorfile.SafetensorsFiles

    def copy_side_files(self, dest: Path) -> None:
        for name in SIDE_FILES:
            if (self.root / name).is_file():
                shutil.copyfile(self.root / name, dest / name)


def _float_root(info) -> Path | None:
    """The HF-format dir of an unquantized source, or None (quantized, bin weights, GGUF not converted yet)."""
    if info.kind == "hf":
        return Path(info.path)
    if info.kind == "checkpoint":
        return None if info.manifest is None or info.manifest.quantized else Path(info.path)
    if info.kind == "gguf":
        from compress.loading import cached_conversion

        return cached_conversion(info)
    return None


def arch_of(path: Path):
    """The architecture from config.json alone when it spells every field out, else through transformers."""
    import json

    from compress.hfdir import architecture_from_config

    ns = config_namespace(json.loads((path / "config.json").read_text()))
    if ns is None:
        from transformers import AutoConfig

        ns = AutoConfig.from_pretrained(str(path))
    return architecture_from_config(ns)


def file_source(info) -> DirectSource | None:
    """A reader for ``info``'s files: ``direct_source`` for float sources, and for quantized llmkiln
    checkpoints their config, codes and scales (shards included); None when only transformers can read it."""
    if info.kind == "checkpoint" and info.manifest is not None and info.manifest.quantized:
        from compress.tensorfile import SafetensorsFiles, checkpoint_files

        root = Path(info.path)
        files = checkpoint_files(root)
        if not files or not (root / "tokenizer.json").is_file():
            return None
        return DirectSource(root, arch_of(root), SafetensorsFiles(files))
    return direct_source(info)


def direct_source(info) -> DirectSource | None:
    """A torch-free reader for ``info``, or None when the exporter should load the torch model instead."""
    from compress.hfdir import architecture_from_config
    from compress.tensorfile import SafetensorsFiles, checkpoint_files

    try:
        root = _float_root(info)
        if root is None or not (root / "tokenizer.json").is_file():
            return None
        ns = config_namespace(json.loads((root / "config.json").read_text()))
        if ns is None:
            return None
        arch = architecture_from_config(ns)
        if rope_type(arch) not in DIRECT_ROPE or (arch.rope_scaling or {}).get("partial_rotary_factor", 1) != 1:
            return None
        files = checkpoint_files(root)
        if not files:
            return None
        return DirectSource(root, arch, SafetensorsFiles(files))
    except Exception:
        return None  # the torch loader reports what is wrong in its own words
