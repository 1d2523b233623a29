"""`max` and `mse`: weights from their own values, activations from their observed maxima (one pass).

`mse` chooses each weight block's scale to minimise the weight's squared rounding error, which
needs no data, so it also applies while `from_pretrained` quantizes each weight as it is read.
Neither needs layer streaming, but a weight source that holds one block at a time (a checkpoint
on disk) streams them: `plan_block` observes the block's full-precision inputs, which with
`sequential=False` are exactly those of one pass over the full-precision model.
"""

from typing import Dict, Optional

import torch
from torch import nn

from ... import formats as F
from ...modules.layer_plan import LayerPlan
from ..clipping import mse_weight_scale
from ..expert_smoothing import ExpertPlan
from .base import Algorithm, BlockContext, observe_group_inputs


class Max(Algorithm):
    name = "max"

    def fits(self, fmt: F.Format) -> bool:
        return True

    def plan_block(self, context: BlockContext, linears: Dict[str, nn.Linear]) -> Dict[str, LayerPlan]:
        groups, stats = observe_group_inputs(context, linears)
        return {name: LayerPlan(input_amax=stats[group[0]].amax,
                                weight_scale=self.data_free_weight_scale(linears[name].weight, context.fmt,
                                                                         context.group_size))
                for group in groups for name in group}


class MSE(Max):
    """Max's plan with searched weight scales (`data_free_weight_scale`), for INT4 and INT8 weights."""

    name = "mse"
    searches_weight_scales = True

    def fits(self, fmt: F.Format) -> bool:
        return fmt.weight in (F.INT4, F.INT8)

    def data_free_weight_scale(self, w: torch.Tensor, fmt: F.Format, group_size) -> Optional[torch.Tensor]:
        return mse_weight_scale(w, fmt, group_size)

    def plan_experts(self, w: torch.Tensor, stat, kind: str, fmt: F.Format, group_size) -> Optional[ExpertPlan]:
        return self.plan_unobserved_experts(w, fmt, group_size)

    def plan_unobserved_experts(self, w: torch.Tensor, fmt: F.Format, group_size) -> Optional[ExpertPlan]:
        """Every expert's searched weight scale; the input scales stay the observed ones."""
        scales = {e: LayerPlan(weight_scale=mse_weight_scale(w[e], fmt, group_size)) for e in range(w.shape[0])}
        return ExpertPlan(None, None, scales)
