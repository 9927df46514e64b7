"""ONNX export built from the weights: one portable QDQ graph for TensorRT and ONNX Runtime, with KV cache.

Public API: ``export_onnx(source, out, *, form="portable", opset=None, validate=True, force=False,
exporter="kiln", optimum_python=None) -> Manifest`` (``exporter="optimum"``: optimum-onnx's exporter, fp32).
"""
from ..errors import ExportError

__all__ = ["ExportError", "export_onnx", "OnnxExportConfig"]


def __getattr__(name):
    if name in ("export_onnx", "OnnxExportConfig"):
        from . import export as _e

        return getattr(_e, name)
    raise AttributeError(name)
