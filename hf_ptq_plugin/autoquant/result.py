"""What an AutoQuantize search found: per group its candidates, scores and costs, and the choice.

The scores are kept, so `result.solve(effective_bits)` picks the best assignment for another
budget with no forward pass; `apply_choice` (search.py) then builds that model from a
full-precision one.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .solver import UNQUANTIZED, check_budget, solve_knapsack


@dataclass
class GroupCandidates:
    """One layer group's options: `qformats[i]` has `scores[i]`, nominal `costs[i]` (bits x elements) and
    `true_bits[i]` (stored bits per weight, scales included). The last option is unquantized ("none")."""

    name: str
    members: List[str]
    elements: int
    qformats: List[str]
    scores: List[float]
    costs: List[float]
    true_bits: List[float]

    def option(self, qformat: str) -> int:
        if qformat not in self.qformats:
            raise ValueError(f"{qformat!r} is not a candidate of group {self.name!r}; valid: {self.qformats}")
        return self.qformats.index(qformat)


@dataclass
class AutoQuantizeResult:
    """The search's candidate statistics, the chosen format per group, and the settings that built them.

    `choice`: {group name: qformat or "none"}. `algorithms`: {qformat: calibration algorithm}.
    `memory`: bytes measured while the candidates were held (`model_bytes`, `bf16_model_bytes`,
    `candidate_bytes` per format, `peak_bytes` = model + every candidate). `group_size`: the INT4
    candidates' group size, as resolved (None: no INT4 candidate). `frontier`: the metric per budget
    when asked (frontier.py).
    """

    groups: List[GroupCandidates]
    choice: Dict[str, str]
    target_bits: float
    method: str
    algorithms: Dict[str, str]
    exclude_modules: List[str] = field(default_factory=list)
    kv_cache_qformat: str = "none"
    memory: Dict[str, object] = field(default_factory=dict)
    group_size: Optional[int] = None
    frontier: List[dict] = field(default_factory=list)

    @property
    def elements(self) -> int:
        return sum(group.elements for group in self.groups)

    @property
    def effective_bits(self) -> float:
        """Nominal bits per searched weight of the choice (what the budget counts)."""
        return sum(g.costs[g.option(self.choice[g.name])] for g in self.groups) / self.elements

    @property
    def true_bits(self) -> float:
        """Stored bits per searched weight of the choice, scales included."""
        return sum(g.true_bits[g.option(self.choice[g.name])] * g.elements for g in self.groups) / self.elements

    @property
    def score(self) -> float:
        return sum(g.scores[g.option(self.choice[g.name])] for g in self.groups)

    @property
    def layer_qformats(self) -> Dict[str, str]:
        """{Linear name: qformat} of the layers the choice quantizes (unquantized ones left out)."""
        return {member: self.choice[g.name] for g in self.groups for member in g.members
                if self.choice[g.name] != UNQUANTIZED}

    @property
    def qformats(self) -> List[str]:
        """The candidate formats searched (without "none")."""
        return list(dict.fromkeys(q for g in self.groups for q in g.qformats if q != UNQUANTIZED))

    def solve(self, effective_bits: float) -> "AutoQuantizeResult":
        """The result for another budget, from the stored scores and costs (no forward pass)."""
        costs = [g.costs for g in self.groups]
        check_budget(effective_bits, costs, self.elements)
        picks = solve_knapsack([g.scores for g in self.groups], costs, effective_bits * self.elements)
        choice = {g.name: g.qformats[pick] for g, pick in zip(self.groups, picks)}
        return dataclasses.replace(self, choice=choice, target_bits=effective_bits)

    def summary(self, limit: Optional[int] = None) -> str:
        """A table: group, chosen format, and each candidate's score."""
        lines = [f"AutoQuantize ({self.method}): {self.effective_bits:.3f} effective bits (target {self.target_bits}, "
                 f"{self.true_bits:.3f} stored), score {self.score:.4g}"]
        for group in self.groups[:limit]:
            options = ", ".join(f"{q} {s:.3g}" for q, s in zip(group.qformats, group.scores))
            lines.append(f"  {group.name}: {self.choice[group.name]}  ({options})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-friendly: every field, with the derived totals."""
        return {**dataclasses.asdict(self), "effective_bits": self.effective_bits, "true_bits": self.true_bits,
                "score": self.score}
