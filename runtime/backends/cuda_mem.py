"""Device memory through cuda-python's runtime API (``cudart``): no torch, no cupy.

Every cuda-python call returns ``(cudaError_t, *values)``; ``Cuda`` checks the error and turns it into an
``EngineError``. Host memory is passed as integer addresses of contiguous numpy arrays.
"""
from __future__ import annotations

import numpy as np

from ..errors import EngineError

INSTALL_HINT = "pip install 'llmkiln[gpu]' on a machine with an NVIDIA GPU"


def load_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except Exception as e:
            raise EngineError(f"the tensorrt backend needs cuda-python ({type(e).__name__}: {e}): "
                              f"{INSTALL_HINT}") from None
    return cudart


class Cuda:
    """Checked wrappers over the few cudart calls the TensorRT backend needs, all on one stream."""

    def __init__(self, cudart, device: int = 0):
        self.rt = cudart
        err, n = cudart.cudaGetDeviceCount()
        if err != cudart.cudaError_t.cudaSuccess or not n or device >= n:
            raise EngineError(f"no NVIDIA GPU is visible (CUDA: {getattr(err, 'name', err)}, {n or 0} device(s)); "
                              f"the tensorrt backend needs one: {INSTALL_HINT}")
        self.call(cudart.cudaSetDevice(device), "select device")
        prop = self.call(cudart.cudaGetDeviceProperties(device), "device properties")
        name = prop.name
        if isinstance(name, (bytes, bytearray)):
            name = bytes(name).split(b"\0", 1)[0].decode("utf-8", "replace")
        self.gpu_name, self.compute_capability = str(name).strip(), (int(prop.major), int(prop.minor))
        self.stream = self.call(cudart.cudaStreamCreate(), "stream create")
        k = cudart.cudaMemcpyKind
        self.H2D, self.D2H, self.D2D = k.cudaMemcpyHostToDevice, k.cudaMemcpyDeviceToHost, k.cudaMemcpyDeviceToDevice

    def call(self, result, what: str):
        err, rest = result[0], result[1:]
        if err != self.rt.cudaError_t.cudaSuccess:
            raise EngineError(f"CUDA {what} failed: {err}")
        return rest[0] if len(rest) == 1 else (rest or None)

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def malloc(self, nbytes: int) -> int:
        return int(self.call(self.rt.cudaMalloc(max(int(nbytes), 1)), f"cudaMalloc({nbytes} bytes)"))

    def free(self, ptr: int) -> None:
        if ptr:
            self.call(self.rt.cudaFree(ptr), "cudaFree")

    def h2d(self, dst: int, host: np.ndarray) -> None:
        if host.nbytes:
            self.call(self.rt.cudaMemcpyAsync(dst, host.ctypes.data, host.nbytes, self.H2D, self.stream), "copy H2D")

    def d2h(self, host: np.ndarray, src: int) -> None:
        if host.nbytes:
            self.call(self.rt.cudaMemcpyAsync(host.ctypes.data, src, host.nbytes, self.D2H, self.stream), "copy D2H")

    def copy2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, kind=None) -> None:
        """``height`` rows of ``width`` bytes, rows ``spitch``/``dpitch`` bytes apart (device to device by default)."""
        if width and height:
            self.call(self.rt.cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height,
                                                self.D2D if kind is None else kind, self.stream), "copy 2D")

    def zero2d(self, dst: int, pitch: int, width: int, height: int) -> None:
        if width and height:
            self.call(self.rt.cudaMemset2DAsync(dst, pitch, 0, width, height, self.stream), "memset 2D")

    def sync(self) -> None:
        self.call(self.rt.cudaStreamSynchronize(self.stream), "stream synchronize")

    def close(self) -> None:
        if self.stream is not None:
            self.call(self.rt.cudaStreamDestroy(self.stream), "stream destroy")
            self.stream = None


class DeviceBuffer:
    """A device allocation that grows geometrically (contents are not kept across growth)."""

    def __init__(self, cuda: Cuda):
        self.cuda, self.ptr, self.nbytes = cuda, 0, 0

    def reserve(self, nbytes: int) -> int:
        if nbytes > self.nbytes:
            self.cuda.free(self.ptr)
            self.nbytes = max(int(nbytes), int(self.nbytes * 1.5), 256)
            self.ptr = self.cuda.malloc(self.nbytes)
        return self.ptr

    def free(self) -> None:
        self.cuda.free(self.ptr)
        self.ptr, self.nbytes = 0, 0
