"""AWQ-lite (`docs/modelopt-facts.md` §3.5): per-input-channel scales found by a grid search.

For a group of Linears that read the same input x (T, K), with stacked weights W (N, K):
    w_mean[c] = mean over rows of |W[o, c]| / (amax of W[o, :] in c's quantization block)
    x_mean[c] = mean |x[:, c]| over all calibration tokens
    for alpha in 0, 0.1, ..., 1:  s = x_mean^alpha / w_mean^(1 - alpha), normalized by sqrt(max * min)
        loss = mean((Q_x(x / s) @ Q_w(W * s).T - x @ W.T)^2)
and the best s becomes `pre_quant_scale = 1 / s` (the weight is multiplied by s).

Unlike ModelOpt, which measures weight error only, the loss here includes the activation
quantization of formats that quantize activations (W4A8, NVFP4-AWQ), with the static scale
that the smoothed input will get: from the per-channel max |x| over every calibration token (of
every process), max_c(x_amax[c] / s[c]), not from the sample's own max. Weight-only formats are
unaffected by this.

The loss is a sum over output rows, and the scale is one per input channel, so a group wider than
MAX_SEARCH_ROWS rows is scored on an evenly strided subset of its rows: an estimate of the same loss
at a fraction of the cost (a Llama-3-8B gate/up pair has 28672 rows, 7x the cap, and its search
was most of that model's calibration time). Groups up to the cap (every SmolLM2 group) use all rows.
"""

from typing import Callable, Optional

import torch

from .. import formats as F
from ..backends import cpu_blas
from ..backends.cpu_activations import fast_quantize_activation
from ..backends.fake_quantize import fake_quantize_weight
from ..numerics import input_scale_from_amax
from .distributed import all_reduce
from .smoothing import evenly_strided

ALPHA_GRID = tuple(i * 0.1 for i in range(11))  # 0, 0.1, ..., 1
MEAN_ELEMENTS = 2**24  # weights made fp32 at a time for the normalized weight mean (64 MB)
MAX_SEARCH_ROWS = 4096  # output rows a group's loss is measured on (an evenly strided subset above this)


def awq_search(w: torch.Tensor, x: torch.Tensor, x_mean: torch.Tensor, x_amax: torch.Tensor, fmt: F.Format,
               group_size: int, tie: Optional[Callable] = None) -> torch.Tensor:
    """The best smoothing factor s (K,) for stacked weights w (N, K) and sampled inputs x (T, K),
    given the per-channel mean and max |x| (K,) over all calibration tokens. `tie` (scale -> scale)
    constrains every candidate scale, e.g. to one that folds into the layer before."""
    w_mean = normalized_weight_mean(w, block_size(fmt, group_size))
    return best_scale(alpha_losses(w, x, x_mean, x_amax, w_mean, fmt, group_size, tie), x_mean, w_mean, tie)


def alpha_losses(w: torch.Tensor, x: torch.Tensor, x_mean: torch.Tensor, x_amax: torch.Tensor, w_mean: torch.Tensor,
                 fmt: F.Format, group_size: int, tie: Optional[Callable] = None) -> torch.Tensor:
    """(len(ALPHA_GRID),) summed squared output errors on x (T, K) of w (N, K) smoothed by each alpha's scale.

    `x_mean`, `x_amax` and `w_mean` (K,) may describe more than w and x (all experts of a MoE
    layer, whose losses are then summed to choose their one shared scale).
    """
    w, x = search_rows(w).float(), x.float()
    output_error = _squared_output_error(w, x, x_amax.float(), fmt, group_size, len(ALPHA_GRID))
    return torch.stack([output_error(scale_for(a, x_mean, w_mean, tie)) for a in ALPHA_GRID])


def search_rows(w: torch.Tensor) -> torch.Tensor:
    """The rows of w (N, K) the loss is measured on: all, or every n-th when N > MAX_SEARCH_ROWS."""
    return evenly_strided(w, MAX_SEARCH_ROWS)


def best_scale(losses: torch.Tensor, x_mean: torch.Tensor, w_mean: torch.Tensor,
               tie: Optional[Callable] = None) -> torch.Tensor:
    """The scale of the alpha with the least loss summed over processes."""
    # Several processes: each holds its own token sample; summed errors pick one alpha for all.
    return scale_for(ALPHA_GRID[int(all_reduce(losses, "sum").argmin())], x_mean, w_mean, tie)


def block_size(fmt: F.Format, group_size: Optional[int]) -> int:
    return group_size if fmt.weight in (F.INT4, F.NVFP4) else 1


def normalized_weight_mean(w: torch.Tensor, block: int) -> torch.Tensor:
    """mean over rows of |w| / (its block's amax), (K,) fp32. A weight over MEAN_ELEMENTS is summed
    a slice of rows at a time, so its fp32 temporaries stay small."""
    n, k = w.shape
    rows = max(1, MEAN_ELEMENTS // k)
    if n <= rows:
        return _normalized(w, block).mean(dim=0)
    return sum(_normalized(w[start:start + rows], block).sum(dim=0) for start in range(0, n, rows)) / n


def _normalized(w: torch.Tensor, block: int) -> torch.Tensor:
    blocks = w.float().abs().view(w.shape[0], -1, block)
    return (blocks / blocks.amax(dim=-1, keepdim=True).clamp(min=1e-12)).view(w.shape)


def scale_for(alpha: float, x_mean: torch.Tensor, w_mean: torch.Tensor, tie: Optional[Callable] = None) -> torch.Tensor:
    scale = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(1e-4, 1e4)
    scale = scale / (scale.max() * scale.min()).sqrt()
    return scale if tie is None else tie(scale)


def _squared_output_error(w, x, x_amax, fmt: F.Format, group_size: int, evaluations: int) -> Callable:
    """scale -> the summed squared difference between the smoothed, quantized layer's outputs on x
    and the original ones.

    Weight-only formats leave x / s unquantized, so the difference is x @ E.T with
    E = Q(w * s) / s - w, and its squared sum is sum((E @ G) * E) for the Gram matrix G = x.T @ x:
    N K^2 operations per scale instead of T K N, after T K^2 once. That form is used when it costs
    less over all `evaluations` (for SmolLM2's q/k/v and gate/up, 3x less at 2048 tokens).
    """
    (n, k), tokens = w.shape, x.shape[0]
    if fmt.act is None and k * (tokens + evaluations * n) < evaluations * tokens * n:
        gram = cpu_blas.mm(x.T, x)
        return lambda scale: _gram_error(fake_quantize_weight(w * scale, fmt, group_size) / scale - w, gram)
    reference = cpu_blas.mm(x, w.T)
    return lambda scale: (_quantized_output(w, x, x_amax, scale, fmt, group_size) - reference).pow(2).sum()


def _gram_error(error: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    return (cpu_blas.mm(error, gram) * error).sum()


def _quantized_output(w, x, x_amax, scale, fmt: F.Format, group_size: int) -> torch.Tensor:
    w_q = fake_quantize_weight(w * scale, fmt, group_size)
    input_scale = input_scale_from_amax((x_amax / scale).amax(), fmt) if fmt.needs_calibration_data else None
    return cpu_blas.mm(fast_quantize_activation(x / scale, fmt, input_scale), w_q.T)
