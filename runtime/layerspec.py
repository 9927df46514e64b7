"""``LayerSpec``: what one Linear became, the single description every stage reads.

kiln.json records one spec per quantized (or pruned) Linear; compress writes them, export builds the graph
from them (QDQ pattern, validation tolerance, TensorRT flags) and nothing downstream reads a scheme name. A
scheme (``int8-wo``, ``fp8``, ...) is only a preset that expands to specs, so one checkpoint may mix formats
Linear by Linear. Field meanings are in docs/CONTRACTS.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

WeightFormat = Literal["float", "int8", "fp8", "int4"]
ActFormat = Literal["int8", "fp8"]
Granularity = Literal["tensor", "token"]
Sparsity = Literal["2:4", "unstructured"]
Kernel = Literal["fast", "fine", "exact"]
KERNELS = ("fast", "fine", "exact")
# inputs per activation scale of ONNX Runtime's fast weight-only kernel (MatMulNBits quantizes its input per
# block of the weight's block size), by kernel: what the exporters write the weight scales at
ACT_BLOCK = {"fast": 32, "fine": 16}

WEIGHT_FORMATS = ("float", "int8", "fp8", "int4")
GROUPED_FORMATS = ("int8", "int4")  # formats whose scales may come per block of inputs


@dataclass(frozen=True)
class LayerSpec:
    """weight: storage format of the weight codes (symmetric, zero point 0).
    group_size: inputs per weight scale (a block along the input axis); None = one scale per output row.
    act: format the input is quantized to before the product; None = the input stays float (weight-only).
    act_granularity: ``tensor`` = one calibrated static scale, ``token`` = one scale per token at run time.
    sparsity: ``2:4`` (at most 2 non-zeros in every 4 inputs of a row) or ``unstructured`` zeros, else None.
    kernel: how a CPU backend computes a weight-only product: ``fast`` (ONNX Runtime's kernel that quantizes
    the activations to int8 per block of 32 inputs), ``fine`` (the same kernel with blocks of 16: closer to the
    checkpoint, an extra float32 scale per 16 inputs) or ``exact`` (float activations); None = the backend's
    default (fast). Only int8 and int4 weights have a choice.
    """

    weight: WeightFormat = "float"
    group_size: int | None = None
    act: ActFormat | None = None
    act_granularity: Granularity | None = None
    sparsity: Sparsity | None = None
    kernel: Kernel | None = None

    def __post_init__(self):
        if self.weight not in WEIGHT_FORMATS:
            raise ValueError(f"weight must be one of {', '.join(WEIGHT_FORMATS)}, got {self.weight!r}")
        g = self.group_size
        if self.weight == "int4" and g is None:
            raise ValueError("an int4 weight needs group_size")
        if g is not None:
            if self.weight not in GROUPED_FORMATS:
                raise ValueError(f"group_size applies to {' and '.join(GROUPED_FORMATS)} weights, not {self.weight}")
            if isinstance(g, bool) or not isinstance(g, int) or g < 2 or g & (g - 1):
                raise ValueError(f"group_size must be a power of two >= 2, got {g!r}")
        if self.act is not None:
            if self.weight == "float":
                raise ValueError("a quantized input needs a quantized weight")
            if self.act_granularity is None:
                raise ValueError("act needs act_granularity (tensor or token)")
            if self.act_granularity == "token" and self.act != "int8":
                raise ValueError("per-token (dynamic) activation scales exist for int8 only")
        elif self.act_granularity is not None:
            raise ValueError("act_granularity without act")
        if self.kernel is not None:
            if self.kernel not in KERNELS:
                raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
            if self.weight not in GROUPED_FORMATS or self.act is not None:
                raise ValueError("kernel applies to weight-only int8 and int4 Linears")

    @property
    def quantized(self) -> bool:
        return self.weight != "float"

    @property
    def float_input(self) -> bool:
        return self.act is None

    @property
    def static_act(self) -> bool:
        """A calibrated per-tensor activation scale (QuantizeLinear/DequantizeLinear pair, TensorRT's form)."""
        return self.act is not None and self.act_granularity == "tensor"

    @property
    def dynamic_act(self) -> bool:
        return self.act is not None and self.act_granularity == "token"

    def label(self) -> str:
        """Short name: ``int8``, ``int4/g128``, ``fp8 x fp8``, ``int8 x int8/token``, ``float 2:4``."""
        s = self.weight + (f"/g{self.group_size}" if self.group_size else "")
        if self.act:
            s += f" x {self.act}" + ("/token" if self.act_granularity == "token" else "")
        if self.sparsity:
            s += f" {self.sparsity}"
        if self.kernel:
            s += f" ({self.kernel})"
        return s


def summarize(specs) -> dict[str, int]:
    """{label: how many Linears} for a collection of LayerSpecs, most common first."""
    counts: dict[str, int] = {}
    for s in specs:
        counts[s.label()] = counts.get(s.label(), 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
