"""auto_quantize: the best format per layer group under an effective-bits budget (ModelOpt's AutoQuantize).

1. Groups: q/k/v one decision, gate/up one, every other quantizable Linear its own (groups.py).
2. Candidates: each format quantizes every searched layer through the calibration pipeline with its
   own algorithm, as `quantize()` would (candidates.py); "none" (full precision) is always an option.
3. Scores: how much each candidate hurts its group, by gradient or KL divergence (scores.py).
4. Solve: the multiple-choice knapsack, exactly (solver.py); the result keeps scores and costs, so
   `result.solve(bits)` re-solves without a forward pass and `apply_choice` builds that model.
5. Assemble: the chosen candidates go into the model, AWQ scales are folded, the KV cache is
   calibrated, and the model gets the PTQConfig its checkpoint needs (assemble.py).
"""

import logging
import resource
from dataclasses import asdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import formats as F
from ..calibration.interrupted import refuse_if_interrupted
from ..config import PTQConfig
from ..evaluation import model_bytes
from ..hf.memory import release_freed_heap
from ..modules.kv_cache import check_kv_support
from .assemble import assemble
from .candidates import bits_per_weight, build_candidates, candidate_bytes, storable
from .frontier import check_budgets, measure_frontier
from .groups import LayerGroup, search_groups, weight_elements
from .result import AutoQuantizeResult, GroupCandidates
from .scores import Candidates, Scores, gradient_scores, kl_div_scores
from .solver import UNQUANTIZED, check_budget, nominal_bits

logger = logging.getLogger(__name__)

METHODS = ("gradient", "kl_div")
MiB = 2 ** 20


def auto_quantize(model: nn.Module, qformats: Sequence[str], effective_bits: float, forward_loop: Callable, *,
                  method: str = "gradient", algorithms: Optional[Dict[str, str]] = None,
                  group_size: Optional[int] = None, exclude_modules: Sequence[str] = (), kv_cache_qformat: str = "none",
                  score_loop: Optional[Callable] = None, loss_fn: Optional[Callable] = None,
                  frontier_bits: Sequence[float] = (), evaluate: Optional[Callable[[nn.Module], float]] = None
                  ) -> Tuple[nn.Module, AutoQuantizeResult]:
    """Quantize `model` in place with the format per layer group that minimizes the total score
    within `effective_bits` (nominal bits per searched weight, "none" = 16); returns (model, result).

    qformats: candidate formats (ModelOpt names); full precision is always a candidate too.
    forward_loop: `loop(model)` running calibration data (required: scoring reads activations).
    method: "gradient" (ModelOpt's default) or "kl_div". algorithms: {qformat: algorithm} overrides;
    the others use the format's default, as `quantize()` does. group_size: the INT4 candidates' group
    size (None: the format's default, as in PTQConfig). exclude_modules: kept in full
    precision and out of the budget, besides the defaults (lm_head, MoE routers, vision towers).
    kv_cache_qformat: applied to every layer after the search. score_loop: the scoring batches, as a
    loop like `forward_loop` (its default) or a list of batches (dicts of model inputs, or token-id
    tensors). loss_fn(outputs, batch) -> scalar for "gradient" (default: `sampled_label_loss()`, the
    LM loss on next tokens drawn from the model's own predictions; `causal_lm_loss` is ModelOpt's, on
    the data's next tokens: scores.py says why ours is the default). frontier_bits with
    evaluate(model) -> number (e.g. perplexity): `result.frontier` gets the metric of the choice at
    each of these budgets, measured on the searched candidates before the final model is assembled
    (frontier.py).
    A MoE layer's fused experts are one group, which always takes one of the formats (`group_options`).
    """
    _check_arguments(model, forward_loop, method, loss_fn, exclude_modules)
    check_budgets(frontier_bits, evaluate)
    algorithms = candidate_algorithms(qformats, algorithms, group_size)
    groups, layers = search_groups(model, exclude_modules)
    stored = {q: storable(PTQConfig(qformat=q, algorithm=a, group_size=_int4(q, group_size)), layers)
              for q, a in algorithms.items()}
    options = group_options(groups, stored)
    costs = [nominal_costs(g, options[g.name]) for g in groups]
    for bits in (effective_bits, *frontier_bits):
        check_budget(bits, costs, sum(g.elements for g in groups))
    kv_format = F.get_kv_format(kv_cache_qformat)
    if kv_format is not None:
        check_kv_support(model, kv_format)
    candidates = {q: build_candidates(model, kept, config, forward_loop) for q, (config, kept) in stored.items()}
    memory = memory_report(model, candidates)
    scores = _scores(model, groups, candidates, scoring_loop(score_loop, forward_loop), method, loss_fn)
    resolved_group_size = next((c.group_size for c, _ in stored.values() if c.format.group_size_choices), None)
    searched = AutoQuantizeResult([group_candidates(g, options[g.name], candidates, scores[g.name], layers)
                                   for g in groups], {}, effective_bits, method, algorithms, list(exclude_modules),
                                  kv_cache_qformat, memory, resolved_group_size)
    if frontier_bits:
        searched.frontier = [asdict(point) for point in
                             measure_frontier(model, searched, candidates, layers, frontier_bits, evaluate)]
    result = searched.solve(effective_bits)
    chosen = {name: candidates[q][name] for name, q in result.layer_qformats.items()}
    del candidates  # the candidates not chosen are freed here
    assemble(model, result, chosen, forward_loop)
    logger.info("%s", result.summary(limit=0))
    logger.debug("%s", result.summary())
    return model, result


def apply_choice(model: nn.Module, result: AutoQuantizeResult, forward_loop: Callable) -> nn.Module:
    """Quantize a full-precision `model` (the one searched, loaded again) to `result.choice`, e.g. of
    `result.solve(other_bits)`, and return it.

    Each chosen format calibrates every searched layer through the pipeline, as the search did, and
    only its chosen layers are kept, so the model equals what `auto_quantize` builds for that choice.
    """
    refuse_if_interrupted(model)
    groups, layers = search_groups(model, result.exclude_modules)
    if [g.members for g in groups] != [tuple(g.members) for g in result.groups]:
        raise ValueError(f"{type(model).__name__}'s layer groups differ from the searched ones; apply_choice needs "
                         "the full-precision model that was searched (load it again)")
    layer_qformats = result.layer_qformats
    chosen = {}
    for qformat in sorted(set(layer_qformats.values())):
        config, kept = storable(PTQConfig(qformat=qformat, algorithm=result.algorithms[qformat],
                                          group_size=_int4(qformat, result.group_size)), layers)
        built = build_candidates(model, kept, config, forward_loop)
        chosen.update({name: built[name] for name, q in layer_qformats.items() if q == qformat})
    return assemble(model, result, chosen, forward_loop)


def candidate_algorithms(qformats: Sequence[str], overrides: Optional[Dict[str, str]],
                         group_size: Optional[int] = None) -> Dict[str, str]:
    """{qformat: algorithm} for the candidate formats (validated; "none" is implicit and dropped)."""
    if isinstance(qformats, str) or not qformats:
        raise ValueError(f"qformats must be a non-empty list of qformat names, got {qformats!r}; valid: "
                         f"{', '.join(F.FORMATS)}")
    names = list(dict.fromkeys(q for q in qformats if q != UNQUANTIZED))
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ValueError(f"algorithms names qformat(s) {unknown} that are not candidates; valid: {names}")
    if not names:
        raise ValueError(f"qformats {list(qformats)} hold no quantized format; valid: {', '.join(F.FORMATS)}")
    if group_size is not None and not any(_int4(q, group_size) for q in names):
        raise ValueError(f"group_size={group_size} applies to INT4 candidates only; none of {names} is one")
    # PTQConfig validates each pair (unknown format, algorithm that does not fit it, group size) with the valid choices.
    return {q: PTQConfig(qformat=q, algorithm=overrides.get(q), group_size=_int4(q, group_size)).resolved_algorithm
            for q in names}


def _int4(qformat: str, group_size: Optional[int]) -> Optional[int]:
    """`group_size` for a format whose group size is a choice (INT4), else None (the format's own)."""
    return group_size if F.get_format(qformat).group_size_choices else None


def group_options(groups: List[LayerGroup], stored: Dict[str, Tuple[PTQConfig, dict]]) -> Dict[str, List[str]]:
    """{group: its options}: the formats that can store every member, then "none" (full precision).

    A MoE layer's experts always take a format: our loader and the single-format rule read a checkpoint's
    fused experts all quantized or all not (exclude them, `exclude_modules=['*experts*']`, to keep them
    in full precision), so their group has no "none" option.
    """
    options = {}
    for group in groups:
        formats = [q for q, (_, kept) in stored.items() if all(m in kept for m in group.members)]
        if group.experts and not formats:
            raise ValueError(f"no candidate format can store the experts of {group.name!r} (they always take a "
                             f"format); exclude them with exclude_modules=[{group.name!r}] or add a format")
        options[group.name] = formats if group.experts else formats + [UNQUANTIZED]
    return options


def nominal_costs(group: LayerGroup, options: List[str]) -> List[float]:
    """Budget costs (nominal bits x elements) of the group's options."""
    return [nominal_bits(q) * group.elements for q in options]


def group_candidates(group: LayerGroup, options: List[str], candidates: Candidates, scores: Dict[str, float],
                     layers: Dict[str, nn.Module]) -> GroupCandidates:
    """One group's options (`group_options`) with their scores, nominal costs and stored bits per weight."""

    def stored_bits(option: str) -> float:
        built = layers if option == UNQUANTIZED else candidates[option]
        return sum(bits_per_weight(built[m]) * weight_elements(layers[m]) for m in group.members) / group.elements

    return GroupCandidates(group.name, list(group.members), group.elements, list(options),
                           [0.0 if q == UNQUANTIZED else scores[q] for q in options], nominal_costs(group, options),
                           [stored_bits(q) for q in options])


def memory_report(model: nn.Module, candidates: Candidates) -> Dict[str, object]:
    """Bytes held while searching: the full-precision model plus every candidate (logged)."""
    per_format = {q: candidate_bytes(layers) for q, layers in candidates.items()}
    report = {"model_bytes": model_bytes(model), "bf16_model_bytes": model_bytes(model, torch.bfloat16),
              "candidate_bytes": per_format}
    report["peak_bytes"] = report["model_bytes"] + sum(per_format.values())
    report["process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    logger.info("searching with the model (%.1f MiB; %.1f MiB in bf16) and every candidate (%.1f MiB): %.1f MiB, "
                "%.2fx the bf16 model", report["model_bytes"] / MiB, report["bf16_model_bytes"] / MiB,
                sum(per_format.values()) / MiB, report["peak_bytes"] / MiB,
                report["peak_bytes"] / report["bf16_model_bytes"])
    return report


def scoring_loop(score_loop, forward_loop: Callable) -> Callable:
    """`score_loop` as a forward loop: itself if callable, a loop over its batches if a list, else `forward_loop`."""
    if score_loop is None:
        return forward_loop
    if callable(score_loop):
        return score_loop
    if not isinstance(score_loop, (list, tuple)) or not score_loop:
        raise ValueError(f"score_loop must be a forward loop (loop(model)) or a non-empty list of batches, got "
                         f"{type(score_loop).__name__}")

    @torch.no_grad()
    def loop(model: nn.Module) -> None:
        for batch in score_loop:
            if isinstance(batch, dict):
                model(**batch)
            else:
                model(batch)
    return loop


def _scores(model: nn.Module, groups: List[LayerGroup], candidates: Candidates, score_loop: Callable, method: str,
            loss_fn: Optional[Callable]) -> Scores:
    was_training = model.training
    model.eval()  # no dropout: every candidate is compared on the same outputs
    try:
        if method == "gradient":
            return gradient_scores(model, groups, candidates, score_loop, loss_fn)
        return kl_div_scores(model, groups, candidates, score_loop)
    finally:
        model.train(was_training)
        release_freed_heap()  # the scoring passes' activations, kept by the allocator otherwise


def _check_arguments(model: nn.Module, forward_loop, method: str, loss_fn: Optional[Callable],
                     exclude_modules) -> None:
    refuse_if_interrupted(model)
    if not callable(forward_loop):
        raise ValueError(f"auto_quantize needs forward_loop=lambda model: ... running calibration data through the "
                         f"model (candidates are calibrated and scored on it), got {forward_loop!r}")
    PTQConfig(exclude_modules=exclude_modules)  # a ValueError unless a list of module names or patterns
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if loss_fn is not None and method != "gradient":
        raise ValueError(f"loss_fn is used by method='gradient' only; method={method!r} compares output distributions")
