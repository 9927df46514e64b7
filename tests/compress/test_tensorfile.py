"""Plain-read safetensors access and the layer-by-layer shard writer, checked against safetensors itself."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from compress.tensorfile import INDEX, SafetensorsFiles, ShardWriter, TensorFileError, checkpoint_files


def test_reads_what_safetensors_wrote_including_bf16_and_fp8(tmp_path):
    t = {"a": torch.randn(3, 5), "b": torch.randn(4, 2).to(torch.bfloat16), "c": torch.arange(6, dtype=torch.int8),
         "d": torch.randn(2, 3).to(torch.float8_e4m3fn), "e": torch.randn(7, 4).to(torch.float16)}
    save_file(t, str(tmp_path / "x.safetensors"))
    st = SafetensorsFiles([tmp_path / "x.safetensors"])
    np.testing.assert_array_equal(st["a"], t["a"].numpy())
    np.testing.assert_array_equal(st["b"], t["b"].float().numpy())  # widened exactly
    np.testing.assert_array_equal(st.get("b", raw=True), t["b"].view(torch.int16).numpy().view(np.uint16))
    np.testing.assert_array_equal(st["c"], t["c"].numpy())
    np.testing.assert_array_equal(st.get("d", raw=True), t["d"].view(torch.uint8).numpy())
    np.testing.assert_array_equal(st["e"], t["e"].numpy())
    np.testing.assert_array_equal(st.get("e", rows=slice(2, 5)), t["e"][2:5].numpy())
    assert st.shape("a") == (3, 5) and st.dtype("b") == "BF16" and st.nbytes("a") == 60


def test_bf16_is_widened_chunk_by_chunk_exactly(tmp_path, monkeypatch):
    import compress.tensorfile as tf

    t = torch.randn(101, 13).to(torch.bfloat16)
    save_file({"pad": torch.ones(3, dtype=torch.int8), "t": t}, str(tmp_path / "x.safetensors"))
    monkeypatch.setattr(tf, "BF16_CHUNK", 17)  # chunks that split rows, and a short last chunk
    st = SafetensorsFiles([tmp_path / "x.safetensors"])
    np.testing.assert_array_equal(st["t"], t.float().numpy())
    np.testing.assert_array_equal(st.get("t", rows=slice(40, 77)), t[40:77].float().numpy())


def test_shards_hold_whole_groups_and_safetensors_reads_them(tmp_path):
    rng = np.random.default_rng(0)
    groups = [{f"l{i}.w": (rng.standard_normal((64, 32)).astype(np.float32), "F32"),
               f"l{i}.q": (rng.integers(-127, 128, (64, 32)).astype(np.int8), "I8"),
               f"l{i}.h": (rng.integers(0, 65535, (8,)).astype(np.uint16), "BF16")} for i in range(5)]
    w = ShardWriter(tmp_path, max_bytes=21_000)  # 10,256 bytes a group: two groups per shard
    for g in groups:
        w.add(g)
    names = w.close()
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] + [INDEX]
    index = json.loads((tmp_path / INDEX).read_text())
    assert index["weight_map"]["l0.w"] == index["weight_map"]["l1.q"] == names[0]
    assert index["weight_map"]["l4.h"] == names[2]
    assert not list(tmp_path.glob("*.tmp"))
    files = checkpoint_files(tmp_path)
    for g in groups:
        for name, (arr, _) in g.items():
            f = tmp_path / index["weight_map"][name]
            with safe_open(str(f), "pt") as h:  # the library's own reader takes the padded header
                got = h.get_tensor(name)
            if name.endswith(".h"):
                assert got.dtype == torch.bfloat16 and torch.equal(got.view(torch.int16), torch.from_numpy(arr.view(np.int16)))
            else:
                np.testing.assert_array_equal(got.numpy(), arr)
            np.testing.assert_array_equal(SafetensorsFiles(files).get(name, raw=True), arr)


def test_one_shard_is_model_safetensors_and_a_big_header_is_rewritten(tmp_path, monkeypatch):
    monkeypatch.setattr(ShardWriter, "RESERVE", 256)  # far too small: the writer must fall back
    w = ShardWriter(tmp_path)
    w.add({f"t{i}": (np.full((2,), i, np.float32), "F32") for i in range(40)})
    w.add({"scalar": (np.array(0.5, np.float32), "F32")})
    assert w.close() == ["model.safetensors"]
    with safe_open(str(tmp_path / "model.safetensors"), "np") as h:
        assert sorted(k for k in h.keys() if k != "scalar") == sorted(f"t{i}" for i in range(40))
        np.testing.assert_array_equal(h.get_tensor("t39"), [39, 39])
        assert h.get_tensor("scalar").shape == () and float(h.get_tensor("scalar")) == 0.5


def test_truncated_and_corrupt_files_are_named(tmp_path):
    save_file({"a": torch.randn(100, 100)}, str(tmp_path / "x.safetensors"))
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "x.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(TensorFileError, match=r"x.safetensors: corrupt or truncated safetensors file \(a lies outside the file"):
        SafetensorsFiles([tmp_path / "x.safetensors"])
    (tmp_path / "y.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(TensorFileError, match="y.safetensors: corrupt or truncated safetensors file"):
        SafetensorsFiles([tmp_path / "y.safetensors"])
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": {"a": "missing.safetensors"}}))
    with pytest.raises(TensorFileError, match="names missing.safetensors, which is missing"):
        checkpoint_files(tmp_path)
