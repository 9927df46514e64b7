"""Backends run an artifact's graph. ``load_backend`` picks one; TensorRT is imported only when asked for."""
from __future__ import annotations

from pathlib import Path

from ..errors import EngineError
from .base import Backend, KVCache

BACKENDS = ("auto", "onnxruntime", "tensorrt")
_GPU_HINT = "pip install 'llmkiln[gpu]' on a machine with an NVIDIA GPU"


def _tensorrt(root, manifest, threads, providers, trust_engine_code=False) -> Backend:
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
    return TensorRTBackend(root, manifest, threads=threads, providers=providers,
                           trust_engine_code=trust_engine_code)


def load_backend(root: str | Path, manifest, backend: str = "auto", threads: int | None = None,
                 providers: list[str] | None = None, trust_engine_code: bool = False) -> Backend:
    """The backend that runs ``manifest``'s artifact. ``trust_engine_code``: let a version-compatible
    TensorRT engine run the host code its plan carries (only for engines from a source you trust)."""
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    from ..onnx_files import check_artifact_files

    check_artifact_files(root, manifest)  # plain files inside the dir only (no symlink, no ../ data)
    if backend == "auto":
        backend = "tensorrt" if manifest.kind == "engine" else "onnxruntime"
    if backend == "tensorrt":
        return _tensorrt(root, manifest, threads, providers, trust_engine_code)
    if manifest.kind != "onnx":
        raise EngineError(f"{root} is a {manifest.kind} artifact; the onnxruntime backend runs onnx artifacts "
                          "(make one with `kiln export onnx`)")
    from .onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(root, manifest, threads=threads, providers=providers)


__all__ = ["Backend", "KVCache", "BACKENDS", "load_backend"]
