import json

import pytest

from runtime.fsutil import atomic_dir
from runtime.layerspec import LayerSpec
from runtime.manifest import Architecture, Manifest, ManifestError, read_manifest, verify_files
from runtime.records import QuantPass

ARCH = Architecture(model_type="llama", layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16,
                    vocab=512, max_position=1024, rope_theta=10000.0, rms_eps=1e-5, tied_embeddings=True)


def _write(tmp_path, **over):
    (tmp_path / "a.bin").write_bytes(b"abc")
    m = Manifest(kind="checkpoint", architecture=ARCH,
                 passes=[QuantPass(config={"scheme": "int8-wo"}, layers={"model.layers.0.mlp.up_proj": LayerSpec("int8")})])
    m.record_files(tmp_path)
    d = m.to_dict() | over
    (tmp_path / "kiln.json").write_text(json.dumps(d))


def test_round_trip(tmp_path):
    _write(tmp_path)
    m = read_manifest(tmp_path)
    assert m.architecture == ARCH and m.files["a.bin"].size == 3
    assert m.preset() == "int8-wo" and m.layer_specs() == {"model.layers.0.mlp.up_proj": LayerSpec("int8")}
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


UP = "model.layers.0.mlp.up_proj"


def _set(path, value):
    def edit(d):
        *head, last = path
        for k in head:
            d = d[k]
        d[last] = value
    return edit


@pytest.mark.parametrize("edit,msg", [
    (_set(["architecture", "max_position"], "1024"), r"architecture\.max_position: expected an integer, got '1024'"),
    (_set(["architecture", "tied_embeddings"], "false"), r"architecture\.tied_embeddings: expected true or false"),
    (_set(["architecture", "rope_theta"], float("nan")), r"architecture\.rope_theta: expected a finite number"),
    (_set(["files", "a.bin"], 3), r"files\.a\.bin: expected an object, got 3"),
    (_set(["files", "a.bin", "size"], "3"), r"files\.a\.bin\.size: expected an integer"),
    (_set(["files", "a.bin", "sha256"], "zz"), r"files\.a\.bin: sha256 must be 64 lowercase hex digits"),
    (_set(["passes", 0, "layers", UP, "weight"], "int3"), rf"passes\[0\]\.layers\.{UP}\.weight: must be one of"),
    (_set(["passes", 0, "layers", UP, "surprise"], 1), r"unknown key\(s\) surprise \(known: weight, group_size"),
    (_set(["passes", 0, "layers", UP, "act"], "fp8"), rf"layers\.{UP}: act needs act_granularity"),
    (_set(["passes", 0, "layers"], []), r"passes\[0\]\.layers: expected an object"),
    (_set(["validation"], {"passed": "yes"}), r"validation\.passed: is none of|validation\.passed: expected true"),
    (_set(["io"], {"version": 1}), r"io: missing form"),
])
def test_wrong_types_are_one_line_errors_naming_the_field(tmp_path, edit, msg):
    _write(tmp_path)
    d = json.loads((tmp_path / "kiln.json").read_text())
    edit(d)
    (tmp_path / "kiln.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match=msg) as e:
        read_manifest(tmp_path)
    assert "\n" not in str(e.value)


def test_layer_specs_merge_prune_sparsity_and_quantized_formats():
    from runtime.records import PrunePass

    down = "model.layers.0.mlp.down_proj"
    m = Manifest(kind="checkpoint", architecture=ARCH, passes=[
        PrunePass(config={"method": "wanda"}, pattern="2:4", layers=(UP, down)),
        QuantPass(config={"scheme": "int8-wo"}, layers={UP: LayerSpec("int8")})])
    assert m.layer_specs() == {UP: LayerSpec("int8", sparsity="2:4"), down: LayerSpec(sparsity="2:4")}
    assert m.quantized and m.preset() == "int8-wo"
    again = Manifest.from_dict(json.loads(json.dumps(m.to_dict())))
    assert again.passes == m.passes
