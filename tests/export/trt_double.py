"""A recording test double of the ``tensorrt`` and cuda-python module surfaces this project uses.

TensorRT cannot be installed or run on the machines these tests run on, so the build and runtime code is
exercised against this double instead: every call is recorded (name and arguments) and checked against the
documented TensorRT 10.x / 11.x Python API — signatures, enum members (11.x has no precision BuilderFlags),
profile validity (min <= opt <= max, ranks, every dynamic input covered) — and the "parser" reads the real
ONNX file (names, ranks, dynamic dims) the way ``OnnxParser.parse_from_file`` would see them. It builds no
kernels: the "plan" is a JSON description of what the build was asked to do.
"""
from __future__ import annotations

import enum
import json
from pathlib import Path

_FLAGS_10 = ["FP16", "INT8", "DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "TF32", "SPARSE_WEIGHTS",
             "SAFETY_SCOPE", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO",
             "REJECT_EMPTY_ALGORITHMS", "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME", "FP8", "ERROR_ON_TIMING_CACHE_MISS",
             "BF16", "DISABLE_COMPILATION_CACHE", "STRIP_PLAN", "REFIT_IDENTICAL", "WEIGHT_STREAMING", "INT4"]
_REMOVED_IN_11 = {"FP16", "INT8", "FP8", "BF16", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                  "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO"}


class DoubleError(AssertionError):
    """A call the documented API would reject."""


class RecordingTensorRT:
    """Stands in for ``import tensorrt as trt``; ``calls`` lists ``(name, args)`` in order."""

    def __init__(self, version: str = "10.15.1", fail_build: bool = False, timing_cache_ok: bool = True):
        self.__version__ = version
        self.major = int(version.split(".")[0])
        self.calls: list[tuple[str, tuple]] = []
        self.fail_build = fail_build
        self.timing_cache_ok = timing_cache_ok
        flags = [f for f in _FLAGS_10 if not (self.major >= 11 and f in _REMOVED_IN_11)]
        self.BuilderFlag = enum.IntEnum("BuilderFlag", [(f, i) for i, f in enumerate(flags)])
        # 11.x keeps STRONGLY_TYPED (deprecated, ignored: strong typing is always on)
        self.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", [("STRONGLY_TYPED", 1)])
        self.MemoryPoolType = enum.IntEnum("MemoryPoolType", [("WORKSPACE", 0), ("DLA_MANAGED_SRAM", 1)])
        self.TensorIOMode = enum.IntEnum("TensorIOMode", [("NONE", 0), ("INPUT", 1), ("OUTPUT", 2)])
        self.DataType = enum.IntEnum("DataType", [("FLOAT", 0), ("HALF", 1), ("INT8", 2), ("INT32", 3),
                                                  ("BOOL", 4), ("UINT8", 5), ("FP8", 6), ("BF16", 7),
                                                  ("INT64", 8), ("INT4", 9)])
        rec = self

        class Logger:
            VERBOSE, INFO, WARNING, ERROR, INTERNAL_ERROR = 4, 3, 2, 1, 0

            def __init__(self, severity=2):
                rec._call("Logger", severity)

        self.Logger = Logger
        self.Builder = lambda logger: _Builder(rec, logger)
        self.OnnxParser = lambda network, logger: _Parser(rec, network, logger)

        def runtime(logger):
            from tests.export.trt_runtime_double import RuntimeDouble

            rec._call("Runtime", logger)
            return RuntimeDouble(rec)

        self.Runtime = runtime

    def nptype(self, dt):
        import numpy as np

        return {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "BOOL": np.bool_,
                "UINT8": np.uint8, "INT64": np.int64}[self.DataType(dt).name]

    def _call(self, name, *args):
        self.calls.append((name, args))

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def args(self, name: str) -> list[tuple]:
        return [a for n, a in self.calls if n == name]


class _Input:
    def __init__(self, name, shape):
        self.name, self.shape = name, tuple(shape)


class _Network:
    def __init__(self, rec, flags):
        self.rec, self.flags, self.inputs, self.parsed = rec, flags, [], False

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, i):
        return self.inputs[i]


class _Parser:
    def __init__(self, rec, network, logger):
        rec._call("OnnxParser", network, logger)
        self.rec, self.network, self.errors = rec, network, []

    def parse_from_file(self, path: str) -> bool:
        import onnx

        self.rec._call("OnnxParser.parse_from_file", path)
        if not isinstance(path, str):
            raise DoubleError("parse_from_file takes the model path as str")
        model = onnx.load(path, load_external_data=False)
        for t in model.graph.initializer:
            for e in t.external_data:
                if e.key == "location" and not (Path(path).parent / e.value).is_file():
                    self.errors.append(f"external weights file {e.value} not found next to {path}")
        inits = {t.name for t in model.graph.initializer}
        for vi in model.graph.input:
            if vi.name not in inits:
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]
                self.network.inputs.append(_Input(vi.name, dims))
        self.network.path = path
        self.network.io = [(vi.name, mode, vi.type.tensor_type.elem_type,
                            [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim])
                           for mode, vis in (("INPUT", [v for v in model.graph.input if v.name not in inits]),
                                             ("OUTPUT", model.graph.output)) for vi in vis]
        self.network.parsed = not self.errors
        return not self.errors

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, i):
        return self.errors[i]


class _Profile:
    def __init__(self, rec):
        self.rec, self.shapes = rec, {}

    def set_shape(self, input: str, min, opt, max):
        self.rec._call("IOptimizationProfile.set_shape", input, tuple(min), tuple(opt), tuple(max))
        if not (len(min) == len(opt) == len(max)):
            raise DoubleError(f"set_shape({input}): min/opt/max ranks differ")
        if not all(a <= b <= c for a, b, c in zip(min, opt, max)) or any(a < 0 for a in min):
            raise DoubleError(f"set_shape({input}): need 0 <= min <= opt <= max, got {min} {opt} {max}")
        self.shapes[input] = (tuple(min), tuple(opt), tuple(max))


class _TimingCache:
    def __init__(self, data: bytes):
        self.data = bytes(data)

    def serialize(self):
        return memoryview(b"TCACHE" + self.data[-16:] + b"+1")


class _Config:
    def __init__(self, rec):
        self.rec, self.flags, self.profiles, self.cache, self.pool = rec, [], [], None, {}

    def set_memory_pool_limit(self, pool_type, pool_size):
        self.rec._call("IBuilderConfig.set_memory_pool_limit", pool_type, pool_size)
        if not isinstance(pool_type, self.rec.MemoryPoolType) or not isinstance(pool_size, int):
            raise DoubleError("set_memory_pool_limit(MemoryPoolType, int)")
        self.pool[pool_type] = pool_size

    def set_flag(self, flag):
        self.rec._call("IBuilderConfig.set_flag", flag)
        if not isinstance(flag, self.rec.BuilderFlag):
            raise DoubleError("set_flag takes a BuilderFlag")
        self.flags.append(flag.name)

    def create_timing_cache(self, serialized_timing_cache):
        self.rec._call("IBuilderConfig.create_timing_cache", bytes(serialized_timing_cache))
        return _TimingCache(serialized_timing_cache)

    def set_timing_cache(self, cache, ignore_mismatch):
        self.rec._call("IBuilderConfig.set_timing_cache", cache, ignore_mismatch)
        if not isinstance(cache, _TimingCache) or not isinstance(ignore_mismatch, bool):
            raise DoubleError("set_timing_cache(ITimingCache, bool)")
        self.cache = cache
        return self.rec.timing_cache_ok

    def get_timing_cache(self):
        self.rec._call("IBuilderConfig.get_timing_cache")
        return self.cache

    def add_optimization_profile(self, profile):
        self.rec._call("IBuilderConfig.add_optimization_profile", profile)
        self.profiles.append(profile)
        return len(self.profiles) - 1


class _Builder:
    def __init__(self, rec, logger):
        rec._call("Builder", logger)
        self.rec = rec

    def create_network(self, flags=0):
        self.rec._call("Builder.create_network", flags)
        return _Network(self.rec, flags)

    def create_builder_config(self):
        self.rec._call("Builder.create_builder_config")
        return _Config(self.rec)

    def create_optimization_profile(self):
        self.rec._call("Builder.create_optimization_profile")
        return _Profile(self.rec)

    def build_serialized_network(self, network, config):
        self.rec._call("Builder.build_serialized_network", network, config)
        if not network.parsed:
            raise DoubleError("build_serialized_network before a successful parse")
        if not config.profiles:
            raise DoubleError("a network with dynamic inputs needs at least one optimization profile")
        by_name = {i.name: i.shape for i in network.inputs}
        for k, p in enumerate(config.profiles):
            for name, shape in by_name.items():
                if any(d < 0 for d in shape) and name not in p.shapes:
                    raise DoubleError(f"profile {k} has no shapes for dynamic input {name}")
            for name, (mn, _, mx) in p.shapes.items():
                if name not in by_name or len(by_name[name]) != len(mn):
                    raise DoubleError(f"profile {k}: {name} is not an input of that rank")
                for d, a, b in zip(by_name[name], mn, mx):
                    if d >= 0 and not a == b == d:
                        raise DoubleError(f"profile {k}: {name} static dim {d} given range {a}..{b}")
        if self.rec.fail_build:
            return None
        desc = {"flags": config.flags, "network_flags": network.flags, "pool": {int(k): v for k, v in config.pool.items()},
                "profiles": [{n: [list(s) for s in v] for n, v in p.shapes.items()} for p in config.profiles],
                "version": self.rec.__version__, "onnx": network.path, "io": network.io}
        return memoryview(b"PLAN" + json.dumps(desc).encode())


class RecordingCudart:
    """Stands in for cuda-python's ``cudart``: calls return ``(cudaError_t, *values)`` as documented.

    "Device" memory is host memory this double allocates and tracks: every copy checks that its kind matches
    where the pointers live (a device address must lie in a live allocation, a host address must not) and that
    every byte touched lies inside one allocation, so pointer arithmetic errors fail loudly instead of
    corrupting memory.
    """

    class cudaError_t(enum.IntEnum):
        cudaSuccess = 0
        cudaErrorInvalidValue = 1
        cudaErrorNoDevice = 100

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToHost = 0
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2
        cudaMemcpyDeviceToDevice = 3

    class _Props:
        def __init__(self, name: bytes, major: int, minor: int):
            self.name, self.major, self.minor = name, major, minor

    def __init__(self, devices=((b"NVIDIA H100 80GB HBM3", 9, 0),)):
        self.devices = list(devices)
        self.calls: list[tuple[str, tuple]] = []
        self.allocs: dict[int, object] = {}  # address -> numpy buffer
        self.streams: set[int] = set()

    def _rec(self, name, *args):
        self.calls.append((name, args))

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def cudaGetDeviceCount(self):
        self._rec("cudaGetDeviceCount")
        if not self.devices:
            return (self.cudaError_t.cudaErrorNoDevice, 0)
        return (self.cudaError_t.cudaSuccess, len(self.devices))

    def cudaSetDevice(self, device):
        self._rec("cudaSetDevice", device)
        return (self.cudaError_t.cudaSuccess,)

    def cudaGetDeviceProperties(self, device):
        self._rec("cudaGetDeviceProperties", device)
        name, major, minor = self.devices[device]
        return (self.cudaError_t.cudaSuccess, self._Props(name + b"\0" * 8, major, minor))

    def cudaStreamCreate(self):
        handle = 0x5EED0000 + len(self.streams) + 1
        self.streams.add(handle)
        self._rec("cudaStreamCreate")
        return (self.cudaError_t.cudaSuccess, handle)

    def _stream(self, stream):
        if int(stream) not in self.streams:
            raise DoubleError(f"unknown stream {stream}")

    def cudaStreamSynchronize(self, stream):
        self._stream(stream)
        self._rec("cudaStreamSynchronize", stream)
        return (self.cudaError_t.cudaSuccess,)

    def cudaStreamDestroy(self, stream):
        self._stream(stream)
        self.streams.discard(int(stream))
        self._rec("cudaStreamDestroy", stream)
        return (self.cudaError_t.cudaSuccess,)

    def cudaMalloc(self, size):
        import numpy as np

        buf = np.full(int(size), 0xAB, dtype=np.uint8)  # garbage, like real cudaMalloc
        self.allocs[buf.ctypes.data] = buf
        self._rec("cudaMalloc", size)
        return (self.cudaError_t.cudaSuccess, buf.ctypes.data)

    def cudaFree(self, ptr):
        self._rec("cudaFree", ptr)
        if self.allocs.pop(int(ptr), None) is None:
            raise DoubleError(f"cudaFree of {ptr:#x}, which is not a live allocation")
        return (self.cudaError_t.cudaSuccess,)

    def device_bytes(self) -> int:
        return sum(b.nbytes for b in self.allocs.values())

    def _where(self, ptr: int, n: int) -> str:
        for base, buf in self.allocs.items():
            if base <= ptr < base + buf.nbytes or (n == 0 and ptr == base + buf.nbytes):
                if ptr + n > base + buf.nbytes:
                    raise DoubleError(f"access of {n} bytes at {ptr:#x} runs past its allocation")
                return "device"
        return "host"

    def _check(self, kind, dst, dn, src, sn):
        want = {1: ("device", "host"), 2: ("host", "device"), 3: ("device", "device"), 0: ("host", "host")}
        got = (self._where(int(dst), dn), self._where(int(src), sn))
        if got != want[int(kind)]:
            raise DoubleError(f"{self.cudaMemcpyKind(kind).name} between {got[1]} {src:#x} and {got[0]} {dst:#x}")

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        import ctypes

        self._stream(stream)
        self._rec("cudaMemcpyAsync", dst, src, count, kind)
        self._check(kind, dst, count, src, count)
        ctypes.memmove(int(dst), int(src), int(count))
        return (self.cudaError_t.cudaSuccess,)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        import ctypes

        self._stream(stream)
        self._rec("cudaMemcpy2DAsync", dst, dpitch, src, spitch, width, height, kind)
        if width > dpitch or width > spitch:
            return (self.cudaError_t.cudaErrorInvalidValue,)
        self._check(kind, dst, dpitch * (height - 1) + width, src, spitch * (height - 1) + width)
        for r in range(int(height)):
            ctypes.memmove(int(dst) + r * dpitch, int(src) + r * spitch, int(width))
        return (self.cudaError_t.cudaSuccess,)

    def cudaMemset2DAsync(self, ptr, pitch, value, width, height, stream):
        import ctypes

        self._stream(stream)
        self._rec("cudaMemset2DAsync", ptr, pitch, value, width, height)
        if width > pitch or self._where(int(ptr), pitch * (height - 1) + width) != "device":
            return (self.cudaError_t.cudaErrorInvalidValue,)
        for r in range(int(height)):
            ctypes.memset(int(ptr) + r * pitch, int(value), int(width))
        return (self.cudaError_t.cudaSuccess,)
