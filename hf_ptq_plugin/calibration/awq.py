"""AWQ-lite (`modelopt-format.md` §3.5): per-input-channel scales found by a grid search.

For a group of Linears that read the same input x (T, K), with stacked weights W (N, K):
    w_mean[c] = mean over rows of |W[o, c]| / (amax of W[o, :] in c's quantization block)
    x_mean[c] = mean |x[:, c]| over all calibration tokens
    for alpha in 0, 0.1, ..., 1:  s = x_mean^alpha / w_mean^(1 - alpha), normalized by sqrt(max * min)
        loss = mean((Q_x(x / s) @ Q_w(W * s).T - x @ W.T)^2)
and the best s becomes `pre_quant_scale = 1 / s` (the weight is multiplied by s).

Unlike ModelOpt, which measures weight error only, the loss here includes the activation
quantization of formats that quantize activations (W4A8, NVFP4-AWQ), with the static scale
that the smoothed input would get; weight-only formats are unaffected by this.
"""

from typing import Optional

import torch

from .. import formats as F
from ..numerics import input_scale_from_amax, quantize_activation
from ..numerics.weights import fake_quantize_weight
from .distributed import all_reduce

ALPHA_STEP = 0.1


def awq_search(w: torch.Tensor, x: torch.Tensor, x_mean: torch.Tensor, fmt: F.Format, group_size: int,
               alpha_step: float = ALPHA_STEP) -> torch.Tensor:
    """The best smoothing factor s (K,) for stacked weights w (N, K) and sampled inputs x (T, K)."""
    w, x = w.float(), x.float()
    reference = x @ w.T
    w_mean = _normalized_weight_mean(w, _block_size(fmt, group_size))
    alphas = [i * alpha_step for i in range(int(round(1 / alpha_step)) + 1)]
    squared_errors = torch.stack([(_quantized_output(w, x, _scale_for(a, x_mean, w_mean), fmt, group_size)
                                   - reference).pow(2).sum() for a in alphas])
    # Several processes: each holds its own token sample; summed errors pick one alpha for all.
    squared_errors = all_reduce(squared_errors, "sum")
    return _scale_for(alphas[int(squared_errors.argmin())], x_mean, w_mean)


def _block_size(fmt: F.Format, group_size: Optional[int]) -> int:
    return group_size if fmt.weight in (F.INT4, F.NVFP4) else 1


def _normalized_weight_mean(w: torch.Tensor, block: int) -> torch.Tensor:
    n, k = w.shape
    blocks = w.abs().view(n, k // block, block)
    normalized = blocks / blocks.amax(dim=-1, keepdim=True).clamp(min=1e-12)
    return normalized.view(n, k).mean(dim=0)


def _scale_for(alpha: float, x_mean: torch.Tensor, w_mean: torch.Tensor) -> torch.Tensor:
    scale = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(1e-4, 1e4)
    return scale / (scale.max() * scale.min()).sqrt()


def _quantized_output(w, x, scale, fmt: F.Format, group_size: int) -> torch.Tensor:
    w_q = fake_quantize_weight(w * scale, fmt, group_size)
    x_s = x / scale
    input_scale = input_scale_from_amax(x_s.abs().amax(), fmt) if fmt.needs_calibration_data else None
    return quantize_activation(x_s, fmt, input_scale) @ w_q.T
