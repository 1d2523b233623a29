"""INT8 GEMM: W8A8 (`int8_sq`, activations quantized in the prologue) or W8A16 (`int8_wo`).

Layout (the unified checkpoint's):
    x            (M, K)   fp32 / fp16 / bf16 activations
    weight       (N, K)   int8, w[n, k] = weight[n, k] * weight_scale[n]
    weight_scale (N,)     fp32 per output channel
    input_scale  ()       fp32 static activation scale (W8A8 only)
    pre_quant_scale (K,)  optional, in x's dtype (SmoothQuant)
    out          (M, N)   x's dtype

W8A8 (QUANTIZE_X): each x tile is scaled, rounded half to even and clamped to [-128, 127]
exactly as `numerics.int_quantize` does (division with tl.math.div_rn, rounding by the fp32
magic-number trick, so the codes are bit-identical to the reference), then int8 x int8 -> int32
tl.dot; the exact integer sum is scaled once by input_scale * weight_scale[n].
W8A16: int8 weights are exact in any dot dtype, so the per-channel scale is applied to the fp32
accumulator, not to the operands. K and N need not be multiples of the tiles (masked).
"""

import torch
import triton
import triton.language as tl

from .launch import dot_dtype, gemm_setup, require
from .rounding import round_half_even
from .tiles import load_scale, load_tile, load_x_tile, mma, store_out_tile, tile_offsets


@triton.jit
def int8_gemm_kernel(
    x_ptr, w_ptr, w_scale_ptr, x_scale_ptr, pqs_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    QUANTIZE_X: tl.constexpr, HAS_PQS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m, offs_n = tile_offsets(BLOCK_M, BLOCK_N)
    if QUANTIZE_X:
        x_scale = tl.load(x_scale_ptr)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = load_x_tile(x_ptr, pqs_ptr, offs_m, offs_k, M, K, stride_xm, stride_xk, HAS_PQS)
        w = load_tile(w_ptr, offs_n, offs_k, N, K, stride_wn, stride_wk, 0)
        if QUANTIZE_X:
            # clamp before rounding: the bounds are integers, so this equals round-then-clamp
            y = tl.minimum(tl.maximum(tl.math.div_rn(x, x_scale), -128.0), 127.0)
            x_q = round_half_even(y).to(tl.int8)
            acc = tl.dot(x_q, tl.trans(w), acc)
        else:
            acc = mma(acc, x, tl.trans(w), DOT_DTYPE)
    w_scale = load_scale(w_scale_ptr, offs_n[None, :], N, True)  # (1, BLOCK_N), per output channel
    if QUANTIZE_X:
        result = acc.to(tl.float32) * x_scale * w_scale
    else:
        result = acc * w_scale
    store_out_tile(out_ptr, bias_ptr, result, offs_m, offs_n, M, N, stride_om, stride_on, HAS_BIAS)


def int8_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor = None,
              pre_quant_scale: torch.Tensor = None, bias: torch.Tensor = None,
              block_m: int = None, block_n: int = None, block_k: int = None) -> torch.Tensor:
    """x (..., K) -> (..., N); W8A8 when `input_scale` is given, else weight-only."""
    n, k = weight.shape
    require(weight.dtype == torch.int8, f"INT8 weight must be int8 (N, K), got {weight.dtype}")
    require(weight_scale.shape == (n,), f"weight_scale {tuple(weight_scale.shape)} must be per channel ({n},)")
    x2d, out, (bm, bn, bk) = gemm_setup(x, n, k, block_m, block_n, block_k)
    m = x2d.shape[0]
    int8_gemm_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        x2d, weight, weight_scale, input_scale, pre_quant_scale, bias, out,
        m, n, k,
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
        QUANTIZE_X=input_scale is not None, HAS_PQS=pre_quant_scale is not None, HAS_BIAS=bias is not None,
        DOT_DTYPE=dot_dtype(x.dtype, x.device), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
    )
    return out.reshape(*x.shape[:-1], n)
