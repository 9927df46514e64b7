import json

import pytest
from click.testing import CliRunner

from kiln.cli import cli


def run(*args):
    return CliRunner().invoke(cli, list(args))


def test_help_lists_stage_groups():
    r = run("--help")
    assert r.exit_code == 0
    for name in ("compress", "export", "eval", "info"):
        assert name in r.output


def test_eval_ppl_json(tiny_dir):
    r = run("eval", "ppl", str(tiny_dir), "--seq-len", "64", "--windows", "2", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["tokens"] == 126 and out["windows"] == 2 and out["seq_len"] == 64
    assert out["corpus"] == "builtin:pydoc" and out["ppl"] > 1


def test_info_json(tiny_dir):
    r = run("info", str(tiny_dir), "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["architecture"]["kv_heads"] == 2 and out["parameters"] > 0
    assert "float32" in out["bytes_by_dtype"]


@pytest.mark.parametrize("args,msg", [
    (["eval", "ppl", "/no/such/dir"], "no such file"),
    (["info", "/no/such/dir"], "no such file"),
])
def test_errors_are_one_line(args, msg):
    r = run(*args)
    assert r.exit_code == 2
    assert msg in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.output


def test_short_corpus_is_one_line(tiny_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    r = run("eval", "ppl", str(tiny_dir), "--text", str(short))
    assert r.exit_code == 2 and "shorter than one window" in r.stderr


def test_corrupt_weights_cli(tiny_copy):
    f = next(tiny_copy.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:100])
    r = run("eval", "ppl", str(tiny_copy))
    assert r.exit_code == 2 and "corrupt or truncated" in r.stderr


def test_absurd_values(tiny_dir):
    r = run("eval", "ppl", str(tiny_dir), "--windows", "0")
    assert r.exit_code == 2
    r = run("eval", "ppl", str(tiny_dir), "--seq-len", "64", "--windows", "100000")
    assert r.exit_code == 2 and "lower --windows" in r.stderr
