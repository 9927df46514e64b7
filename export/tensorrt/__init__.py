"""TensorRT engines from portable ONNX artifacts (H100: FP8, INT8, INT4 weight-only, 2:4 sparse).

Pure parts (tested everywhere): ``check_onnx`` (TensorRT's documented ONNX constraints), ``derive_profiles``
(min/opt/max for every dynamic input, each KV tensor included), ``select_settings`` (strongly typed; builder
flags from the LayerSpecs in kiln.json). The TensorRT calls live in ``build.build_plan``; ``export_tensorrt`` writes the
engine artifact dir. TensorRT itself is imported only when a build runs.
"""
from .check import Violation, check_onnx, onnx_violations, opset_range
from .engine import TensorRTExport, export_tensorrt
from .flags import BuildSettings, check_device, select_settings, tensorrt_blockers
from .profiles import InputSpec, Profile, ProfileFlags, derive_profiles, graph_inputs

__all__ = ["BuildSettings", "InputSpec", "Profile", "ProfileFlags", "TensorRTExport", "Violation", "check_device",
           "check_onnx", "derive_profiles", "export_tensorrt", "graph_inputs", "onnx_violations", "opset_range",
           "select_settings", "tensorrt_blockers"]
