"""Pruning: unstructured and N:M (Magnitude, Wanda, SparseGPT), structured width and depth, recovery by
distillation. ``prune_(model, config, calib=...)`` prunes in place; ``prune_checkpoint`` is the disk entry point."""
from .api import PruneReport, count_parameters, prune_, prune_checkpoint
from .config import NM, Depth, Magnitude, Recover, SparseGPT, StructuredWidth, Wanda
from .distill import distill_, kd_loss
from .masks import nm_mask, prune_count, row_mask, sparsegpt_prune, wanda_scores

__all__ = ["prune_", "prune_checkpoint", "PruneReport", "count_parameters", "NM", "Magnitude", "Wanda",
           "SparseGPT", "StructuredWidth", "Depth", "Recover", "distill_", "kd_loss", "nm_mask", "row_mask",
           "prune_count", "sparsegpt_prune", "wanda_scores"]
