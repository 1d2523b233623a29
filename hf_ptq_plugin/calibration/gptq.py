"""GPTQ (`modelopt-format.md` §3.8) for INT4 group-wise, INT8 per-channel and FP8 per-tensor or
per-channel weights.

Per Linear, with the Hessian H = (2/n) sum x x^T of its inputs: dead columns are zeroed, H is
damped by `perc_damp * mean(diag H)`, and columns are quantized left to right in blocks of 128,
each column's rounding error spread over the columns not yet quantized through the upper
Cholesky factor of H^-1 (no activation reordering). Error feedback needs only a rounding grid,
so FP8's (E4M3 values times a fixed scale) works as the integers' does.

The scales: an INT4 group's (amax / 7) is taken when the loop reaches the group, from the weights
as earlier columns' error feedback left them (as GPTQ's reference implementation does: a scale
from the original weights would clip or waste range on the updated ones); INT8 rows (amax / 127)
and FP8 tensors or rows (amax / 448) are fixed before the loop. They are returned, so the
QuantLinear stores exactly the codes GPTQ chose: recomputing scales afterwards would re-round them.
"""

import torch

from .. import formats as F
from .distributed import all_reduce, all_reduce_number
from ..numerics.fp8 import FP8_MAX, fp8_quantize
from ..numerics.integer import INT4_MAX, INT8_MAX
from ..numerics.scales import block_amax, scale_from_amax

PERC_DAMP = 0.01
COLUMN_BLOCK = 128


class HessianStats:
    """Running (2/n) sum x x^T of a Linear's inputs, in fp32."""

    def __init__(self):
        self.hessian, self.num_tokens = None, 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, K)
        total = self.num_tokens + x.shape[0]
        contribution = (2.0 / total) * (x.T @ x)
        if self.hessian is None:
            self.hessian = contribution
        else:
            self.hessian = self.hessian * (self.num_tokens / total) + contribution
        self.num_tokens = total

    def reduce_across_processes(self) -> None:
        """The Hessian of all processes' tokens: token-weighted sum, divided by the total count."""
        total = all_reduce_number(self.num_tokens, "sum")
        if self.hessian is not None and total > self.num_tokens:
            self.hessian = all_reduce(self.hessian * self.num_tokens, "sum") / total
        self.num_tokens = int(total)


def gptq_weight_scale(w: torch.Tensor, fmt: F.Format, group_size: int) -> torch.Tensor:
    """The fixed scales GPTQ quantizes with: INT4 (N, K / g), INT8 (N,), FP8 () or (N,)."""
    if fmt.weight == F.INT4:
        return scale_from_amax(block_amax(w, group_size), INT4_MAX)
    if fmt.weight == F.INT8:
        return scale_from_amax(w.abs().amax(dim=1).float(), INT8_MAX)
    if fmt.weight == F.FP8 and fmt.weight_granularity == F.PER_TENSOR:
        return scale_from_amax(w.abs().amax().float(), FP8_MAX)
    if fmt.weight == F.FP8 and fmt.weight_granularity == F.PER_CHANNEL:
        return scale_from_amax(w.abs().amax(dim=1).float(), FP8_MAX)
    raise ValueError(f"gptq supports INT4, INT8 and per-tensor or per-channel FP8 weights; got qformat {fmt.name!r}")


def _column_grid(w: torch.Tensor, scale: torch.Tensor, fmt: F.Format, group_size: int):
    """(per-element scale (N, K), rounding of a column of w/scale onto the format's grid)."""
    if fmt.weight == F.INT4:
        return scale.repeat_interleave(group_size, dim=1), lambda y: torch.round(y).clamp(-8, 7)
    if fmt.weight == F.INT8:
        return scale[:, None].expand_as(w), lambda y: torch.round(y).clamp(-128, 127)
    column_scale = scale.expand_as(w) if scale.dim() == 0 else scale[:, None].expand_as(w)
    return column_scale, lambda y: fp8_quantize(y, torch.ones((), device=y.device)).float()


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, fmt: F.Format, group_size: int,
                  perc_damp: float = PERC_DAMP):
    """(dequantized weight (N, K) fp32 on the format's grid, its scale) for weight w (N, K)."""
    w = w.float().clone()
    scale = gptq_weight_scale(w, fmt, group_size)
    column_scale, to_grid = _column_grid(w, scale, fmt, group_size)
    hinv = _inverse_hessian_factor(hessian, w, perc_damp)
    k = w.shape[1]
    for start in range(0, k, COLUMN_BLOCK):
        end = min(start + COLUMN_BLOCK, k)
        errors = torch.zeros_like(w[:, start:end])
        for i in range(start, end):
            if fmt.weight == F.INT4 and i % group_size == 0:  # the group's scale, from the updated weights
                scale[:, i // group_size] = scale_from_amax(w[:, i:i + group_size].abs().amax(dim=1), INT4_MAX)
                column_scale[:, i:i + group_size] = scale[:, i // group_size, None]
            s = column_scale[:, i]
            q = to_grid(w[:, i] / s) * s
            error = (w[:, i] - q) / hinv[i, i]
            w[:, i:end] -= error[:, None] * hinv[i, i:end][None, :]
            w[:, i] = q
            errors[:, i - start] = error
        w[:, end:] -= errors @ hinv[start:end, end:]
    return w, scale


def _inverse_hessian_factor(hessian: torch.Tensor, w: torch.Tensor, perc_damp: float) -> torch.Tensor:
    """Upper Cholesky factor of the damped H^-1; zeroes w's dead columns in place."""
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += perc_damp * torch.diag(h).mean() * torch.eye(h.shape[0], device=h.device)
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(h_inv, upper=True)
