"""``--budget``: a format per input group, the cheapest for the target within a perplexity budget, checked
on the exported artifact (entry.quantize_budget)."""
