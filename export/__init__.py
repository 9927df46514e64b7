"""llmkiln export: ONNX graphs built from the weights, self-validated; TensorRT engines; Triton repositories."""
from .errors import ExportError

__all__ = ["ExportError"]
