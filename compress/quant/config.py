"""One frozen config dataclass per quantization scheme, validated in __post_init__; serialized into kiln.json.

A scheme is a preset: ``layer_spec(name, in_features)`` expands it to the ``LayerSpec`` of each Linear it
selects, and that spec, not the scheme name, is what the checkpoint records and every later stage reads.
Selection: ``targets`` / ``ignore`` patterns (compress.selection); by default every Linear of the decoder
layers plus the lm_head (stored once with a tied embedding). Measurements behind the defaults are in
docs/QUANTIZATION.md.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from runtime.layerspec import LayerSpec

from ..errors import CompressError
from ..selection import DECODER_LINEARS, Selection, check_patterns, matches
from . import primitives as P

QUANT_TARGETS = (DECODER_LINEARS, "lm_head")
TENSORRT_IGNORE = ("lm_head",)  # a tied table feeds Gather, which TensorRT does not take in INT8 / FP8
DEFAULT_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_CLIPS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
METHODS = ("gptq", "rtn")
CPU_KERNELS = ("fast", "fine")  # LayerSpec.kernel values a weight-only preset may ask for


@dataclass(frozen=True)
class QuantConfig:
    """Base of every scheme: which Linears (``targets`` minus ``ignore``)."""

    targets: tuple = QUANT_TARGETS
    ignore: tuple = ()

    scheme = ""  # class attribute: the --scheme name

    def __post_init__(self):
        object.__setattr__(self, "targets", check_patterns(self.targets, "targets"))
        object.__setattr__(self, "ignore", check_patterns(self.ignore, "ignore"))

    @property
    def selection(self) -> Selection:
        return Selection(self.targets, self.ignore)

    @property
    def needs_calibration(self) -> bool:
        return getattr(self, "method", "rtn") == "gptq"

    def to_dict(self) -> dict:
        d = {"scheme": self.scheme}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    def layer_spec(self, name: str, in_features: int) -> LayerSpec:  # pragma: no cover - every scheme overrides
        raise NotImplementedError

    def head_spec(self, in_features: int) -> LayerSpec:
        """The lm_head (and a tied embedding table with it) is weight-only INT8 unless a scheme says otherwise."""
        return LayerSpec("int8")


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise CompressError(f"method must be 'gptq' or 'rtn', got {method!r}")


def _check_kernel(kernel) -> None:
    if kernel is not None and kernel not in CPU_KERNELS:
        raise CompressError(f"kernel must be one of {', '.join(CPU_KERNELS)}, got {kernel!r}")


def _check_damp(damp) -> None:
    if not (0.0 < float(damp) < 1.0):
        raise CompressError(f"damp must be in (0, 1), got {damp!r}")


def _check_grid(values, what: str, lo: float, hi: float, lo_open: bool = False) -> tuple:
    try:
        vals = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise CompressError(f"{what} must be a list of numbers, got {values!r}") from None
    if not vals:
        raise CompressError(f"{what} must not be empty")
    for v in vals:
        if v > hi or v < lo or (lo_open and v == lo):
            raise CompressError(f"{what}: {v} is outside ({lo}, {hi}]" if lo_open else f"{what}: {v} is outside [{lo}, {hi}]")
    return vals


def _group(in_features: int, preferred: int) -> int:
    try:
        return P.group_size_for(in_features, preferred)
    except ValueError as e:
        raise CompressError(str(e)) from None


@dataclass(frozen=True)
class Int8WeightOnly(QuantConfig):
    """INT8 symmetric weights per output channel, float activations.

    ``method``: ``gptq`` (error-compensating rounding on calibration data, layer by layer) or ``rtn``
    (round to nearest; with calibration data and ``weight_clip_search`` the per-channel clip is chosen by
    activation-weighted MSE).
    ``kernel``: recorded in every LayerSpec (lm_head included) for the CPU backend: ``fine`` has ONNX Runtime
    quantize the activations per 16 inputs instead of 32 (docs/QUANTIZATION.md); None = its default.
    ``fine``: patterns of Linears that get the ``fine`` kernel whatever ``kernel`` says (--budget's choice).
    ``gptq_head``: with GPTQ, the lm_head (a tied table with it) by GPTQ on the final norm's output too;
    False rounds it to nearest (the default before; docs/QUANTIZATION.md has both).
    """

    method: str = "gptq"
    damp: float = 0.01
    weight_clip_search: bool = False
    kernel: str | None = None
    fine: tuple = ()
    gptq_head: bool = True
    scheme = "int8-wo"

    def __post_init__(self):
        super().__post_init__()
        _check_method(self.method)
        _check_damp(self.damp)
        _check_kernel(self.kernel)
        object.__setattr__(self, "fine", check_patterns(self.fine, "fine"))

    def layer_spec(self, name, in_features):
        return LayerSpec("int8", kernel="fine" if matches(name, self.fine) else self.kernel)

    def head_spec(self, in_features):
        return LayerSpec("int8", kernel=self.kernel)


@dataclass(frozen=True)
class Int8Grouped(QuantConfig):
    """INT8 symmetric weights with one scale per ``group_size`` inputs of a row, float activations.

    ``group_size``: 128, or the largest of 128/64/32 (not above it) dividing each layer's input dim.
    """

    group_size: int = 128
    method: str = "gptq"
    damp: float = 0.01
    kernel: str | None = None
    gptq_head: bool = True  # as for Int8WeightOnly
    scheme = "int8-group"

    def __post_init__(self):
        super().__post_init__()
        if self.group_size not in (32, 64, 128):
            raise CompressError(f"group_size must be 32, 64 or 128, got {self.group_size!r}")
        _check_method(self.method)
        _check_damp(self.damp)
        _check_kernel(self.kernel)

    def layer_spec(self, name, in_features):
        return LayerSpec("int8", group_size=_group(in_features, self.group_size), kernel=self.kernel)

    def head_spec(self, in_features):
        return LayerSpec("int8", kernel=self.kernel)


@dataclass(frozen=True)
class Int4(QuantConfig):
    """INT4 symmetric weights (zero point 0) in groups along the input dim, float activations.

    ``method``: ``gptq`` (error-compensating, layer by layer on calibration data) or ``rtn``.
    ``group_size``: 128, or the largest of 128/64/32 dividing each layer's input dim.
    ``lm_head``: ``int8`` (default) or ``int4`` for the tied embedding / lm_head table.
    """

    group_size: int = 128
    method: str = "gptq"
    lm_head: str = "int8"
    damp: float = 0.01
    kernel: str | None = None
    gptq_head: bool = True  # as for Int8WeightOnly
    scheme = "int4"

    def __post_init__(self):
        super().__post_init__()
        if self.group_size not in (32, 64, 128):
            raise CompressError(f"group_size must be 32, 64 or 128, got {self.group_size!r}")
        _check_method(self.method)
        if self.lm_head not in ("int8", "int4"):
            raise CompressError(f"lm_head must be 'int8' or 'int4' (or ignore it to keep it float), got {self.lm_head!r}")
        _check_damp(self.damp)
        _check_kernel(self.kernel)

    def layer_spec(self, name, in_features):
        return LayerSpec("int4", group_size=_group(in_features, self.group_size), kernel=self.kernel)

    def head_spec(self, in_features):
        if self.lm_head == "int4":
            return self.layer_spec("lm_head", in_features)
        return LayerSpec("int8", kernel=self.kernel)


@dataclass(frozen=True)
class ActivationScheme(QuantConfig):
    """Shared by the activation-quantized schemes: SmoothQuant migration with alpha searched per layer group
    (``None`` in the search also tries no smoothing), static activation scales clipped by output MSE.
    ``float_inputs`` names Linears that stay weight-only (quantized weights, float input): mixed precision for
    inputs a per-tensor scale cannot hold."""

    alphas: tuple = DEFAULT_ALPHAS
    clips: tuple = DEFAULT_CLIPS
    smooth: bool = True
    rows_per_batch: int = 16  # calibration tokens per batch kept for the searches (the first 4 always)
    method: str = "rtn"  # weights: round to nearest, or gptq (layer by layer, after smoothing)
    headroom: float = 1.0  # static scale = amax * clip * headroom / top code (>1 leaves room for unseen peaks)
    damp: float = 0.01  # GPTQ: fraction of the mean Hessian diagonal added to it
    float_inputs: tuple = ()  # selection patterns: these Linears keep float inputs (weights still quantized)

    weight_format = ""  # class attributes: the preset's weight and activation formats
    act_format = ""
    act_granularity = "tensor"

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "float_inputs", check_patterns(self.float_inputs, "float_inputs"))
        _check_method(self.method)
        _check_damp(self.damp)
        object.__setattr__(self, "alphas", _check_grid(self.alphas, "alphas", 0.0, 1.0))
        object.__setattr__(self, "clips", _check_grid(self.clips, "clips", 0.0, 1.0, lo_open=True))
        if not (1.0 <= float(self.headroom) <= 64.0):
            raise CompressError(f"headroom must be in [1, 64], got {self.headroom!r}")
        if not isinstance(self.rows_per_batch, int) or self.rows_per_batch < 4:
            raise CompressError(f"rows_per_batch must be an integer >= 4, got {self.rows_per_batch!r}")

    @property
    def needs_calibration(self) -> bool:
        return True

    def layer_spec(self, name, in_features):
        if matches(name, self.float_inputs):
            return LayerSpec(self.weight_format)
        return LayerSpec(self.weight_format, act=self.act_format, act_granularity=self.act_granularity)


@dataclass(frozen=True)
class Fp8(ActivationScheme):
    """FP8 E4M3 weights per output channel, FP8 E4M3 activations with static per-tensor scales (H100).

    Round-to-nearest weights by default (``method="gptq"`` for GPTQ). A tied lm_head stays float by default
    (``ignore``): its table also feeds the embedding ``Gather``, which TensorRT does not take quantized.
    """

    ignore: tuple = TENSORRT_IGNORE
    scheme = "fp8"
    weight_format = "fp8"
    act_format = "fp8"


@dataclass(frozen=True)
class SmoothQuantInt8(ActivationScheme):
    """INT8 weights per channel after SmoothQuant, INT8 static per-tensor activations (TensorRT), except the
    ``down_proj`` inputs, which stay float (``float_inputs``; INT8 weight-only there): that input carries
    a few massive activations a per-tensor static scale cannot hold (docs/QUANTIZATION.md). alpha 0.8 (or
    none, per layer group) at the calibration max, GPTQ weights. A tied lm_head stays float by default, as
    for fp8."""

    ignore: tuple = TENSORRT_IGNORE
    alphas: tuple = (0.8,)
    clips: tuple = (1.0,)
    method: str = "gptq"
    float_inputs: tuple = ("down_proj",)
    scheme = "int8-sq"
    weight_format = "int8"
    act_format = "int8"


@dataclass(frozen=True)
class Int8Dynamic(ActivationScheme):
    """INT8 weights per channel after SmoothQuant, INT8 per-token dynamic activations (ONNX Runtime CPU)."""

    clips: tuple = (1.0,)
    scheme = "int8-dyn"
    weight_format = "int8"
    act_format = "int8"
    act_granularity = "token"


SCHEMES = {c.scheme: c for c in (Int8WeightOnly, Fp8, SmoothQuantInt8, Int8Dynamic, Int4, Int8Grouped)}
ACTIVATION_SCHEMES = tuple(n for n, c in SCHEMES.items() if issubclass(c, ActivationScheme))  # take float_inputs


def config_for(scheme: str, **kw) -> QuantConfig:
    """The config of a ``--scheme`` name; unknown names list the valid ones."""
    if scheme not in SCHEMES:
        raise CompressError(f"unknown scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}")
    return SCHEMES[scheme](**kw)


def config_from_dict(d: dict) -> QuantConfig:
    """Inverse of ``to_dict`` (reads a kiln.json quantize pass or a recipe)."""
    d = dict(d)
    scheme = d.pop("scheme", None)
    cls = SCHEMES.get(scheme)
    if cls is None:
        raise CompressError(f"quantize pass has unknown scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise CompressError(f"quantize pass for {scheme}: unknown config key(s) {', '.join(unknown)}")
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
    except TypeError as e:
        raise CompressError(f"quantize pass for {scheme}: {e}") from None
