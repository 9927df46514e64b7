import json

import pytest

from runtime.fsutil import atomic_dir
from runtime.manifest import Architecture, Manifest, ManifestError, read_manifest, verify_files

ARCH = Architecture(model_type="llama", layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16,
                    vocab=512, max_position=1024, rope_theta=10000.0, rms_eps=1e-5, tied_embeddings=True)


def _write(tmp_path, **over):
    (tmp_path / "a.bin").write_bytes(b"abc")
    m = Manifest(kind="checkpoint", architecture=ARCH, passes=[{"kind": "quantize", "config": {"scheme": "int8-wo"}}])
    m.record_files(tmp_path)
    d = m.to_dict() | over
    (tmp_path / "kiln.json").write_text(json.dumps(d))


def test_round_trip(tmp_path):
    _write(tmp_path)
    m = read_manifest(tmp_path)
    assert m.architecture == ARCH and m.files["a.bin"]["size"] == 3
    assert m.quant_pass()["config"]["scheme"] == "int8-wo"
    verify_files(tmp_path, m, full=True)


@pytest.mark.parametrize("over,msg", [
    ({"schema_version": 99}, "schema_version 99 is not supported"),
    ({"surprise": 1}, "unknown key"),
    ({"kind": "zip"}, "kind must be one of"),
    ({"passes": [{"kind": "melt"}]}, "passes\\[0\\]"),
])
def test_strict(tmp_path, over, msg):
    _write(tmp_path, **over)
    with pytest.raises(ManifestError, match=msg):
        read_manifest(tmp_path)


def test_not_json(tmp_path):
    (tmp_path / "kiln.json").write_text("{nope")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_truncated_file_detected(tmp_path):
    _write(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"ab")
    with pytest.raises(ManifestError, match="truncated"):
        verify_files(tmp_path, read_manifest(tmp_path))


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "x").write_text("half")
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_refuses_existing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        with atomic_dir(out):
            pass
    with atomic_dir(out, force=True) as tmp:
        (tmp / "new").write_text("1")
    assert [p.name for p in out.iterdir()] == ["new"]
