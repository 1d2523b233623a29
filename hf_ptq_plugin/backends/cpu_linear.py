"""QuantLinear's CPU backend: the reference's math on torch's fast CPU kernels.

The activation side gives the reference's values
(`x * pre_quant_scale` in the activation dtype, then `quantize_activation` / `int_quantize`, or
their op-lean equivalents in `cpu_activations`, with the same scale); the GEMM runs on the weight
form `cpu_weights` cached for the layer:

  dense     F.linear on the reference's fp32 weight: the reference's output, bit for bit (or,
            inside `cpu_weights.bf16_dense_weights`, on its weight and activations rounded to bf16).
            fp32 / fp16 activations only where the native kernels cannot run.
  fp16pack  fbgemm's fp16-weight GEMM with fp32 activations: the reference's products (or an
            fp16-rounded weight, see cpu_weights), accumulated in fp32 in another order.
  int4pack  torch's packed INT4 matmul on bf16 activations with bf16 group scales (<= 2**-9
            relative each) and a bf16 output (one more 2**-9).
  native    `native.py`'s kernels on the checkpoint's codes: fp32 x_q times the weight decoded to fp32
            (exact but for INT4's code x group scale, rounded once in fp32), fp32 sums; up to
            NATIVE_GEMV_ROWS rows in the kernel's own loop, more through torch's fp32 GEMM on a few
            hundred decoded weight rows at a time.
  int8pack  W8A16: torch's INT8 weight matmul on bf16 activations with unit scales; the fp32
            scales multiply its bf16 output. W8A8: an int8 x int8 product of the integer activation
            codes and the weight's codes with exact int32 sums, so a row's output does not depend on
            how many rows share the call (int8pack's bf16 output would round them): `native.w8a8`
            where the native library is the AVX2 build (and K a multiple of native.BLOCK, at most
            native.W8A8_MAX_K), else torch._int_mm. Both give the same int32 sums, bit for bit.
"""

import torch
import torch.nn.functional as F_nn

from .. import formats as F
from ..numerics import int_quantize
from . import native
from .cpu_activations import fast_quantize_activation
from .cpu_weights import aligned_for_int8pack, build_cpu_weight

# W8A8 on torch._int_mm: up to INT_MM_BY_ROWS rows, one matrix-vector call per row beats one
# GEMM call (BENCHMARKS.md, "W8A8 kernel by rows": 0.5 ms per row against about 3 ms).
INT_MM_BY_ROWS = 6
# The native kernels' matrix-vector loop up to this many rows; above it, decoding chunks of the weight for
# torch's GEMM is faster (BENCHMARKS.md, "CPU speed per format").
NATIVE_GEMV_ROWS = 8


def cpu_linear(module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` for a CPU tensor x (..., K); the reference's numbers within the bounds above."""
    # module._buffers / _parameters rather than attributes: nn.Module.__getattr__ is slow, and
    # decoding makes hundreds of these calls per token.
    buffers, bias = module._buffers, module._parameters.get("bias")
    pre_quant_scale = buffers.get("pre_quant_scale")
    if pre_quant_scale is not None:
        x = x * pre_quant_scale  # in the activation dtype, as the reference (and engines) do
    weight = module.cpu_weight_cache
    if weight is None or not weight.is_current(buffers, x.dtype):
        weight = module.cpu_weight_cache = _build(module, x.dtype)
    if weight.kind == "dense":  # the reference's weight, activations quantized to the reference's values
        x_q = fast_quantize_activation(x, module.fmt, module._activation_scale(x))  # fp32
        dtype = weight.matrix.dtype  # fp32, or bf16 inside `bf16_dense_weights`
        return F_nn.linear(x_q.to(dtype), weight.matrix, None if bias is None else bias.to(dtype)).to(x.dtype)
    x2d = x.reshape(-1, x.shape[-1])
    if weight.kind == "int4pack":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2d.contiguous(), weight.matrix, module.group_size,
                                                       weight.scales)
        if bias is None:  # already bf16: skip two casts per call (decode makes hundreds a token)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        y = y.float()
    elif weight.kind == "int8pack":
        y = _int8pack(module, weight, x2d)
    elif weight.kind == "native":
        y = _native(module, weight, x2d)
    else:
        x_q = fast_quantize_activation(x2d, module.fmt, module._activation_scale(x2d))  # fp32 (M, K)
        y = torch.ops.quantized.linear_dynamic_fp16(x_q.contiguous(), weight.matrix) * weight.out_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def _build(module, act_dtype: torch.dtype):
    """The layer's cached weight form. When torch's int8 kernel needs an aligned copy of the int8 weight (one
    memory-mapped from a file at an odd offset), the layer adopts that copy as its `weight`: the same values,
    held once instead of twice, and the mapped original is released."""
    weight = build_cpu_weight(module.fmt, module.weight_buffers(), module.group_size, act_dtype)
    if weight.kind == "int8pack" and weight.matrix is not module._buffers["weight"]:
        module._buffers["weight"] = weight.matrix
        weight = build_cpu_weight(module.fmt, module.weight_buffers(), module.group_size, act_dtype)
    return weight


def _native(module, weight, x2d: torch.Tensor) -> torch.Tensor:
    """The `native` kind's product, fp32 (M, N) (module docstring)."""
    x_q = fast_quantize_activation(x2d, module.fmt, module._activation_scale(x2d)).contiguous()  # fp32 (M, K)
    n, group = module.out_features, module.group_size or 0
    multiply = native.gemv if x_q.shape[0] <= NATIVE_GEMV_ROWS else native.matmul_by_chunks
    return multiply(weight.layout, x_q, weight.matrix, n, weight.scales, group) * weight.out_scale


def _int8pack(module, weight, x2d: torch.Tensor) -> torch.Tensor:
    """The `int8pack` kind's GEMM: W8A16's int8pack, or W8A8's exact int8 x int8 (module docstring)."""
    if module.fmt.act == F.INT8:
        x_scale = module._activation_scale(x2d)
        codes = int_quantize(x2d, x_scale, 8)  # a new tensor, so 64-byte aligned
        if weight.layout == "w8a8":  # chosen once, when the weight form was built (cpu_weights)
            y = native.w8a8(codes, weight.matrix).float()
        elif 1 < codes.shape[0] <= INT_MM_BY_ROWS:  # one row (decode) is one call either way
            y = torch.cat([torch._int_mm(row, weight.matrix.t()) for row in codes.split(1)]).float()
        else:
            y = torch._int_mm(codes, weight.matrix.t()).float()
        return y * (x_scale * weight.out_scale)
    y = torch.ops.aten._weight_int8pack_mm(aligned_for_int8pack(x2d), weight.matrix, weight.scales)
    return y.float() * weight.out_scale
