"""`gptq`: column-by-column rounding with error feedback on each layer's input Hessian.

Layer-streamed: the Hessians of one block's inputs are collected, then its weights are rounded;
the math is in calibration/gptq.py. Experts get GPTQ on the Hessian of the tokens routed to each.
"""

from typing import Dict, Optional

import torch
from torch import nn

from ... import formats as F
from ...modules.layer_plan import LayerPlan
from ..blocks import statistics_pass
from ..expert_smoothing import ExpertPlan
from ..gptq import HessianFactor, HessianStats, gptq_quantize
from ..selection import fused_groups, fused_weight_amax
from ..smoothing import groups_sharing_input
from ..stats import InputStats, input_hooks
from .base import Algorithm, BlockContext


class GPTQ(Algorithm):
    name = "gptq"
    streamed = True
    observes_expert_hessians = True

    def fits(self, fmt: F.Format) -> bool:
        fp8_grid = fmt.weight == F.FP8 and fmt.weight_granularity in (F.PER_TENSOR, F.PER_CHANNEL)
        return (fmt.weight in (F.INT4, F.INT8, F.NVFP4) or fp8_grid) and not fmt.fp8_weight_scale_2

    def plan_block(self, context: BlockContext, linears: Dict[str, nn.Linear]) -> Dict[str, LayerPlan]:
        fmt = context.fmt
        groups = groups_sharing_input(list(linears), fused_groups(linears))
        leaders = {group[0]: linears[group[0]] for group in groups}
        hessians = {name: HessianStats() for name in leaders}
        # The input amax only sets static activation scales: weight-only formats skip that statistic.
        stats = {name: InputStats() for name in leaders} if fmt.needs_calibration_data else {}
        with input_hooks(leaders, hessians, context.token_mask), \
                input_hooks({n: leaders[n] for n in stats}, stats, context.token_mask):
            statistics_pass(context.block, context.inputs, leaders, context.token_mask, context.outputs)
        for s in list(hessians.values()) + list(stats.values()):
            s.reduce_across_processes()
        # NVFP4's weight_scale_2, per-tensor FP8's weight_scale: one per fused group, as engines need.
        global_amax = fused_weight_amax(linears) if fmt.fused_siblings_share_weight_scale else {}
        plans = {}
        # The widest input first: its factor, calibration's largest allocation (a down_proj's is K^2 fp32),
        # is then made while no plan holds a weight yet.
        for group in sorted(groups, key=lambda g: -linears[g[0]].in_features):
            # One factorization per input, for every Linear that reads it (q/k/v, gate/up).
            factor = HessianFactor(hessians.pop(group[0]))
            for name in group:
                weight, scale = factor.quantize(linears[name].weight, fmt, context.group_size,
                                                global_amax=global_amax.get(name))
                amax = stats[group[0]].amax if stats else None
                plans[name] = LayerPlan(input_amax=amax, weight=weight, weight_scale=scale)
        return plans

    def plan_experts(self, w: torch.Tensor, stat, kind: str, fmt: F.Format, group_size) -> Optional[ExpertPlan]:
        """GPTQ for every expert that saw tokens; the others are rounded to nearest."""
        chosen = {}
        for e in range(w.shape[0]):
            if int(stat.tokens[e]) > 0:
                # The expert's Hessian is made for this call: it becomes the factor in its own storage.
                weight, scale = gptq_quantize(w[e], stat.hessian(kind, e), fmt, group_size, in_place=True)
                chosen[e] = LayerPlan(weight=weight, weight_scale=scale)
        return ExpertPlan(None, None, chosen)
