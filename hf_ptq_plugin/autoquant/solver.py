"""The exact multiple-choice knapsack AutoQuantize solves.

Costs count weight elements times the format's nominal bits (`formats.nominal_bits`, ModelOpt's:
NVFP4 4.5, INT4 and W4A8 4, FP8 and INT8 8, unquantized 16); the budget is `effective_bits` times the
searched elements. The search picks exactly one option per group minimizing the summed score under that budget, as a
binary integer program solved to optimality by HiGHS (`scipy.optimize.milp`, relative gap 0).
"""

from typing import List, Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from ..formats import UNQUANTIZED, UNQUANTIZED_BITS, nominal_bits  # noqa: F401 (the costs, used with the solver)

# Scores are rescaled so the largest is this: HiGHS's absolute gap (1e-6) is then negligible next to them.
_SCORE_SCALE = 1e6
# A solution may exceed the budget by HiGHS's feasibility tolerance; past this (bits), it is re-solved tighter.
_BUDGET_SLACK = 1e-9


def cheapest_bits(costs: Sequence[Sequence[float]], elements: float) -> float:
    """Effective bits of the cheapest assignment (each group's cheapest option)."""
    return sum(min(c) for c in costs) / elements


def check_budget(effective_bits: float, costs: Sequence[Sequence[float]], elements: float) -> None:
    """ValueError unless `effective_bits` lies between the cheapest assignment and 16 bits (all unquantized)."""
    low = cheapest_bits(costs, elements)
    valid = isinstance(effective_bits, (int, float)) and not isinstance(effective_bits, bool)
    if not valid or not low - _BUDGET_SLACK <= effective_bits <= UNQUANTIZED_BITS:
        raise ValueError(f"effective_bits={effective_bits!r} is outside the achievable range [{low:.4g}, "
                         f"{UNQUANTIZED_BITS:g}] for these formats and layers (cheapest assignment to all unquantized)")


def solve_knapsack(scores: Sequence[Sequence[float]], costs: Sequence[Sequence[float]], budget: float) -> List[int]:
    """Per group, the index of its chosen option: minimal sum of scores with sum of costs <= budget.

    `scores[g][o]`, `costs[g][o]`: option o of group g. A ValueError if no assignment fits the budget.
    """
    sizes = [len(s) for s in scores]
    flat_scores = np.concatenate([np.asarray(s, dtype=np.float64) for s in scores])
    flat_costs = np.concatenate([np.asarray(c, dtype=np.float64) for c in costs])
    cheapest = sum(min(c) for c in costs)
    if cheapest > budget * (1 + _BUDGET_SLACK):
        raise ValueError(f"no assignment fits the budget {budget}: the cheapest one costs {cheapest}")
    top = float(np.max(np.abs(flat_scores))) if flat_scores.size else 0.0
    objective = flat_scores * (_SCORE_SCALE / top) if top > 0 else flat_scores
    one_per_group = np.zeros((len(sizes), flat_scores.size))
    start = 0
    for group, size in enumerate(sizes):
        one_per_group[group, start:start + size] = 1.0
        start += size
    scale = float(np.max(flat_costs)) or 1.0  # costs near 1: HiGHS's tolerances are absolute
    limit = budget / scale
    for _ in range(5):
        chosen = _solve(objective, one_per_group, flat_costs / scale, limit)
        spent = float(flat_costs[chosen].sum())
        if spent <= budget * (1 + _BUDGET_SLACK):
            return _per_group(chosen, sizes)
        limit -= (spent - budget) / scale  # over by HiGHS's feasibility tolerance: tighten by as much
    raise ValueError(f"the knapsack solver found no assignment within the budget {budget} (last: {spent})")


def _solve(objective: np.ndarray, one_per_group: np.ndarray, costs: np.ndarray, limit: float) -> np.ndarray:
    constraints = [LinearConstraint(one_per_group, 1, 1), LinearConstraint(costs[None, :], -np.inf, limit)]
    result = milp(objective, constraints=constraints, integrality=np.ones_like(objective), bounds=Bounds(0, 1),
                  options={"mip_rel_gap": 0.0})
    if result.x is None:
        raise ValueError(f"the knapsack solver found no assignment within the budget: {result.message}")
    return np.flatnonzero(np.round(result.x) > 0)


def _per_group(chosen: np.ndarray, sizes: List[int]) -> List[int]:
    offsets = np.cumsum([0] + sizes[:-1])
    picks = [-1] * len(sizes)
    for index in chosen:
        group = int(np.searchsorted(offsets, index, side="right") - 1)
        picks[group] = int(index - offsets[group])
    return picks
