"""Optimization profiles derived from the build flags: pure, and covering every dynamic input.

The graph contract (docs/CONTRACTS.md) is fixed: ``input_ids``/``position_ids [B, S]``, ``attention_mask
[B, T]``, ``logits_positions [K]`` and ``past_key_values.{i}.key|value [B, kv_heads, P, head_dim]`` with
``T = P + S``. Two profiles:

- ``prefill`` (profile 0): S in 1..max_seq tuned at opt_seq, P in 0..max_seq-1 tuned at 0 (a fresh prompt),
  K in 1..max_seq tuned at 1 (generation asks for the last position, scoring for all);
- ``decode``  (profile 1): S = 1, K = 1, P in 0..max_seq-1 tuned at opt_seq (one token against a long cache).

Batch is 1..max_batch, tuned at 1. ``T`` always stays within 1..max_seq. An input the rules do not cover is
an error here, not a TensorRT build failure an hour later (the classic one: a KV input left out).

A quantized KV cache (IO contract 3) adds ``past_key_values.{i}.key_scale|value_scale [B, kv_heads, P, 1]``
beside the codes: they get P's ranges like the codes, and when one layer has them every layer must.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from runtime.records import POSITIONS, ProfileRecord

from ..errors import ExportError

KV_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
SCALE_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)_scale$")
ROLES = {"input_ids": ("B", "S"), "position_ids": ("B", "S"), "attention_mask": ("B", "T"),
         POSITIONS: ("K",)}


@dataclass(frozen=True)
class ProfileFlags:
    """What the user asked for: ``--max-batch``, ``--max-seq``, ``--opt-seq``."""

    max_batch: int = 8
    max_seq: int = 2048
    opt_seq: int = 512

    def __post_init__(self):
        for name in ("max_batch", "max_seq", "opt_seq"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ExportError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.max_seq < 2:
            raise ExportError("--max-seq must be at least 2 (a prompt token and a generated one)")
        if self.opt_seq > self.max_seq:
            raise ExportError(f"--opt-seq {self.opt_seq} is larger than --max-seq {self.max_seq}; "
                              "pick an --opt-seq within --max-seq")


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, and dims as ints (static) or strings (symbolic / dynamic)."""

    name: str
    dims: tuple

    @property
    def dynamic(self) -> bool:
        return any(not isinstance(d, int) or d < 0 for d in self.dims)


@dataclass(frozen=True)
class Profile:
    name: str
    shapes: dict  # input name -> (min, opt, max), each a tuple of ints

    def to_dict(self) -> dict:
        return {"name": self.name, "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()}}

    def record(self) -> ProfileRecord:
        return ProfileRecord(name=self.name, shapes={k: tuple(tuple(d) for d in v) for k, v in self.shapes.items()})


def _axis_ranges(flags: ProfileFlags) -> dict[str, dict[str, tuple[int, int, int]]]:
    """(min, opt, max) of each symbolic axis, per profile."""
    L = flags.max_seq
    opt = min(flags.opt_seq, L - 1)  # the decode cache must leave room for the new token
    b = (1, 1, flags.max_batch)
    return {
        "prefill": {"B": b, "S": (1, flags.opt_seq, L), "P": (0, 0, L - 1), "T": (1, flags.opt_seq, L),
                    "K": (1, 1, L)},
        "decode": {"B": b, "S": (1, 1, 1), "P": (0, opt, L - 1), "T": (1, opt + 1, L), "K": (1, 1, 1)},
    }


def _roles(spec: InputSpec, kv_heads: int, head_dim: int) -> tuple:
    """The axis role (or static size) of each dim of a known input; raises for anything else."""
    if spec.name in ROLES:
        roles = ROLES[spec.name]
    elif KV_RE.match(spec.name):
        roles = ("B", kv_heads, "P", head_dim)
    elif SCALE_RE.match(spec.name):
        roles = ("B", kv_heads, "P", 1)
    else:
        raise ExportError(
            f"graph input {spec.name!r} is dynamic and has no optimization-profile rule; the engine would "
            "fail to build. Expected input_ids, attention_mask, position_ids, logits_positions and "
            "past_key_values.N.key|value (and .key_scale|value_scale for a quantized cache)"
        )
    if len(roles) != len(spec.dims):
        raise ExportError(f"graph input {spec.name} has rank {len(spec.dims)}, expected {len(roles)} "
                          f"({', '.join(map(str, roles))})")
    for r, d in zip(roles, spec.dims):
        if isinstance(r, int) and isinstance(d, int) and d >= 0 and d != r:
            raise ExportError(f"graph input {spec.name} has a static dim {d} where the architecture says {r}")
    return roles


def derive_profiles(inputs: list[InputSpec], flags: ProfileFlags, *, layers: int, kv_heads: int,
                    head_dim: int) -> list[Profile]:
    """Profiles for every dynamic input of the graph (``inputs``), checked against the architecture."""
    names = {s.name for s in inputs}
    missing = [n for n in ROLES if n not in names]
    kv_expected = {f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")}
    missing += sorted(kv_expected - names, key=_kv_order)
    if missing:
        raise ExportError(f"the graph lacks input(s) {', '.join(missing[:6])}"
                          f"{' ...' if len(missing) > 6 else ''}; it does not follow the llmkiln IO contract")
    scales = {n for n in names if SCALE_RE.match(n)}
    if scales:  # a quantized cache: every layer's key and value carry their scales
        scale_expected = {f"{n}_scale" for n in kv_expected}
        missing = sorted(scale_expected - scales, key=_kv_order)
        if missing:
            raise ExportError(f"the graph lacks KV scale input(s) {', '.join(missing[:6])}"
                              f"{' ...' if len(missing) > 6 else ''}; a quantized cache has one per key and value "
                              "of every layer (re-export with kiln export onnx --kv-cache)")
        kv_expected |= scale_expected
    extra_kv = sorted(n for n in names if (KV_RE.match(n) or SCALE_RE.match(n)) and n not in kv_expected)
    if extra_kv:
        raise ExportError(f"the graph has KV input(s) {', '.join(extra_kv)} beyond the {layers} layers "
                          "kiln.json records")
    profiles = []
    for pname, axes in _axis_ranges(flags).items():
        shapes = {}
        for spec in inputs:
            if not spec.dynamic:
                continue
            roles = _roles(spec, kv_heads, head_dim)
            mn, op, mx = ([r if isinstance(r, int) else axes[r][k] for r in roles] for k in range(3))
            shapes[spec.name] = (tuple(mn), tuple(op), tuple(mx))
        profiles.append(Profile(pname, shapes))
    return profiles


def _kv_order(name: str):
    m = KV_RE.match(name) or SCALE_RE.match(name)
    return (int(m.group(1)), m.group(0)) if m else (-1, name)


def graph_inputs(model) -> list[InputSpec]:
    """The InputSpecs of a ModelProto's graph inputs (initializers excluded)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = []
        for d in vi.type.tensor_type.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?"))
        specs.append(InputSpec(vi.name, tuple(dims)))
    return specs

