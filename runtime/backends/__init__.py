"""Backends run an artifact's graph. ``load_backend`` picks one; TensorRT is imported only when asked for."""
from __future__ import annotations

from pathlib import Path

from ..errors import EngineError
from .base import Backend, KVCache

BACKENDS = ("auto", "onnxruntime", "tensorrt")
_GPU_HINT = "pip install 'llmkiln[gpu]' on a machine with an NVIDIA GPU"


def _tensorrt(root, manifest, threads, providers) -> Backend:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise EngineError(f"the tensorrt backend needs TensorRT, which is not installed: {_GPU_HINT}") from None
    try:
        from .tensorrt import TensorRTBackend
    except ImportError as e:
        raise EngineError(f"the tensorrt backend is not available ({e}): {_GPU_HINT}") from None
    if manifest.kind != "engine":
        raise EngineError(f"{root} is an {manifest.kind} artifact; the tensorrt backend runs engine artifacts "
                          "(build one with `kiln export tensorrt`)")
    return TensorRTBackend(root, manifest, threads=threads, providers=providers)


def load_backend(root: str | Path, manifest, backend: str = "auto", threads: int | None = None,
                 providers: list[str] | None = None) -> Backend:
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "tensorrt" if manifest.kind == "engine" else "onnxruntime"
    if backend == "tensorrt":
        return _tensorrt(root, manifest, threads, providers)
    if manifest.kind != "onnx":
        raise EngineError(f"{root} is a {manifest.kind} artifact; the onnxruntime backend runs onnx artifacts "
                          "(make one with `kiln export onnx`)")
    from .onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(root, manifest, threads=threads, providers=providers)


__all__ = ["Backend", "KVCache", "BACKENDS", "load_backend"]
