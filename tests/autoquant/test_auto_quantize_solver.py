"""The knapsack solver against brute force, the budget's range, and re-solving from stored scores."""

import itertools

import numpy as np
import pytest

from hf_ptq_plugin.autoquant import AutoQuantizeResult, GroupCandidates
from hf_ptq_plugin.autoquant.solver import check_budget, nominal_bits, solve_knapsack


def brute_force(scores, costs, budget):
    """(best objective, its picks, second-best objective) over every feasible assignment."""
    feasible = []
    for picks in itertools.product(*[range(len(s)) for s in scores]):
        if sum(c[p] for c, p in zip(costs, picks)) <= budget:
            feasible.append((sum(s[p] for s, p in zip(scores, picks)), picks))
    feasible.sort()
    second = feasible[1][0] if len(feasible) > 1 else np.inf
    return feasible[0][0], list(feasible[0][1]), second


def random_instance(rng):
    groups, options = rng.integers(3, 7), rng.integers(2, 5)
    # Scores over several orders of magnitude, as sensitivity scores are; some exactly 0 (unquantized).
    scores = [list(10.0 ** rng.uniform(-8, 2, options) * (rng.random(options) > 0.1)) for _ in range(groups)]
    elements = rng.integers(1, 50, groups) * 64
    bits = [4.0, 4.5, 8.0, 16.0]
    costs = [[float(e * bits[rng.integers(0, 4)]) for _ in range(options)] for e in elements]
    low, high = sum(min(c) for c in costs), sum(max(c) for c in costs)
    budget = float(rng.uniform(low, high)) if rng.random() > 0.2 else float(sum(rng.choice(c) for c in costs))
    return scores, costs, max(budget, low)


def test_solver_matches_brute_force_on_random_instances():
    rng = np.random.default_rng(0)
    for _ in range(80):
        scores, costs, budget = random_instance(rng)
        picks = solve_knapsack(scores, costs, budget)
        best, best_picks, second = brute_force(scores, costs, budget)
        assert sum(c[p] for c, p in zip(costs, picks)) <= budget
        assert sum(s[p] for s, p in zip(scores, picks)) == pytest.approx(best, rel=1e-9, abs=1e-300)
        if second - best > 1e-6 * max(best, 1e-12):  # a unique optimum: the very same assignment
            assert picks == best_picks


def test_budget_exactly_at_an_assignment_picks_it_when_it_is_the_only_one():
    scores = [[5.0, 0.0], [3.0, 0.0], [1.0, 0.0]]
    costs = [[4.0, 16.0], [4.0, 16.0], [4.0, 16.0]]
    assert solve_knapsack(scores, costs, 12.0) == [0, 0, 0]
    assert solve_knapsack(scores, costs, 24.0) == [1, 0, 0]  # the 12 extra bits go to the most sensitive group
    assert solve_knapsack(scores, costs, 48.0) == [1, 1, 1]


def make_result(scores_per_group, qformats=("fp8", "int4_awq")):
    options = list(qformats) + ["none"]
    groups = [GroupCandidates(f"g{i}", [f"g{i}.a"], 64 * (i + 1), options, list(s) + [0.0],
                              [nominal_bits(q) * 64 * (i + 1) for q in options], [nominal_bits(q) for q in options])
              for i, s in enumerate(scores_per_group)]
    return AutoQuantizeResult(groups, {}, 0.0, "gradient", {q: "max" for q in qformats})


def test_result_solve_meets_the_budget_and_spends_it_on_the_most_sensitive_groups():
    rng = np.random.default_rng(1)
    searched = make_result([sorted(rng.uniform(0, 1, 2)) for _ in range(5)])
    previous_score = np.inf
    for bits in (4.0, 5.0, 6.0, 7.5, 8.0, 10.0, 16.0):
        result = searched.solve(bits)
        assert result.effective_bits <= bits
        assert result.score <= previous_score  # more bits never cost accuracy
        previous_score = result.score
    assert set(searched.solve(4.0).choice.values()) == {"int4_awq"}
    assert set(searched.solve(16.0).choice.values()) == {"none"}


@pytest.mark.parametrize("bits", [3.99, 16.01, float("nan"), True])
def test_budget_outside_the_achievable_range_names_it(bits):
    with pytest.raises(ValueError, match=r"outside the achievable range \[4, 16\]"):
        make_result([[0.1, 0.2]]).solve(bits)


def test_check_budget_counts_the_cheapest_format_of_each_group():
    check_budget(4.5, [[4.5 * 10, 8 * 10, 16 * 10]], 10)
    with pytest.raises(ValueError, match=r"\[4.5, 16\]"):
        check_budget(4.4, [[4.5 * 10, 8 * 10, 16 * 10]], 10)


def test_nominal_bits_follow_modelopt():
    assert [nominal_bits(q) for q in ("nvfp4", "nvfp4_awq", "w4a16_nvfp4", "int4_awq", "w4a8_awq", "fp8",
                                      "fp8_pc_pt", "int8_sq", "int8_wo", "mxfp8", "none")] == [
        4.5, 4.5, 4.5, 4, 4, 8, 8, 8, 8, 8, 16]
