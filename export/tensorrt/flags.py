"""Builder settings per artifact: pure functions of the checkpoint's LayerSpecs and the command-line flags.

Precision is never a builder flag: the network is strongly typed (TensorRT 10.x:
``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; TensorRT 11.x: always on, the flag accepted and ignored), so
every tensor's type comes from the graph — FP32 compute, INT8 / FP8 E4M3 / INT4 only where the ONNX has
explicit Q/DQ. ``BuilderFlag.FP16``/``INT8``/``FP8``/``INT4`` are not used (TensorRT 11 removed them).
The only builder flags this stage sets are ``SPARSE_WEIGHTS`` (when a LayerSpec carries 2:4 sparsity) and
``VERSION_COMPATIBLE`` (on request).
"""
from __future__ import annotations

from dataclasses import dataclass

from runtime.layerspec import summarize
from runtime.records import BuildSettingsRecord

from ..errors import ExportError

# Minimum compute capability per feature (TensorRT support matrix): FP8 E4M3 Q/DQ needs Ada/Hopper (8.9);
# 2:4 structured-sparse kernels need Ampere (8.0) or later.
MIN_CC_FP8 = (8, 9)
MIN_CC_SPARSE = (8, 0)


@dataclass(frozen=True)
class BuildSettings:
    strongly_typed: bool
    builder_flags: tuple[str, ...]  # names of tensorrt.BuilderFlag members
    formats: dict  # LayerSpec label -> how many Linears (empty for a float model)
    sparse_2_4: bool
    min_compute_capability: tuple[int, int] | None  # what the precision/sparsity needs, None when anything goes

    def record(self) -> BuildSettingsRecord:
        return BuildSettingsRecord(strongly_typed=self.strongly_typed, builder_flags=self.builder_flags,
                                   formats=dict(self.formats), sparse_2_4=self.sparse_2_4,
                                   min_compute_capability=".".join(map(str, self.min_compute_capability))
                                   if self.min_compute_capability else None)


def _dynamic(specs: dict) -> list[str]:
    return sorted(n for n, s in specs.items() if s.dynamic_act)


def tensorrt_blockers(specs: dict, arch) -> list[str]:
    """Why TensorRT cannot build the portable graph of a checkpoint with these LayerSpecs (empty: it can).
    Pure: what ``kiln export onnx`` says before writing and ``kiln export tensorrt`` refuses."""
    out = []
    dyn = _dynamic(specs)
    if dyn:
        out.append(f"{len(dyn)} Linear(s) quantize activations per token with scales computed at run time "
                   f"(e.g. {dyn[0]}), and TensorRT needs calibrated static scales (quantize with --scheme int8-sq "
                   "or fp8)")
    head = specs.get("lm_head")
    if arch.tied_embeddings and head is not None and head.quantized:
        out.append(f"the tied lm_head / embedding table is quantized ({head.label()}) and the embedding "
                   "Gather reads it, which TensorRT does not take (quantize with --ignore lm_head)")
    return out


def select_settings(specs: dict, *, version_compatible: bool = False) -> BuildSettings:
    """Builder settings for an artifact whose Linears have these LayerSpecs (kiln.json, ``layer_specs()``)."""
    dyn = _dynamic(specs)
    if dyn:
        raise ExportError(
            f"{len(dyn)} Linear(s) quantize activations with scales computed at run time (e.g. {dyn[0]}); "
            "TensorRT needs calibrated static scales. Quantize with --scheme int8-sq (static INT8) or fp8 for a "
            "TensorRT engine"
        )
    sparse = any(s.sparsity == "2:4" for s in specs.values())
    flags = []
    if sparse:
        flags.append("SPARSE_WEIGHTS")
    if version_compatible:
        flags.append("VERSION_COMPATIBLE")
    need = None
    if sparse:
        need = MIN_CC_SPARSE
    if any("fp8" in (s.weight, s.act) for s in specs.values()):
        need = max(need or (0, 0), MIN_CC_FP8)
    return BuildSettings(strongly_typed=True, builder_flags=tuple(flags),
                         formats=summarize(s for s in specs.values() if s.quantized), sparse_2_4=sparse,
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
