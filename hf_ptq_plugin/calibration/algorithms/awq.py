"""`awq_lite`, `awq_clip`, `awq_full`: AWQ's per-channel scale search and/or its clipping search.

Both searches minimise the output error of a group of Linears reading one input, on a token
sample of it, so AWQ is layer-streamed. The search's math is in calibration/awq.py, the clipping's
in calibration/clipping.py.
"""

from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ... import formats as F
from ...modules.layer_plan import LayerPlan
from ..awq import awq_search
from ..clipping import clip_nvfp4_global_amax, clip_weight_scale
from ..expert_smoothing import ExpertPlan, expert_awq_plan
from ..smoothing import apply_pre_quant_scale, stacked_weight
from ..stats import InputStats
from .base import Algorithm, BlockContext, plan_smoothed_groups


class AWQ(Algorithm):
    streamed = True
    samples_expert_tokens = True

    def __init__(self, name: str, search: bool, clip: bool):
        self.name, self.search, self.clip = name, search, clip

    def fits(self, fmt: F.Format) -> bool:
        return fmt.pre_quant_scale

    def plan_block(self, context: BlockContext, linears: Dict[str, nn.Linear]) -> Dict[str, LayerPlan]:
        return plan_smoothed_groups(context, linears, lambda group, stats, tie: self._plan_group(
            linears, group, stats, context, tie))

    def _plan_group(self, linears, group: List[str], s: InputStats, context: BlockContext,
                    tie: Optional[Callable]) -> Dict[str, LayerPlan]:
        fmt, group_size = context.fmt, context.group_size
        plan, x_sample = LayerPlan(input_amax=s.amax), s.sample
        if self.search:
            scale = awq_search(stacked_weight(linears, group), x_sample, s.channel_mean, s.channel_amax, fmt,
                               group_size, tie)
            pre_quant_scale = apply_pre_quant_scale([linears[name] for name in group], 1.0 / scale)
            x_sample = x_sample * pre_quant_scale.float()
            plan = LayerPlan(pre_quant_scale=pre_quant_scale,
                             input_amax=(s.channel_amax * pre_quant_scale.float()).amax())
        if not self.clip:
            return {name: plan.but() for name in group}
        if fmt.weight == F.NVFP4:
            global_amax = clip_nvfp4_global_amax(stacked_weight(linears, group), x_sample, fmt)
            return {name: plan.but(weight_global_amax=global_amax) for name in group}
        return {name: plan.but(weight_scale=clip_weight_scale(linears[name].weight, x_sample, fmt, group_size))
                for name in group}

    def plan_experts(self, w: torch.Tensor, stat, kind: str, fmt: F.Format, group_size) -> Optional[ExpertPlan]:
        return expert_awq_plan(w, stat, kind, fmt, group_size, self.search, self.clip)
