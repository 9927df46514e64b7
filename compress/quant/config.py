"""One frozen config dataclass per quantization scheme, validated in __post_init__; serialized into kiln.json.

Layer selection: every nn.Linear inside the decoder layers is quantized, plus the lm_head (weight-only INT8,
stored once with the tied embedding) unless ``ignore`` names it. ``ignore`` patterns: ``re:REGEX`` (full match
on the torch module name) or a glob that matches the full name or its last components
(``down_proj``, ``model.layers.0.*``, ``lm_head``; ``embed_tokens`` is the same table as a tied lm_head).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

from ..errors import CompressError

DEFAULT_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_CLIPS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)


def _tuple_of_str(v, what: str) -> tuple:
    if isinstance(v, str) or not all(isinstance(p, str) and p for p in v):
        raise CompressError(f"{what} must be a list of non-empty pattern strings, got {v!r}")
    return tuple(v)


def _check_patterns(patterns: tuple, what: str = "ignore") -> None:
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise CompressError(f"{what} pattern {p!r} is not a valid regular expression ({e})") from None


def matches(name: str, patterns) -> bool:
    """Whether module ``name`` is named by one of ``patterns`` (see module doc)."""
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return True
        elif fnmatchcase(name, p) or fnmatchcase(name, "*." + p):
            return True
    return False


@dataclass(frozen=True)
class _Base:
    ignore: tuple = ()

    scheme = ""  # class attribute, the --scheme name

    def __post_init__(self):
        object.__setattr__(self, "ignore", _tuple_of_str(self.ignore, "ignore"))
        _check_patterns(self.ignore)

    def to_dict(self) -> dict:
        d = {"scheme": self.scheme}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    def keeps_float(self, name: str) -> bool:
        pats = self.ignore
        if name == "lm_head" and matches("model.embed_tokens", pats):
            return True
        return matches(name, pats)


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


@dataclass(frozen=True)
class Int8WeightOnly(_Base):
    """INT8 symmetric weights per output channel, float activations.

    ``method``: ``gptq`` (error-compensating rounding on calibration data, layer by layer) or ``rtn``
    (round to nearest; with calibration data the per-channel clip is chosen by activation-weighted MSE).
    """

    method: str = "gptq"
    damp: float = 0.01
    weight_clip_search: bool = False
    scheme = "int8-wo"

    act = None
    weight = "int8"

    def __post_init__(self):
        super().__post_init__()
        if self.method not in ("gptq", "rtn"):
            raise CompressError(f"method must be 'gptq' or 'rtn', got {self.method!r}")
        if not (0.0 < float(self.damp) < 1.0):
            raise CompressError(f"damp must be in (0, 1), got {self.damp!r}")


@dataclass(frozen=True)
class _ActQuant(_Base):
    """Shared by the activation-quantized schemes: SmoothQuant migration with alpha searched per layer group
    (``None`` in the search also tries no smoothing), static activation scales clipped by output MSE.
    ``float_inputs`` names Linears that stay weight-only (quantized weights, float input): mixed precision for
    inputs a per-tensor scale cannot hold (SmolLM2's ``down_proj``, see the README)."""

    alphas: tuple = DEFAULT_ALPHAS
    clips: tuple = DEFAULT_CLIPS
    smooth: bool = True
    rows_per_batch: int = 16  # calibration tokens per batch kept for the searches (the first 4 always)
    gptq: bool = False  # weights by GPTQ (layer by layer, after smoothing) instead of round to nearest
    headroom: float = 1.0  # static scale = amax * clip * headroom / top code (>1 leaves room for unseen peaks)
    damp: float = 0.01  # GPTQ: fraction of the mean Hessian diagonal added to it
    float_inputs: tuple = ()  # ignore-style patterns: these Linears keep float inputs (weights still quantized)

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "float_inputs", _tuple_of_str(self.float_inputs, "float_inputs"))
        _check_patterns(self.float_inputs, "float_inputs")
        if not (0.0 < float(self.damp) < 1.0):
            raise CompressError(f"damp must be in (0, 1), got {self.damp!r}")
        object.__setattr__(self, "alphas", _check_grid(self.alphas, "alphas", 0.0, 1.0))
        object.__setattr__(self, "clips", _check_grid(self.clips, "clips", 0.0, 1.0, lo_open=True))
        if not (1.0 <= float(self.headroom) <= 64.0):
            raise CompressError(f"headroom must be in [1, 64], got {self.headroom!r}")
        if not isinstance(self.rows_per_batch, int) or self.rows_per_batch < 4:
            raise CompressError(f"rows_per_batch must be an integer >= 4, got {self.rows_per_batch!r}")


@dataclass(frozen=True)
class Fp8(_ActQuant):
    """FP8 E4M3 weights per output channel, FP8 E4M3 activations with static per-tensor scales (H100).

    Round-to-nearest weights by default. Measured on SmolLM2-135M (16 calibration windows from pydoc): RTN
    pydoc 1.0298 / held-out English 1.0314; GPTQ (``gptq=True``) 1.0215 / 1.0458, better on text like the
    calibration windows and worse on unseen text. With float activations the fp8 weights give 1.0121 (RTN) /
    1.0048 (GPTQ) on pydoc: most of the loss is E4M3's 3-bit mantissa on activations, which no scale choice
    changes (raw max, MSE-clipped and 4x-headroom scales, alpha 0.5 or no smoothing: 1.030-1.038 with RTN).
    """

    scheme = "fp8"
    act = "fp8"
    weight = "fp8"


@dataclass(frozen=True)
class SmoothQuantInt8(_ActQuant):
    """INT8 weights per channel after SmoothQuant, INT8 static per-tensor activations (TensorRT), except the
    ``down_proj`` inputs, which stay float (``float_inputs``; INT8 weight-only there).

    Measured on SmolLM2-135M (ratios pydoc / held-out English, 16 calibration windows): these defaults
    1.0057 / 1.0045. With every input quantized (``float_inputs=()``): 1.0248 / 1.0661. The down_proj input
    (SiLU(gate) * up) carries massive activations (calibration max about 2400x the 99.9th percentile of |x|
    in layer 11), which a per-tensor static scale cannot hold: with RTN weights, keeping only the down_proj
    inputs float takes the loss from 1.0333 / 1.0862 to 1.0011 / 1.0104. alpha 0.8 (or none, per layer
    group) at the calibration max beat the full alpha grid with MSE-chosen clipping (1.0524 on pydoc).
    """

    alphas: tuple = (0.8,)
    clips: tuple = (1.0,)
    gptq: bool = True
    float_inputs: tuple = ("down_proj",)
    scheme = "int8-sq"
    act = "int8"
    weight = "int8"


@dataclass(frozen=True)
class Int8Dynamic(_ActQuant):
    """INT8 weights per channel after SmoothQuant, INT8 per-token dynamic activations (ORT CPU)."""

    clips: tuple = (1.0,)
    scheme = "int8-dyn"
    act = "int8-dyn"
    weight = "int8"


@dataclass(frozen=True)
class Int4(_Base):
    """INT4 symmetric weights (zero point 0) in groups along the input dim, float activations.

    ``method``: ``gptq`` (error-compensating, layer by layer on calibration data) or ``rtn``.
    ``group_size``: 128, or the largest of 128/64/32 dividing each layer's input dim.
    ``lm_head``: ``int8`` (default) or ``int4`` for the tied embedding / lm_head table.
    """

    group_size: int = 128
    method: str = "gptq"
    lm_head: str = "int8"
    damp: float = 0.01
    scheme = "int4"
    act = None
    weight = "int4"

    def __post_init__(self):
        super().__post_init__()
        if self.group_size not in (32, 64, 128):
            raise CompressError(f"group_size must be 32, 64 or 128, got {self.group_size!r}")
        if self.method not in ("gptq", "rtn"):
            raise CompressError(f"method must be 'gptq' or 'rtn', got {self.method!r}")
        if self.lm_head not in ("int8", "int4"):
            raise CompressError(f"lm_head must be 'int8' or 'int4' (or ignore it to keep it float), got {self.lm_head!r}")
        if not (0.0 < float(self.damp) < 1.0):
            raise CompressError(f"damp must be in (0, 1), got {self.damp!r}")


SCHEMES = {c.scheme: c for c in (Int8WeightOnly, Fp8, SmoothQuantInt8, Int8Dynamic, Int4)}
ACTIVATION_SCHEMES = tuple(n for n, c in SCHEMES.items() if issubclass(c, _ActQuant))  # take float_inputs
QuantConfig = _Base


def config_for(scheme: str, **kw) -> _Base:
    """The config of a ``--scheme`` name; unknown names list the valid ones."""
    if scheme not in SCHEMES:
        raise CompressError(f"unknown scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}")
    return SCHEMES[scheme](**kw)


def config_from_dict(d: dict) -> _Base:
    """Inverse of ``to_dict`` (reads a kiln.json quantize pass)."""
    d = dict(d)
    scheme = d.pop("scheme", None)
    cls = SCHEMES.get(scheme)
    if cls is None:
        raise CompressError(f"quantize pass has unknown scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise CompressError(f"quantize pass for {scheme}: unknown config key(s) {', '.join(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
