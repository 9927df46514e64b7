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
