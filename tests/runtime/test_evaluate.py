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


def test_window_nll_in_row_blocks_equals_the_whole_window_formula():
    """The row-blocked log-softmax gives the very same sum as float64 over the whole window at once."""
    import numpy as np

    from runtime.scoring import LSE_ROWS, window_nll

    rng = np.random.default_rng(0)
    s, v = 3 * LSE_ROWS + 7, 1000
    logits = (rng.standard_normal((s, v)) * 4).astype(np.float32)
    ids = rng.integers(0, v, s)
    x = logits[:-1].astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=-1))
    ref = float((lse - x[np.arange(s - 1), ids[1:]]).sum())
    assert window_nll(logits, ids) == ref
