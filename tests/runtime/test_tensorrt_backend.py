"""The TensorRT backend, driven through the recording TensorRT / cuda-python test doubles.

The doubles run the engine's source ONNX graph with ONNX Runtime on the bound "device" addresses, so the
backend's bookkeeping — profiles, shapes, device pointers, the ping-pong KV cache on the device, the logits
rows copied back, the cache row/column moves — is checked against the ONNX Runtime backend on the same graph.
Loading without TensorRT is checked for real.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from export.tensorrt import ProfileFlags, TensorRTExport, export_tensorrt
from runtime.backends.onnxruntime import OnnxRuntimeBackend
from runtime.backends.tensorrt import TensorRTBackend
from runtime.errors import EngineError
from runtime.manifest import read_manifest
from tests.export.trt_double import DoubleError, RecordingCudart, RecordingTensorRT
from tests.export.trt_fixtures import HD, KV, LAYERS, VOCAB, contract_artifact


@pytest.fixture
def built(tmp_path, tiny_dir):
    art = contract_artifact(tmp_path / "art", tiny_dir)
    eng = tmp_path / "engine"
    trt, cud = RecordingTensorRT("10.15.1"), RecordingCudart()
    export_tensorrt(art, eng, ProfileFlags(4, 32, 8), trt=trt, cudart=cud)
    return art, eng, trt, cud


def _backends(built):
    art, eng, trt, cud = built
    ref = OnnxRuntimeBackend(art, read_manifest(art))
    be = TensorRTBackend(eng, read_manifest(eng), trt=trt, cudart=cud)
    return ref, be


def _step(be, cache, ids, mask, pos, last_only=True):
    return be.forward(cache, np.array(ids), np.array(mask), np.array(pos), last_only=last_only)


def test_prefill_and_decode_match_onnxruntime_with_the_cache_on_the_device(built):
    ref, be = _backends(built)
    _, _, trt, cud = built
    rc, tc = ref.allocate(2, 16), be.allocate(2, 16)
    ids = [[5, 6, 7, 8], [9, 10, 11, 12]]
    mask, pos = np.ones((2, 4), np.int64), np.tile(np.arange(4), (2, 1))
    a, b = _step(ref, rc, ids, mask, pos, last_only=False), _step(be, tc, ids, mask, pos, last_only=False)
    assert b.shape == (2, 4, VOCAB) and np.array_equal(a, b)
    for t in range(4, 7):
        nxt = [[t + 20], [t + 30]]
        m, p = np.ones((2, t + 1), np.int64), np.full((2, 1), t)
        a, b = _step(ref, rc, nxt, m, p), _step(be, tc, nxt, m, p)
        assert b.shape == (2, 1, VOCAB) and np.array_equal(a, b)
    assert tc.length == rc.length == 7
    # during the 4 steps the KV cache never went through the host: per step 4 uploads (ids, mask, positions,
    # logits_positions) and 1 download (the logits rows asked for); no device-to-device traffic (ping-pong sides)
    H2D, D2H = cud.cudaMemcpyKind.cudaMemcpyHostToDevice, cud.cudaMemcpyKind.cudaMemcpyDeviceToHost
    copies = [c[1][-1] for c in cud.calls if c[0] in ("cudaMemcpyAsync", "cudaMemcpy2DAsync")]
    assert copies.count(H2D) == 4 * 4 and copies.count(D2H) == 4 and len(copies) == 20
    for i in range(LAYERS):
        for x, y in zip(rc.layer(i), tc.layer(i)):
            assert x.shape == (2, KV, 7, HD) and np.array_equal(x, y)
    runs = trt.args("IExecutionContext.execute_async_v3")
    assert [r[1] for r in runs] == [0, 1, 1, 1]  # prefill profile, then the decode profile
    be.close()


def test_cache_moves_on_the_device_match_the_host_cache(built):
    ref, be = _backends(built)
    caches = []
    for backend in (ref, be):
        c1, c2 = backend.allocate(2, 8), backend.allocate(1, 8)
        _step(backend, c1, [[1, 2, 3], [4, 5, 6]], np.ones((2, 3), np.int64), np.tile(np.arange(3), (2, 1)))
        _step(backend, c2, [[7, 8, 9, 10, 11]], np.ones((1, 5), np.int64), [[0, 1, 2, 3, 4]])
        shift = c1.extend(c2)  # grows the device allocation too (8 -> 3 rows)
        assert shift == 2 and (c1.batch, c1.length) == (3, 5)
        c1.select([2, 0])
        c1.trim_left(1)
        out = _step(backend, c1, [[12], [13]], np.ones((2, 5), np.int64), [[5], [4]])
        caches.append((c1, out))
    (hc, ho), (dc, do) = caches
    assert np.array_equal(ho, do)
    for i in range(LAYERS):
        for x, y in zip(hc.layer(i), dc.layer(i)):
            assert x.shape == (2, KV, 5, HD) and np.array_equal(x, y)


def test_outside_the_profiles_is_a_clear_error(built):
    _, be = _backends(built)
    c = be.allocate(5, 8)
    with pytest.raises(EngineError, match="outside the engine's profiles.*--max-batch"):
        _step(be, c, [[1]] * 5, np.ones((5, 1), np.int64), np.zeros((5, 1), np.int64))
    c = be.allocate(1, 40)
    with pytest.raises(EngineError, match="max length 32"):
        _step(be, c, [list(range(33))], np.ones((1, 33), np.int64), [list(range(33))])


def test_mismatched_tensorrt_version_says_what_to_rebuild(built):
    _, eng, _, cud = built
    with pytest.raises(EngineError) as e:
        TensorRTBackend(eng, read_manifest(eng), trt=RecordingTensorRT("10.16.0"), cudart=cud)
    msg = str(e.value)
    assert "built with TensorRT 10.15.1" in msg and "10.16.0" in msg and "kiln export tensorrt" in msg
    assert f"-o {eng} --force --max-batch 4 --max-seq 32 --opt-seq 8" in msg
    with pytest.raises(EngineError, match=r"compute capability 9\.0.*8\.9"):
        TensorRTBackend(eng, read_manifest(eng), trt=RecordingTensorRT("10.15.1"),
                        cudart=RecordingCudart(devices=((b"NVIDIA L40S", 8, 9),)))
    with pytest.raises(EngineError, match="no NVIDIA GPU"):
        TensorRTBackend(eng, read_manifest(eng), trt=RecordingTensorRT("10.15.1"), cudart=RecordingCudart(()))


def test_trusted_version_compatible_engine_allows_host_code_and_runs_on_newer(tmp_path, tiny_dir):
    art = contract_artifact(tmp_path / "art", tiny_dir)
    eng = tmp_path / "engine"
    export_tensorrt(art, eng, ProfileFlags(2, 16, 4), TensorRTExport(version_compatible=True),
                    trt=RecordingTensorRT("10.15.1"), cudart=RecordingCudart())
    trt11 = RecordingTensorRT("11.1.0")
    be = TensorRTBackend(eng, read_manifest(eng), trt=trt11, cudart=RecordingCudart(), trust_engine_code=True)
    assert be.runtime.engine_host_code_allowed is True  # without the flag: tests/runtime/test_engine_trust.py
    out = _step(be, be.allocate(1, 4), [[1, 2]], np.ones((1, 2), np.int64), [[0, 1]])
    assert out.shape == (1, 1, VOCAB)


def test_close_frees_device_memory(built):
    _, be = _backends(built)
    _, _, _, cud = built
    c = be.allocate(2, 8)
    _step(be, c, [[1, 2], [3, 4]], np.ones((2, 2), np.int64), np.tile(np.arange(2), (2, 1)))
    assert cud.device_bytes() > 0
    c.free()
    be.close()
    assert cud.device_bytes() == 0 and not cud.streams
    with pytest.raises(DoubleError):  # the double really refuses a double free
        cud.cudaFree(12345)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="checks machines without TensorRT")
def test_engine_load_without_tensorrt_is_one_clear_error(built):
    from runtime import Engine

    _, eng, _, _ = built
    with pytest.raises(EngineError) as e:
        Engine.load(eng, backend="tensorrt")
    msg = str(e.value)
    assert "TensorRT" in msg and "pip install 'llmkiln[gpu]'" in msg and "\n" not in msg
