"""Pruning configs: one frozen dataclass per method, validated on construction, serialized into kiln.json.

Unstructured / semi-structured (dense weights with zeros in place):
    Magnitude(sparsity=0.5)      |W|
    Wanda(sparsity=0.5)          |W| * ||X_j||   (needs calibration)
    SparseGPT(sparsity=NM(2, 4)) OBS pruning with weight reconstruction (needs calibration)
Structured (a smaller ordinary checkpoint):
    StructuredWidth(mlp=0.25, kv_groups=1)   MLP channels, whole GQA groups
    Depth(layers=4)                          whole decoder layers
Recovery (optional, after any method): Recover(steps=..., lr=..., seq_len=..., seed=...) — distillation from
the unpruned model.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import CompressError
from ..selection import DECODER_LINEARS, Selection, check_patterns

DEFAULT_TARGETS = (DECODER_LINEARS,)
DEFAULT_IGNORE = ("lm_head", "re:.*embed_tokens")


@dataclass(frozen=True)
class NM:
    """N:M semi-structured sparsity: at most ``n`` non-zeros in every ``m`` consecutive input weights of a row.

    ``NM(2, 4)`` is what H100 sparse tensor cores run (2 zeros in every group of 4).
    """

    n: int = 2
    m: int = 4

    def __post_init__(self):
        if not (isinstance(self.n, int) and isinstance(self.m, int)) or not 0 < self.n < self.m:
            raise CompressError(f"N:M pattern needs integers 0 < N < M (e.g. 2:4), got {self.n}:{self.m}")

    @classmethod
    def parse(cls, text: str) -> NM:
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
        if not m:
            raise CompressError(f"pattern must look like N:M (e.g. 2:4), got {text!r}")
        return cls(int(m.group(1)), int(m.group(2)))

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def _check_sparsity(sparsity) -> None:
    if isinstance(sparsity, NM):
        return
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity) \
            or not 0.0 < float(sparsity) < 1.0:
        raise CompressError(f"sparsity must be a fraction strictly between 0 and 1 (e.g. 0.5) or an N:M "
                            f"pattern such as 2:4, got {sparsity!r}")


@dataclass(frozen=True)
class _Unstructured:
    sparsity: float | NM = 0.5
    targets: tuple[str, ...] = DEFAULT_TARGETS
    ignore: tuple[str, ...] = DEFAULT_IGNORE

    method = ""
    needs_calibration = True

    def __post_init__(self):
        _check_sparsity(self.sparsity)
        object.__setattr__(self, "targets", check_patterns(self.targets, "targets"))
        object.__setattr__(self, "ignore", check_patterns(self.ignore, "ignore"))

    @property
    def selection(self) -> Selection:
        return Selection(self.targets, self.ignore)

    @property
    def pattern(self) -> str:
        """The sparsity pattern left in the weights, as kiln.json records it."""
        return "2:4" if isinstance(self.sparsity, NM) and (self.sparsity.n, self.sparsity.m) == (2, 4) \
            else "unstructured"

    def to_dict(self) -> dict:
        d = {"method": self.method}
        if isinstance(self.sparsity, NM):
            d["pattern"] = str(self.sparsity)
        else:
            d["sparsity"] = float(self.sparsity)
        if self.targets != DEFAULT_TARGETS:
            d["targets"] = list(self.targets)
        if self.ignore != DEFAULT_IGNORE:
            d["ignore"] = list(self.ignore)
        return d


@dataclass(frozen=True)
class Magnitude(_Unstructured):
    """Prune the smallest |W| of each output row (no calibration)."""

    method = "magnitude"
    needs_calibration = False


@dataclass(frozen=True)
class Wanda(_Unstructured):
    """Prune the smallest |W_ij| * ||X_j||_2 of each output row (Sun et al. 2023), layer by layer."""

    method = "wanda"


@dataclass(frozen=True)
class SparseGPT(_Unstructured):
    """Optimal-brain-surgeon pruning with reconstruction of the remaining weights (Frantar & Alistarh 2023).

    ``blocksize`` columns are pruned at a time; ``damp`` is the Hessian dampening as a fraction of its mean
    diagonal.
    """

    blocksize: int = 128
    damp: float = 0.01

    method = "sparsegpt"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise CompressError(f"blocksize must be a positive integer, got {self.blocksize!r}")
        if isinstance(self.sparsity, NM) and self.blocksize % self.sparsity.m:
            raise CompressError(f"blocksize {self.blocksize} must be a multiple of M={self.sparsity.m}")
        if not 0.0 < self.damp < 1.0:
            raise CompressError(f"damp must be between 0 and 1 (e.g. 0.01), got {self.damp!r}")

    def to_dict(self) -> dict:
        return super().to_dict() | {"blocksize": self.blocksize, "damp": self.damp}


@dataclass(frozen=True)
class StructuredWidth:
    """Remove a fraction ``mlp`` of every layer's MLP channels and ``kv_groups`` whole GQA groups per layer
    (a KV head with its query heads), least important first by calibration activations."""

    mlp: float = 0.0
    kv_groups: int = 0

    method = "width"
    needs_calibration = True

    def __post_init__(self):
        if isinstance(self.mlp, bool) or not isinstance(self.mlp, (int, float)) or not 0.0 <= self.mlp < 1.0:
            raise CompressError(f"--mlp must be a fraction in [0, 1) of MLP channels to remove, got {self.mlp!r}")
        if isinstance(self.kv_groups, bool) or not isinstance(self.kv_groups, int) or self.kv_groups < 0:
            raise CompressError(f"--kv-groups must be a non-negative integer, got {self.kv_groups!r}")
        if self.mlp == 0 and self.kv_groups == 0:
            raise CompressError("width pruning needs --mlp FRACTION and/or --kv-groups K")

    def to_dict(self) -> dict:
        return {"method": self.method, "mlp": float(self.mlp), "kv_groups": self.kv_groups}


@dataclass(frozen=True)
class Depth:
    """Remove the ``layers`` decoder layers with the least block influence (1 - cos(input, output))."""

    layers: int = 1

    method = "depth"
    needs_calibration = True

    def __post_init__(self):
        if isinstance(self.layers, bool) or not isinstance(self.layers, int) or self.layers < 1:
            raise CompressError(f"--layers must be a positive number of decoder layers to remove, got {self.layers!r}")

    def to_dict(self) -> dict:
        return {"method": self.method, "layers": self.layers}


@dataclass(frozen=True)
class Recover:
    """Knowledge distillation from the unpruned model on calibration text: KL(teacher || student) on logits.

    Trains every decoder-layer weight (embeddings frozen), AdamW with linear warm-up and cosine decay,
    ``steps`` steps of one window of ``seq_len`` tokens. Deterministic for a given ``seed`` and thread count.
    Pruned zeros stay zero (masks are re-applied after every step).
    """

    steps: int = 64
    lr: float = 2e-4
    seq_len: int = 256
    seed: int = 0
    temperature: float = 1.0
    warmup: float = 0.1

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise CompressError(f"--recover-steps must be a positive integer, got {self.steps!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and 0 < self.lr < 1):
            raise CompressError(f"--recover-lr must be between 0 and 1 (e.g. 1e-4), got {self.lr!r}")
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise CompressError(f"--recover-seq-len must be an integer >= 2, got {self.seq_len!r}")
        if not isinstance(self.seed, int):
            raise CompressError(f"--seed must be an integer, got {self.seed!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise CompressError(f"temperature must be positive, got {self.temperature!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise CompressError(f"warmup must be a fraction in [0, 1), got {self.warmup!r}")

    def to_dict(self) -> dict:
        return {"steps": self.steps, "lr": self.lr, "seq_len": self.seq_len, "seed": self.seed,
                "temperature": self.temperature, "warmup": self.warmup}


METHODS = {c.method: c for c in (Magnitude, Wanda, SparseGPT, StructuredWidth, Depth)}
PruneConfig = Magnitude | Wanda | SparseGPT | StructuredWidth | Depth


def config_from_dict(cfg: dict):
    """(prune config, Recover or None) from the form kiln.json and recipes store (``method`` + fields,
    ``pattern: "2:4"`` for N:M, ``recover``)."""
    d = dict(cfg)
    method = d.pop("method", None)
    cls = METHODS.get(method)
    if cls is None:
        raise CompressError(f"unknown prune method {method!r}; methods: {', '.join(METHODS)}")
    recover = d.pop("recover", None)
    if "pattern" in d:
        if "sparsity" in d:
            raise CompressError("give sparsity or pattern, not both")
        d["sparsity"] = NM.parse(d.pop("pattern"))
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    rec = None
    if recover is not None:
        if not isinstance(recover, dict):
            raise CompressError("recover must be a mapping (steps, lr, seq_len, seed, ...)")
        try:
            rec = Recover(**recover)
        except TypeError as e:
            raise CompressError(f"recover: {e}") from None
    try:
        return cls(**d), rec
    except TypeError as e:
        raise CompressError(f"prune method {method}: {e}") from None
