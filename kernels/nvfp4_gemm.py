"""NVFP4 GEMM: FP4 (E2M1) weights with FP8 16-block scales; activations quantized on the fly.

Layout (the unified checkpoint's `nvfp4`, `nvfp4_awq`, `w4a16_nvfp4`):
    x              (M, K)       fp32 / fp16 / bf16 activations
    weight         (N, K // 2)  uint8, two E2M1 codes per byte along K, element 2k in the low
                                nibble; code = sign bit 3 | magnitude index bits 0-2
    weight_scale   (N, K // 16) float8_e4m3fn block scales
    weight_scale_2 ()           fp32 global scale: w = e2m1 * weight_scale * weight_scale_2
    input_scale    ()           fp32 global activation scale (QUANTIZE_X); None for W4A16
    pre_quant_scale (K,)        optional, in x's dtype (AWQ)
    out            (M, N)       x's dtype

QUANTIZE_X: each x tile is split into 16-element blocks and quantized in the serving engine's
order, exactly as `numerics.nvfp4.nvfp4_activation_quantize` does: G = 1 / input_scale, block
scale SF = fp8(G * (amax * fp32(1 / 6))), codes = e2m1(x * (1 / (SF * (1 / G)))) (every reciprocal
rounded to nearest with div_rn, e4m3 rounding emulated; an SF of 0 zeroes its block). Both
operands then hold e2m1 * e4m3-scale products: at most 6 significant bits in
[2**-10, 2688] (or 0), exact in fp16, so tl.dot runs on fp16 operands with exact
products and the two global scales multiply the fp32 sum once. W4A16 (no input_scale): x is
multiplied in the dot dtype with the fp16/bf16-exact weight products. K % 16 == 0; K and N need
not be multiples of the tiles (masked); BLOCK_K must be a multiple of 16.
"""

import torch
import triton
import triton.language as tl

from .launch import dot_dtype, gemm_setup, require
from .rounding import e2m1_decode, e2m1_index, e2m1_magnitude, fp8_e4m3_round
from .tiles import load_tile, load_x_tile, mma, store_out_tile, tile_offsets

NVFP4_BLOCK = 16
RCP_E2M1_MAX = tl.constexpr(0.1666666716337204)  # fp32(1 / 6), exactly: the engine's rcp(6.0f)


@triton.jit
def _quantize_x_blocks(x, input_scale, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_M, BLOCK_K) fp32 -> e2m1 value * fp8 block scale (fp32, exact in fp16).

    vLLM csrc/quantization/fp4/nvfp4_utils.cuh, cvt_warp_fp16_to_fp4, with its rcp.approx.ftz
    replaced by correctly rounded reciprocals (`numerics.nvfp4.nvfp4_activation_block_scales`).
    """
    blocks = tl.reshape(x, (BLOCK_M, BLOCK_K // 16, 16))
    g = tl.math.div_rn(1.0, input_scale)
    scale = fp8_e4m3_round(g * (tl.max(tl.abs(blocks), axis=2) * RCP_E2M1_MAX))  # saturates at 448
    divisor = tl.where(scale > 0, scale, 1.0) * tl.math.div_rn(1.0, g)  # no 1 / 0 in the lanes dropped below
    out_scale = tl.where(scale > 0, tl.math.div_rn(1.0, divisor), 0.0)
    y = blocks * out_scale[:, :, None]
    magnitude = e2m1_magnitude(e2m1_index(tl.abs(y)))
    value = tl.where(y < 0, -magnitude, magnitude) * scale[:, :, None]
    return tl.reshape(value, (BLOCK_M, BLOCK_K))


@triton.jit
def nvfp4_gemm_kernel(
    x_ptr, x_scale_ptr, pqs_ptr, w_ptr, w_scale_ptr, w_scale_2_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sk, stride_om, stride_on,
    QUANTIZE_X: tl.constexpr, HAS_PQS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m, offs_n = tile_offsets(BLOCK_M, BLOCK_N)
    offs_kp = tl.arange(0, BLOCK_K // 2)  # packed columns of one K step
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if QUANTIZE_X:
        x_global = tl.load(x_scale_ptr)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = load_x_tile(x_ptr, pqs_ptr, offs_m, offs_k, M, K, stride_xm, stride_xk, HAS_PQS)
        # (BLOCK_N, BLOCK_K // 2) bytes -> (BLOCK_N, BLOCK_K) codes, low nibble first along K
        packed_cols = k0 // 2 + offs_kp
        packed = load_tile(w_ptr, offs_n, packed_cols, N, K // 2, stride_wn, stride_wk, 0).to(tl.int32)
        codes = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_N, BLOCK_K))
        scale_cols = k0 // 16 + tl.arange(0, BLOCK_K // 16)
        w_scale = load_tile(w_scale_ptr, offs_n, scale_cols, N, K // 16, stride_sn, stride_sk, 0.0).to(tl.float32)
        w = tl.reshape(tl.reshape(e2m1_decode(codes), (BLOCK_N, BLOCK_K // 16, 16)) * w_scale[:, :, None],
                       (BLOCK_N, BLOCK_K))
        if QUANTIZE_X:
            acc = mma(acc, _quantize_x_blocks(x, x_global, BLOCK_M, BLOCK_K), tl.trans(w), tl.float16)
        else:
            acc = mma(acc, x, tl.trans(w), DOT_DTYPE)
    acc = acc * tl.load(w_scale_2_ptr)
    if QUANTIZE_X:
        acc = acc * x_global
    store_out_tile(out_ptr, bias_ptr, acc, offs_m, offs_n, M, N, stride_om, stride_on, HAS_BIAS)


def nvfp4_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor,
               input_scale: torch.Tensor = None, pre_quant_scale: torch.Tensor = None, bias: torch.Tensor = None,
               block_m: int = None, block_n: int = None, block_k: int = None) -> torch.Tensor:
    """x (..., K) -> (..., N) in x's dtype; activations quantized to NVFP4 when `input_scale` is given."""
    n, half_k = weight.shape
    k = 2 * half_k
    require(weight.dtype == torch.uint8, f"NVFP4 weight must be uint8 (N, K/2), got {weight.dtype}")
    # A partial last block would read a masked (zero) block scale and drop its weights without a word.
    require(k % NVFP4_BLOCK == 0, f"NVFP4 in_features must be a multiple of {NVFP4_BLOCK}, got {k}")
    require(weight_scale.shape == (n, k // NVFP4_BLOCK) and weight_scale.dtype == torch.float8_e4m3fn,
            f"weight_scale must be float8_e4m3fn ({n}, {k // NVFP4_BLOCK}), got {weight_scale.dtype} "
            f"{tuple(weight_scale.shape)}")
    x2d, out, (bm, bn, bk) = gemm_setup(x, n, k, block_m, block_n, block_k, k_multiple=NVFP4_BLOCK)
    m = x2d.shape[0]
    nvfp4_gemm_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        x2d, input_scale, pre_quant_scale, weight, weight_scale, weight_scale_2, bias, out,
        m, n, k,
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1),
        weight_scale.stride(0), weight_scale.stride(1), out.stride(0), out.stride(1),
        QUANTIZE_X=input_scale is not None, HAS_PQS=pre_quant_scale is not None, HAS_BIAS=bias is not None,
        DOT_DTYPE=dot_dtype(x.dtype, x.device), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
    )
    return out.reshape(*x.shape[:-1], n)
