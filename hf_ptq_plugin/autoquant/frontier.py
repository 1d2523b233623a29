"""The accuracy/size frontier of one AutoQuantize search: a metric (e.g. perplexity) per bits budget.

Every budget is solved from the search's stored scores, and its model is evaluated by swapping the
already calibrated candidate layers into the model, so the whole frontier costs one evaluation
per budget and no calibration or scoring. Each point is the model as searched: AWQ scales stay on
the layers (not yet folded into the norms) and the KV cache in full precision, so it can differ
from the assembled model's metric in the last digits (by bf16 rounding of the fold) and by the KV
cache's error when one is asked for.
"""

import csv
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

from torch import nn

from .result import AutoQuantizeResult
from .scores import Candidates

CSV_FIELDS = ("target_bits", "effective_bits", "stored_bits", "metric", "formats")


@dataclass
class FrontierPoint:
    """One budget's choice: its nominal and stored bits per searched weight, the metric, groups per format."""

    target_bits: float
    effective_bits: float
    stored_bits: float
    metric: float
    formats: Dict[str, int]


def measure_frontier(model: nn.Module, searched: AutoQuantizeResult, candidates: Candidates,
                     layers: Dict[str, nn.Module], budgets: Sequence[float],
                     evaluate: Callable[[nn.Module], float]) -> List[FrontierPoint]:
    """`evaluate(model)` for the choice of every budget (ascending); the model holds `layers` after."""
    points = []
    for bits in sorted(set(float(b) for b in budgets)):
        result = searched.solve(bits)
        try:
            for name, qformat in result.layer_qformats.items():
                model.set_submodule(name, candidates[qformat][name])
            metric = float(evaluate(model))
        finally:
            for name, layer in layers.items():
                model.set_submodule(name, layer)
        points.append(FrontierPoint(bits, result.effective_bits, result.true_bits, metric,
                                    dict(sorted(Counter(result.choice.values()).items()))))
    return points


def check_budgets(budgets: Sequence[float], evaluate) -> None:
    """ValueError for a frontier asked without an evaluation, or with budgets that are not numbers."""
    if not budgets:
        return
    if not callable(evaluate):
        raise ValueError(f"frontier_bits needs evaluate=lambda model: <a number, e.g. perplexity>, got {evaluate!r}")
    bad = [b for b in budgets if isinstance(b, bool) or not isinstance(b, (int, float))]
    if bad:
        raise ValueError(f"frontier_bits must be numbers (effective bits), got {bad}")


def write_frontier(points: Sequence[FrontierPoint], stem, metric_name: str = "perplexity") -> Tuple[Path, Path]:
    """Write `<stem>.csv` (one row per budget) and `<stem>.png` (metric against effective bits)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or assumed
    from matplotlib import pyplot

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = stem.with_name(stem.name + ".csv"), stem.with_name(stem.name + ".png")
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for point in points:
            row = asdict(point)
            row["formats"] = " ".join(f"{q}:{n}" for q, n in point.formats.items())
            writer.writerow(row)
    figure, axes = pyplot.subplots(figsize=(6, 4))
    axes.plot([p.effective_bits for p in points], [p.metric for p in points], marker="o")
    for point in points:
        axes.annotate(" ".join(f"{q}:{n}" for q, n in point.formats.items()), (point.effective_bits, point.metric),
                      fontsize=6, textcoords="offset points", xytext=(4, 4))
    axes.set_xlabel("effective bits per searched weight")
    axes.set_ylabel(metric_name)
    axes.set_title("AutoQuantize frontier")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    pyplot.close(figure)
    return csv_path, png_path
