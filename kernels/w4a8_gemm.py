"""W4A8 GEMM (`w4a8_awq`): INT4 group-wise weights times FP8 activations.

Layout (the unified checkpoint's):
    a              (M, K)       float8_e4m3fn activations from `fp8_quantize(..., activation=True)`
                                (static `input_scale`, with `pre_quant_scale` applied there)
    a_scale        ()           fp32 `input_scale`
    weight         (N // 2, K)  uint8, rows 2j / 2j + 1 in the low / high nibble (signed int4)
    weight_scale   (N, K // G)  fp32 group scales
    weight_scale_2 ()           fp32 per-tensor scale
    out            (M, N)       the activations' original dtype

The engine's weight (TensorRT-LLM, `numerics.weights.int4_w4a8_weight`) is
fp8(q * ratio) * weight_scale_2 with ratio = fp16(fp16(weight_scale) * (1 / weight_scale_2))
(`numerics.weights.w4a8_group_ratio`): the group scale ratio is rounded to fp16 and the product
to e4m3. This kernel rebuilds those e4m3 weights in the K loop (fp16 casts: correct in the
interpreter; e4m3 rounding: emulated exactly, `rounding.fp8_e4m3_round`), takes an fp8 x fp8
tl.dot (exact products, fp32 accumulator; fp16 operands on GPUs before sm_89) and scales the sum
once by input_scale * weight_scale_2.
"""

import torch
import triton
import triton.language as tl

from .fp8_gemm import fp8_dot_dtype
from .launch import gemm_blocks, require
from .rounding import fp8_e4m3_round, int4_decode
from .tiles import load_group_scales, load_tile, mma, store_out_tile, tile_offsets


@triton.jit
def w4a8_gemm_kernel(
    a_ptr, a_scale_ptr, w_ptr, scale_ptr, scale_2_ptr, bias_ptr, out_ptr,
    M, N, K, GROUP_SIZE,
    stride_am, stride_ak, stride_wp, stride_wk, stride_sn, stride_sg, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m, offs_n = tile_offsets(BLOCK_M, BLOCK_N)
    offs_p = tl.program_id(1) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)  # packed rows of this tile
    scale_2 = tl.load(scale_2_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = load_tile(a_ptr, offs_m, offs_k, M, K, stride_am, stride_ak, 0.0)
        packed = load_tile(w_ptr, offs_p, offs_k, N // 2, K, stride_wp, stride_wk, 0).to(tl.int32)
        pairs = tl.join(packed & 0xF, packed >> 4)  # (BLOCK_N // 2, BLOCK_K, 2): even row, odd row
        q = int4_decode(tl.reshape(tl.permute(pairs, (0, 2, 1)), (BLOCK_N, BLOCK_K)))
        scale = load_group_scales(scale_ptr, offs_n, offs_k, N, K, stride_sn, stride_sg, GROUP_SIZE, 0.0)
        ratio = (scale.to(tl.float16).to(tl.float32) * tl.math.div_rn(1.0, scale_2)).to(tl.float16).to(tl.float32)
        w = fp8_e4m3_round(q.to(tl.float32) * ratio).to(tl.float8e4nv)  # exact: already on the grid
        acc = mma(acc, a, tl.trans(w), DOT_DTYPE)
    a_scale = tl.load(a_scale_ptr)
    store_out_tile(out_ptr, bias_ptr, acc * a_scale * scale_2, offs_m, offs_n, M, N, stride_om, stride_on, HAS_BIAS)


def w4a8_gemm(a: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
              weight_scale_2: torch.Tensor, group_size: int, out_dtype: torch.dtype, bias: torch.Tensor = None,
              fp8_dot: bool = None, block_m: int = None, block_n: int = None, block_k: int = None) -> torch.Tensor:
    """(M, K) fp8 activations -> (M, N) `out_dtype`; see the module docstring for the layout."""
    m, k = a.shape
    n = 2 * weight.shape[0]
    require(a.dtype == torch.float8_e4m3fn, f"W4A8 activations must be float8_e4m3fn, got {a.dtype}")
    require(weight.dtype == torch.uint8 and weight.shape[1] == k, f"INT4 weight must be uint8 (N/2, {k})")
    require(weight_scale.shape == (n, k // group_size) and k % group_size == 0,
            f"weight_scale {tuple(weight_scale.shape)} does not match N={n}, K={k}, group {group_size}")
    bm, bn, bk = gemm_blocks(m, n, k, a.device, block_m, block_n, block_k, n_multiple=2)  # whole packed rows
    out = torch.empty((m, n), device=a.device, dtype=out_dtype)
    w4a8_gemm_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        a, a_scale, weight, weight_scale, weight_scale_2, bias, out,
        m, n, k, group_size,
        a.stride(0), a.stride(1), weight.stride(0), weight.stride(1),
        weight_scale.stride(0), weight_scale.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, DOT_DTYPE=fp8_dot_dtype(a.device, fp8_dot),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
    )
    return out
