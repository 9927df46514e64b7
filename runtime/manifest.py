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

SCHEMA_VERSION = 1
MANIFEST_NAME = "kiln.json"
KINDS = ("checkpoint", "onnx", "engine")
PASS_KINDS = ("quantize", "prune")


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


_ARCH_FIELDS = {f.name: f for f in dataclasses.fields(Architecture)}


@dataclass
class Manifest:
    kind: str
    architecture: Architecture
    source: dict = field(default_factory=dict)
    passes: list[dict] = field(default_factory=list)
    io: dict | None = None
    files: dict[str, dict] = field(default_factory=dict)
    validation: dict | None = None
    engine: dict | None = None
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
            "passes": self.passes,
            "io": self.io,
            "files": self.files,
            "validation": self.validation,
            "engine": self.engine,
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
        allowed = {"schema_version", "kind", "producer", "source", "architecture", "passes", "io", "files",
                   "validation", "engine"}
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise ManifestError(f"{where}: unknown key(s) {', '.join(unknown)}")
        kind = d.get("kind")
        if kind not in KINDS:
            raise ManifestError(f"{where}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
        arch = d.get("architecture")
        if not isinstance(arch, dict):
            raise ManifestError(f"{where}: 'architecture' must be an object")
        bad = sorted(set(arch) - set(_ARCH_FIELDS))
        if bad:
            raise ManifestError(f"{where}: unknown architecture key(s) {', '.join(bad)}")
        required = [n for n, f in _ARCH_FIELDS.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [n for n in required if n not in arch]
        if missing:
            raise ManifestError(f"{where}: architecture is missing {', '.join(missing)}")
        passes = d.get("passes", [])
        if not isinstance(passes, list):
            raise ManifestError(f"{where}: 'passes' must be a list")
        for i, p in enumerate(passes):
            if not isinstance(p, dict) or p.get("kind") not in PASS_KINDS or not isinstance(p.get("config"), dict):
                raise ManifestError(
                    f"{where}: passes[{i}] must be an object with kind in {PASS_KINDS} and a 'config' object"
                )
        for key in ("source", "files"):
            if not isinstance(d.get(key, {}), dict):
                raise ManifestError(f"{where}: '{key}' must be an object")
        for key in ("io", "validation", "engine"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise ManifestError(f"{where}: '{key}' must be an object")
        return cls(
            kind=kind,
            architecture=Architecture(**arch),
            source=d.get("source", {}),
            passes=passes,
            io=d.get("io"),
            files=d.get("files", {}),
            validation=d.get("validation"),
            engine=d.get("engine"),
            producer=d.get("producer", "unknown"),
            schema_version=version,
        )

    # ---- helpers ---------------------------------------------------------------
    def quant_pass(self) -> dict | None:
        """The last quantize pass, or None for a float model."""
        qs = [p for p in self.passes if p["kind"] == "quantize"]
        return qs[-1] if qs else None

    def record_files(self, root: str | Path, names: list[str] | None = None) -> None:
        """Fill ``files`` with size and sha256 of each file under root (kiln.json itself excluded)."""
        root = Path(root)
        if names is None:
            names = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                           if p.is_file() and p.name != MANIFEST_NAME)
        self.files = {n: {"size": (root / n).stat().st_size, "sha256": sha256_file(root / n)} for n in names}

    def save(self, root: str | Path) -> Path:
        path = Path(root) / MANIFEST_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return path


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
        if p.stat().st_size != meta.get("size"):
            raise ManifestError(
                f"{p}: size {p.stat().st_size} differs from {meta.get('size')} in {MANIFEST_NAME}; "
                "the file is truncated or was replaced — re-create the artifact"
            )
        if full and sha256_file(p) != meta.get("sha256"):
            raise ManifestError(f"{p}: sha256 differs from {MANIFEST_NAME}; the file is corrupt — re-create it")
