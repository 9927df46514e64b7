"""Strict JSON <-> frozen dataclass conversion for the records in kiln.json.

``from_json(cls, obj, where)`` checks every field against the dataclass's annotations: unknown keys, missing
required keys and wrong types are one-line errors naming the field (``kiln.json: io.inputs[3].dtype: expected
a string, got 7``). Supported annotations: ``str``, ``int``, ``float`` (a JSON integer is accepted), ``bool``,
``Literal[...]``, ``X | None``, ``tuple[X, ...]`` / ``list[X]``, ``dict[str, X]``, ``dict`` / ``Any`` (any JSON object /
value, kept as is) and nested dataclasses. ``to_json`` is the inverse (tuples become lists; every field is
written, ``None`` as null, so a record in kiln.json is complete).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, get_args, get_origin, get_type_hints

_HINTS: dict[type, dict] = {}


class RecordError(ValueError):
    """A JSON record that does not match its dataclass; the message names the field path."""


def _hints(cls) -> dict:
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


def _describe(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _convert(tp, v, path: str):
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return v
    if origin is Literal:
        if not any(v == a and type(v) is type(a) for a in args):
            raise RecordError(f"{path}: must be one of {', '.join(map(repr, args))}, got {_describe(v)}")
        return v
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, v, path)
            except RecordError as e:
                errors.append(str(e))
        raise RecordError(errors[0] if len(errors) == 1 else
                          f"{path}: {_describe(v)} is none of {' / '.join(_name(a) for a in args)}")
    if origin in (tuple, list):
        if not isinstance(v, (list, tuple)):
            raise RecordError(f"{path}: expected a list, got {_describe(v)}")
        item = args[0] if args else Any
        return origin(_convert(item, x, f"{path}[{i}]") for i, x in enumerate(v))
    if origin is dict or tp is dict:
        if not isinstance(v, dict):
            raise RecordError(f"{path}: expected an object, got {_describe(v)}")
        if not args:
            return dict(v)
        return {k: _convert(args[1], x, f"{path}.{k}") for k, x in v.items()}
    if dataclasses.is_dataclass(tp):
        return from_json(tp, v, path)
    if tp is bool:
        if not isinstance(v, bool):
            raise RecordError(f"{path}: expected true or false, got {_describe(v)}")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise RecordError(f"{path}: expected an integer, got {_describe(v)}")
        return v
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise RecordError(f"{path}: expected a finite number, got {_describe(v)}")
        return float(v)
    if tp is str:
        if not isinstance(v, str):
            raise RecordError(f"{path}: expected a string, got {_describe(v)}")
        return v
    raise TypeError(f"strict: unsupported annotation {tp!r} at {path}")


def _name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def from_json(cls, obj, path: str):
    """An instance of dataclass ``cls`` from the JSON value ``obj``; ``path`` names it in errors."""
    if not isinstance(obj, dict):
        raise RecordError(f"{path}: expected an object, got {_describe(obj)}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(obj) - set(fields))
    if unknown:
        raise RecordError(f"{path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(fields)})")
    kw = {}
    for name, f in fields.items():
        if name not in obj:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecordError(f"{path}: missing {name}")
            continue
        kw[name] = _convert(hints[name], obj[name], f"{path}.{name}")
    try:
        return cls(**kw)
    except (ValueError, TypeError) as e:  # the class's own __post_init__ checks
        raise RecordError(f"{path}: {e}") from None


def to_json(obj):
    """A dataclass (or a structure of them) as plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_json(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    return obj
