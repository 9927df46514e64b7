"""llmkiln compress: load Llama-style models and make them smaller (quantize, prune), in PyTorch.

Heavy imports (torch, transformers) happen on first use, so importing the error type is cheap.
"""
from .errors import CompressError

__all__ = ["CompressError", "load_model", "SourceInfo", "perplexity", "quantize_", "prune_"]

_LAZY = {
    "load_model": ("compress.loading", "load_model"),
    "SourceInfo": ("compress.sources", "SourceInfo"),
    "perplexity": ("compress.evaluate", "perplexity"),
    "quantize_": ("compress.quant", "quantize_"),
    "prune_": ("compress.prune", "prune_"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(name)
