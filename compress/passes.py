"""What ``quantize_`` and ``prune_`` return: one kind of report, turned into a kiln.json pass record.

``layers`` maps every Linear the pass touched to its LayerSpec (quantized Linears to their format; pruned
ones to a float spec carrying the sparsity pattern, or none for structured pruning that shrinks shapes).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from runtime.layerspec import LayerSpec
from runtime.records import QuantPass


@dataclass
class PassReport:
    config: object
    layers: dict[str, LayerSpec] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)


@dataclass
class QuantReport(PassReport):
    def to_pass(self) -> QuantPass:
        return QuantPass(config=self.config.to_dict(), layers=dict(self.layers), stats=dict(self.stats))


def config_from_pass(kind: str, cfg: dict):
    """The library config object for a serialized pass config (the form kiln.json and recipes store).
    Returns a QuantConfig for ``quantize``, a (prune config, Recover or None) pair for ``prune``."""
    if kind == "quantize":
        from .quant.config import config_from_dict

        return config_from_dict(cfg)
    from .prune.config import config_from_dict as prune_from_dict

    return prune_from_dict(cfg)
