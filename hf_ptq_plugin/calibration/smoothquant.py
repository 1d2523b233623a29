"""SmoothQuant (`docs/modelopt-facts.md` §3.4): migrate activation outliers into the INT8 weights.

Per input channel c: a[c] = w_max[c]^(1-alpha) / x_max[c]^alpha, clamped to [1e-4, 1e4], and 1
for channels that never saw a non-zero activation. `pre_quant_scale = a` multiplies x, W[:, c] is
divided by a[c], and the static input amax becomes max_c(x_max[c] * a[c]).

alpha is searched per group of Linears sharing an input, over 0, 0.1, ..., 1: the one whose
W8A8 output (per-channel INT8 weights, the static per-tensor INT8 input scale the smoothed
activations will really get) is closest to the full-precision output on a sample of calibration
tokens. No single alpha suits every layer: on SmolLM2-135M a fixed 0.5 (the paper's balance point)
leaves perplexity at 39.9 and ModelOpt's fixed 1.0 at 31.3, where the search reaches 30.75
(BENCHMARKS.md). Without a token sample, alpha is DEFAULT_ALPHA.

The loss is a sum over tokens and output rows, so it is measured on at most SEARCH_TOKENS tokens
and SEARCH_ROWS rows of each group, evenly strided (the weight's per-channel max still comes from
every row). The search had been most of SmoothQuant's calibration time; the subsets cost a third of
it. On SmolLM2-135M they pick the alpha of the whole sample (2048 tokens) and all rows in all but a
few of its 120 groups (off by 0.1 there), and perplexity moves by 0.2% (BENCHMARKS.md).
"""

from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from .. import formats as F
from ..modules.layer_plan import LayerPlan
from ..numerics import input_scale_from_amax, quantize_activation
from ..numerics.weights import fake_quantize_weight
from .distributed import all_reduce
from .smoothing import apply_pre_quant_scale, evenly_strided, stacked_weight

DEFAULT_ALPHA = 1.0  # ModelOpt's default, used only when no token sample is at hand
ALPHAS = tuple(i / 10 for i in range(11))
SEARCH_TOKENS = 1024  # tokens of the sample the loss is measured on (an evenly strided subset above this)
SEARCH_ROWS = 1024  # output rows of a group the loss is measured on (likewise)


def smoothquant_scale(w: torch.Tensor, x_channel_amax: torch.Tensor, alpha: float = DEFAULT_ALPHA,
                      w_channel_amax: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The per-input-channel `pre_quant_scale` (K,) for weight(s) w (N, K) and activation amax (K,).

    `w_channel_amax` (K,), when given, replaces w's own per-channel max |w| (the max over all the
    experts of a MoE layer, which share one scale).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothquant alpha must be in [0, 1], got {alpha!r}")
    w_max = w.abs().amax(dim=0) if w_channel_amax is None else w_channel_amax
    w_max, x_max = w_max.float().clamp(min=1e-8), x_channel_amax.float()
    scale = (w_max.pow(1 - alpha) / x_max.clamp(min=1e-8).pow(alpha)).clamp(1e-4, 1e4)
    return torch.where(x_max > 2**-31, scale, torch.ones_like(scale))


def search_alpha(w: torch.Tensor, x_channel_amax: torch.Tensor, x_sample: torch.Tensor, fmt: F.Format,
                 tie: Optional[Callable] = None) -> float:
    """The alpha of ALPHAS whose smoothed, quantized output on x_sample (T, K) is closest to x @ w.T."""
    return best_alpha(alpha_errors(w, x_channel_amax, x_sample, fmt, tie=tie))


def alpha_errors(w: torch.Tensor, x_channel_amax: torch.Tensor, x_sample: torch.Tensor, fmt: F.Format,
                 w_channel_amax: Optional[torch.Tensor] = None, tie: Optional[Callable] = None) -> torch.Tensor:
    """(len(ALPHAS),) summed squared differences between the smoothed, quantized output of w on
    x_sample and x_sample @ w.T, per alpha (`w_channel_amax`: see smoothquant_scale; `tie`: a
    constraint on the scale, e.g. one that folds into the layer before). Measured on subsets of
    x_sample's tokens and w's rows (module docstring)."""
    if w_channel_amax is None:
        w_channel_amax = w.abs().amax(dim=0)  # of every row: the scale the layer will really get
    w, x = evenly_strided(w, SEARCH_ROWS).float(), evenly_strided(x_sample, SEARCH_TOKENS).float()
    x_amax = x_channel_amax.float()
    reference = x @ w.T
    errors = []
    for alpha in ALPHAS:
        a = _tied(smoothquant_scale(w, x_amax, alpha, w_channel_amax), tie)
        input_scale = input_scale_from_amax((x_amax * a).amax(), fmt)
        output = quantize_activation(x * a, fmt, input_scale) @ fake_quantize_weight(w / a, fmt).T
        errors.append((output - reference).pow(2).sum())
    return torch.stack(errors)


def best_alpha(errors: torch.Tensor) -> float:
    # Several processes: each holds its own token sample; summed errors pick one alpha for all.
    return ALPHAS[int(all_reduce(errors, "sum").argmin())]


def smoothquant_group_plan(linears: Dict[str, nn.Linear], group: List[str], x_channel_amax: torch.Tensor,
                           x_sample: Optional[torch.Tensor] = None, fmt: Optional[F.Format] = None,
                           tie: Optional[Callable] = None) -> Dict[str, LayerPlan]:
    """Smooth a group of Linears sharing one input, in place; {name: its plan}.

    With a token sample (and the format), alpha is searched (`search_alpha`); else DEFAULT_ALPHA.
    """
    w = stacked_weight(linears, group)
    alpha = DEFAULT_ALPHA if x_sample is None else search_alpha(w, x_channel_amax, x_sample, fmt, tie)
    scale = _tied(smoothquant_scale(w, x_channel_amax, alpha), tie)
    scale = apply_pre_quant_scale([linears[name] for name in group], scale)
    input_amax = (x_channel_amax.float() * scale.float()).amax()
    return {name: LayerPlan(pre_quant_scale=scale, input_amax=input_amax) for name in group}


def _tied(scale: torch.Tensor, tie: Optional[Callable]) -> torch.Tensor:
    return scale if tie is None else tie(scale)
