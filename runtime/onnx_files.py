"""Which files an artifact's ONNX graph may read: plain regular files inside the artifact dir, listed in kiln.json.

An ONNX initializer stored as external data names its file in ``external_data[location]``; a crafted graph can
point that at ``../../secret`` or make ``model.onnx.data`` a symlink to a file outside the dir, and whoever opens
the graph then reads that file as weights (and may hand it back as logits, or copy it into a Triton repo).
ONNX Runtime (>= 1.24.1, pinned in pyproject.toml) refuses both when it opens a graph from a path; everything
else that opens an artifact's graph — ``kiln export tensorrt``, ``kiln export triton``, the optimum exporter,
``onnx.load`` with external data — checks here first, and the runtime checks ``model.onnx`` and the data file
kiln.json names before ONNX Runtime sees them.

Pure and torch/onnx-free: ``check_artifact_files`` reads only kiln.json's ``files`` and ``io.external_data`` and
``lstat``s; ``check_model_locations`` walks a ModelProto the caller loaded (with ``load_external_data=False``)
through its protobuf fields, so it needs no ``onnx`` import either.
"""
from __future__ import annotations

import os
import stat
from collections.abc import Collection, Iterator
from pathlib import Path, PurePosixPath

from .errors import EngineError

GRAPH = "model.onnx"
EXTERNAL = 1  # onnx.TensorProto.DataLocation.EXTERNAL
COPY_HINT = ("copy the artifact with its files dereferenced (cp -rL) or re-create it with kiln export onnx")


def unsafe_name(name: str) -> str | None:
    """Why ``name`` (a file name from kiln.json or an ONNX ``location``) is not a plain relative path inside
    the artifact dir, or None when it is one."""
    if not isinstance(name, str) or not name:
        return "is empty"
    if "\0" in name or "\\" in name:
        return "contains a backslash or NUL"
    p = PurePosixPath(name)
    if p.is_absolute() or name.startswith("~"):
        return "is an absolute path"
    if any(part in ("..", ".") for part in name.split("/")) or not p.parts:
        return "leaves the artifact dir (.. or . components)"
    return None


def check_file(root: str | Path, name: str, listed: Collection[str] | None = None, *, what: str = "file",
               error: type[Exception] = EngineError) -> Path:
    """``root/name`` must be a plain regular file (not a symlink, at any level) inside ``root`` and, when
    ``listed`` is given, one of those names. Returns the path; raises ``error`` in one line otherwise."""
    root = Path(root)
    why = unsafe_name(name)
    if why:
        raise error(f"{root}: {what} {name!r} {why}; an artifact's graph reads only files inside its dir")
    if listed is not None and name not in listed:
        raise error(f"{root}: {what} {name!r} is not listed in kiln.json files; re-create the artifact")
    path = root / name
    parent = root
    for part in PurePosixPath(name).parts:  # no symlink at any level under root
        parent = parent / part
        try:
            st = os.lstat(parent)
        except FileNotFoundError:
            raise error(f"{root}: {what} {name!r} is missing; re-create the artifact") from None
        if stat.S_ISLNK(st.st_mode):
            raise error(f"{parent}: {what} {name!r} is a symlink; an artifact's graph reads only plain files "
                        f"inside its dir: {COPY_HINT}")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: {what} {name!r} is not a regular file; re-create the artifact")
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
        raise error(f"{path}: {what} {name!r} resolves outside {root}: {COPY_HINT}")
    return path


def check_artifact_files(root: str | Path, manifest, *, error: type[Exception] = EngineError) -> None:
    """Before anything opens or copies an artifact's files: every file kiln.json lists is a plain regular
    file inside the dir (a relative name, no symlink); an ONNX artifact's ``model.onnx`` and the data file
    ``io.external_data`` names are among them."""
    root = Path(root)
    listed = set(manifest.files)
    for name in sorted(listed):
        check_file(root, name, what="file", error=error)
    if manifest.kind == "onnx":
        check_file(root, GRAPH, listed, what="graph", error=error)
        data = manifest.io.external_data if manifest.io is not None else None
        if data is not None:
            check_file(root, data, listed, what="external data file", error=error)


def _node_tensors(nodes) -> Iterator:
    for node in nodes:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for s in ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors):
                yield s.values
                yield s.indices
            if a.HasField("g"):
                yield from _tensors(a.g)
            for g in a.graphs:
                yield from _tensors(g)


def _tensors(graph) -> Iterator:
    """Every TensorProto of a GraphProto that can carry external data: initializers, sparse initializers,
    Constant / attribute tensors, and the same in every subgraph."""
    yield from graph.initializer
    for s in graph.sparse_initializer:
        yield s.values
        yield s.indices
    yield from _node_tensors(graph.node)


def external_locations(model) -> dict[str, str]:
    """``{location: first tensor name}`` of every external-data tensor of ``model`` (a ModelProto, loaded
    without its external data), model-local functions included. A tensor marked external without exactly
    one location maps under ``""`` (refused by ``check_model_locations``)."""
    out: dict[str, str] = {}
    tensors = [_tensors(model.graph)] + [_node_tensors(f.node) for f in model.functions]
    for t in (t for it in tensors for t in it):
        if t.data_location != EXTERNAL and not len(t.external_data):
            continue
        locs = [e.value for e in t.external_data if e.key == "location"]
        out.setdefault(locs[0] if len(locs) == 1 else "", t.name)
    return out


def check_model_locations(model, root: str | Path, listed: Collection[str] | None = None, *,
                          error: type[Exception] = EngineError) -> set[str]:
    """Every external-data ``location`` of ``model`` names a plain regular file inside ``root`` (and one of
    ``listed`` when given). Returns the locations."""
    locs = external_locations(model)
    for loc, tensor in locs.items():
        check_file(root, loc, listed, what=f"external data location of tensor {tensor!r}", error=error)
    return set(locs)
