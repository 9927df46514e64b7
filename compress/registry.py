"""Config class -> transform registries (torchao style): one transform per quantize or prune config class.

    @QUANT_TRANSFORMS.register(Int8WeightOnly)
    def int8_weight_only(model, config, ctx): ...

``QUANT_TRANSFORMS.get(config)`` returns the transform of the config's class (exact class first, then its
bases), so adding a scheme is one config class, one registered transform and, for export, one weight
emitter (docs/CONTRACTS.md, "Adding a scheme").
"""
from __future__ import annotations

from typing import Callable

from .errors import CompressError


class Registry:
    def __init__(self, what: str):
        self.what = what
        self._by_class: dict[type, Callable] = {}

    def register(self, cls: type):
        def deco(fn: Callable) -> Callable:
            if cls in self._by_class:
                raise ValueError(f"{self.what}: {cls.__name__} already has a transform")
            self._by_class[cls] = fn
            return fn

        return deco

    def get(self, config) -> Callable:
        for cls in type(config).__mro__:
            fn = self._by_class.get(cls)
            if fn is not None:
                return fn
        known = ", ".join(c.__name__ for c in self._by_class)
        raise CompressError(f"no {self.what} transform for {type(config).__name__}; known configs: {known}")

    def classes(self) -> tuple[type, ...]:
        return tuple(self._by_class)


QUANT_TRANSFORMS = Registry("quantize")
PRUNE_TRANSFORMS = Registry("prune")
