"""Triton device functions that load and store the tiles every GEMM kernel here shares, and their
`mma` step. Imports only triton.
"""

import triton
import triton.language as tl

from .rounding import round_to_dtype


@triton.jit
def tile_offsets(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(offs_m, offs_n): the rows and columns of this program's output tile, grid (M tiles, N tiles)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n


@triton.jit
def load_tile(ptr, offs_r, offs_c, R, C, stride_r, stride_c, other: tl.constexpr):
    """Tile [offs_r, offs_c] of an (R, C) matrix in its stored dtype; `other` outside (R, C)."""
    mask = (offs_r[:, None] < R) & (offs_c[None, :] < C)
    return tl.load(ptr + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c, mask=mask, other=other)


@triton.jit
def load_group_scales(ptr, offs_n, offs_k, N, K, stride_n, stride_g, GROUP, other: tl.constexpr):
    """scale[n, k // GROUP] for each element of the weight tile [offs_n, offs_k]; `other` outside (N, K)."""
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    return tl.load(ptr + offs_n[:, None] * stride_n + (offs_k[None, :] // GROUP) * stride_g, mask=mask, other=other)


@triton.jit
def load_scale(ptr, offs, size, PER_ROW: tl.constexpr):
    """ptr[offs] (zero at offs >= size) if PER_ROW, else the single per-tensor scale ptr[0].

    Pass offs_m[:, None] or offs_n[None, :]: the result then scales the accumulator's rows or columns.
    """
    if PER_ROW:
        return tl.load(ptr + offs, mask=offs < size, other=0.0)
    else:
        return tl.load(ptr)


@triton.jit
def load_x_tile(x_ptr, pqs_ptr, offs_m, offs_k, M, K, stride_xm, stride_xk, HAS_PQS: tl.constexpr):
    """(BLOCK_M, BLOCK_K) fp32 tile of x (* pre_quant_scale); zero outside (M, K)."""
    x = load_tile(x_ptr, offs_m, offs_k, M, K, stride_xm, stride_xk, 0.0)
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

    fp32 uses "ieee" (no TF32) so an fp32 model gets fp32 products; 16-bit and fp8 operands use the
    tensor cores. The launchers pick fp32 for bf16 under the interpreter, whose bf16 dot is wrong.
    """
    if DOT_DTYPE == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc)
