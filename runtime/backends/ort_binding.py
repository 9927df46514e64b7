"""The one place the runtime reaches below ONNX Runtime's public Python API.

Binding 2 x layers KV tensors on every decode step is the Python hot path: the public
``IOBinding.bind_input(name, "cpu", 0, dtype, shape, ptr)`` rebuilds a device object on each call, while the
C++ binding object takes one made once. ``benchmarks/ort_binding.py`` measures the difference; the backend
falls back to the public API when this returns (None, None), and tests/runtime/test_ort_binding.py notices
when an ONNX Runtime release moves these internals.
"""
from __future__ import annotations


def fast_binding(sess) -> tuple[object | None, object | None]:
    """(C++ CPU device, C++ session) for ``sess``, or (None, None) when this ONNX Runtime lacks them."""
    try:
        from onnxruntime.capi.onnxruntime_inference_collection import OrtDevice

        return OrtDevice.make("cpu", 0)._get_c_device(), sess._sess
    except Exception:
        return None, None


def c_binding(binding) -> object | None:
    """The C++ object behind a public ``IOBinding``, or None."""
    return getattr(binding, "_iobinding", None)
