"""llmkiln: one collision-free import for the public API of ``compress``, ``export`` and ``runtime``.

    from llmkiln import Engine                        # runtime only: never imports torch
    from llmkiln import load_model, quantize_, Int8WeightOnly, prune_, Wanda, export_onnx   # needs llmkiln[compress]

Every name is imported on first use (PEP 562), from the package that owns it, so importing ``llmkiln`` or a
runtime name costs what the runtime costs and nothing more. The packages themselves stay importable as
``compress``, ``export``, ``runtime`` and ``kiln``.
"""
import importlib as _importlib

# name -> the module whose public API it is (each package's own __init__ decides what is public)
_SOURCES = {
    # runtime (base install)
    "Engine": "runtime",
    "EngineError": "runtime",
    # compress (pip install 'llmkiln[compress]')
    "CompressError": "compress",
    "load_model": "compress",
    "quantize_": "compress.quant",
    "QuantConfig": "compress.quant",
    "Int8WeightOnly": "compress.quant",
    "Fp8": "compress.quant",
    "SmoothQuantInt8": "compress.quant",
    "Int8Dynamic": "compress.quant",
    "Int4": "compress.quant",
    "prune_": "compress.prune",
    "Magnitude": "compress.prune",
    "Wanda": "compress.prune",
    "SparseGPT": "compress.prune",
    "NM": "compress.prune",
    "StructuredWidth": "compress.prune",
    "Depth": "compress.prune",
    "Recover": "compress.prune",
    # export (pip install 'llmkiln[export]'; validation against the torch model needs [compress])
    "ExportError": "export",
    "export_onnx": "export.onnx",
}

__all__ = list(_SOURCES)


def __getattr__(name: str):
    module = _SOURCES.get(name)
    if module is None:
        raise AttributeError(f"module 'llmkiln' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(__all__) | {n for n in globals() if n.startswith("__")})
