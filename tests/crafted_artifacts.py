"""Crafted ONNX artifacts whose graph reads a file outside the artifact dir, with kiln.json made consistent
(every listed file's size and sha256 match), as a hostile download would be.

``escape(art, how)`` edits a real artifact dir in place (its weights move next to it, to ``outside.bin``):

- ``dotdot``: the graph's locations are ``../outside.bin`` and kiln.json lists that name (``files`` and
  ``io.external_data``), so verification by hash passes;
- ``dotdot-decoy``: the graph's locations are ``../outside.bin``, kiln.json still lists ``model.onnx.data``,
  now a decoy file;
- ``symlink``: ``model.onnx.data`` is a symlink to ``../outside.bin`` (same bytes: the hashes still match);
- ``symlink-inside``: ``model.onnx.data`` is a symlink to ``real.bin`` inside the dir (ONNX Runtime follows it;
  llmkiln wants plain files only).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

KINDS = ("dotdot", "dotdot-decoy", "symlink", "symlink-inside")


def _entry(p: Path) -> dict:
    data = p.read_bytes()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _relocate(art: Path, location: str) -> None:
    import onnx

    m = onnx.load(str(art / "model.onnx"), load_external_data=False)
    n = 0
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value, n = location, n + 1
    assert n, "the artifact has no external data"
    onnx.save_model(m, str(art / "model.onnx"))


def escape(art: Path, how: str) -> Path:
    """Edit ``art`` as ``how`` says; returns the outside file the graph would read."""
    art = Path(art)
    outside = art.parent / "outside.bin"
    kj = json.loads((art / "kiln.json").read_text())
    data = art / "model.onnx.data"
    if how in ("dotdot", "dotdot-decoy"):
        os.replace(data, outside)
        _relocate(art, "../outside.bin")
        del kj["files"]["model.onnx.data"]
        if how == "dotdot":
            kj["files"]["../outside.bin"] = _entry(outside)
            kj["io"]["external_data"] = "../outside.bin"
        else:
            data.write_bytes(b"decoy")
            kj["files"]["model.onnx.data"] = _entry(data)
        kj["files"]["model.onnx"] = _entry(art / "model.onnx")
    elif how == "symlink":
        os.replace(data, outside)
        data.symlink_to(outside)  # same bytes: size and sha256 in kiln.json still match
    elif how == "symlink-inside":
        os.replace(data, art / "real.bin")
        data.symlink_to("real.bin")
        kj["files"]["real.bin"] = _entry(art / "real.bin")
        outside = art / "real.bin"
    else:
        raise ValueError(how)
    (art / "kiln.json").write_text(json.dumps(kj, indent=2) + "\n")
    return outside
