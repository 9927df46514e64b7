"""The typed records inside kiln.json (docs/CONTRACTS.md): passes, the ONNX IO contract, the validation
record, the TensorRT engine block and file entries. All frozen and strictly parsed by ``runtime.strict``.

Free-form objects remain only where nothing downstream reads them (a pass's ``stats``, the compress config a
pass was made with, the ONNX checker summary): they are checked to be JSON objects and kept as they are.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Literal

from .layerspec import LayerSpec

IO_VERSION = 2  # 2: the graph takes ``logits_positions`` [K] and returns logits [B, K, vocab]
# 3: version 2 with a quantized KV cache: past/present are codes (``kv_dtype``) plus float32 scale tensors
# ``past_key_values.{i}.key_scale`` / ``present.{i}.key_scale`` [batch, kv_heads, seq, 1] (docs/CONTRACTS.md).
# Float-cache artifacts stay version 2, so a reader that predates quantized caches refuses only what it cannot run.
IO_VERSION_QUANTIZED_KV = 3
# 4: version 2 with an int8 KV cache whose scales are static, one per KV head and channel, stored in the graph
# (the ONNX Runtime form's GroupQueryAttention reads the codes directly): past/present are int8 codes only.
IO_VERSION_STATIC_KV = 4
IO_VERSIONS = (IO_VERSION, IO_VERSION_QUANTIZED_KV, IO_VERSION_STATIC_KV)
POSITIONS = "logits_positions"
# kv_dtype: the cache's storage type. float32 / float16: plain values; int8 / float8e4m3fn: codes whose
# per-token-and-head scales travel beside them as float32 tensors (SCALE_SUFFIX)
FLOAT_KV = ("float32", "float16")
QUANTIZED_KV = ("int8", "float8e4m3fn")
SCALE_SUFFIX = "_scale"


def io_version(kv_dtype: str, static_scales: bool = False) -> int:
    """The IO contract version an artifact with this KV storage type is written with; ``static_scales``: the
    codes' scales are constants in the graph (version 4, int8 only) rather than tensors beside the codes."""
    if static_scales:
        if kv_dtype != "int8":
            raise ValueError(f"static KV scales exist for an int8 cache only, not {kv_dtype}")
        return IO_VERSION_STATIC_KV
    return IO_VERSION_QUANTIZED_KV if kv_dtype in QUANTIZED_KV else IO_VERSION


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str

    def __post_init__(self):
        if self.size < 0:
            raise ValueError(f"size must be >= 0, got {self.size}")
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ValueError("sha256 must be 64 lowercase hex digits")


# ---- passes -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantPass:
    """One quantize pass: the compress config it was made with (a preset and its options, read back only by
    compress) and the LayerSpec of every Linear it quantized (``lm_head`` included when it did)."""

    config: dict
    layers: dict[str, LayerSpec]
    stats: dict = field(default_factory=dict)
    kind: Literal["quantize"] = "quantize"

    @property
    def preset(self) -> str:
        return str(self.config.get("scheme", "custom"))


@dataclass(frozen=True)
class PrunePass:
    """One prune pass: the compress config, the sparsity ``pattern`` it left in the weights (``2:4``,
    ``unstructured``; None for structured width/depth, which leave a smaller dense model) and the Linears
    that carry it."""

    config: dict
    pattern: Literal["2:4", "unstructured"] | None = None
    layers: tuple[str, ...] = ()
    stats: dict = field(default_factory=dict)
    kind: Literal["prune"] = "prune"


Pass = QuantPass | PrunePass


# ---- static KV-cache scales ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KVCacheRecord:
    """Static int8 KV-cache scales (runtime.kvscales): in a checkpoint, the file that holds them; in an ort-form
    artifact (IO contract 4), where the graph's constants came from. ``calibrated_by``: ``quantize`` (the
    checkpoint's quantize pass, on its calibration stream) or ``export`` (the float-cache graph at export)."""

    format: Literal["int8"]
    calibrated_by: Literal["quantize", "export"]
    corpus: str
    windows: int
    seq_len: int
    granularity: Literal["per-channel"] = "per-channel"  # one scale per layer, KV head and channel
    file: str | None = None  # checkpoint: KV_SCALES_FILE; artifact: None (constants in the graph)

    def __post_init__(self):
        if self.windows < 1 or self.seq_len < 1:
            raise ValueError(f"windows and seq_len must be >= 1, got {self.windows} and {self.seq_len}")
        parts = PurePosixPath(self.file).parts if self.file is not None else ()
        if self.file is not None and (not parts or self.file.startswith("/") or "\\" in self.file
                                      or any(x in ("..", ".") for x in parts)):
            raise ValueError(f"file must be a relative path inside the checkpoint dir, got {self.file!r}")


# ---- the ONNX IO contract --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class IOSpec:
    """The graph's inputs and outputs (names, dtypes, symbolic shapes) and how it was built."""

    version: int
    form: Literal["portable", "ort"]
    opset: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    kv_layout: str = "[batch, kv_heads, seq, head_dim]"
    kv_dtype: str = "float32"
    external_data: str | None = "model.onnx.data"
    exporter: Literal["kiln", "optimum"] = "kiln"
    weight_block: int | None = None  # smallest inputs-per-scale of the graph's blocked DequantizeLinears

    def __post_init__(self):
        if self.version not in IO_VERSIONS:
            raise ValueError(f"IO contract version {self.version} is not supported (this llmkiln reads "
                             f"{', '.join(map(str, IO_VERSIONS[:-1]))} and {IO_VERSIONS[-1]}); re-export the artifact")
        if self.kv_dtype not in FLOAT_KV + QUANTIZED_KV:
            raise ValueError(f"kv_dtype must be one of {', '.join(FLOAT_KV + QUANTIZED_KV)}, got {self.kv_dtype!r}")
        if self.version == IO_VERSION_STATIC_KV:
            if self.kv_dtype != "int8" or self.form != "ort":
                raise ValueError(f"IO contract version {IO_VERSION_STATIC_KV} (static KV scales) is an int8 cache "
                                 f"of the ort form, not {self.kv_dtype} of the {self.form} form")
        elif self.version != io_version(self.kv_dtype):
            raise ValueError(f"a {self.kv_dtype} KV cache is IO contract version {io_version(self.kv_dtype)}, "
                             f"not {self.version}; re-export the artifact")

    @property
    def logits_positions(self) -> bool:
        return any(t.name == POSITIONS for t in self.inputs)

    @property
    def kv_quantized(self) -> bool:
        """The cache holds codes: with per-token scale tensors (version 3) or static scales (version 4)."""
        return self.kv_dtype in QUANTIZED_KV

    @property
    def kv_static(self) -> bool:
        """The codes' scales are constants inside the graph (IO contract version 4)."""
        return self.version == IO_VERSION_STATIC_KV

    @property
    def kv_scales(self) -> tuple[str, ...]:
        """Names of the scale inputs (``past_key_values.{i}.key_scale`` ...), empty for a float cache."""
        return tuple(t.name for t in self.inputs if t.name.startswith("past_key_values.")
                     and t.name.endswith(SCALE_SUFFIX))


# ---- validation ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Diff:
    max_abs: float
    value: float  # max_abs / (max - min) of the reference logits
    past_tokens: int | None = None


@dataclass(frozen=True)
class LogitCheck:
    """ONNX Runtime logits against the reference, without and with a past KV, at one optimization level."""

    optimization: str
    value: float
    tolerance: float
    no_past: Diff
    with_past: Diff
    top1_agreement: float
    # {op type: nodes per run} ONNX Runtime ran at this level that the graph file does not contain (its fusions,
    # e.g. MatMulNBits for DequantizeLinear -> MatMul, which quantizes activations to int8 per block): where its
    # numbers may part from the graph's own math. None: not recorded (artifacts made before it was)
    kernels: dict[str, int] | None = None


@dataclass(frozen=True)
class LayerCheck:
    """One decoder layer (or the final norm + lm_head, ``layer`` = -1) of the graph run alone on the torch
    model's input to it: max |Δ| / (max - min) of the torch output."""

    layer: int
    graph: float | None  # basic optimizations: the graph's own math
    ort_cpu: float  # all optimizations: what the runtime runs


@dataclass(frozen=True)
class Validation:
    """What export compared and what came out. ``passed`` is None when validation was skipped. ``mode``:
    ``whole-model`` (logits of the whole graph against the whole torch model, and greedy decoding) or
    ``per-layer`` (each layer's subgraph against the torch layer on the same input, for models whose float32
    torch copy does not fit the memory budget; docs/CONTRACTS.md)."""

    passed: bool | None
    skipped: bool = False
    mode: Literal["whole-model", "per-layer"] = "whole-model"
    reason: str | None = None
    per_layer: tuple[LayerCheck, ...] = ()
    reference: str | None = None
    runtime: str | None = None
    metric: str | None = None
    prompt_tokens: int | None = None
    value: float | None = None
    tolerance: float | None = None
    ort_cpu: LogitCheck | None = None
    graph: LogitCheck | None = None
    greedy_tokens: int | None = None
    greedy_identical_prefix: int | None = None
    greedy_required: bool | None = None


# ---- TensorRT engines ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildSettingsRecord:
    strongly_typed: bool
    builder_flags: tuple[str, ...]
    formats: dict[str, int]  # LayerSpec label -> number of Linears
    sparse_2_4: bool
    min_compute_capability: str | None = None


@dataclass(frozen=True)
class BuildRecord:
    max_batch: int
    max_seq: int
    opt_seq: int
    version_compatible: bool = False
    workspace_gb: float | None = None
    seconds: float | None = None


@dataclass(frozen=True)
class ProfileRecord:
    name: str
    shapes: dict[str, tuple[tuple[int, ...], ...]]  # input -> (min, opt, max) dims


@dataclass(frozen=True)
class SourceArtifact:
    path: str
    sha256: str
    onnx_check: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EngineInfo:
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    build: BuildRecord
    settings: BuildSettingsRecord | None = None
    profiles: tuple[ProfileRecord, ...] = ()
    timing_cache_sha256: str | None = None
    source_artifact: SourceArtifact | None = None

