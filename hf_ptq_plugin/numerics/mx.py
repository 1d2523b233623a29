"""MXFP8: float8_e4m3fn values in 32-element blocks with power-of-two (E8M0) scales.

The scale exponent is e = ceil(log2(block_amax / 448)), clamped to [-127, 127] and stored as the
uint8 e + 127, so every block's values fit the FP8 range without saturation.
"""

import torch

from .fp8 import FP8_MAX, fp8_quantize
from .scales import block_amax

MX_BLOCK = 32
E8M0_BIAS = 127


def mxfp8_quantize(x: torch.Tensor):
    """x (..., K) -> (float8_e4m3fn (..., K), uint8 E8M0 exponents (..., K // 32))."""
    amax = block_amax(x, MX_BLOCK)
    exponent = torch.ceil(torch.log2(amax / FP8_MAX)).clamp(-E8M0_BIAS, E8M0_BIAS)
    step = torch.exp2(exponent).repeat_interleave(MX_BLOCK, dim=-1)
    return fp8_quantize(x, step), (exponent + E8M0_BIAS).to(torch.uint8)


def mxfp8_dequantize(q: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """float8 values (..., K) and E8M0 exponents (..., K // 32) -> fp32 (..., K)."""
    step = torch.exp2(exponents.float() - E8M0_BIAS).repeat_interleave(MX_BLOCK, dim=-1)
    return q.float() * step


def mxfp8_fake_quantize(x: torch.Tensor) -> torch.Tensor:
    return mxfp8_dequantize(*mxfp8_quantize(x))
