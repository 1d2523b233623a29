"""SmoothQuant (`modelopt-format.md` §3.4): migrate activation outliers into the INT8 weights.

Per input channel c: a[c] = w_max[c]^(1-alpha) / x_max[c]^alpha, clamped to [1e-4, 1e4], and 1
for channels that never saw a non-zero activation. `pre_quant_scale = a` multiplies x, W[:, c] is
divided by a[c], and the static input amax becomes max_c(x_max[c] * a[c]).

Default alpha is 0.5, the SmoothQuant paper's balance point; ModelOpt's default of 1.0 moves all
of the range into the weights, which its own notes call aggressive.
"""

from typing import Dict, List

import torch
from torch import nn

from .smoothing import apply_pre_quant_scale, stacked_weight

DEFAULT_ALPHA = 0.5


def smoothquant_scale(w: torch.Tensor, x_channel_amax: torch.Tensor, alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """The per-input-channel `pre_quant_scale` (K,) for weight(s) w (N, K) and activation amax (K,)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothquant alpha must be in [0, 1], got {alpha!r}")
    w_max = w.abs().amax(dim=0).float().clamp(min=1e-8)
    x_max = x_channel_amax.float()
    scale = (w_max.pow(1 - alpha) / x_max.clamp(min=1e-8).pow(alpha)).clamp(1e-4, 1e4)
    return torch.where(x_max > 2**-31, scale, torch.ones_like(scale))


def smoothquant_group_plan(linears: Dict[str, nn.Linear], group: List[str], x_channel_amax: torch.Tensor) -> dict:
    """Smooth a group of Linears sharing one input, in place; {name: {"pre_quant_scale", "input_amax"}}."""
    scale = smoothquant_scale(stacked_weight(linears, group), x_channel_amax)
    scale = apply_pre_quant_scale([linears[name] for name in group], scale)
    input_amax = (x_channel_amax.float() * scale.float()).amax()
    return {name: {"pre_quant_scale": scale, "input_amax": input_amax} for name in group}
