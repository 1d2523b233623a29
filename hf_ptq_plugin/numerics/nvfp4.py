"""NVFP4: E2M1 values in 16-element blocks, FP8 E4M3 block scales, an fp32 global scale.

Codes are 4 bits: bit 3 the sign, bits 0-2 an index into E2M1_GRID. Two codes per byte along
the last (input) axis, the even element in the low nibble (`docs/modelopt-facts.md` §2.4, §2.7).
Weights follow ModelOpt's order of operations (what the checkpoint stores); activations follow
the serving engines' quantize kernel (`nvfp4_activation_quantize`).
"""

import torch

from .fp8 import FP8_MAX
from .scales import block_amax, scale_from_amax

E2M1_MAX = 6.0
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
NVFP4_BLOCK = 16
FP8_MIN_SUBNORMAL = 2.0**-9  # block scales are clamped here so tiny blocks do not vanish
# fp32(1 / 6) as a Python float, exact in fp32: the engines multiply block maxima by it (they do not divide by 6)
RCP_E2M1_MAX = torch.tensor(E2M1_MAX).reciprocal().item()


def e2m1_codes(y: torch.Tensor) -> torch.Tensor:
    """Round fp32 values (already divided by their scale) onto E2M1, ties to even, saturating at 6.

    Midpoints between grid points tie toward the even mantissa: 0.25->0, 0.75->1, 1.25->1,
    1.75->2, 2.5->2, 3.5->4, 5->4; so the boundaries alternate between > and >=.
    Returns uint8 codes in [0, 15].
    """
    m = y.abs()
    index = (
        (m > 0.25).to(torch.uint8) + (m >= 0.75) + (m > 1.25) + (m >= 1.75)
        + (m > 2.5) + (m >= 3.5) + (m > 5.0)
    )
    sign = (y < 0).to(torch.uint8) << 3
    return sign | index


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes -> fp32 values."""
    grid = torch.tensor(E2M1_GRID, dtype=torch.float32, device=codes.device)
    magnitude = grid[(codes & 0x7).long()]
    return torch.where((codes & 0x8) != 0, -magnitude, magnitude)


def e2m1_round(y: torch.Tensor) -> torch.Tensor:
    """`e2m1_values(e2m1_codes(y))` for finite y, in a third of the ops (GPTQ rounds one column at a
    time, where the op count is the cost).

    E2M1's spacing is 0.5 below 2, 1 below 4 and 2 above: rounding |y| half-to-even at that spacing
    gives the same values and ties (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4,
    5 -> 4), then saturating at 6.
    """
    m = y.abs()
    spacing = torch.where(m < 2.0, 0.5, torch.where(m < 4.0, 1.0, 2.0))
    magnitude = torch.round(m / spacing).mul_(spacing).clamp_(max=E2M1_MAX)
    return torch.where(y < 0, -magnitude, magnitude)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (..., K) -> uint8 (..., K // 2), element 2k in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (..., K // 2) -> codes (..., K); exact inverse of `pack_nibbles`."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """`weight_scale_2` / `input_scale` = amax / (6 * 448), fp32; zero amax gives 1.0."""
    return scale_from_amax(amax, E2M1_MAX * FP8_MAX)


def nvfp4_block_scales(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """Per-16-block scales in FP8 units: fp8(clamp(block_amax / (6 * gs), 2^-9, 448)).

    (..., K) -> float8_e4m3fn (..., K // 16). An all-zero block gets 1.0, so it divides cleanly.
    """
    return nvfp4_block_scales_of_amax(block_amax(x, NVFP4_BLOCK), global_scale)


def nvfp4_block_scales_of_amax(amax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """`nvfp4_block_scales` from the blocks' fp32 amax (..., K // 16)."""
    scales = amax / (E2M1_MAX * global_scale)
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    return scales.clamp(FP8_MIN_SUBNORMAL, FP8_MAX).to(torch.float8_e4m3fn)


def nvfp4_quantize(x: torch.Tensor, global_scale: torch.Tensor, block_scales=None):
    """x (..., K) -> (codes uint8 (..., K), block scales float8_e4m3fn (..., K // 16)).

    `block_scales`, when given (GPTQ's fixed scales), are used instead of the max-derived ones.
    """
    if block_scales is None:
        block_scales = nvfp4_block_scales(x, global_scale)
    step = block_scales.float() * global_scale  # (..., K // 16) fp32
    y = x.float().unflatten(-1, (-1, NVFP4_BLOCK)) / step[..., None]
    return e2m1_codes(y).flatten(-2), block_scales


def nvfp4_activation_block_scales(x: torch.Tensor, input_scale: torch.Tensor):
    """(block scales float8_e4m3fn (..., K // 16), output scales fp32 (..., K // 16)) of activations.

    The engine's order: vLLM csrc/quantization/fp4/nvfp4_utils.cuh, cvt_warp_fp16_to_fp4 (TensorRT-LLM
    cpp/tensorrt_llm/kernels/quantization.cuh, cvt_warp_fp16_to_fp4, is the same arithmetic), with the
    global scale G = 1 / input_scale rounded to fp32 (vLLM modelopt.py, input_scale_inv; TensorRT-LLM
    _torch/modules/linear.py, NVFP4LinearMethod.load_weight_scales): SF = e4m3(G * (block_amax * rcp(6)))
    and output scale rcp(float(SF) * rcp(G)), 0 when SF is 0. There is no 2**-9 floor: a block whose SF
    rounds to 0 dequantizes to 0. The kernel's rcp is rcp.approx.ftz.f32, an approximation that is not
    guaranteed to be correctly rounded; here every rcp is the correctly rounded one (1 / x in fp32).
    """
    g = torch.reciprocal(input_scale.float())
    scales = block_amax(x, NVFP4_BLOCK).mul_(RCP_E2M1_MAX).mul_(g)  # G * (amax * rcp(6)), fp32
    scales = scales.clamp_(max=FP8_MAX).to(torch.float8_e4m3fn)  # the cvt saturates at 448
    sf = scales.float()
    output_scales = torch.where(sf > 0, torch.reciprocal(sf * torch.reciprocal(g)), 0.0)
    return scales, output_scales


def nvfp4_activation_quantize(x: torch.Tensor, input_scale: torch.Tensor):
    """Activations x (..., K) -> (codes uint8 (..., K), block scales float8_e4m3fn (..., K // 16)).

    codes = e2m1(x * output scale) (`nvfp4_activation_block_scales`): a multiply where the weight
    path divides, as cvt_warp_fp16_to_fp4 does before its cvt.rn.satfinite.e2m1x2.f32.
    """
    block_scales, output_scales = nvfp4_activation_block_scales(x, input_scale)
    y = x.float().unflatten(-1, (-1, NVFP4_BLOCK)) * output_scales[..., None]
    return e2m1_codes(y).flatten(-2), block_scales


def nvfp4_activation_fake_quantize(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """Activations through the engine's NVFP4 quantizer and back (fp32): e2m1 * block scale * input_scale."""
    codes, block_scales = nvfp4_activation_quantize(x, input_scale)
    return nvfp4_dequantize(codes, block_scales, input_scale)


def nvfp4_dequantize(codes: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor):
    """codes (..., K), block scales (..., K // 16) -> fp32 (..., K)."""
    step = block_scales.float() * global_scale
    return e2m1_values(codes) * step.repeat_interleave(NVFP4_BLOCK, dim=-1)


def nvfp4_fake_quantize(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """Quantize with dynamic block scales under a fixed global scale, then dequantize (fp32)."""
    codes, block_scales = nvfp4_quantize(x, global_scale)
    return nvfp4_dequantize(codes, block_scales, global_scale)
