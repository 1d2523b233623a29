"""NVFP4 block quantize + pack: the weight tensors of `nvfp4` on the CUDA load path.

Layout produced (the unified checkpoint's):
    x             (R, C)       fp32 / fp16 / bf16, C % 16 == 0
    global_scale  ()           fp32 `weight_scale_2` = amax / (6 * 448), computed by the caller
    packed        (R, C // 2)  uint8, E2M1 codes of elements 2k (low nibble) and 2k + 1 (high)
    block_scale   (R, C // 16) float8_e4m3fn: fp8(clamp(block_amax / (6 * global_scale), 2**-9, 448)),
                               1.0 for an all-zero block

Same math as `numerics.nvfp4.nvfp4_quantize` + `pack_nibbles`, bit for bit: division with
div_rn, the e4m3 block scale rounded by exact emulation (the interpreter's fp8 cast is wrong in
2.5% of values), the E2M1 rounding with the reference's tie-to-even thresholds. Each program
quantizes a (BLOCK_R, BLOCK_C) tile; BLOCK_C must be a multiple of 16.
"""

import torch
import triton
import triton.language as tl

from .launch import require
from .rounding import e2m1_index, fp8_e4m3_round
from .tiles import load_tile

NVFP4_BLOCK = 16


@triton.jit
def nvfp4_quantize_kernel(
    x_ptr, global_scale_ptr, packed_ptr, block_scale_ptr,
    R, C,
    stride_xr, stride_xc, stride_pr, stride_pc, stride_sr, stride_sc,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    x = load_tile(x_ptr, offs_r, offs_c, R, C, stride_xr, stride_xc, 0.0)
    blocks = tl.reshape(x.to(tl.float32), (BLOCK_R, BLOCK_C // 16, 16))
    global_scale = tl.load(global_scale_ptr)
    scale = tl.math.div_rn(tl.max(tl.abs(blocks), axis=2), 6.0 * global_scale)
    scale = tl.where(scale == 0, 1.0, scale)
    scale = fp8_e4m3_round(tl.maximum(scale, 0.001953125))  # clamp to [2**-9, 448]; 448 inside the rounding
    y = tl.math.div_rn(blocks, (scale * global_scale)[:, :, None])
    codes = e2m1_index(tl.abs(y)) | ((y < 0).to(tl.int32) << 3)
    # (BLOCK_R, BLOCK_C) codes -> (BLOCK_R, BLOCK_C // 2) bytes: even element low, odd element high
    low, high = tl.split(tl.reshape(codes, (BLOCK_R, BLOCK_C // 2, 2)))
    offs_p = tl.program_id(1) * (BLOCK_C // 2) + tl.arange(0, BLOCK_C // 2)
    tl.store(packed_ptr + offs_r[:, None] * stride_pr + offs_p[None, :] * stride_pc, (low | (high << 4)).to(tl.uint8),
             mask=(offs_r[:, None] < R) & (offs_p[None, :] < C // 2))
    offs_s = tl.program_id(1) * (BLOCK_C // 16) + tl.arange(0, BLOCK_C // 16)
    tl.store(block_scale_ptr + offs_r[:, None] * stride_sr + offs_s[None, :] * stride_sc,
             scale.to(block_scale_ptr.dtype.element_ty), mask=(offs_r[:, None] < R) & (offs_s[None, :] < C // 16))


def nvfp4_quantize(x: torch.Tensor, global_scale: torch.Tensor, block_r: int = None, block_c: int = None):
    """x (R, C) -> (packed uint8 (R, C // 2), block scales float8_e4m3fn (R, C // 16))."""
    require(x.dim() == 2 and x.shape[1] % NVFP4_BLOCK == 0,
            f"NVFP4 quantizes (R, C) with C a multiple of {NVFP4_BLOCK}, got {tuple(x.shape)}")
    r, c = x.shape
    block_r = block_r or (16 if x.is_cuda else min(triton.next_power_of_2(r), 64))
    block_c = block_c or (128 if x.is_cuda else min(triton.next_power_of_2(c), 512))
    require(block_c % NVFP4_BLOCK == 0, f"block_c must be a multiple of {NVFP4_BLOCK}, got {block_c}")
    packed = torch.empty((r, c // 2), device=x.device, dtype=torch.uint8)
    block_scale = torch.empty((r, c // NVFP4_BLOCK), device=x.device, dtype=torch.float8_e4m3fn)
    nvfp4_quantize_kernel[(triton.cdiv(r, block_r), triton.cdiv(c, block_c))](
        x, global_scale, packed, block_scale,
        r, c,
        x.stride(0), x.stride(1), packed.stride(0), packed.stride(1), block_scale.stride(0), block_scale.stride(1),
        BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return packed, block_scale
