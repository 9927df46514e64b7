"""A quantized KV cache (int8 / FP8 codes + float32 per-token scales) on the ONNX Runtime backend: the
invariances a float cache has (cache vs no-cache, chunked vs one pass, batch vs single, continuous batching),
its cache moves, the bytes the server's admission counts, and ``perplexity(chunk=N)``.

Tolerances, measured on the tiny model: a token's codes depend only on its own key/value row and attention
reads the dequantized present (new tokens included), so chunked and one-pass logits agree to 0.0 (bound
1e-5); int8 logits differ from the float cache's by 1.3e-3 of the logit range, FP8 by 7.1e-3 (bounds 5e-3 and
2e-2); perplexity (float, int8 and FP8 caches) is the same for every chunk to 4e-10 relative (bound 1e-7)."""
import numpy as np
import pytest

from runtime import Engine
from runtime.backends.hostcache import QuantHostKVCache, fp8_e4m3fn_table
from runtime.evaluate import perplexity
from runtime.generate import Batch, GenerationConfig, Sequence
from runtime.sampling import SamplingParams, sample
from runtime.scheduler import kv_bytes_per_token

PROMPTS = ["The module defines a class", "x", "A much longer prompt about the module and its many functions"]


@pytest.fixture(scope="module", params=["int8", "fp8"])
def qeng(request, tiny_dir, tmp_path_factory):
    from export.onnx import export_onnx

    out = tmp_path_factory.mktemp("kvq") / f"tiny-{request.param}"
    export_onnx(str(tiny_dir), out, validate=False, kv_cache=request.param)
    return Engine.load(out, threads=1)


def _chunked(be, ids, chunk):
    cache, outs = be.allocate(1, len(ids)), []
    for a in range(0, len(ids), chunk):
        part = ids[a:a + chunk]
        e = a + len(part)
        outs.append(np.array(be.forward(cache, np.array([part]), np.ones((1, e), np.int64),
                                        np.arange(a, e)[None], last_only=False)[0]))
    return np.concatenate(outs), cache


def test_chunked_equals_one_pass_and_stays_near_the_float_cache(qeng, tiny_engine):
    ids = qeng.tokenizer.encode(PROMPTS[2]) * 3
    one = qeng.score(ids)
    for chunk in (1, 5, 16):
        got, cache = _chunked(qeng.backend, ids, chunk)
        np.testing.assert_allclose(got, one, atol=1e-5, rtol=0)
        assert isinstance(cache, QuantHostKVCache) and cache.length == len(ids)
    ref = tiny_engine.score(ids)
    rel = np.abs(one - ref).max() / (ref.max() - ref.min())
    assert rel <= {"int8": 5e-3, "fp8": 2e-2}[qeng.backend.describe()["kv_cache"]], rel


def test_kv_cache_equals_full_recompute(qeng):
    be = qeng.backend
    ids = qeng.tokenizer.encode(PROMPTS[0])
    params, n, rng = SamplingParams(temperature=1.0), 20, np.random.default_rng(3)
    cache = be.allocate(1, len(ids) + n)
    seq, cached = list(ids), []
    logits = be.forward(cache, np.array([seq]), np.ones((1, len(seq)), np.int64), np.arange(len(seq))[None])
    for _ in range(n):
        row = np.array(logits[0, -1])
        cached.append(row.copy())
        seq.append(sample(row, params, rng))
        t = len(seq)
        logits = be.forward(cache, np.array([[seq[-1]]]), np.ones((1, t), np.int64), np.array([[t - 1]]))
    rng, seq2 = np.random.default_rng(3), list(ids)
    for k in range(n):
        row = qeng.score(seq2)[-1]
        np.testing.assert_allclose(row, cached[k], atol=1e-4, rtol=0)
        seq2.append(sample(row.copy(), params, rng))
    assert seq2 == seq


def test_batch_equals_singles_and_continuous_batching(qeng):
    eng = qeng
    kw = dict(max_new_tokens=12, temperature=1.0, seed=11, ignore_eos=True)
    assert [r.token_ids for r in eng.generate(PROMPTS, **kw)] == [eng.generate(p, **kw).token_ids for p in PROMPTS]

    def seq(p, n, seed):
        cfg = GenerationConfig(max_new_tokens=n, sampling=SamplingParams(temperature=1.0), seed=seed, ignore_eos=True)
        return Sequence(eng.tokenizer.encode(p), cfg, eng.tokenizer, eng.eos_ids)

    ref = [eng.generate(p, max_new_tokens=n, temperature=1.0, seed=s, ignore_eos=True).token_ids
           for p, n, s in [(PROMPTS[1], 20, 1), (PROMPTS[2], 6, 2), (PROMPTS[0], 15, 3)]]
    a, b, c = seq(PROMPTS[1], 20, 1), seq(PROMPTS[2], 6, 2), seq(PROMPTS[0], 15, 3)
    batch = Batch(eng.backend)
    batch.add([a])
    for _ in range(4):
        batch.step()
    batch.add([b])  # longer prompt: a's codes and scales shift right together
    for _ in range(4):
        batch.step()
    batch.add([c])  # shorter: c is shifted instead; b leaves, columns are trimmed
    while len(batch):
        batch.step()
    assert [a.out, b.out, c.out] == ref


def test_cache_moves_keep_codes_and_scales_together(qeng):
    be = qeng.backend
    _, x = _chunked(be, list(range(3, 8)) * 1, 5)
    x2 = be.allocate(2, 8)
    be.forward(x2, np.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]), np.ones((2, 5), np.int64),
               np.tile(np.arange(5), (2, 1)))
    y = be.allocate(1, 8)
    be.forward(y, np.array([np.arange(11, 19)]), np.ones((1, 8), np.int64), np.arange(8)[None])
    ref_a = [np.array(t) for i in range(be.layers) for t in x2.layer(i)]
    ref_b = [np.array(t) for i in range(be.layers) for t in y.layer(i)]
    assert x2.extend(y) == 3 and (x2.batch, x2.length) == (3, 8)
    got = [np.array(t) for i in range(be.layers) for t in x2.layer(i)]
    for g, ra, rb in zip(got, ref_a, ref_b):
        assert g.dtype == np.float32 and g.shape[-1] == be.head_dim
        np.testing.assert_array_equal(g[:2, :, 3:], ra)
        np.testing.assert_array_equal(g[:2, :, :3], 0)  # freed columns: zero codes and zero scales
        np.testing.assert_array_equal(g[2:], rb)
    x2.select([2, 0])
    x2.trim_left(2)
    for g2, g in zip([np.array(t) for i in range(be.layers) for t in x2.layer(i)], got):
        np.testing.assert_array_equal(g2, g[[2, 0]][:, :, 2:])
    assert (x2.codes.length, x2.scales.length, x2.codes.batch, x2.scales.batch) == (6, 6, 2, 2)


def test_bytes_per_token_is_what_the_cache_allocates_and_what_admission_counts(qeng, tiny_engine):
    be, a = qeng.backend, qeng.manifest.architecture
    per = a.layers * 2 * a.kv_heads * (a.head_dim * 1 + 4) * 2  # codes + float32 scale, two buffers
    assert be.kv_bytes_per_token == per == kv_bytes_per_token(qeng)
    assert be.allocate(3, 40).capacity_bytes == 3 * 40 * per
    assert kv_bytes_per_token(tiny_engine) == a.layers * 2 * a.kv_heads * a.head_dim * 4 * 2
    assert qeng.describe()["kv_cache"] in ("int8", "fp8") and "kv_cache" not in tiny_engine.describe()


def test_perplexity_chunk_on_float_and_quantized_caches(tiny_engine, qeng):
    ids = tiny_engine.tokenizer.encode(" ".join(PROMPTS) * 40, add_special_tokens=False)
    for eng in (tiny_engine, qeng):
        base = perplexity(eng, seq_len=64, windows=3, ids=ids)
        for chunk in (1, 7, 64, 1000):
            got = perplexity(eng, seq_len=64, windows=3, ids=ids, chunk=chunk)
            assert got.tokens == base.tokens == 3 * 63
            assert abs(got.nll - base.nll) <= 1e-7 * abs(base.nll), (chunk, got.nll, base.nll)
    with pytest.raises(Exception, match="chunk must be at least 1"):
        perplexity(tiny_engine, seq_len=64, windows=1, ids=ids, chunk=0)


def test_fp8_table_decodes_e4m3fn():
    import ml_dtypes

    t = fp8_e4m3fn_table()
    ref = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(np.isnan(t), np.isnan(ref))
    np.testing.assert_array_equal(t[~np.isnan(t)], ref[~np.isnan(ref)])
    assert np.nanmax(t) == 448.0


def test_cli_eval_ppl_chunk(tiny_onnx, tiny_dir):
    import json

    from click.testing import CliRunner

    from kiln.cli import cli

    r = CliRunner().invoke(cli, ["eval", "ppl", str(tiny_onnx), "--seq-len", "64", "--windows", "2", "--chunk",
                                 "16", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["chunk"] == 16 and out["tokens"] == 126
    r1 = CliRunner().invoke(cli, ["eval", "ppl", str(tiny_onnx), "--seq-len", "64", "--windows", "2", "--json"])
    assert abs(json.loads(r1.stdout.strip().splitlines()[-1])["nll"] - out["nll"]) <= 1e-5 * out["nll"]
    r = CliRunner().invoke(cli, ["eval", "ppl", str(tiny_dir), "--chunk", "16"])
    assert r.exit_code == 2 and "--chunk feeds an ONNX or engine artifact" in r.output


def test_perplexity_picks_a_chunk_when_a_windows_logits_pass_the_budget(tiny_engine, qeng, monkeypatch):
    """Without --chunk, a float cache's window whose float32 logits pass LOGITS_BUDGET is fed as many tokens as
    fit (logits [chunk, vocab] at a time) and scores the same; a quantized cache keeps one pass."""
    import runtime.evaluate as ev

    ids = tiny_engine.tokenizer.encode(" ".join(PROMPTS) * 40, add_special_tokens=False)
    vocab = tiny_engine.manifest.architecture.vocab
    base = perplexity(tiny_engine, seq_len=64, windows=3, ids=ids)
    assert base.chunk is None and "chunk" not in base.to_dict()
    monkeypatch.setattr(ev, "LOGITS_BUDGET", 10 * vocab * 4)  # 10 rows of logits
    got = perplexity(tiny_engine, seq_len=64, windows=3, ids=ids)
    assert got.chunk == 10 and got.to_dict()["chunk"] == 10 and got.tokens == base.tokens
    assert abs(got.nll - base.nll) <= 1e-7 * abs(base.nll), (got.nll, base.nll)
    assert ev.auto_chunk(qeng, 64) is None and perplexity(qeng, seq_len=64, windows=1, ids=ids).chunk is None
    assert ev.auto_chunk(tiny_engine, 10) is None  # a window that fits is one pass
