"""kiln.json: the versioned, strictly parsed manifest every artifact dir carries.

Kinds: ``checkpoint`` (compressed or plain HF weights), ``onnx`` (model.onnx + data),
``engine`` (TensorRT plan). Unknown keys and unsupported schema versions are errors;
nothing is inferred from file names.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import EngineError
from .fsutil import atomic_write_text, sha256_file
from .layerspec import LayerSpec
from .records import (EngineInfo, FileEntry, IOSpec, KVCacheRecord, Pass, PrunePass, QuantPass,
                      Validation)
from .strict import RecordError, _convert, from_json, to_json

SCHEMA_VERSION = 2  # 2: typed LayerSpecs and records (runtime/records.py)
MANIFEST_NAME = "kiln.json"
KINDS = ("checkpoint", "onnx", "engine")


class ManifestError(EngineError):
    """kiln.json is missing, malformed, of another schema version, or disagrees with the files."""


def _producer() -> str:
    try:
        from importlib.metadata import version

        return f"llmkiln {version('llmkiln')}"
    except Exception:
        return "llmkiln (source tree)"


@dataclass(frozen=True)
class Architecture:
    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_position: int
    rope_theta: float
    rms_eps: float
    tied_embeddings: bool
    rope_scaling: dict | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    hidden_act: str = "silu"


@dataclass
class Manifest:
    kind: str
    architecture: Architecture
    source: dict = field(default_factory=dict)
    passes: list[Pass] = field(default_factory=list)
    io: IOSpec | None = None
    files: dict[str, FileEntry] = field(default_factory=dict)
    validation: Validation | None = None
    engine: EngineInfo | None = None
    kv_cache: KVCacheRecord | None = None  # static int8 KV scales: a checkpoint's file or an artifact's origin
    producer: str = field(default_factory=_producer)
    schema_version: int = SCHEMA_VERSION

    # ---- (de)serialization -------------------------------------------------
    def to_dict(self) -> dict:
        d = {
            "schema_version": self.schema_version,
            "kind": self.kind,
            "producer": self.producer,
            "source": self.source,
            "architecture": dataclasses.asdict(self.architecture),
            "passes": to_json(self.passes),
            "io": to_json(self.io),
            "files": to_json(self.files),
            "validation": to_json(self.validation),
            "engine": to_json(self.engine),
            "kv_cache": to_json(self.kv_cache),
        }
        return {k: v for k, v in d.items() if v is not None}

    @classmethod
    def from_dict(cls, d: Any, where: str = MANIFEST_NAME) -> Manifest:
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: expected a JSON object")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(
                f"{where}: schema_version {version!r} is not supported (this llmkiln reads {SCHEMA_VERSION}); "
                "re-create the artifact with this version of llmkiln"
            )
        unknown = sorted(set(d) - _TOP_KEYS)
        if unknown:
            raise ManifestError(f"{where}: unknown key(s) {', '.join(unknown)}")
        kind = d.get("kind")
        if kind not in KINDS:
            raise ManifestError(f"{where}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
        try:
            arch = from_json(Architecture, d.get("architecture"), f"{where}: architecture")
            passes = d.get("passes", [])
            if not isinstance(passes, list):
                raise RecordError(f"{where}: passes: expected a list")
            parsed = [_parse_pass(p, f"{where}: passes[{i}]") for i, p in enumerate(passes)]
            source = _convert(dict, d.get("source", {}), f"{where}: source")
            files = _convert(dict[str, FileEntry], d.get("files", {}), f"{where}: files")
            io = None if d.get("io") is None else from_json(IOSpec, d["io"], f"{where}: io")
            val = None if d.get("validation") is None else from_json(Validation, d["validation"],
                                                                      f"{where}: validation")
            eng = None if d.get("engine") is None else from_json(EngineInfo, d["engine"], f"{where}: engine")
            kv = d.get("kv_cache")
            kv = None if kv is None else from_json(KVCacheRecord, kv, f"{where}: kv_cache")
            producer = _convert(str, d.get("producer", "unknown"), f"{where}: producer")
        except RecordError as e:
            raise ManifestError(str(e)) from None
        return cls(kind=kind, architecture=arch, source=source, passes=parsed, io=io, files=files,
                   validation=val, engine=eng, kv_cache=kv, producer=producer, schema_version=version)

    # ---- helpers ---------------------------------------------------------------
    def quant_passes(self) -> list[QuantPass]:
        return [p for p in self.passes if isinstance(p, QuantPass)]

    @property
    def quantized(self) -> bool:
        return bool(self.quant_passes())

    def layer_specs(self) -> dict[str, LayerSpec]:
        """The LayerSpec of every Linear that is not plain float: quantized ones from the quantize passes
        (each Linear is quantized once), float ones a prune pass left sparse."""
        specs: dict[str, LayerSpec] = {}
        for p in self.passes:
            if isinstance(p, PrunePass) and p.pattern:
                for name in p.layers:
                    specs[name] = LayerSpec(sparsity=p.pattern)
        for p in self.quant_passes():
            for name, spec in p.layers.items():
                sparse = specs.get(name)
                if sparse is not None and sparse.sparsity and spec.sparsity is None:
                    spec = dataclasses.replace(spec, sparsity=sparse.sparsity)
                specs[name] = spec
        return specs

    def preset(self) -> str:
        """A label for people (reports, ``describe``): the quantize presets applied, or fp32."""
        names = [p.preset for p in self.quant_passes()]
        return "+".join(names) if names else "fp32"

    def record_files(self, root: str | Path, names: list[str] | None = None) -> None:
        """Fill ``files`` with size and sha256 of each file under root (kiln.json itself excluded)."""
        root = Path(root)
        if names is None:
            names = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                           if p.is_file() and p.name != MANIFEST_NAME)
        self.files = {n: FileEntry(size=(root / n).stat().st_size, sha256=sha256_file(root / n)) for n in names}

    def save(self, root: str | Path) -> Path:
        path = Path(root) / MANIFEST_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return path


_TOP_KEYS = {f.name for f in dataclasses.fields(Manifest)}


def _parse_pass(p, where: str) -> Pass:
    kind = p.get("kind") if isinstance(p, dict) else None
    if kind == "quantize":
        return from_json(QuantPass, p, where)
    if kind == "prune":
        return from_json(PrunePass, p, where)
    raise RecordError(f"{where}: a pass must be an object with kind 'quantize' or 'prune'")


def read_manifest(root: str | Path) -> Manifest:
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{root}: no {MANIFEST_NAME} here; this is not an llmkiln artifact")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    try:
        return Manifest.from_dict(data, where=str(path))
    except TypeError as e:  # wrong field types inside architecture
        raise ManifestError(f"{path}: {e}") from None


def verify_files(root: str | Path, manifest: Manifest, full: bool = False) -> None:
    """Check every file the manifest lists exists with its recorded size (and sha256 when ``full``)."""
    root = Path(root)
    for name, meta in manifest.files.items():
        p = root / name
        if not p.is_file():
            raise ManifestError(f"{root}: {name} is listed in {MANIFEST_NAME} but missing")
        if p.stat().st_size != meta.size:
            raise ManifestError(
                f"{p}: size {p.stat().st_size} differs from {meta.size} in {MANIFEST_NAME}; "
                "the file is truncated or was replaced — re-create the artifact"
            )
        if full and sha256_file(p) != meta.sha256:
            raise ManifestError(f"{p}: sha256 differs from {MANIFEST_NAME}; the file is corrupt — re-create it")
