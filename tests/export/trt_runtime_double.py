"""The runtime half of the recording TensorRT test double: Runtime -> ICudaEngine -> IExecutionContext.

``deserialize_cuda_engine`` takes a plan written by the build double (it names the ONNX file it was "built"
from, its IO and its profiles). ``execute_async_v3`` checks what TensorRT checks — a profile is selected, every
input shape is set and inside that profile's min/max, every IO tensor has an address, the stream is the one
created — and then computes the outputs by running that ONNX graph with ONNX Runtime on the bound addresses
(the "device" memory of ``RecordingCudart`` is host memory), so results can be compared with the ONNX Runtime
backend. Everything is recorded in the shared ``calls`` list.
"""
from __future__ import annotations

import json

import numpy as np

from tests.export.trt_double import DoubleError

_ONNX_TO_TRT = {1: "FLOAT", 10: "HALF", 7: "INT64", 6: "INT32", 3: "INT8", 9: "BOOL"}
_ONNX_TO_NP = {1: np.float32, 10: np.float16, 7: np.int64, 6: np.int32, 3: np.int8, 9: np.bool_}


class RuntimeDouble:
    def __init__(self, rec):
        self.rec = rec
        self.engine_host_code_allowed = False

    def deserialize_cuda_engine(self, serialized_engine):
        self.rec._call("Runtime.deserialize_cuda_engine", len(serialized_engine))
        data = bytes(serialized_engine)
        if not data.startswith(b"PLAN"):
            return None
        desc = json.loads(data[4:])
        if desc["version"] != self.rec.__version__ and "VERSION_COMPATIBLE" not in desc["flags"]:
            return None  # what TensorRT does with a plan of another version
        if "VERSION_COMPATIBLE" in desc["flags"] and not self.engine_host_code_allowed:
            return None  # version-compatible plans carry host code: refused unless allowed
        return EngineDouble(self.rec, desc)


class EngineDouble:
    def __init__(self, rec, desc):
        self.rec, self.desc = rec, desc
        self.io = {name: (mode, elem, dims) for name, mode, elem, dims in desc["io"]}
        self.names = [n for n, *_ in desc["io"]]
        self.sess = None

    @property
    def num_io_tensors(self):
        return len(self.names)

    @property
    def num_optimization_profiles(self):
        return len(self.desc["profiles"])

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return self.rec.TensorIOMode[self.io[name][0]] if name in self.io else self.rec.TensorIOMode.NONE

    def get_tensor_dtype(self, name):
        return self.rec.DataType[_ONNX_TO_TRT[self.io[name][1]]]

    def get_tensor_profile_shape(self, name, profile_index):
        return self.desc["profiles"][profile_index][name]

    def create_execution_context(self):
        self.rec._call("ICudaEngine.create_execution_context")
        return ContextDouble(self)

    def session(self):
        if self.sess is None:
            import onnxruntime as ort

            self.sess = ort.InferenceSession(self.desc["onnx"], providers=["CPUExecutionProvider"])
        return self.sess


class ContextDouble:
    def __init__(self, engine: EngineDouble):
        self.engine, self.rec = engine, engine.rec
        self.profile, self.shapes, self.addrs = None, {}, {}

    def set_optimization_profile_async(self, profile_index, stream_handle):
        self.rec._call("IExecutionContext.set_optimization_profile_async", profile_index, stream_handle)
        if not 0 <= profile_index < self.engine.num_optimization_profiles or not isinstance(stream_handle, int):
            return False
        self.profile, self.shapes = profile_index, {}
        return True

    def set_input_shape(self, name, shape):
        self.rec._call("IExecutionContext.set_input_shape", name, tuple(shape))
        if self.profile is None or self.engine.io.get(name, ("",))[0] != "INPUT":
            return False
        mn, _, mx = self.engine.get_tensor_profile_shape(name, self.profile)
        if len(shape) != len(mn) or not all(a <= s <= b for a, s, b in zip(mn, shape, mx)):
            return False  # outside the active profile: TensorRT refuses it
        self.shapes[name] = tuple(int(s) for s in shape)
        return True

    def _dims(self) -> dict:
        known = {}
        for name, shape in self.shapes.items():
            for d, v in zip(self.engine.io[name][2], shape):
                if isinstance(d, str) and known.setdefault(d, v) != v:
                    raise DoubleError(f"inconsistent {d}: {known[d]} vs {v} (from {name})")
        return known

    def get_tensor_shape(self, name):
        mode, _, dims = self.engine.io[name]
        if mode == "INPUT":
            return self.shapes.get(name, tuple(-1 if isinstance(d, str) else d for d in dims))
        known = self._dims()
        return tuple(known.get(d, -1) if isinstance(d, str) else d for d in dims)

    def set_tensor_address(self, name, memory):
        self.rec._call("IExecutionContext.set_tensor_address", name, memory)
        if name not in self.engine.io or not isinstance(memory, int) or memory == 0:
            return False
        self.addrs[name] = memory
        return True

    def execute_async_v3(self, stream_handle):
        self.rec._call("IExecutionContext.execute_async_v3", stream_handle, self.profile)
        io = self.engine.io
        ins = [n for n in io if io[n][0] == "INPUT"]
        missing = [n for n in ins if n not in self.shapes] + [n for n in io if n not in self.addrs]
        if missing or self.profile is None:
            raise DoubleError(f"execute_async_v3 without shapes/addresses for {missing[:4]}")
        import onnxruntime as ort

        sess = self.engine.session()
        binding = sess.io_binding()
        for n in ins:
            binding.bind_input(n, "cpu", 0, _ONNX_TO_NP[io[n][1]], list(self.shapes[n]), self.addrs[n])
        for n in io:
            if io[n][0] == "OUTPUT":
                shape = list(self.get_tensor_shape(n))
                # ORT writes the outputs into the bound memory, as TensorRT writes into device memory
                binding.bind_output(n, "cpu", 0, _ONNX_TO_NP[io[n][1]], shape, self.addrs[n])
        sess.run_with_iobinding(binding)
        assert isinstance(ort.__version__, str)
        return True
