"""Engine on a real exported artifact of the tiny model: KV cache vs recompute, batch vs singles,
continuous batching, streaming, stop strings, errors."""
import json

import numpy as np
import pytest

from runtime import Engine, EngineError
from runtime.generate import Batch, GenerationConfig, Sequence
from runtime.sampling import SamplingParams, sample

PROMPTS = ["The module defines a class", "x", "A much longer prompt about the module and its many functions"]


def _cfg(n=16, temperature=1.0, seed=7, **kw):
    return GenerationConfig(max_new_tokens=n, sampling=SamplingParams(temperature=temperature), seed=seed,
                            ignore_eos=True, **kw)


def test_kv_cache_equals_full_recompute(any_engine):
    tiny_engine = any_engine
    eng, be = tiny_engine, tiny_engine.backend
    ids = eng.tokenizer.encode(PROMPTS[0])
    params, n = SamplingParams(temperature=1.0), 24
    # cached: prefill then one token per step, logits of each step kept
    rng = np.random.default_rng(3)
    cache = be.allocate(1, len(ids) + n)
    seq, cached_logits = list(ids), []
    logits = be.forward(cache, np.array([seq]), np.ones((1, len(seq)), np.int64), np.arange(len(seq))[None])
    for _ in range(n):
        row = np.array(logits[0, -1])
        cached_logits.append(row.copy())
        seq.append(sample(row, params, rng))
        t = len(seq)
        logits = be.forward(cache, np.array([[seq[-1]]]), np.ones((1, t), np.int64), np.array([[t - 1]]))
    # recompute: the whole sequence from an empty cache at every step
    rng = np.random.default_rng(3)
    seq2 = list(ids)
    for k in range(n):
        row = eng.score(seq2)[-1]
        np.testing.assert_allclose(row, cached_logits[k], atol=1e-4, rtol=0)
        seq2.append(sample(row.copy(), params, rng))
    assert seq2 == seq
    assert len(set(seq[len(ids):])) > 3  # a sampled, varied continuation


def test_generate_matches_manual_loop_and_greedy_default(tiny_engine):
    r = tiny_engine.generate(PROMPTS[0], max_new_tokens=10, ignore_eos=True)
    assert r.finish_reason == "length" and len(r.token_ids) == 10
    ids = tiny_engine.tokenizer.encode(PROMPTS[0])
    for t in r.token_ids:
        assert int(np.argmax(tiny_engine.score(ids)[-1])) == t
        ids.append(t)
    assert r.timings["prompt_tokens"] == len(tiny_engine.tokenizer.encode(PROMPTS[0]))
    assert r.timings["ttft_s"] > 0 and r.timings["decode_tokens_per_s"] > 0


def test_batch_equals_singles(any_engine):
    tiny_engine = any_engine
    kw = dict(max_new_tokens=12, temperature=1.0, seed=11, ignore_eos=True)
    batch = tiny_engine.generate(PROMPTS, **kw)
    singles = [tiny_engine.generate(p, **kw) for p in PROMPTS]
    assert [b.token_ids for b in batch] == [s.token_ids for s in singles]
    assert [b.text for b in batch] == [s.text for s in singles]


def test_continuous_batching_joins_and_leaves(any_engine):
    tiny_engine = any_engine
    eng = tiny_engine

    def seq(p, n, seed):
        return Sequence(eng.tokenizer.encode(p), _cfg(n, seed=seed), eng.tokenizer, eng.eos_ids)

    ref = [run.token_ids for run in (eng.generate(p, max_new_tokens=n, temperature=1.0, seed=s, ignore_eos=True)
                                     for p, n, s in [(PROMPTS[1], 20, 1), (PROMPTS[2], 6, 2), (PROMPTS[0], 15, 3)])]
    a, b, c = seq(PROMPTS[1], 20, 1), seq(PROMPTS[2], 6, 2), seq(PROMPTS[0], 15, 3)
    d = seq(PROMPTS[0], 30, 4)
    batch = Batch(eng.backend)
    batch.add([a])
    for _ in range(4):
        batch.step()
    batch.add([b, d])  # b's prompt is longer than a's cache: a's rows shift right
    batch.step()
    d.cancel()
    batch.step()
    assert d.finish_reason == "cancelled" and len(batch) == 2
    for _ in range(3):
        batch.step()
    batch.add([c])  # c is shorter than the running rows: it is shifted instead
    while len(batch):
        batch.step()
    assert [a.out, b.out, c.out] == ref
    assert batch.cache is None


def test_ort_form_generates_what_portable_does(tiny_engine, tiny_engine_ort):
    kw = dict(max_new_tokens=16, ignore_eos=True)
    assert ([r.token_ids for r in tiny_engine_ort.generate(PROMPTS, **kw)]
            == [r.token_ids for r in tiny_engine.generate(PROMPTS, **kw)])
    np.testing.assert_allclose(tiny_engine_ort.score(tiny_engine.tokenizer.encode(PROMPTS[2])),
                               tiny_engine.score(tiny_engine.tokenizer.encode(PROMPTS[2])), atol=1e-4)


def test_stream_concatenates_to_generate(tiny_engine):
    kw = dict(max_new_tokens=40, temperature=1.0, seed=5, ignore_eos=True)
    deltas = list(tiny_engine.stream(PROMPTS[0], **kw))
    full = tiny_engine.generate(PROMPTS[0], **kw)
    assert "".join(deltas) == full.text
    assert all(d for d in deltas)
    pairs = list(tiny_engine.stream(PROMPTS[:2], **kw))
    assert "".join(d for i, d in pairs if i == 0) == full.text


def test_stop_strings_cut_text(tiny_engine):
    kw = dict(max_new_tokens=40, temperature=1.0, seed=5, ignore_eos=True)
    full = tiny_engine.generate(PROMPTS[0], **kw).text
    stop = full[10:13]
    r = tiny_engine.generate(PROMPTS[0], stop=[stop], **kw)
    assert r.finish_reason == "stop" and r.text == full[:full.index(stop)]
    assert "".join(tiny_engine.stream(PROMPTS[0], stop=[stop], **kw)) == r.text


def test_seeded_sampling_is_deterministic(tiny_engine):
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=40, ignore_eos=True)
    a = tiny_engine.generate(PROMPTS[0], seed=1, **kw).token_ids
    assert a == tiny_engine.generate(PROMPTS[0], seed=1, **kw).token_ids
    assert a != tiny_engine.generate(PROMPTS[0], seed=2, **kw).token_ids


def test_chat_messages_use_template(tiny_engine):
    msgs = [{"role": "user", "content": "hello"}]
    ids = tiny_engine.encode_prompt(msgs)
    assert tiny_engine.tokenizer.decode(ids, skip_special_tokens=False).startswith("<|im_start|>user\nhello")
    assert tiny_engine.generate(msgs, max_new_tokens=3, ignore_eos=True).finish_reason == "length"


def test_eos_stops_unless_ignored(tiny_engine):
    eos = min(tiny_engine.eos_ids)
    ids = tiny_engine.tokenizer.encode(PROMPTS[0])
    cfg = GenerationConfig(max_new_tokens=5)
    s = Sequence(ids, cfg, tiny_engine.tokenizer, {eos})
    s.accept(100)
    s.accept(eos)
    assert s.finish_reason == "stop" and s.out == [100, eos]
    s = Sequence(ids, GenerationConfig(max_new_tokens=5, ignore_eos=True), tiny_engine.tokenizer, {eos})
    s.accept(eos)
    assert s.finish_reason is None


def test_request_errors(tiny_engine):
    with pytest.raises(EngineError, match="exceeds the model's context of 1024"):
        tiny_engine.generate(PROMPTS[0], max_new_tokens=1024)
    with pytest.raises(EngineError, match="max_new_tokens"):
        tiny_engine.generate(PROMPTS[0], max_new_tokens=0)
    with pytest.raises(EngineError, match="top_p"):
        tiny_engine.generate(PROMPTS[0], top_p=0.0)
    with pytest.raises(EngineError, match="outside the vocabulary"):
        tiny_engine.generate([1, 2, 99999])


def _edit_manifest(art, **over):
    p = art / "kiln.json"
    d = json.loads(p.read_text()) | over
    p.write_text(json.dumps(d))


def test_corrupt_model_file(tiny_onnx_copy):
    p = tiny_onnx_copy / "model.onnx"
    data = bytearray(p.read_bytes())
    data[100:140] = b"\x00" * 40
    p.write_bytes(bytes(data))
    with pytest.raises(EngineError, match="model.onnx: sha256 differs"):
        Engine.load(tiny_onnx_copy)
    with pytest.raises(EngineError, match="ONNX Runtime cannot load it"):
        Engine.load(tiny_onnx_copy, verify="none")


def test_truncated_weights(tiny_onnx_copy):
    p = tiny_onnx_copy / "model.onnx.data"
    p.write_bytes(p.read_bytes()[:-16])
    with pytest.raises(EngineError, match="model.onnx.data: size"):
        Engine.load(tiny_onnx_copy)


def test_other_schema_version(tiny_onnx_copy):
    _edit_manifest(tiny_onnx_copy, schema_version=1)
    with pytest.raises(EngineError, match="schema_version 1 is not supported"):
        Engine.load(tiny_onnx_copy)


def test_missing_tokenizer(tiny_onnx_copy):
    (tiny_onnx_copy / "tokenizer.json").unlink()
    with pytest.raises(EngineError, match="tokenizer.json"):
        Engine.load(tiny_onnx_copy)
    d = json.loads((tiny_onnx_copy / "kiln.json").read_text())
    del d["files"]["tokenizer.json"]
    (tiny_onnx_copy / "kiln.json").write_text(json.dumps(d))
    with pytest.raises(EngineError, match="tokenizer.json is missing"):
        Engine.load(tiny_onnx_copy)


def test_checkpoint_is_not_runnable(tiny_onnx_copy):
    _edit_manifest(tiny_onnx_copy, kind="checkpoint")
    with pytest.raises(EngineError, match="checkpoint; the runtime runs onnx or engine"):
        Engine.load(tiny_onnx_copy)


def test_tensorrt_backend_missing_says_what_to_install(tiny_onnx):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    with pytest.raises(EngineError, match=r"pip install 'llmkiln\[gpu\]'"):
        Engine.load(tiny_onnx, backend="tensorrt")
    with pytest.raises(EngineError, match="unknown backend"):
        Engine.load(tiny_onnx, backend="cuda")


def test_cache_grows_during_a_long_generation(any_engine):
    tiny_engine = any_engine
    ids = tiny_engine.tokenizer.encode(PROMPTS[0])
    r = tiny_engine.generate(ids, max_new_tokens=560, temperature=1.0, seed=3, ignore_eos=True)
    assert len(r.token_ids) == 560  # past the first allocation (prompt + 512)
    logits = tiny_engine.score(ids + r.token_ids[:-1])
    cfg = tiny_engine.config(560, temperature=1.0, seed=3, ignore_eos=True)
    seq = Sequence(ids, cfg, tiny_engine.tokenizer, tiny_engine.eos_ids)
    replay = [sample(logits[len(ids) - 1 + k].copy(), cfg.sampling, seq.rng) for k in range(560)]
    assert replay == r.token_ids


def test_ort_form_appends_in_place(tiny_engine_ort):
    """The --form ort artifact runs on the shared cache: one buffer per tensor, bound once, appended in place."""
    from runtime.backends.sharedcache import SharedKVCache

    be = tiny_engine_ort.backend
    cache = be.allocate(1, 16)
    assert isinstance(cache, SharedKVCache)
    ids = tiny_engine_ort.tokenizer.encode(PROMPTS[0])
    n = len(ids)
    be.forward(cache, np.array([ids]), np.ones((1, n), np.int64), np.arange(n)[None])
    buf, key = cache.bufs, cache.kv_bound
    first = cache.layer(0)[0].copy()
    step = be.forward(cache, np.array([[5]]), np.ones((1, n + 1), np.int64), np.array([[n]]))[0, -1].copy()
    assert cache.bufs is buf and cache.kv_bound == key and cache.length == n + 1
    np.testing.assert_array_equal(cache.layer(0)[0][:, :, :n], first)  # the past is left where it was
    np.testing.assert_allclose(step, tiny_engine_ort.score(ids + [5])[-1], atol=1e-4)
