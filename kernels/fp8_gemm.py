"""FP8 W8A8 GEMM: out = (a * a_scale) @ (b * b_scale)^T + bias, both operands float8_e4m3fn.

Layout (the unified checkpoint's `fp8` and `fp8_pc_pt`):
    a        (M, K)  float8_e4m3fn activations, from `fp8_quantize(..., activation=True)` (static or
                     per-token scale, rounded as the serving engines round them)
    a_scale  () or (M,)  fp32: per tensor (`input_scale`) or per token (dynamic)
    b        (N, K)  float8_e4m3fn weight
    b_scale  () or (N,)  fp32: per tensor or per output channel (`weight_scale`)
    out      (M, N)  the activations' original dtype

Products of two e4m3 values are exact in fp32, so the tl.dot accumulator is the exact sum up to
fp32 rounding, and both scales (per tensor, per row or per column) are applied once at the end.
tl.dot takes the fp8 operands as they are where it can (tensor cores on sm_89+, and the
interpreter); otherwise they are widened to fp16, which holds every e4m3 value exactly (`fp8_dot_dtype`).
"""

import torch
import triton
import triton.language as tl

from .launch import gemm_blocks, require
from .tiles import load_scale, load_tile, mma, store_out_tile, tile_offsets


@triton.jit
def fp8_gemm_kernel(
    a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bn, stride_bk, stride_om, stride_on,
    A_PER_ROW: tl.constexpr, B_PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m, offs_n = tile_offsets(BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = load_tile(a_ptr, offs_m, offs_k, M, K, stride_am, stride_ak, 0.0)
        b = load_tile(b_ptr, offs_n, offs_k, N, K, stride_bn, stride_bk, 0.0)
        acc = mma(acc, a, tl.trans(b), DOT_DTYPE)
    a_scale = load_scale(a_scale_ptr, offs_m[:, None], M, A_PER_ROW)  # (BLOCK_M, 1) or scalar
    b_scale = load_scale(b_scale_ptr, offs_n[None, :], N, B_PER_ROW)  # (1, BLOCK_N) or scalar
    store_out_tile(out_ptr, bias_ptr, acc * a_scale * b_scale, offs_m, offs_n, M, N, stride_om, stride_on, HAS_BIAS)


def fp8_dot_dtype(device: torch.device, fp8_dot: bool = None):
    """tl.dot's operand dtype for e4m3 values: e4m3 if `fp8_dot` (None: where fp8 tl.dot exists), else fp16."""
    if fp8_dot is None:
        fp8_dot = device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)
    return tl.float8e4nv if fp8_dot else tl.float16


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype, bias: torch.Tensor = None, fp8_dot: bool = None,
             block_m: int = None, block_n: int = None, block_k: int = None) -> torch.Tensor:
    """(M, K) x (N, K) float8_e4m3fn -> (M, N) `out_dtype`; see the module docstring."""
    m, k = a.shape
    n = b.shape[0]
    require(a.dtype == b.dtype == torch.float8_e4m3fn,
            f"fp8_gemm takes float8_e4m3fn operands, got {a.dtype}, {b.dtype}")
    require(b.shape[1] == k, f"a has K={k}, b has K={b.shape[1]}")
    require(a_scale.dim() == 0 or a_scale.shape == (m,), f"a_scale must be () or ({m},), got {tuple(a_scale.shape)}")
    require(b_scale.dim() == 0 or b_scale.shape == (n,), f"b_scale must be () or ({n},), got {tuple(b_scale.shape)}")
    bm, bn, bk = gemm_blocks(m, n, k, a.device, block_m, block_n, block_k)
    out = torch.empty((m, n), device=a.device, dtype=out_dtype)
    fp8_gemm_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        a, a_scale, b, b_scale, bias, out,
        m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        A_PER_ROW=a_scale.dim() == 1, B_PER_ROW=b_scale.dim() == 1, HAS_BIAS=bias is not None,
        DOT_DTYPE=fp8_dot_dtype(a.device, fp8_dot), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
    )
    return out
