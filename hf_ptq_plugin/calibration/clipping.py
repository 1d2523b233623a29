"""Clipping searches: weight ranges smaller than max |w| when that lowers the error.

`awq_clip` (`docs/modelopt-facts.md` §3.6) measures the error on the layer's output, with calibration
inputs x: for INT4, per (row, group) block (for INT8, per row), the squared error of the block's
partial output sum_{k in group} x_k (w_k - Q(w_k)) over tokens (every token of the AWQ sample,
through one Gram matrix per group), for clip ratios 0.5, 0.55, ..., 1.0 of the block amax; for NVFP4 the global
amax (the per-tensor `weight_scale_2`) is clipped, scored on the whole output of the sample's
first MAX_CLIP_TOKENS tokens. On SmolLM2, scoring INT4 blocks on all 2048 sampled tokens rather
than the first 256 lowers awq_full's perplexity from 34.15 to 34.00. `mse` needs no data: per
block, the squared weight error sum (w - Q(w))^2, optionally weighted per input channel (GPTQ's
INT4 scales; `weighted_nvfp4_block_scales` is the same search for GPTQ's NVFP4 block scales).
Each returns the scale (or global amax) the QuantLinear then stores as is.
"""

import torch

from .. import formats as F
from ..backends.fake_quantize import fake_quantize_weight
from ..numerics.integer import INT4_MAX, INT8_MAX, int_quantize
from ..numerics.nvfp4 import NVFP4_BLOCK, e2m1_round, nvfp4_block_scales_of_amax
from ..numerics.scales import block_amax, scale_from_amax
from .distributed import all_reduce

CLIP_RATIOS = tuple(0.5 + 0.05 * i for i in range(11))
MSE_RATIOS = tuple(0.5 + 0.02 * i for i in range(26))
CHUNK_ELEMENTS = 2**20  # weights per step of the per-row searches: 4 MB of fp32 stays in cache over every ratio
MAX_CLIP_TOKENS = 256  # NVFP4's global-amax search multiplies the whole layer per ratio: keep it small


def clip_weight_scale(w: torch.Tensor, x: torch.Tensor, fmt: F.Format, group_size: int) -> torch.Tensor:
    """awq_clip's scales for integer weights: INT4 group scales (N, K / g), INT8 row scales (N,)."""
    if fmt.weight == F.INT4:
        return clip_int_scale(w, x, group_size)
    if fmt.weight == F.INT8:
        return clip_int_scale(w, x, w.shape[1], bits=8)[:, 0]
    raise ValueError(f"awq_clip clips INT4, INT8 and NVFP4 weights; qformat {fmt.name!r} has {fmt.weight} weights")


def clip_int_scale(w: torch.Tensor, x: torch.Tensor, group_size: int, bits: int = 4) -> torch.Tensor:
    """Integer scales (N, K / g) minimizing each block's partial-output error on inputs x (T, K);
    INT4 groups, or (bits=8, group_size=K) INT8 rows."""
    maxbound = INT4_MAX if bits == 4 else INT8_MAX
    w, x = w.float(), x.float()
    n, k = w.shape
    groups = k // group_size
    amax = block_amax(w, group_size)  # (N, G)
    # sum over tokens of (x_g . d)^2 = d^T (x_g^T x_g) d: one (g, g) Gram matrix per group, made
    # once, instead of the (T, N, G) partial outputs per ratio (g / T of their operations per ratio).
    x_groups = x.view(-1, groups, group_size).transpose(0, 1)  # (G, T, g)
    gram = torch.bmm(x_groups.transpose(1, 2), x_groups)  # (G, g, g)
    errors = []
    for ratio in CLIP_RATIOS:
        step = scale_from_amax(amax * ratio, maxbound).repeat_interleave(group_size, dim=1)  # (N, K)
        diff = (w - int_quantize(w, step, bits).float() * step).view(n, groups, group_size).transpose(0, 1)  # (G, N, g)
        errors.append((torch.bmm(diff, gram) * diff).sum(dim=-1).T)  # (N, G)
    errors = all_reduce(torch.stack(errors), "sum")  # (ratios, N, G), summed over processes' tokens
    best = torch.tensor(CLIP_RATIOS)[errors.argmin(dim=0)]
    return scale_from_amax(amax * best, maxbound)


def clip_nvfp4_global_amax(w: torch.Tensor, x: torch.Tensor, fmt: F.Format) -> torch.Tensor:
    """The clipped global amax of (stacked) NVFP4 weights w (N, K) minimizing the output error on x."""
    w, x = w.float(), x[:MAX_CLIP_TOKENS].float()
    amax = w.abs().amax()
    reference = x @ w.T
    errors = torch.stack([(x @ fake_quantize_weight(w, fmt, global_amax=amax * r).T
                           - reference).pow(2).sum() for r in CLIP_RATIOS])
    return amax * CLIP_RATIOS[int(all_reduce(errors, "sum").argmin())]


def mse_weight_scale(w: torch.Tensor, fmt: F.Format, group_size: int, importance: torch.Tensor = None,
                     int4_max: float = INT4_MAX) -> torch.Tensor:
    """INT4 group (N, K / g) or INT8 row (N,) scales minimizing the squared weight error per block.

    `importance` (K,), if given, weighs each input channel's squared error: GPTQ passes diag(H),
    the channel's input energy, so the search minimizes the output error that round-to-nearest
    would leave if the channels were uncorrelated. `int4_max` is the amax's code (7, or GPTQ's 7.5).
    """
    if fmt.weight not in (F.INT4, F.INT8):
        raise ValueError(f"mse supports INT4 and INT8 weights; got qformat {fmt.name!r}")
    return in_row_chunks(w, lambda rows: _mse_rows_scale(rows, fmt, group_size, importance, int4_max))


def in_row_chunks(w: torch.Tensor, search) -> torch.Tensor:
    """`search(rows)` over chunks of w's rows, concatenated: each row's scales depend on that row
    alone, and a chunk's dozen passes per ratio then run in cache instead of over the whole weight."""
    rows = max(1, CHUNK_ELEMENTS // w.shape[1])
    return torch.cat([search(w[start:start + rows]) for start in range(0, w.shape[0], rows)])


def _mse_rows_scale(w: torch.Tensor, fmt: F.Format, group_size: int, importance, int4_max: float) -> torch.Tensor:
    w = w.float()
    bits, maxbound, block = (4, int4_max, group_size) if fmt.weight == F.INT4 else (8, INT8_MAX, w.shape[1])
    blocks = w.view(w.shape[0], -1, block)  # (N, G, b)
    weights = torch.ones(()) if importance is None else importance.float().view(1, -1, block)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    errors = []
    for ratio in MSE_RATIOS:
        scale = scale_from_amax(amax * ratio, maxbound)
        # int_quantize's rounding, then the squared error, in place: (Q(w) - w)^2 is (w - Q(w))^2 exactly.
        diff = (blocks / scale).round_().clamp_(low, high).mul_(scale).sub_(blocks).square_()
        errors.append((diff.mul_(weights) if importance is not None else diff).sum(dim=-1))
    best = torch.tensor(MSE_RATIOS)[torch.stack(errors).argmin(dim=0)]  # (N, G)
    scale = scale_from_amax(amax.squeeze(-1) * best, maxbound)
    return scale if fmt.weight == F.INT4 else scale.squeeze(-1)


def weighted_nvfp4_block_scales(w: torch.Tensor, global_scale: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """NVFP4 e4m3 block scales (N, K / 16) under `global_scale` with, per 16-block, the least
    rounding error weighted per input channel by `importance` (K,) (GPTQ passes diag(H)).

    Candidates are the max-derived scale times 0.50, 0.52, ..., 1.00 (`MSE_RATIOS`), each rounded to e4m3 as
    the checkpoint stores it; among equal errors the smallest scale wins.
    """
    return in_row_chunks(w, lambda rows: _weighted_nvfp4_rows_scales(rows, global_scale, importance))


def _weighted_nvfp4_rows_scales(w: torch.Tensor, global_scale: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """The search over the distinct e4m3 scales the ratios give rather than over the ratios: a block's 26
    ratios round to 9 e4m3 values at most (the ratios span one binade, which e4m3 splits into 8 steps), and
    they reach every code from the smallest ratio's to the largest's (consecutive ratios are at most 4% apart,
    an e4m3 rounding interval at least 6.7% wide), so scoring those codes scores the same candidates in a
    third of the passes. The block amax times a ratio is the amax of the block times the ratio (rounding is
    monotonic), so `nvfp4_block_scales(w * ratio)` needs no pass over w."""
    w = w.float()
    blocks = w.unflatten(-1, (-1, NVFP4_BLOCK))  # (N, K / 16, 16)
    weights = importance.float().view(1, -1, NVFP4_BLOCK)
    amax = block_amax(w, NVFP4_BLOCK)  # (N, K / 16)
    lowest = nvfp4_block_scales_of_amax(amax * MSE_RATIOS[0], global_scale).view(torch.uint8)
    highest = nvfp4_block_scales_of_amax(amax * MSE_RATIOS[-1], global_scale).view(torch.uint8)
    best_codes, best_errors = None, None
    # Non-negative e4m3 codes order as their values: code + 1 is the next larger scale.
    for offset in range(int((highest - lowest).max()) + 1):
        codes = torch.minimum(lowest + offset, highest)  # a block with fewer candidates repeats its largest
        step = (codes.view(torch.float8_e4m3fn).float() * global_scale)[..., None]  # (N, K / 16, 1)
        diff = blocks - e2m1_round(blocks / step) * step  # nvfp4_quantize then nvfp4_dequantize's values
        errors = (diff.pow(2) * weights).sum(dim=-1)  # (N, K / 16)
        if best_codes is None:
            best_codes, best_errors = codes, errors
        else:
            better = errors < best_errors
            best_codes = torch.where(better, codes, best_codes)
            best_errors = torch.where(better, errors, best_errors)
    return best_codes.view(torch.float8_e4m3fn)
