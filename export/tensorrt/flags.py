"""Builder settings per artifact: pure functions of kiln.json ``passes`` and the command-line flags.

Precision is never a builder flag: the network is strongly typed (TensorRT 10.x:
``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; TensorRT 11.x: always on, the flag accepted and ignored), so
every tensor's type comes from the graph — FP32 compute, INT8 / FP8 E4M3 / INT4 only where the ONNX has
explicit Q/DQ. ``BuilderFlag.FP16``/``INT8``/``FP8``/``INT4`` are not used (TensorRT 11 removed them).
The only builder flags this stage sets are ``SPARSE_WEIGHTS`` (when a 2:4 prune pass is recorded) and
``VERSION_COMPATIBLE`` (on request).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ExportError

# Minimum compute capability per feature (TensorRT support matrix): FP8 E4M3 Q/DQ needs Ada/Hopper (8.9);
# 2:4 structured-sparse kernels need Ampere (8.0) or later.
MIN_CC_FP8 = (8, 9)
MIN_CC_SPARSE = (8, 0)
# Schemes whose activations are quantized at run time with computed scales: TensorRT Q/DQ needs
# build-time constant scales, so these graphs cannot be built (check_onnx reports the exact nodes).
DYNAMIC_ACT_SCHEMES = ("int8-dyn",)


@dataclass(frozen=True)
class BuildSettings:
    strongly_typed: bool
    builder_flags: tuple[str, ...]  # names of tensorrt.BuilderFlag members
    scheme: str | None  # the quantize scheme, None for a float model
    sparse_2_4: bool
    min_compute_capability: tuple[int, int] | None  # what the precision/sparsity needs, None when anything goes

    def to_dict(self) -> dict:
        return {"strongly_typed": self.strongly_typed, "builder_flags": list(self.builder_flags),
                "scheme": self.scheme, "sparse_2_4": self.sparse_2_4,
                "min_compute_capability": ".".join(map(str, self.min_compute_capability))
                if self.min_compute_capability else None}


def is_2_4_prune(p: dict) -> bool:
    """Whether a kiln.json pass is a 2:4 (N:M with N=2, M=4) semi-structured prune.

    Accepts the serializations an N:M config can take: ``{"pattern": "2:4"}``, ``{"n": 2, "m": 4}``, or a
    method/name of ``"2:4"``.
    """
    if p.get("kind") != "prune":
        return False
    c = p.get("config") or {}
    for key in ("pattern", "sparsity_pattern", "method", "name"):
        v = c.get(key)
        if isinstance(v, str) and v.replace(" ", "").lower() in ("2:4", "nm2:4", "nm(2,4)"):
            return True
    n, m = c.get("n", c.get("N")), c.get("m", c.get("M"))
    return n == 2 and m == 4


def quant_scheme(passes: list[dict]) -> str | None:
    qs = [p for p in passes if p.get("kind") == "quantize"]
    return (qs[-1].get("config") or {}).get("scheme") if qs else None


def uses_fp8(passes: list[dict]) -> bool:
    qs = [p for p in passes if p.get("kind") == "quantize"]
    if not qs:
        return False
    layers = qs[-1].get("layers") or {}
    return quant_scheme(passes) == "fp8" or any(
        isinstance(s, dict) and "fp8" in (s.get("weight"), s.get("act")) for s in layers.values())


def select_settings(passes: list[dict], *, version_compatible: bool = False) -> BuildSettings:
    """Builder settings for an artifact whose kiln.json records ``passes``."""
    scheme = quant_scheme(passes)
    if scheme in DYNAMIC_ACT_SCHEMES:
        raise ExportError(
            f"scheme {scheme} quantizes activations with scales computed at run time; TensorRT needs "
            "calibrated static scales. Quantize with --scheme int8-sq (static INT8) or fp8 for a TensorRT engine"
        )
    sparse = any(is_2_4_prune(p) for p in passes)
    flags = []
    if sparse:
        flags.append("SPARSE_WEIGHTS")
    if version_compatible:
        flags.append("VERSION_COMPATIBLE")
    need = None
    if sparse:
        need = MIN_CC_SPARSE
    if uses_fp8(passes):
        need = max(need or (0, 0), MIN_CC_FP8)
    return BuildSettings(strongly_typed=True, builder_flags=tuple(flags), scheme=scheme, sparse_2_4=sparse,
                         min_compute_capability=need)


def check_device(settings: BuildSettings, compute_capability: tuple[int, int], gpu_name: str) -> None:
    """Refuse a build the GPU cannot run, naming the feature and the GPU."""
    need = settings.min_compute_capability
    if need and tuple(compute_capability) < tuple(need):
        what = "FP8 E4M3" if need == MIN_CC_FP8 else "2:4 sparse weights"
        raise ExportError(
            f"{gpu_name} (compute capability {compute_capability[0]}.{compute_capability[1]}) cannot run "
            f"{what}, which needs compute capability {need[0]}.{need[1]} or newer (H100 is 9.0); build on such "
            "a GPU or re-quantize with another scheme"
        )
