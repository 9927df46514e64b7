"""Perplexity through the runtime equals the torch protocol on the same weights; `kiln eval ppl` on an artifact."""
import json

from click.testing import CliRunner


def test_perplexity_matches_torch_protocol(tiny_engine, tiny_dir):
    from compress.evaluate import perplexity as torch_ppl
    from compress.loading import load_model
    from runtime.evaluate import perplexity

    model, tok, _ = load_model(str(tiny_dir))
    ref = torch_ppl(model, tok, seq_len=64, windows=3)
    got = perplexity(tiny_engine, seq_len=64, windows=3)
    assert (got.tokens, got.windows, got.seq_len, got.corpus) == (ref.tokens, ref.windows, ref.seq_len, ref.corpus)
    assert abs(got.ppl - ref.ppl) / ref.ppl < 1e-5


def test_kiln_eval_ppl_on_artifact(tiny_onnx):
    from kiln.cli import cli

    r = CliRunner().invoke(cli, ["eval", "ppl", str(tiny_onnx), "--seq-len", "32", "--windows", "2", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["kind"] == "onnx" and out["tokens"] == 62 and out["ppl"] > 1
