"""GPTQ (`docs/modelopt-facts.md` §3.8) for INT4 group-wise, INT8 per-channel, FP8 per-tensor or
per-channel, and NVFP4 weights.

Per Linear, with the Hessian H = (2/n) sum x x^T of its inputs: dead columns are zeroed, H is
damped by `perc_damp * mean(diag H)`, and columns are quantized in blocks of 128, each column's
rounding error spread over the columns not yet quantized. GPTQ states the spread with the upper
Cholesky factor of H^-1; it is computed here in its equivalent nearest-plane form (Babai's
algorithm on H's own Cholesky factor, `hessian_algebra.feedback_factor_`), which needs no inverse:
the same rounding in exact arithmetic, for half the factorization's work. Error feedback needs
only a rounding grid, so FP8's (E4M3 values times a fixed scale) and NVFP4's (E2M1 values times
fixed FP8 block scales and the global scale) work as the integers' do.

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

Memory: each Hessian is summed in place and becomes its factor in its own storage
(`hessian_algebra.py`), and a block's widest input (a down_proj's) is factored first, before any
plan holds a weight. A Llama-3-8B block then needs one 14336 x 14336 fp32 matrix at a time, not three.
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
from .hessian_algebra import add_upper_gram_, feedback_factor_, mirror_upper_, permute_rows_, permute_symmetric_

PERC_DAMP = 0.01
COLUMN_BLOCK = 128
COLUMN_SUBBLOCK = 32  # columns whose errors spread one by one, within a block
ACT_ORDER = True
INT4_GPTQ_MAX = 7.5  # amax / 7.5: all 16 codes, see the module docstring


class HessianStats:
    """(2/n) sum x x^T of a Linear's inputs, in fp32. The sum grows in place (upper triangle only);
    `hessian` finishes it once, in place, when it is first read."""

    def __init__(self):
        self._gram, self.num_tokens, self._finished = None, 0, False

    def update(self, x: torch.Tensor) -> None:
        if self._finished:
            raise RuntimeError("HessianStats.update after its hessian was read")
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, K)
        if self._gram is None:
            self._gram = torch.zeros(x.shape[1], x.shape[1], device=x.device)
        add_upper_gram_(self._gram, x)
        self.num_tokens += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        if self._gram is not None and not self._finished:
            mirror_upper_(self._gram).mul_(2.0 / max(self.num_tokens, 1))
            self._finished = True
        return self._gram

    def take_hessian(self) -> torch.Tensor:
        """The Hessian, which this no longer holds: its new owner may change it in place and free it."""
        hessian, self._gram = self.hessian, None
        return hessian

    def reduce_across_processes(self) -> None:
        """The Hessian of all processes' tokens: their sums of x x^T and token counts are added."""
        if self._finished:
            raise RuntimeError("HessianStats.reduce_across_processes after its hessian was read")
        total = all_reduce_number(self.num_tokens, "sum")
        if self._gram is not None and total > self.num_tokens:
            self._gram = all_reduce(self._gram, "sum")
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


def _column_steps(scale: torch.Tensor, fmt: F.Format, group_size: int, global_amax: torch.Tensor,
                  shape) -> Tuple[torch.Tensor, int, Callable]:
    """(steps (G, N): the grid step of each group of `width` consecutive columns, width, rounding of a
    column of w / step onto the format's grid, in place: it is given a fresh tensor), for w of `shape` (N, K).
    A table per group rather than per weight: a down_proj's would be two more copies of it."""
    n, k = shape
    if fmt.weight == F.INT4:
        return scale.t().contiguous(), group_size, lambda y: y.round_().clamp_(-8, 7)
    if fmt.weight == F.INT8:
        return scale[None, :].clone(), k, lambda y: y.round_().clamp_(-128, 127)
    if fmt.weight == F.NVFP4:
        return (scale.float() * nvfp4_global_scale(global_amax)).t().contiguous(), NVFP4_BLOCK, e2m1_round
    steps = scale.expand(1, n) if scale.dim() == 0 else scale[None, :]
    # fp8_quantize(y, 1): y / 1 is y, so only the clamp and the cast remain.
    return steps.float().clone(), k, lambda y: y.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()


class HessianFactor:
    """What GPTQ takes from one input's Hessian, computed once for every Linear that reads it
    (q/k/v, gate/up): dead input channels, the column order, and the error-feedback coefficients of
    the damped H in that order (`feedback_factor_`)."""

    def __init__(self, hessian, perc_damp: float = PERC_DAMP, act_order: bool = ACT_ORDER, in_place: bool = False):
        """`hessian`: the (K, K) matrix, copied unless `in_place` (a matrix made for this call), or a
        HessianStats whose matrix is taken. Taken matrices become the factor in their own storage: a
        down_proj's is K^2 fp32, and a second one would be the largest allocation of the whole calibration."""
        if isinstance(hessian, HessianStats):
            hessian = hessian.take_hessian().float()
        else:
            hessian = hessian.float() if in_place else hessian.float().clone()
        energy = hessian.diagonal().clone()
        self.dead = energy == 0
        energy[self.dead] = 1.0  # a dead channel's row and column are zero: a unit pivot isolates it
        self.act_order = act_order
        self.order = torch.argsort(energy, descending=True, stable=True) if act_order else torch.arange(len(energy))
        self.energy = energy  # each input channel's, the weights of the scale search
        reverse = self.order.flip(0)
        permute_symmetric_(hessian, reverse)
        hessian.diagonal().copy_(energy[reverse] + perc_damp * energy.mean())
        self.factor = feedback_factor_(hessian)

    @torch.no_grad()
    def quantize(self, w: torch.Tensor, fmt: F.Format, group_size: int, global_amax=None):
        """(dequantized weight (N, K) fp32 on the format's grid, its scale) for weight w (N, K).

        `global_amax` (NVFP4; per-tensor FP8) is the amax behind `weight_scale_2` (the FP8
        `weight_scale`), shared by fused layers.
        """
        dtype = w.dtype
        w = w.detach().to(torch.float32, copy=True)
        if global_amax is None:  # the original weight's, as QuantLinear will derive weight_scale_2
            global_amax = w.abs().amax()
        w[:, self.dead] = 0.0
        scale = gptq_weight_scale(w, fmt, group_size, global_amax, self.energy)
        steps, width, to_grid = _column_steps(scale, fmt, group_size, global_amax, w.shape)
        # Work on the transpose in column order: column i is then the contiguous row i, which the updates
        # sweep. Transposing first makes the reordering a permutation of whole rows, done in place.
        wt = w.t().contiguous()
        del w
        permute_rows_(wt, self.order)
        # The errors are against the original weights (`feedback_factor_`), which the updates overwrite in wt: they
        # are kept in the weight's own dtype (exact), where fp32 w was (a bf16 weight's take half of it).
        original = wt.to(dtype, copy=True)
        dynamic_groups = fmt.weight == F.INT4 and not self.act_order
        energy, feedback, k = self.energy[self.order], self.factor, wt.shape[0]
        column_group = (self.order // width).tolist()
        for start in range(0, k, COLUMN_BLOCK):
            end = min(start + COLUMN_BLOCK, k)
            errors = original[start:end].to(torch.float32, copy=True)
            # Sub-blocks: each column's error goes to the rest of its sub-block one column at a time (memory
            # bound), and each sub-block's to the rest of the block in one product.
            for sub_start in range(start, end, COLUMN_SUBBLOCK):
                sub_end = min(sub_start + COLUMN_SUBBLOCK, end)
                for i in range(sub_start, sub_end):
                    if dynamic_groups and i % group_size == 0:  # the group's scale, from the updated weights
                        group_w = self._updated_group(wt, original, i, i + group_size)
                        scale[:, i // group_size] = gptq_weight_scale(group_w, fmt, group_size, global_amax,
                                                                      energy[i:i + group_size])[:, 0]
                        steps[i // group_size] = scale[:, i // group_size]
                    # One column at a time, where the op count is the cost: results go straight into place.
                    s, column = steps[column_group[i]], wt[i]
                    q = to_grid(column / s).mul_(s)
                    error = errors[i - start].sub_(q)
                    wt[i + 1:sub_end].addr_(feedback[i, i + 1:sub_end], error)
                    column.copy_(q)
                sub_errors = errors[sub_start - start:sub_end - start]
                wt[sub_end:end].addmm_(feedback[sub_start:sub_end, sub_end:end].t(), sub_errors)
            wt[end:].addmm_(feedback[start:end, end:].t(), errors)  # and over every later block
        permute_rows_(wt, torch.argsort(self.order))
        return wt.t().contiguous(), scale

    def _updated_group(self, wt: torch.Tensor, original: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Columns start:end (N, end - start) as GPTQ's updates leave them once every earlier column is
        rounded: the least-loss values given those roundings. The nearest-plane sums in wt hold only the earlier
        columns' part y; that optimum is original + V^-T y over the group (V's block of it, unit upper)."""
        group = original[start:end].to(torch.float32, copy=True)
        block = self.factor[start:end, start:end].t()
        shift = torch.linalg.solve_triangular(block, wt[start:end] - group, upper=False, unitriangular=True)
        return group.add_(shift).t()


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, fmt: F.Format, group_size: int,
                  perc_damp: float = PERC_DAMP, act_order: bool = ACT_ORDER, global_amax=None, in_place: bool = False):
    """GPTQ of one weight w (N, K) on its input Hessian: `HessianFactor(...).quantize(...)`."""
    return HessianFactor(hessian, perc_damp, act_order, in_place).quantize(w, fmt, group_size, global_amax)
