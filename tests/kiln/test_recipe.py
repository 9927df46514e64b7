from pathlib import Path

import pytest
from click.testing import CliRunner

from kiln.cli import cli
from kiln.recipe import RecipeError, load_recipe, parse_recipe

RECIPES = sorted((Path(__file__).parents[2] / "examples" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_parse(path):
    r = load_recipe(path)
    assert r.passes and r.passes[-1]["kind"] == "quantize"


def test_recipe_names_expected():
    assert {p.stem for p in RECIPES} >= {"cpu-int8", "cpu-int4", "h100-fp8", "h100-fp8-2of4", "pruned-width-int8"}


@pytest.mark.parametrize("text,line,msg", [
    ("passes:\n  - kind: melt\n    config: {}\n", 2, "unknown pass 'melt'"),
    ("passes:\n  - kind: quantize\n    config: {scheme: int8-wo}\n  - kind: prune\n    config: {method: magnitude}\n",
     4, "prune after quantize"),
    ("passes:\n  - kind: quantize\n    config: {scheme: int9}\n", 3, "unknown scheme 'int9'"),
    ("passes:\n  - kind: prune\n    config: {method: wanda, sparsity: lots}\n", 3, "sparsity must be a fraction"),
    ("eval:\n  windows: eight\n", 2, "eval.windows must be int"),
    ("passes: []\ncolour: blue\n", 2, "unknown key 'colour'"),
    ("target: tpu\n", 1, "target must be one of"),
    ("passes: [\n", 2, "not valid YAML"),
    ("passes:\n  - kind: quantize\n    config: {budget: 0.9}\n", 3, "budget is a perplexity ratio above 1"),
    ("passes:\n  - kind: quantize\n    config: {budget: 1.02, formats: [int4, int3]}\n", 3, "'int3' is not a format"),
    ("passes:\n  - kind: quantize\n    config: {budget: 1.02, scheme: int4}\n", 3, "unknown budget field 'scheme'"),
    ("export: {form: ort, kv_cache: int4}\n", 1, "export.kv_cache must be one of float, int8, fp8"),
    ("eval:\n  chunk: 0\n", 2, "eval.chunk must be at least 1"),
])
def test_bad_recipes_name_the_line(text, line, msg):
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, where="r.yaml")
    assert str(e.value).startswith(f"r.yaml:{line}:") and msg in str(e.value)


def test_bad_recipe_cli_is_one_line(tmp_path, tiny_dir):
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes:\n  - kind: quantize\n    config: {scheme: int8-wo, bits: 3}\n")
    r = CliRunner().invoke(cli, ["pipeline", str(tiny_dir), "-o", str(tmp_path / "out"), "--recipe", str(bad)])
    assert r.exit_code == 2
    assert r.stderr.startswith("error: ") and "bad.yaml:3:" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_budget_pass_takes_the_targets_formats():
    """A budget pass names its budget and, optionally, formats; the pipeline fills the target's default formats
    and refuses a format the target has no cost for, in one line."""
    from compress.errors import CompressError
    from kiln.pipeline import Pipeline

    r = parse_recipe("target: cpu\npasses:\n  - kind: quantize\n    config: {budget: 1.02}\n")
    assert r.passes == [{"kind": "quantize", "config": {"budget": 1.02}}]
    p = Pipeline("smollm2-135m", "/nonexistent-out", recipe=r)
    assert p.recipe.passes == [{"kind": "quantize", "config": {"budget": 1.02, "formats": ["int4", "int8-wo"]},
                                "target": "cpu"}]
    r = parse_recipe("target: cpu\npasses:\n  - kind: quantize\n    config: {budget: 1.02, formats: [fp8, float]}\n")
    with pytest.raises(CompressError, match="'fp8' is not a format for target cpu"):
        Pipeline("smollm2-135m", "/nonexistent-out", recipe=r)
