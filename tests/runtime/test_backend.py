"""The ONNX Runtime backend on a hand-built graph: cache row/column moves, last-position logits, threads."""
import numpy as np
import pytest

from runtime.backends import load_backend
from runtime.backends.hostcache import HostKVCache
from runtime.errors import EngineError
from runtime.manifest import read_manifest


@pytest.fixture(scope="module")
def be(hand_art):
    return load_backend(hand_art, read_manifest(hand_art), threads=1)


def _prefill(be, ids):
    ids = np.asarray(ids, dtype=np.int64)
    c = be.allocate(ids.shape[0], ids.shape[1] + 4)
    lg = be.forward(c, ids, np.ones_like(ids), np.tile(np.arange(ids.shape[1]), (ids.shape[0], 1)),
                    last_only=False)
    return c, np.array(lg)


def test_last_only_equals_last_row_of_all(be):
    ids = np.array([[5, 9, 30, 7, 100]])
    _, full = _prefill(be, ids)
    c = be.allocate(1, 8)
    last = be.forward(c, ids, np.ones_like(ids), np.arange(5)[None], last_only=True)
    assert last.shape == (1, 1, be.vocab) and be.positions
    np.testing.assert_allclose(last[0, 0], full[0, -1], atol=1e-5)
    assert c.length == 5


def test_all_positions_equal_a_plain_onnxruntime_run(hand_art):
    import onnxruntime as ort

    ids = np.array([[5, 9, 30, 7]])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(4)[None],
             "logits_positions": np.arange(4)}
    feeds |= {f"past_key_values.{i}.{w}": np.zeros((1, 2, 0, 8), np.float32) for i in range(2) for w in ("key", "value")}
    plain = ort.InferenceSession(str(hand_art / "model.onnx")).run(["logits"], feeds)[0]
    b = load_backend(hand_art, read_manifest(hand_art), threads=1)
    c = b.allocate(1, 4)
    got = b.forward(c, ids, feeds["attention_mask"], feeds["position_ids"], last_only=False)
    np.testing.assert_allclose(got, plain, atol=1e-6)


def test_cache_ops_against_numpy(be):
    a, _ = _prefill(be, [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    b, _ = _prefill(be, [[11, 12, 13, 14, 15, 16, 17, 18]])
    ref_a = [np.array(t) for i in range(be.layers) for t in a.layer(i)]
    ref_b = [np.array(t) for i in range(be.layers) for t in b.layer(i)]
    shift = a.extend(b)  # a: length 5 -> 8, shifted right by 3
    assert shift == 3 and a.batch == 3 and a.length == 8
    got = [np.array(t) for i in range(be.layers) for t in a.layer(i)]
    for g, ra, rb in zip(got, ref_a, ref_b):
        np.testing.assert_array_equal(g[:2, :, 3:], ra)
        np.testing.assert_array_equal(g[:2, :, :3], 0)
        np.testing.assert_array_equal(g[2:], rb)
    a.select([2, 0])
    a.trim_left(2)
    got2 = [np.array(t) for i in range(be.layers) for t in a.layer(i)]
    for g2, g in zip(got2, got):
        np.testing.assert_array_equal(g2, g[[2, 0]][:, :, 2:])
    assert (a.batch, a.length) == (2, 6)


def test_cache_grows_past_its_first_size():
    c = HostKVCache(layers=1, kv_heads=2, head_dim=4, dtype=np.float32, batch=1, max_len=2)
    c.view(c.side, 0, 1, 2)[...] = 7.0
    c.length = 2
    c.reserve(4, 50)
    assert c.bufs.shape[2] >= 4 * 2 * 50 * 4
    np.testing.assert_array_equal(c.past(0), 7.0)


def test_shape_errors_and_threads(be, hand_art):
    c = be.allocate(1, 4)
    with pytest.raises(EngineError, match="attention_mask must be"):
        be.forward(c, np.array([[1, 2]]), np.ones((1, 3), np.int64), np.array([[0, 1]]))
    with pytest.raises(EngineError, match="threads must be at least 1"):
        load_backend(hand_art, read_manifest(hand_art), threads=0)
    with pytest.raises(EngineError, match="provider"):
        load_backend(hand_art, read_manifest(hand_art), providers=["NoSuchExecutionProvider"])


def test_private_binding_is_available_and_the_public_fallback_agrees(hand_art):
    """ONNX Runtime's C++ binding objects (runtime/backends/ort_binding.py) exist in the installed release:
    if this fails, a release moved them and the backend silently runs the slower public API. Both paths give
    the same logits."""
    b = load_backend(hand_art, read_manifest(hand_art), threads=1)
    assert b._cdev is not None and b._csess is not None
    ids = np.array([[5, 9, 30, 7, 100, 3]])
    mask, pos = np.ones_like(ids), np.arange(6)[None]
    fast = b.forward(b.allocate(1, 8), ids, mask, pos, last_only=False).copy()
    b._cdev = b._csess = None  # the public IOBinding API
    public = b.forward(b.allocate(1, 8), ids, mask, pos, last_only=False)
    np.testing.assert_array_equal(fast, public)
