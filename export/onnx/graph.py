"""A small ONNX graph builder that streams initializers to ``model.onnx.data`` as they are added.

Only metadata (names, dims, offsets) stays in memory, so peak memory while writing is about one tensor,
not the whole model. Node and value names follow one namespace per module: ``/model/layers.3/attn/q_proj/MatMul``.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

DATA_NAME = "model.onnx.data"
_INLINE_BYTES = 256  # smaller constants live inside model.onnx (shapes, eps, ...)
_PAGE = 4096  # big tensors start on a page boundary so ONNX Runtime can mmap them

NP_TO_ONNX = {
    np.dtype("float32"): TensorProto.FLOAT,
    np.dtype("float16"): TensorProto.FLOAT16,
    np.dtype("int64"): TensorProto.INT64,
    np.dtype("int32"): TensorProto.INT32,
    np.dtype("int8"): TensorProto.INT8,
    np.dtype("uint8"): TensorProto.UINT8,
    np.dtype("bool"): TensorProto.BOOL,
}


class GraphBuilder:
    def __init__(self, out_dir: str | Path, opset: int):
        self.out_dir = Path(out_dir)
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._names: set[str] = set()
        self._consts: dict[tuple, str] = {}
        self._data = open(self.out_dir / DATA_NAME, "wb")
        self._offset = 0
        self.data_bytes = 0

    # ---- values ------------------------------------------------------------------
    def input(self, name: str, elem: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def output(self, name: str, elem: int, shape: list) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))

    def initializer(self, name: str, arr: np.ndarray, elem: int | None = None, dims: list[int] | None = None) -> str:
        """Add a weight. ``arr`` holds the raw bytes; ``elem``/``dims`` override for packed types (INT4, FP8)."""
        arr = np.ascontiguousarray(arr)
        elem = NP_TO_ONNX[arr.dtype] if elem is None else elem
        dims = list(arr.shape) if dims is None else list(dims)
        t = TensorProto(name=name, data_type=elem, dims=dims)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        size = arr.nbytes
        if size <= _INLINE_BYTES:
            t.raw_data = arr.tobytes()
        else:
            align = _PAGE if size >= 1 << 16 else 64
            pad = (-self._offset) % align
            if pad:
                self._data.write(b"\0" * pad)
                self._offset += pad
            self._data.write(memoryview(arr.reshape(-1)).cast("B"))  # the array's own bytes: no copy of a big table
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", DATA_NAME), ("offset", str(self._offset)), ("length", str(size))):
                e = t.external_data.add()
                e.key, e.value = k, v
            self._offset += size
            self.data_bytes += size
        self.inits.append(t)
        self._names.add(name)
        return name

    def alias(self, name: str, of: str) -> str:
        """A second initializer over the same stored bytes (same offset in model.onnx.data): the data is written
        once, but each consumer gets its own initializer, so ORT may repack one (DequantizeLinear -> MatMul into
        MatMulNBits) while another node still reads the original codes."""
        src = next(t for t in self.inits if t.name == of)
        t = TensorProto()
        t.CopyFrom(src)
        t.name = name
        self.inits.append(t)
        self._names.add(name)
        return name

    def const(self, value, dtype="int64") -> str:
        """A small shared constant (shapes, axes, scalars)."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = f"/const/{arr.dtype.name}_{len(self._consts)}"
            self.initializer(name, arr)
            self._consts[key] = name
        return self._consts[key]

    # ---- nodes -------------------------------------------------------------------
    def op(self, op_type: str, inputs: list[str], name: str, n_out: int = 1, domain: str = "", outputs=None,
           **attrs):
        """Add node ``name`` (a namespace path); returns its output name (or a list when n_out > 1)."""
        if name in self._names:
            raise ValueError(f"duplicate node name {name}")
        self._names.add(name)
        outs = outputs or [f"{name}/output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs[0] if n_out == 1 and outputs is None else outs

    # ---- finish ------------------------------------------------------------------
    def finish(self, graph_name: str, doc: str = "", metadata: dict | None = None) -> Path:
        self._data.flush()
        os.fsync(self._data.fileno())
        self._data.close()
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, initializer=self.inits)
        imports = [helper.make_opsetid("", self.opset)]
        imports += [helper.make_opsetid(d, 1) for d in sorted({n.domain for n in self.nodes} - {""})]
        model = helper.make_model(graph, opset_imports=imports, producer_name="llmkiln", doc_string=doc)
        model.ir_version = 10
        for k, v in (metadata or {}).items():
            e = model.metadata_props.add()
            e.key, e.value = k, str(v)
        path = self.out_dir / "model.onnx"
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
        return path

    def abort(self) -> None:
        if not self._data.closed:
            self._data.close()
