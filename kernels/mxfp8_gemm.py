"""MXFP8 GEMM: e4m3 weights with power-of-two (E8M0) 32-block scales; activations quantized on the fly.

Layout (the unified checkpoint's `mxfp8`):
    x            (M, K)       fp32 / fp16 / bf16 activations
    weight       (N, K)       float8_e4m3fn
    weight_scale (N, K // 32) uint8 biased exponents e + 127: w = weight * 2**e
    out          (M, N)       x's dtype

Each x tile is split into 32-element blocks; per block e = ceil(log2(amax / 448)), clamped to
[-127, 127], and x / 2**e is rounded to e4m3 (emulated exactly, `rounding.fp8_e4m3_round`).
ceil(log2(.)) is taken from the fp32 bits (exponent, plus one unless the mantissa is zero),
which is exact; the reference's fp32 torch.log2 can round a value a few ulps above a power of
two down to that power, so the two can differ by one exponent on such blocks (the block is then
quantized on a 2x coarser or finer grid: both are valid MX encodings; random data never hits it).
Both operands are then e4m3 values times powers of two, exact in fp32 and in bf16 (8 exponent
bits), so tl.dot (fp32 accumulator) sees exact operands; on a GPU it runs in bf16 (tensor
cores), under the interpreter in fp32 (its bf16 dot is wrong). Blocks of 2**-127 scale (all-zero
or tiny) use 2**-126 here, which quantizes them to the same zeros. K % 32 == 0; BLOCK_K must be a
multiple of 32; K and N need not be multiples of the tiles (masked).
"""

import torch
import triton
import triton.language as tl

from .launch import gemm_setup, require
from .rounding import fp8_e4m3_round, pow2
from .tiles import load_group_scales, load_tile, load_x_tile, mma, store_out_tile, tile_offsets

MX_BLOCK = 32


@triton.jit
def _quantize_x_blocks(x, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_M, BLOCK_K) fp32 -> MXFP8 round trip fp8(x / 2**e) * 2**e (fp32)."""
    blocks = tl.reshape(x, (BLOCK_M, BLOCK_K // 32, 32))
    bits = tl.math.div_rn(tl.max(tl.abs(blocks), axis=2), 448.0).to(tl.int32, bitcast=True)
    biased = (bits >> 23) & 0xFF
    exponent = biased - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)  # ceil(log2(.)) of a normal float
    exponent = tl.where(biased == 0, -126, tl.minimum(tl.maximum(exponent, -126), 127))
    step = pow2(exponent)[:, :, None]
    value = fp8_e4m3_round(blocks * pow2(-exponent)[:, :, None]) * step
    return tl.reshape(value, (BLOCK_M, BLOCK_K))


@triton.jit
def mxfp8_gemm_kernel(
    x_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sk, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m, offs_n = tile_offsets(BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = _quantize_x_blocks(load_x_tile(x_ptr, x_ptr, offs_m, offs_k, M, K, stride_xm, stride_xk, False),
                               BLOCK_M, BLOCK_K)
        q = load_tile(w_ptr, offs_n, offs_k, N, K, stride_wn, stride_wk, 0.0)
        biased = load_group_scales(w_scale_ptr, offs_n, offs_k, N, K, stride_sn, stride_sk, 32, 127).to(tl.int32)
        # 2**(biased - 127) as two exact factors, so biased = 0 (2**-127) stays representable
        w = q.to(tl.float32) * pow2(tl.maximum(biased - 127, -126)) * tl.where(biased == 0, 0.5, 1.0)
        acc = mma(acc, x, tl.trans(w), DOT_DTYPE)
    store_out_tile(out_ptr, bias_ptr, acc, offs_m, offs_n, M, N, stride_om, stride_on, HAS_BIAS)


def mxfp8_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor = None,
               block_m: int = None, block_n: int = None, block_k: int = None) -> torch.Tensor:
    """x (..., K) -> (..., N) in x's dtype; see the module docstring for the layout."""
    n, k = weight.shape
    require(weight.dtype == torch.float8_e4m3fn, f"MXFP8 weight must be float8_e4m3fn, got {weight.dtype}")
    require(weight_scale.shape == (n, k // MX_BLOCK) and weight_scale.dtype == torch.uint8 and k % MX_BLOCK == 0,
            f"weight_scale must be uint8 ({n}, {k // MX_BLOCK}), got {weight_scale.dtype} {tuple(weight_scale.shape)}")
    x2d, out, (bm, bn, bk) = gemm_setup(x, n, k, block_m, block_n, block_k, k_multiple=MX_BLOCK)
    m = x2d.shape[0]
    mxfp8_gemm_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        x2d, weight, weight_scale, bias, out,
        m, n, k,
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1),
        weight_scale.stride(0), weight_scale.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, DOT_DTYPE=tl.bfloat16 if x.is_cuda else tl.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
    )
    return out.reshape(*x.shape[:-1], n)
