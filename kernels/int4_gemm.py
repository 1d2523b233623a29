"""W4A16 GEMM: out = (x * pre_quant_scale) @ dequant(W)^T + bias, INT4 weights read as stored.

Layout (the unified checkpoint's, `int4_awq`):
    x            (M, K)       fp32 / fp16 / bf16 activations
    weight       (N // 2, K)  uint8: byte [j, k] holds row 2j in the low nibble and row 2j + 1 in
                              the high nibble, each a two's complement int4 in [-8, 7]
    weight_scale (N, K // G)  fp32 group scales, w[n, k] = q[n, k] * weight_scale[n, k // G]
    pre_quant_scale (K,)      optional, in x's dtype (AWQ); applied and rounded as torch does
    out          (M, N)       x's dtype

Each program computes a (BLOCK_M, BLOCK_N) output tile: it loads BLOCK_N // 2 packed rows,
splits the nibbles and interleaves them back into BLOCK_N rows, multiplies by the group
scales in fp32 and feeds tl.dot in the dot dtype (the activation dtype on a GPU, so the
dequantized weight is rounded to it; fp32 otherwise), accumulating in fp32.
K need not be a multiple of BLOCK_K, nor N of BLOCK_N (masked); N must be even.
"""

import torch
import triton
import triton.language as tl

from .launch import dot_dtype, gemm_setup, require
from .rounding import int4_decode
from .tiles import load_group_scales, load_tile, load_x_tile, mma, store_out_tile, tile_offsets


@triton.jit
def int4_gemm_kernel(
    x_ptr, w_ptr, scale_ptr, pqs_ptr, bias_ptr, out_ptr,
    M, N, K, GROUP_SIZE,
    stride_xm, stride_xk, stride_wp, stride_wk, stride_sn, stride_sg, stride_om, stride_on,
    HAS_PQS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m, offs_n = tile_offsets(BLOCK_M, BLOCK_N)
    offs_p = tl.program_id(1) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)  # packed rows of this tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = load_x_tile(x_ptr, pqs_ptr, offs_m, offs_k, M, K, stride_xm, stride_xk, HAS_PQS)
        # (BLOCK_N // 2, BLOCK_K) uint8 -> (BLOCK_N, BLOCK_K) int4 values, rows interleaved back
        packed = load_tile(w_ptr, offs_p, offs_k, N // 2, K, stride_wp, stride_wk, 0).to(tl.int32)
        pairs = tl.join(packed & 0xF, packed >> 4)  # (BLOCK_N // 2, BLOCK_K, 2): even row, odd row
        q = tl.reshape(tl.permute(pairs, (0, 2, 1)), (BLOCK_N, BLOCK_K))
        scale = load_group_scales(scale_ptr, offs_n, offs_k, N, K, stride_sn, stride_sg, GROUP_SIZE, 0.0)
        w = int4_decode(q).to(tl.float32) * scale  # exactly the reference's q * scale
        acc = mma(acc, x, tl.trans(w), DOT_DTYPE)
    store_out_tile(out_ptr, bias_ptr, acc, offs_m, offs_n, M, N, stride_om, stride_on, HAS_BIAS)


def int4_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, group_size: int,
              pre_quant_scale: torch.Tensor = None, bias: torch.Tensor = None,
              block_m: int = None, block_n: int = None, block_k: int = None) -> torch.Tensor:
    """x (..., K) -> (..., N) in x's dtype; see the module docstring for the layout."""
    half_n, k = weight.shape
    n = 2 * half_n
    require(weight.dtype == torch.uint8, f"INT4 weight must be uint8 (N/2, K), got {weight.dtype}")
    require(weight_scale.shape == (n, k // group_size) and k % group_size == 0,
            f"weight_scale {tuple(weight_scale.shape)} does not match N={n}, K={k}, group {group_size}")
    x2d, out, (bm, bn, bk) = gemm_setup(x, n, k, block_m, block_n, block_k, n_multiple=2)  # whole packed rows
    m = x2d.shape[0]
    int4_gemm_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        x2d, weight, weight_scale, pre_quant_scale, bias, out,
        m, n, k, group_size,
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1),
        weight_scale.stride(0), weight_scale.stride(1), out.stride(0), out.stride(1),
        HAS_PQS=pre_quant_scale is not None, HAS_BIAS=bias is not None, DOT_DTYPE=dot_dtype(x.dtype, x.device),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
    )
    return out.reshape(*x.shape[:-1], n)
