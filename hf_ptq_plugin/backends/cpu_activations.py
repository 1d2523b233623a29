"""Activation fake quantization for the CPU backend: the reference's values in fewer torch ops.

At decode sizes (M = 1) every torch op costs a fixed overhead whatever its size, and the reference NVFP4
and MXFP8 activation quantizers (`numerics.nvfp4`, `numerics.mx`) take ~35 and ~16 ops, more
than the GEMM itself on small layers. These compute the same fp32 values bit for bit (tested
against the reference) in about half the ops: blocks stay a trailing axis instead of being
repeated out, and the E2M1 rounding is one `bucketize` on thresholds that encode its ties.
Other formats use `numerics.quantize_activation` unchanged.
"""

from typing import Optional

import torch

from .. import formats as F
from ..numerics import FP8_MAX, quantize_activation
from ..numerics.nvfp4 import E2M1_GRID, NVFP4_BLOCK, nvfp4_activation_block_scales
from . import native

# The reference rounds |y| to E2M1 with alternating strict / non-strict comparisons
# (m > 0.25, m >= 0.75, m > 1.25, ...; ties to the even mantissa). `bucketize(right=True)`
# counts thresholds t <= m, so each strict "m > t" becomes "m >= the next float above t".
_STRICT = (True, False, True, False, True, False, True)
_THRESHOLDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
E2M1_BOUNDARIES = torch.tensor([torch.nextafter(torch.tensor(t), torch.tensor(float("inf"))).item() if strict else t
                                for t, strict in zip(_THRESHOLDS, _STRICT)], dtype=torch.float32)
E2M1_VALUES = torch.tensor(E2M1_GRID, dtype=torch.float32)
MX_BLOCK = 32


def fast_quantize_activation(x: torch.Tensor, fmt: F.Format, input_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """`numerics.quantize_activation(x, fmt, input_scale)`, bit for bit; fp32 (..., K). Off the CPU (a calibration
    search on a GPU) it is that function."""
    if x.device.type != "cpu":
        return quantize_activation(x, fmt, input_scale)
    if fmt.act == F.NVFP4:
        return nvfp4_fake_quantize(x, input_scale)
    if fmt.act == F.MXFP8:
        return mxfp8_fake_quantize(x)
    return quantize_activation(x, fmt, input_scale)


def nvfp4_fake_quantize(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 round trip under the calibrated `input_scale`; the reference's
    `nvfp4_activation_fake_quantize` values, in the engine's order (vLLM
    csrc/quantization/fp4/nvfp4_utils.cuh, cvt_warp_fp16_to_fp4; see `numerics.nvfp4`). One pass of
    the native kernel where it runs (`native_fake_quantize.c`, the same values), else the torch ops below."""
    if x.device.type == "cpu" and x.shape[-1] % NVFP4_BLOCK == 0 and input_scale.numel() == 1 and native.library():
        out = native.nvfp4_fake_quantize(x.float().contiguous(), input_scale.float().item())
        if out is not None:
            return out
    block_scales, output_scales = nvfp4_activation_block_scales(x, input_scale)  # the reference's scales
    y = x.float().unflatten(-1, (-1, NVFP4_BLOCK)) * output_scales[..., None]  # (..., K / 16, 16)
    magnitude = E2M1_VALUES[torch.bucketize(y.abs(), E2M1_BOUNDARIES, right=True)]
    step = (block_scales.float() * input_scale.float())[..., None]
    return (torch.where(y < 0, -magnitude, magnitude) * step).flatten(-2)


def mxfp8_fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """MXFP8 round trip; the reference's `mxfp8_fake_quantize` values."""
    blocks = x.float().unflatten(-1, (-1, MX_BLOCK))  # (..., K / 32, 32)
    exponent = torch.ceil(torch.log2(blocks.abs().amax(dim=-1, keepdim=True) / FP8_MAX)).clamp_(-127, 127)
    step = torch.exp2(exponent)
    q = (blocks / step).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (q.float() * step).flatten(-2)
