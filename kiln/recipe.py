"""Pipeline recipes: a YAML file listing passes (the serialization kiln.json uses) plus stage settings.

    passes:
      - kind: prune
        config: {method: width, mlp: 0.25, recover_steps: 200}
      - kind: quantize
        config: {scheme: int8-wo}
    export: {form: portable, kv_cache: int8}
    eval: {text: builtin:pydoc, windows: 8, seq_len: 512, chunk: 128}
    bench: {prompt_len: 32, new_tokens: 128, runs: 3}
    target: cpu

A quantize pass takes either a scheme (``config: {scheme: int4, ...}``, the form kiln.json stores) or a
quality budget (``config: {budget: 1.02, formats: [int4, int8-wo]}``: ``kiln compress quantize --budget``, the
recipe's target saying what the cost is). ``export.kv_cache`` (float, int8, fp8) is the artifact's KV cache;
with int8 the quantize pass records static scales that the ONNX Runtime form uses. ``eval.chunk`` feeds each
window through the KV cache that many tokens at a time (default: 128 when the cache is quantized, else one
pass).

Every error names the file and line: unknown keys, wrong types, unknown passes, prune after quantize.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from compress.errors import CompressError

PASS_ORDER = {"prune": 0, "quantize": 1}
TARGETS = ("cpu", "h100")
KV_CACHES = ("float", "int8", "fp8")
_SECTIONS = {
    "export": {"form": str, "opset": int, "kv_cache": str},
    "eval": {"text": str, "windows": int, "seq_len": int, "chunk": int},
    "bench": {"prompt_len": int, "new_tokens": int, "runs": int, "threads": int},
}


class RecipeError(CompressError):
    """A recipe that cannot be used; the message names the file and line."""


@dataclass
class Recipe:
    passes: list[dict] = field(default_factory=list)
    export: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    bench: dict = field(default_factory=dict)
    target: str | None = None
    name: str = "recipe"


def _line(node) -> int:
    return node.start_mark.line + 1


def _plain(node):
    import yaml

    return yaml.safe_load(yaml.serialize(node))


def _mapping(node, where: str):
    import yaml

    if not isinstance(node, yaml.MappingNode):
        raise RecipeError(f"{where}:{_line(node)}: expected a mapping")
    out = {}
    for k, v in node.value:
        if not isinstance(k, yaml.ScalarNode):
            raise RecipeError(f"{where}:{_line(k)}: keys must be plain names")
        out[k.value] = (k, v)
    return out


def parse_recipe(text: str, where: str = "recipe") -> Recipe:
    """Parse and validate recipe text; pass configs are checked by the config classes they name."""
    import yaml

    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else "?"
        raise RecipeError(f"{where}:{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if root is None:
        raise RecipeError(f"{where}:1: the recipe is empty")
    top = _mapping(root, where)
    recipe = Recipe(name=Path(where).stem)
    for key, (knode, vnode) in top.items():
        if key == "passes":
            recipe.passes = _passes(vnode, where)
        elif key in _SECTIONS:
            fields = _mapping(vnode, where)
            for fk, (fkn, fvn) in fields.items():
                want = _SECTIONS[key].get(fk)
                if want is None:
                    raise RecipeError(f"{where}:{_line(fkn)}: unknown field {key}.{fk} "
                                      f"(known: {', '.join(_SECTIONS[key])})")
                val = _plain(fvn)
                if not isinstance(val, want) or isinstance(val, bool):
                    raise RecipeError(f"{where}:{_line(fvn)}: {key}.{fk} must be {want.__name__}, got {val!r}")
                if (key, fk) == ("export", "kv_cache") and val not in KV_CACHES:
                    raise RecipeError(f"{where}:{_line(fvn)}: export.kv_cache must be one of {', '.join(KV_CACHES)}")
                if want is int and val < 1:
                    raise RecipeError(f"{where}:{_line(fvn)}: {key}.{fk} must be at least 1, got {val}")
                getattr(recipe, key)[fk] = val
        elif key == "target":
            val = _plain(vnode)
            if val not in TARGETS:
                raise RecipeError(f"{where}:{_line(vnode)}: target must be one of {', '.join(TARGETS)}")
            recipe.target = val
        else:
            raise RecipeError(f"{where}:{_line(knode)}: unknown key {key!r} "
                              f"(known: passes, target, {', '.join(_SECTIONS)})")
    return recipe


def _passes(node, where: str) -> list[dict]:
    import yaml

    if not isinstance(node, yaml.SequenceNode):
        raise RecipeError(f"{where}:{_line(node)}: passes must be a list")
    out, last_kind = [], None
    for item in node.value:
        fields = _mapping(item, where)
        unknown = sorted(set(fields) - {"kind", "config"})
        if unknown:
            raise RecipeError(f"{where}:{_line(fields[unknown[0]][0])}: unknown pass field {unknown[0]!r} "
                              "(a pass has kind and config)")
        if "kind" not in fields:
            raise RecipeError(f"{where}:{_line(item)}: a pass needs 'kind' (prune or quantize)")
        kind_node = fields["kind"][1]
        kind = _plain(kind_node)
        if kind not in PASS_ORDER:
            raise RecipeError(f"{where}:{_line(kind_node)}: unknown pass {kind!r}; passes are prune, quantize")
        if last_kind is not None and PASS_ORDER[kind] < PASS_ORDER[last_kind]:
            raise RecipeError(f"{where}:{_line(kind_node)}: {kind} after {last_kind}; prune must come before quantize")
        if kind == "quantize" and last_kind == "quantize":
            raise RecipeError(f"{where}:{_line(kind_node)}: only one quantize pass is allowed")
        cfg_node = fields.get("config", (None, None))[1]
        cfg = _plain(cfg_node) if cfg_node is not None else {}
        if not isinstance(cfg, dict):
            raise RecipeError(f"{where}:{_line(cfg_node)}: config must be a mapping")
        try:
            if kind == "quantize" and "budget" in cfg:
                budget_config(cfg)
            else:
                build_config(kind, cfg)
        except (CompressError, TypeError, ValueError) as e:
            line = _line(cfg_node if cfg_node is not None else item)
            raise RecipeError(f"{where}:{line}: {kind} config: {' '.join(str(e).split())}") from None
        out.append({"kind": kind, "config": cfg})
        last_kind = kind
    return out


CALIB_KEYS = {"text": str, "samples": int, "seq_len": int}


def split_calibration(cfg: dict) -> tuple[dict, dict]:
    """(config without ``calibration``, calibration settings) — the pipeline's extra per-pass key."""
    cfg = dict(cfg)
    calib = cfg.pop("calibration", None) or {}
    if not isinstance(calib, dict):
        raise CompressError("calibration must be a mapping of text, samples, seq_len")
    for k, v in calib.items():
        want = CALIB_KEYS.get(k)
        if want is None:
            raise CompressError(f"unknown calibration field {k!r} (known: {', '.join(CALIB_KEYS)})")
        if not isinstance(v, want) or isinstance(v, bool):
            raise CompressError(f"calibration.{k} must be {want.__name__}, got {v!r}")
    return cfg, calib


def build_config(kind: str, cfg: dict):
    """The library config object for a serialized pass config (the same form kiln.json stores)."""
    from compress.passes import config_from_pass

    cfg, _ = split_calibration(cfg)
    return config_from_pass(kind, cfg)


BUDGET_KEYS = ("budget", "formats", "calibration")


def budget_config(cfg: dict, target: str | None = None) -> dict:
    """A quantize pass's ``budget`` form, checked: ``{budget: ratio, formats: [a, b] or "a,b"}`` (formats
    default to the target's, compress.budget.search.DEFAULT_FORMATS). With ``target`` the formats are
    checked against it and the result carries it: ``{budget, formats: [...], target}``."""
    from compress.budget.search import COSTS, DEFAULT_FORMATS

    cfg, _ = split_calibration(cfg)
    unknown = sorted(set(cfg) - set(BUDGET_KEYS))
    if unknown:
        raise CompressError(f"unknown budget field {unknown[0]!r} (a budget pass has {', '.join(BUDGET_KEYS)}; "
                            "scheme settings go in a scheme pass)")
    budget = cfg["budget"]
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 1.0 < budget < 10.0:
        raise CompressError(f"budget is a perplexity ratio above 1 (e.g. 1.015), got {budget!r}")
    formats = cfg.get("formats")
    if formats is None:
        if target is None:
            return {"budget": float(budget)}
        formats = DEFAULT_FORMATS[target]
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",") if f.strip()]
    if not isinstance(formats, list) or not formats or not all(isinstance(f, str) for f in formats):
        raise CompressError(f"formats is a list of format names (e.g. int4,int8-wo), got {cfg.get('formats')!r}")
    known = set().union(*COSTS.values()) | {"float"}
    bad = [f for f in formats if f not in known or (target is not None and f not in COSTS[target])]
    if bad:
        where = f" for target {target}" if target else ""
        raise CompressError(f"formats: {bad[0]!r} is not a format{where} (formats: "
                            f"{', '.join(sorted(COSTS[target] if target else known))})")
    out = {"budget": float(budget), "formats": formats}
    return out | {"target": target} if target else out


def load_recipe(path: str | Path) -> Recipe:
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    return parse_recipe(p.read_text(encoding="utf-8"), where=str(path))
