"""The interface every calibration algorithm implements, and the context a block's plan needs.

An algorithm is a small object: which formats it fits, what it needs (activations, the
full-precision weights of a layer-streamed block, samples of each expert's tokens), and how it
plans a decoder block's Linears and a MoE layer's experts. The pipeline only calls this
interface, so adding an algorithm is adding one class to the registry (`__init__.py`).
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ... import formats as F
from ...modules.layer_plan import LayerPlan
from ..blocks import statistics_pass
from ..expert_smoothing import ExpertPlan
from ..producer_folding import find_fold_pairs, fold_into_producer
from ..selection import fused_groups
from ..smoothing import groups_sharing_input
from ..stats import InputStats, input_hooks


@dataclass
class BlockContext:
    """What planning one decoder block sees: its inputs and how to run it."""

    block: nn.Module
    inputs: List[tuple]  # [(args, kwargs, token mask)] of the block's calibration batches
    token_mask: object  # TokenMask: each batch's real (not padding) tokens
    fmt: F.Format
    group_size: Optional[int]
    sample_stride: int  # keep every n-th token in the search samples
    outputs: Optional[list] = None  # not sequential: the full-precision block outputs are collected here
    fold_scales: bool = False  # smoothing scales of o_proj / down_proj go into v_proj / up_proj rows
    fold_verdicts: Optional[dict] = None  # find_fold_pairs' test results, shared by a model's blocks


def observe_group_inputs(context: BlockContext, linears: Dict[str, nn.Linear]
                         ) -> Tuple[List[List[str]], Dict[str, InputStats]]:
    """Groups of the block's Linears that read one input, and each group's input statistics
    (per-channel amax and mean, and a token sample), reduced across processes."""
    groups = groups_sharing_input(list(linears), fused_groups(linears))
    leaders = {group[0]: linears[group[0]] for group in groups}
    stats = {name: InputStats(sample_stride=context.sample_stride) for name in leaders}
    with input_hooks(leaders, stats, context.token_mask):
        statistics_pass(context.block, context.inputs, leaders, context.token_mask, context.outputs)
    for s in stats.values():
        s.reduce_across_processes()
    return groups, {group[0]: stats[group[0]] for group in groups}


def plan_smoothed_groups(context: BlockContext, linears: Dict[str, nn.Linear], plan_group: Callable
                         ) -> Dict[str, LayerPlan]:
    """The plans of a smoothing algorithm (AWQ, SmoothQuant): `plan_group(group, stats, tie)` smooths
    one group of Linears reading one input, in place, and returns its plans; `tie` (or None) makes
    its scale foldable into the producer (producer_folding.py).

    With `context.fold_scales`, consumers are planned first and their scales folded into their
    producers' rows, so each producer is then planned (and quantized) with the scale in its weight.
    """
    groups, stats = observe_group_inputs(context, linears)
    pairs = (find_fold_pairs(context.block, linears, context.inputs, context.fold_verdicts)
             if context.fold_scales else {})
    plans = {}
    for group in sorted(groups, key=lambda g: g[0] not in pairs):  # consumers first (a stable sort)
        pair = pairs.get(group[0])
        group_plans = plan_group(group, stats[group[0]], pair.tie if pair else None)
        scale = group_plans[group[0]].pre_quant_scale
        if pair is not None and scale is not None:
            fold_into_producer(pair, linears[pair.producer], scale)
            group_plans = {name: plan.but(pre_quant_scale=None) for name, plan in group_plans.items()}
        plans.update(group_plans)
    return plans


class Algorithm:
    """One calibration algorithm. Subclasses override what differs from plain `max`."""

    name: str = ""
    streamed: bool = False  # plans block by block on full-precision weights and activations (changes weights)
    samples_expert_tokens: bool = False  # MoE: its expert search replays a sample of each expert's tokens
    observes_expert_hessians: bool = False  # MoE: collects each expert's input Hessian
    searches_weight_scales: bool = False  # chooses weight scales from the weights alone (data_free_weight_scale)

    def fits(self, fmt: F.Format) -> bool:
        """Whether the algorithm makes sense for the format (ModelOpt's pairing)."""
        raise NotImplementedError

    def plan_block(self, context: BlockContext, linears: Dict[str, nn.Linear]) -> Dict[str, LayerPlan]:
        """The plans of one block's Linears, from statistics the algorithm collects by running it."""
        raise NotImplementedError(f"algorithm {self.name!r} is not layer-streamed")

    def plan_experts(self, w: torch.Tensor, stat, kind: str, fmt: F.Format, group_size) -> Optional[ExpertPlan]:
        """The plan of observed experts' fused weights w (E, N, K) for projection `kind`; None: round
        to nearest with the observed input scales. Smoothing algorithms change `w` in place."""
        return None

    def plan_unobserved_experts(self, w: torch.Tensor, fmt: F.Format, group_size) -> Optional[ExpertPlan]:
        """The plan of experts no calibration token reached (data-free algorithms only); None: round
        to nearest."""
        return None

    def data_free_weight_scale(self, w: torch.Tensor, fmt: F.Format, group_size) -> Optional[torch.Tensor]:
        """A weight scale chosen from the weight alone (no data), or None to use the format's own."""
        return None

    def __repr__(self) -> str:
        return self.name
