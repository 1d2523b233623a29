"""Triton device functions that load and store the tiles every GEMM kernel here shares.

`load_x_tile` reads an activation tile and applies `pre_quant_scale` the way the reference
does (the product is rounded to the activation dtype, as `x * pre_quant_scale` in torch is);
`store_out_tile` adds the bias and writes the output rounded to its dtype (ties to even, also
under the interpreter). Imports only triton.
"""

import triton
import triton.language as tl

from .rounding import round_to_dtype


@triton.jit
def load_x_tile(x_ptr, pqs_ptr, offs_m, offs_k, M, K, stride_xm, stride_xk, HAS_PQS: tl.constexpr):
    """(BLOCK_M, BLOCK_K) fp32 tile of x (* pre_quant_scale); zero outside (M, K)."""
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0.0)
    x = x.to(tl.float32)  # upcast at once: the interpreter's bf16 arithmetic is wrong
    if HAS_PQS:
        pqs = tl.load(pqs_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        # A product of two 16-bit floats is exact in fp32, so one rounding to the activation
        # dtype reproduces torch's `x * pre_quant_scale` bit for bit.
        x = round_to_dtype(x * pqs[None, :], x_ptr.dtype.element_ty)
    return x


@triton.jit
def store_out_tile(out_ptr, bias_ptr, acc, offs_m, offs_n, M, N, stride_om, stride_on, HAS_BIAS: tl.constexpr):
    """Write fp32 `acc` (+ bias) to out[offs_m, offs_n], rounded to out's dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out_dtype = out_ptr.dtype.element_ty
    acc = round_to_dtype(acc, out_dtype)  # exact grid value, so the cast below is exact everywhere
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, acc.to(out_dtype), mask=mask)


@triton.jit
def mma(acc, a, b, DOT_DTYPE: tl.constexpr):
    """acc + a @ b with both operands cast to DOT_DTYPE and fp32 accumulation.

    fp32 uses "ieee" (no TF32) so an fp32 model gets fp32 products; 16-bit operands use the
    tensor cores. The launchers pick fp32 for bf16 under the interpreter, whose bf16 dot is wrong.
    """
    if DOT_DTYPE == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc)
