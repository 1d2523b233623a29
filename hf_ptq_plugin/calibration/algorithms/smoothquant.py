"""`smoothquant`: per-channel scales that move activation outliers into the weights (INT8 W8A8).

Siblings reading one input share one scale; its alpha is searched per group on a token sample of
that input, so SmoothQuant is layer-streamed: one block's samples at a time.
"""

from typing import Dict, Optional

import torch
from torch import nn

from ... import formats as F
from ...modules.layer_plan import LayerPlan
from ..expert_smoothing import ExpertPlan, expert_smoothquant_plan
from ..smoothquant import smoothquant_group_plan
from .base import Algorithm, BlockContext, plan_smoothed_groups


class SmoothQuant(Algorithm):
    name = "smoothquant"
    streamed = True
    samples_expert_tokens = True

    def fits(self, fmt: F.Format) -> bool:
        return fmt.act == F.INT8

    def plan_block(self, context: BlockContext, linears: Dict[str, nn.Linear]) -> Dict[str, LayerPlan]:
        return plan_smoothed_groups(context, linears, lambda group, s, tie: smoothquant_group_plan(
            linears, group, s.channel_amax, s.sample, context.fmt, tie))

    def plan_experts(self, w: torch.Tensor, stat, kind: str, fmt: F.Format, group_size) -> Optional[ExpertPlan]:
        return expert_smoothquant_plan(w, stat, kind, fmt)
