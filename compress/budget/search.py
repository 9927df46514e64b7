"""Choose a format per input group: the lowest cost for the target whose predicted perplexity ratio stays
within the budget. Pure functions of the sensitivity scores, the groups' sizes and a cost table.

Costs per weight (docs/QUANTIZATION.md, "--budget"):
  cpu  : bytes one decode step streams on ONNX Runtime CPU: float32 4; int8 (per channel or in groups) and
         int4 the codes plus a float32 scale per 32 inputs (ONNX Runtime's kernel keeps a scale per block even
         for per-channel weights): 1.125, 0.625; ``int8-fine`` (int8-wo with the ``fine`` kernel) a scale per
         16 inputs: 1.25.
  h100 : relative time of a Linear on H100 Tensor Cores against bf16 (1.0): FP8 and INT8 run at twice BF16's
         dense rate with half the bytes (0.5); weight-only INT8 halves the bytes but computes in bf16 (0.6);
         weight-only INT4 quarters them (0.35). From the H100 datasheet's throughputs (BF16 989, FP8/INT8 1979
         dense TFLOPS; 3.35 TB/s HBM3), not measured here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from runtime.layerspec import ACT_BLOCK

COSTS = {
    "cpu": {"float": 4.0, "int8-wo": 1.125, "int8-fine": 1.25, "int8-dyn": 1.125, "int8-group": 1.125,
            "int4": 0.625},
    "h100": {"float": 1.0, "int8-wo": 0.6, "int8-group": 0.62, "int4": 0.35, "fp8": 0.5, "int8-sq": 0.5},
}
# the candidates when none are named: the gates' choices (docs/QUANTIZATION.md, "--budget")
DEFAULT_FORMATS = {"cpu": ["int4", "int8-wo"], "h100": ["fp8", "int8-wo", "float"]}

# the grouped formats' (int4, int8-group) inputs per scale, per target. ONNX Runtime's kernel keeps a scale per 32
# inputs whatever the group (export.onnx.qdq.graph_block repeats a coarser group's), so on cpu groups of 32
# cost no more bytes than groups of 128 and round closer; h100 keeps the presets' 128
GROUPS = {"cpu": 32, "h100": 128}

# the weight-only formats' input as the target's kernel sees it: quantized to int8 per this many inputs; the
# sensitivity proxy applies it (compress.budget.sensitivity)
_FAST, _FINE = ACT_BLOCK["fast"], ACT_BLOCK["fine"]
KERNEL_BLOCKS = {"cpu": {"int8-wo": _FAST, "int8-group": _FAST, "int4": _FAST, "int8-fine": _FINE}, "h100": {}}


@dataclass
class Choice:
    formats: dict[str, str]  # group -> format
    predicted_ratio: float  # exp(scale * summed scores)
    cost: float
    scale: float = 1.0  # the factor the proxy's scores were taken at (recalibrate)


def predicted_ratio(scores: dict, formats: dict) -> float:
    """exp of the summed predicted increases of mean log-perplexity."""
    return math.exp(sum(scores[g][f] for g, f in formats.items()))


def _cost(formats: dict, sizes: dict, table: dict) -> float:
    return sum(sizes[g] * table[f] for g, f in formats.items())


def _ladders(scores: dict, candidates: list[str], target: str) -> dict[str, list[str]]:
    """Each group's formats, cheapest first: the candidates it has scores for (the lm_head has its own)."""
    table = COSTS[target]
    ladder = sorted(candidates, key=lambda f: table[f])
    return {g: [f for f in ladder if f in scores[g]] for g in scores}


def choose(scores: dict, sizes: dict[str, int], candidates: list[str], target: str, budget: float) -> Choice:
    """Start every group at its cheapest candidate; while the prediction is over ``budget``, move up the
    group whose next format buys the most predicted loss per unit of added cost (greedy knapsack). A group
    takes the candidates it has scores for."""
    table = COSTS[target]
    ladders = _ladders(scores, candidates, target)
    pos = {g: 0 for g in scores}
    limit = math.log(budget)
    while sum(scores[g][ladders[g][pos[g]]] for g in scores) > limit:
        best, gain = None, -1.0
        for g in scores:
            if pos[g] + 1 >= len(ladders[g]):
                continue
            now, nxt = ladders[g][pos[g]], ladders[g][pos[g] + 1]
            saved = scores[g][now] - scores[g][nxt]
            extra = sizes[g] * (table[nxt] - table[now])
            rate = saved / extra if extra > 0 else math.inf
            if rate > gain:
                best, gain = g, rate
        if best is None:
            break  # everything is at the most precise format already
        pos[best] += 1
    _step_back(scores, sizes, ladders, pos, table, limit)
    formats = {g: ladders[g][pos[g]] for g in scores}
    return Choice(formats, predicted_ratio(scores, formats), _cost(formats, sizes, table))


def _step_back(scores: dict, sizes: dict, ladders: dict, pos: dict, table: dict, limit: float) -> None:
    """The greedy's last step can be a large one that lands well inside the limit (a big group moved up
    whole). Step groups back down one format at a time, the largest saving first, while the prediction stays
    within ``limit``."""
    total = sum(scores[g][ladders[g][pos[g]]] for g in scores)
    while total <= limit:
        best, saving, added = None, 0.0, 0.0
        for g in scores:
            if pos[g] == 0:
                continue
            now, low = ladders[g][pos[g]], ladders[g][pos[g] - 1]
            extra = scores[g][low] - scores[g][now]
            save = sizes[g] * (table[now] - table[low])
            if total + extra <= limit and save > saving:
                best, saving, added = g, save, extra
        if best is None:
            return
        pos[best] -= 1
        total += added


def move_up(choice: Choice, scores: dict, sizes: dict, candidates: list[str], target: str) -> str | None:
    """After a measured miss: the group with the highest predicted loss moves to its next more precise format.
    Returns its name (None when every group is already at the top)."""
    table = COSTS[target]
    ladders = _ladders(scores, candidates, target)
    order = sorted(choice.formats, key=lambda g: -scores[g][choice.formats[g]])
    for g in order:
        i = ladders[g].index(choice.formats[g])
        if i + 1 < len(ladders[g]):
            choice.formats[g] = ladders[g][i + 1]
            choice.predicted_ratio = predicted_ratio(scores, choice.formats) ** choice.scale
            choice.cost = _cost(choice.formats, sizes, table)
            return g
    return None


def recalibrate(choice: Choice, scores: dict, sizes: dict, candidates: list[str], target: str, budget: float,
                measured: float) -> Choice | None:
    """After a measured miss: the proxy's scores scaled by how much it under-predicted ``choice``
    (k = log measured / summed scores), and the cheapest assignment within ``budget`` under them, when that
    is more precise than ``choice`` (None otherwise: move_up then). Its predicted ratio is the scaled one."""
    raw = sum(scores[g][f] for g, f in choice.formats.items())
    if raw <= 0 or measured <= 1.0 or math.log(measured) <= raw:
        return None
    k = math.log(measured) / raw
    c = choose({g: {f: v * k for f, v in fs.items()} for g, fs in scores.items()}, sizes, candidates, target, budget)
    if c.cost <= choice.cost:
        return None
    c.scale = k
    return c
