"""FP8 block-scaled weight-only GEMM (`fp8_pb_wo`): out = x @ dequant(W)^T + bias.

Layout (the unified checkpoint's):
    x            (M, K)                    fp32 / fp16 / bf16 activations (not quantized)
    weight       (N, K)                    float8_e4m3fn
    weight_scale (N // T, 1, K // T, 1)    fp32, one scale per (T x T) tile, T = 128:
                                           w[n, k] = weight[n, k] * weight_scale[n // T, 0, k // T, 0]
    out          (M, N)                    x's dtype

Each program dequantizes its (BLOCK_N, BLOCK_K) weight tile in fp32 (scale gathered per
element, so any tile shape works) and feeds tl.dot in the dot dtype: the activation dtype on a
GPU (the dequantized weight is rounded to it), fp32 otherwise. N and K are multiples of T by
the format; the tiles of this kernel need not divide them (masked).
"""

import torch
import triton
import triton.language as tl

from .launch import dot_dtype, gemm_setup, require
from .tiles import load_tile, load_x_tile, mma, store_out_tile, tile_offsets


@triton.jit
def fp8_block_gemm_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr,
    M, N, K, TILE,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sk, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m, offs_n = tile_offsets(BLOCK_M, BLOCK_N)
    scale_rows = scale_ptr + (offs_n[:, None] // TILE) * stride_sn  # the scale row of each weight row
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = load_x_tile(x_ptr, x_ptr, offs_m, offs_k, M, K, stride_xm, stride_xk, False)
        q = load_tile(w_ptr, offs_n, offs_k, N, K, stride_wn, stride_wk, 0.0)
        scale = tl.load(scale_rows + (offs_k[None, :] // TILE) * stride_sk,
                        mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)
        acc = mma(acc, x, tl.trans(q.to(tl.float32) * scale), DOT_DTYPE)
    store_out_tile(out_ptr, bias_ptr, acc, offs_m, offs_n, M, N, stride_om, stride_on, HAS_BIAS)


def fp8_block_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, tile: int = 128,
                   bias: torch.Tensor = None, block_m: int = None, block_n: int = None,
                   block_k: int = None) -> torch.Tensor:
    """x (..., K) -> (..., N) in x's dtype; see the module docstring for the layout."""
    n, k = weight.shape
    require(weight.dtype == torch.float8_e4m3fn, f"fp8_pb_wo weight must be float8_e4m3fn, got {weight.dtype}")
    require(weight_scale.shape == (n // tile, 1, k // tile, 1) and n % tile == 0 and k % tile == 0,
            f"weight_scale {tuple(weight_scale.shape)} does not tile ({n}, {k}) by {tile}")
    x2d, out, (bm, bn, bk) = gemm_setup(x, n, k, block_m, block_n, block_k)
    m = x2d.shape[0]
    fp8_block_gemm_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        x2d, weight, weight_scale, bias, out,
        m, n, k, tile,
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1),
        weight_scale.stride(0), weight_scale.stride(2), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, DOT_DTYPE=dot_dtype(x.dtype, x.device), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
    )
    return out.reshape(*x.shape[:-1], n)
