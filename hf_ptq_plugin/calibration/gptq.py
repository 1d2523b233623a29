"""GPTQ (`docs/modelopt-facts.md` §3.8) for INT4 group-wise, INT8 per-channel, FP8 per-tensor or
per-channel, and NVFP4 weights.

Per Linear, with the Hessian H = (2/n) sum x x^T of its inputs: dead columns are zeroed, H is
damped by `perc_damp * mean(diag H)`, and columns are quantized in blocks of 128, each column's
rounding error spread over the columns not yet quantized through the upper Cholesky factor of
H^-1. Error feedback needs only a rounding grid, so FP8's (E4M3 values times a fixed scale) and
NVFP4's (E2M1 values times fixed FP8 block scales and the global scale) work as the integers' do.

Column order: with `act_order` (the default, llm-compressor's "static" activation ordering) the
columns are visited by decreasing diag(H), so the inputs that carry the most energy are rounded
first while the most columns remain to absorb their error; every scale is fixed up front from
the original weights, so groups keep their columns and the checkpoint needs no permutation
index. Without it, columns go left to right and an INT4 group's scale is taken when the loop
reaches the group, from the weights as earlier columns' error feedback left them (as GPTQ's
reference implementation does).

INT4 scales start from amax / 7.5, not the amax / 7 of round-to-nearest (ModelOpt's): all 16
codes are used (a group's largest-magnitude weight lands on 7 if positive, on -8 if negative) and
the step is 7% finer; the engines read any scale. Each group's scale is then clipped to the ratio
of that (0.50, 0.52, ..., 1.00) with the least rounding error weighted by diag(H), the input
energy. On SmolLM2's first four blocks at group 64 (held-out tokens), act-order lowers GPTQ's
summed relative output error by 18% (0.120 -> 0.098) and the amax / 7.5 scales by another 10%
(-> 0.088); with the clipped scales, GPTQ is the most accurate INT4 algorithm on the whole model
(BENCHMARKS.md).

The scales are returned, so the QuantLinear stores exactly the codes GPTQ chose: recomputing
scales afterwards would re-round them.
"""

from typing import Callable, Tuple

import torch

from .. import formats as F
from ..numerics.fp8 import FP8_MAX
from ..numerics.integer import INT8_MAX
from ..numerics.nvfp4 import NVFP4_BLOCK, e2m1_round, nvfp4_global_scale
from ..numerics.scales import scale_from_amax
from ..numerics.weights import fp8_weight_scale
from .clipping import mse_weight_scale, weighted_nvfp4_block_scales
from .distributed import all_reduce, all_reduce_number

PERC_DAMP = 0.01
COLUMN_BLOCK = 128
ACT_ORDER = True
INT4_GPTQ_MAX = 7.5  # amax / 7.5: all 16 codes, see the module docstring
TRIANGULAR_BLOCK = 512  # columns of L^-1 solved at a time: a few (K, 512) temporaries
GRAM_STRIP = 192  # rows of x^T x per GEMM in symmetric_gram: the fastest of 96-512 at K = 576 and 1536


def symmetric_gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x (K, K) for x (T, K), computing only the strips on and right of the diagonal and
    mirroring them. These GEMMs are GPTQ's largest cost after the forward passes, and this takes
    fewer multiply-adds than `x.T @ x` (about half for wide inputs).
    Exactly symmetric, as the Cholesky needs."""
    k = x.shape[1]
    gram = torch.empty(k, k, dtype=x.dtype, device=x.device)
    for start in range(0, k, GRAM_STRIP):
        stop = min(start + GRAM_STRIP, k)
        strip = x[:, start:stop].T @ x[:, start:]  # rows start:stop, columns start: (strided views: no copy)
        gram[start:stop, start:] = strip
        gram[stop:, start:stop] = strip[:, stop - start:].T
    return gram


class HessianStats:
    """Running (2/n) sum x x^T of a Linear's inputs, in fp32."""

    def __init__(self):
        self.hessian, self.num_tokens = None, 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, K)
        total = self.num_tokens + x.shape[0]
        contribution = symmetric_gram(x).mul_(2.0 / total)
        if self.hessian is None:
            self.hessian = contribution
        else:
            self.hessian = self.hessian.mul_(self.num_tokens / total).add_(contribution)
        self.num_tokens = total

    def reduce_across_processes(self) -> None:
        """The Hessian of all processes' tokens: token-weighted sum, divided by the total count."""
        total = all_reduce_number(self.num_tokens, "sum")
        if self.hessian is not None and total > self.num_tokens:
            self.hessian = all_reduce(self.hessian * self.num_tokens, "sum") / total
        self.num_tokens = int(total)


def gptq_weight_scale(w: torch.Tensor, fmt: F.Format, group_size: int, global_amax: torch.Tensor,
                      input_energy: torch.Tensor) -> torch.Tensor:
    """The scales GPTQ quantizes with: INT4 (N, K / g), INT8 (N,), FP8 () or (N,), NVFP4 e4m3 (N, K / 16).

    INT4 group scales (ratios of amax / 7.5) and NVFP4 block scales (ratios of the max-derived
    ones) are searched for the least squared rounding error weighted by `input_energy`, diag(H).
    """
    if fmt.weight == F.INT4:
        return mse_weight_scale(w, fmt, group_size, importance=input_energy, int4_max=INT4_GPTQ_MAX)
    if fmt.weight == F.INT8:
        return scale_from_amax(w.abs().amax(dim=1).float(), INT8_MAX)
    if fmt.weight == F.NVFP4:
        return weighted_nvfp4_block_scales(w, nvfp4_global_scale(global_amax), input_energy)
    if fmt.weight == F.FP8 and fmt.weight_granularity == F.PER_TENSOR:  # amax over fused siblings (or w's own)
        return scale_from_amax(global_amax, FP8_MAX)
    if fmt.weight == F.FP8 and fmt.weight_granularity == F.PER_CHANNEL:
        return fp8_weight_scale(w, fmt, group_size)
    raise ValueError(f"gptq supports INT4, INT8, NVFP4 and per-tensor or per-channel FP8 weights; "
                     f"got qformat {fmt.name!r}")


def _column_grid(w: torch.Tensor, scale: torch.Tensor, fmt: F.Format, group_size: int,
                 global_amax: torch.Tensor) -> Tuple[torch.Tensor, Callable]:
    """(per-element step (N, K), rounding of a column of w / step onto the format's grid)."""
    if fmt.weight == F.INT4:
        return scale.repeat_interleave(group_size, dim=1), lambda y: torch.round(y).clamp(-8, 7)
    if fmt.weight == F.INT8:
        return scale[:, None].expand_as(w).clone(), lambda y: torch.round(y).clamp(-128, 127)
    if fmt.weight == F.NVFP4:
        step = (scale.float() * nvfp4_global_scale(global_amax)).repeat_interleave(NVFP4_BLOCK, dim=1)
        return step, e2m1_round
    step = scale.expand_as(w) if scale.dim() == 0 else scale[:, None].expand_as(w)
    # fp8_quantize(y, 1): y / 1 is y, so only the clamp and the cast remain (y is a fresh tensor).
    return step.clone(), lambda y: y.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()


class InverseHessian:
    """What GPTQ takes from one input's Hessian, computed once for every Linear that reads it
    (q/k/v, gate/up): dead input channels, the column order, and the upper Cholesky factor of the
    damped H^-1 in that order."""

    def __init__(self, hessian, perc_damp: float = PERC_DAMP, act_order: bool = ACT_ORDER):
        """`hessian`: the (K, K) matrix, or a HessianStats whose matrix is taken out of it, so that
        it is freed as soon as it is copied into column order (a down_proj's is K^2 fp32)."""
        if isinstance(hessian, HessianStats):
            stats, hessian = hessian, hessian.hessian
            stats.hessian = None
        energy = hessian.diagonal().float().clone()
        self.dead = energy == 0
        energy[self.dead] = 1.0  # a dead channel's row and column are zero: a unit pivot isolates it
        self.act_order = act_order
        self.order = torch.argsort(energy, descending=True, stable=True) if act_order else torch.arange(len(energy))
        self.energy = energy  # each input channel's, the weights of the scale search
        reverse = self.order.flip(0)
        reversed_h = hessian.float()[reverse[:, None], reverse]  # one gather: no intermediate copy
        del hessian
        reversed_h.diagonal().copy_(energy[reverse] + perc_damp * energy.mean())
        self.factor = _inverse_hessian_factor(reversed_h)

    @torch.no_grad()
    def quantize(self, w: torch.Tensor, fmt: F.Format, group_size: int, global_amax=None):
        """(dequantized weight (N, K) fp32 on the format's grid, its scale) for weight w (N, K).

        `global_amax` (NVFP4; per-tensor FP8) is the amax behind `weight_scale_2` (the FP8
        `weight_scale`), shared by fused layers.
        """
        w = w.float().clone()
        if global_amax is None:  # the original weight's, as QuantLinear will derive weight_scale_2
            global_amax = w.abs().amax()
        w[:, self.dead] = 0.0
        scale = gptq_weight_scale(w, fmt, group_size, global_amax, self.energy)
        step, to_grid = _column_grid(w, scale, fmt, group_size, global_amax)
        # Work on the transpose: column i of w is then the contiguous row i, which the updates sweep.
        wt, step_t = w[:, self.order].t().contiguous(), step[:, self.order].t().contiguous()
        del w, step
        dynamic_groups = fmt.weight == F.INT4 and not self.act_order
        energy, hinv, k = self.energy[self.order], self.factor, wt.shape[0]
        pivots = hinv.diagonal()
        for start in range(0, k, COLUMN_BLOCK):
            end = min(start + COLUMN_BLOCK, k)
            errors = torch.empty_like(wt[start:end])
            for i in range(start, end):
                if dynamic_groups and i % group_size == 0:  # the group's scale, from the updated weights
                    group_w, group_energy = wt[i:i + group_size].t(), energy[i:i + group_size]
                    scale[:, i // group_size] = gptq_weight_scale(group_w, fmt, group_size, global_amax,
                                                                  group_energy)[:, 0]
                    step_t[i:i + group_size] = scale[None, :, i // group_size]
                # One column at a time, where the op count is the cost: results go straight into place.
                s, column = step_t[i], wt[i]
                q = to_grid(column / s).mul_(s)
                error = torch.div(column.sub_(q), pivots[i], out=errors[i - start])
                wt[i + 1:end].addr_(hinv[i, i + 1:end], error, alpha=-1.0)  # spread over the block's later columns
                column.copy_(q)
            wt[end:].addmm_(hinv[start:end, end:].t(), errors, alpha=-1.0)  # and over every later block
        return wt.t()[:, torch.argsort(self.order)].contiguous(), scale


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, fmt: F.Format, group_size: int,
                  perc_damp: float = PERC_DAMP, act_order: bool = ACT_ORDER, global_amax=None):
    """GPTQ of one weight w (N, K) on its input Hessian: `InverseHessian(...).quantize(...)`."""
    return InverseHessian(hessian, perc_damp, act_order).quantize(w, fmt, group_size, global_amax)


def _inverse_hessian_factor(reversed_h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U), given J H J (J the reversal), which it consumes.

    Cholesky J H J = L L^T gives H = (J L J)(J L J)^T, so H^-1 = U^T U with U = J L^-1 J: upper
    triangular with a positive diagonal, hence the factor itself. One Cholesky and one triangular
    inverse take half the operations of inverting H and factoring the inverse, and no more than
    two K x K matrices live at once.
    """
    lower = torch.linalg.cholesky(reversed_h)
    reversed_h.set_()  # frees it now: the caller's reference would keep it through the inverse
    return _flipped_lower_inverse(lower)


def _flipped_lower_inverse(lower: torch.Tensor) -> torch.Tensor:
    """U = J L^-1 J for lower-triangular L: the inverse of the upper-triangular R = J L J.

    Block rows of U from the bottom up: R[I, I] U[I, a:] = I[I, a:] - R[I, b:] U[b:, a:] for the
    block I = a:b, whose right side is GEMMs with the rows already solved. U[b:, b:] is upper
    triangular, so its column block c:d is zero below row d and needs only R[I, b:d]: half the
    multiply-adds of one full product (n^3 / 3 in all, a down_proj's 14336-column inverse's whole
    cost). R's blocks are read from L flipped, so beside L and U only (block, K) temporaries exist.
    """
    n, block = lower.shape[0], TRIANGULAR_BLOCK
    upper = torch.zeros(n, n, dtype=lower.dtype, device=lower.device)
    for a in reversed(range(0, n, block)):
        b = min(a + block, n)
        rhs = torch.zeros(b - a, n - a, dtype=lower.dtype, device=lower.device)
        rhs[:, :b - a].diagonal().fill_(1.0)
        r_right = lower[n - b:n - a, :n - b].flip(0, 1)  # R[a:b, b:], as R[i, j] = L[n-1-i, n-1-j]
        for c in range(b, n, block):
            d = min(c + block, n)
            torch.mm(r_right[:, :d - b], upper[b:d, c:d], out=rhs[:, c - a:d - a]).neg_()
        r_diagonal = lower[n - b:n - a, n - b:n - a].flip(0, 1)  # R[a:b, a:b], upper triangular
        upper[a:b, a:] = torch.linalg.solve_triangular(r_diagonal, rhs, upper=True)
    return upper
