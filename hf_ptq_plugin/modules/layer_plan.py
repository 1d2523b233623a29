"""LayerPlan: what calibration decided for one Linear (or one expert's projection), as typed fields.

A field left None is computed from the weight when the layer is quantized (round to nearest with
the format's own scales), so an empty plan is plain `max` calibration of the weights.
"""

from dataclasses import dataclass, replace
from typing import Optional

import torch


@dataclass
class LayerPlan:
    input_amax: Optional[torch.Tensor] = None  # 0-d: amax of the (pre-scaled) input, for static input scales
    pre_quant_scale: Optional[torch.Tensor] = None  # (K,): the input is multiplied by it (AWQ, SmoothQuant)
    weight: Optional[torch.Tensor] = None  # (N, K): replaces the layer's weight (GPTQ's updated weight)
    weight_scale: Optional[torch.Tensor] = None  # searched scales (clipping, MSE, GPTQ) in the format's shape
    weight_global_amax: Optional[torch.Tensor] = None  # 0-d: the second-level scale's amax (NVFP4, W4A8)

    def but(self, **changes) -> "LayerPlan":
        """A copy with `changes` applied (plans of one group start equal, then diverge per layer)."""
        return replace(self, **changes)
