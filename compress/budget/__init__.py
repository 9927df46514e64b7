"""``--budget``: how much each input group's quantization to each format costs in loss (sensitivity) and the
cheapest assignment for a target within a perplexity budget (search). kiln/budget.py quantizes with it,
exports and measures the artifact."""
