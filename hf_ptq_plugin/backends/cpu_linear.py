"""QuantLinear's CPU backend: the reference's math on torch's fast CPU kernels.

The activation side gives the reference's values
(`x * pre_quant_scale` in the activation dtype, then `quantize_activation` / `int_quantize`, or
their op-lean equivalents in `cpu_activations`, with the same scale); the GEMM runs on the weight
form `cpu_weights` cached for the layer:

  dense     F.linear on the reference's fp32 weight: the reference's output, bit for bit (or,
            inside `cpu_weights.bf16_dense_weights`, on its weight and activations rounded to bf16).
  fp16pack  fbgemm's fp16-weight GEMM with fp32 activations: the reference's products (or an
            fp16-rounded weight, see cpu_weights), accumulated in fp32 in another order.
  int4pack  torch's packed INT4 matmul on bf16 activations with bf16 group scales (<= 2**-9
            relative each) and a bf16 output (one more 2**-9).
  int8pack  torch's INT8 weight matmul on bf16 activations (W8A8: the integer activation codes,
            exact in bf16) with unit scales; the fp32 scales multiply its bf16 output. W8A8 with
            one row or many (prefill) runs torch's int8 x int8 GEMM instead: exact int32 sums.
"""

import torch
import torch.nn.functional as F_nn

from .. import formats as F
from ..numerics import int_quantize
from .cpu_activations import fast_quantize_activation
from .cpu_weights import aligned_for_int8pack, build_cpu_weight

# W8A8 runs on torch._int_mm for one row (its matrix-vector path beats int8pack) and from
# INT_MM_MIN_ROWS rows on; int8pack wins in between (BENCHMARKS.md, "W8A8 kernel by rows").
INT_MM_MIN_ROWS = 16


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
        weight = module.cpu_weight_cache = build_cpu_weight(module.fmt, module.weight_buffers(), module.group_size,
                                                            x.dtype)
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
    else:
        x_q = fast_quantize_activation(x2d, module.fmt, module._activation_scale(x2d))  # fp32 (M, K)
        y = torch.ops.quantized.linear_dynamic_fp16(x_q.contiguous(), weight.matrix) * weight.out_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def _int8pack(module, weight, x2d: torch.Tensor) -> torch.Tensor:
    """The `int8pack` kind's GEMM (module docstring), or W8A8's int8 x int8 one (INT_MM_MIN_ROWS)."""
    if module.fmt.act == F.INT8:
        x_scale = module._activation_scale(x2d)
        codes = int_quantize(x2d, x_scale, 8)  # a new tensor, so 64-byte aligned
        if codes.shape[0] == 1 or codes.shape[0] >= INT_MM_MIN_ROWS:
            y = torch._int_mm(codes, weight.matrix.t()).float()
        else:  # integers in [-128, 127]: exact in bf16
            y = torch.ops.aten._weight_int8pack_mm(codes.to(torch.bfloat16), weight.matrix, weight.scales).float()
        return y * (x_scale * weight.out_scale)
    y = torch.ops.aten._weight_int8pack_mm(aligned_for_int8pack(x2d), weight.matrix, weight.scales)
    return y.float() * weight.out_scale
