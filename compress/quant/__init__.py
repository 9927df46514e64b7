"""Calibrated quantization: INT8 weight-only (per channel or per group), FP8 E4M3, SmoothQuant INT8 (static /
per-token), INT4 (GPTQ).

``quantize_(model, config, calib=forward_loop)`` quantizes in place; ``save_quantized`` writes the real
low-precision tensors (docs/FORMATS.md); ``compress.load_model`` reads them back as an exact fake-quant model.
"""
from .api import is_quantized, quantize_, quantize_joint_
from .checkpoint import load_quantized, save_quantized
from .config import (SCHEMES, ActivationScheme, Fp8, Int4, Int8Dynamic, Int8Grouped, Int8WeightOnly, QuantConfig,
                     SmoothQuantInt8, config_for)

__all__ = ["quantize_", "quantize_joint_", "is_quantized", "save_quantized", "load_quantized", "SCHEMES",
           "config_for", "QuantConfig", "ActivationScheme", "Int8WeightOnly", "Int8Grouped", "Fp8", "SmoothQuantInt8",
           "Int8Dynamic", "Int4"]
