"""The dtype a layer-streamed block's calibration passes compute in.

A bf16 (or fp16) model on a CPU without native instructions for that dtype (AVX512-BF16 or AMX;
e.g. any AVX2 CPU) multiplies through torch's emulated half-precision GEMMs, about ten times
slower than its fp32 ones (BENCHMARKS.md, "CPU speed per format"). There the block's statistics,
search and feed passes run in fp32: the captured block inputs are made fp32 once (each block's
outputs, the next one's inputs, then stay fp32), the block's full-precision Linears multiply
with their weight upcast per call, which is exact (every bf16 or fp16 value is an fp32 value) and
holds one Linear's fp32 weight at a time, not the block's, and the block's other half-precision
parameters (norms) are fp32 while it calibrates, then cast back. Blocks with fused experts, offload
hooks or replaced forwards keep the model's dtype (`calibration_dtype`).

The model itself keeps its dtype: only the calibration arithmetic is wider, as on a GPU, where
GEMMs accumulate in fp32 anyway. Activations between blocks are no longer rounded to bf16.
"""

import contextlib
from typing import Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..backends import cpu_blas
from ..modules.fused_experts import is_fused_experts
from ..modules.quant_experts import QuantExperts
from ..modules.quant_linear import QuantLinear

HALF = (torch.bfloat16, torch.float16)


def cpu_computes_natively(dtype: torch.dtype) -> bool:
    """Whether this CPU has instructions for `dtype` GEMMs (fp32 and wider: always)."""
    if dtype == torch.bfloat16:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if dtype == torch.float16:
        return torch.cpu._is_amx_fp16_supported()
    return True


def calibration_dtype(blocks, inputs: list) -> Optional[torch.dtype]:
    """fp32 for captured block inputs [(args, kwargs, mask)] whose hidden states are half-precision
    on a CPU without native instructions for them; None (compute as the model does) otherwise, and
    for `blocks` with modules that must keep their weights' dtype or their own forward: accelerate's
    offload hooks (which load the half-precision weights on each call), a module whose forward
    something else replaced, and fused experts (whose QuantExperts take their weights' dtype)."""
    for module in (m for block in blocks for m in block.modules()):
        if hasattr(module, "_hf_hook") or "forward" in vars(module) or is_fused_experts(module) \
                or isinstance(module, QuantExperts):
            return None
    args, kwargs, _ = inputs[0]
    hidden = next(t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))
    if hidden.device.type == "cpu" and hidden.dtype in HALF and not cpu_computes_natively(hidden.dtype):
        return torch.float32
    return None


def cast_inputs(inputs: list, dtype: Optional[torch.dtype]) -> list:
    """Captured block inputs [(args, kwargs, mask)] with every half-precision tensor (hidden states,
    rotary cos/sin, additive attention masks, encoder states) in `dtype` (None: as they are)."""
    if dtype is None:
        return inputs
    return [(_cast(args, dtype), _cast(kwargs, dtype), mask) for args, kwargs, mask in inputs]


def _cast(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.dtype in HALF else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


@contextlib.contextmanager
def computing_in(block: nn.Module, dtype: Optional[torch.dtype]) -> Iterator[None]:
    """Within, `block` computes in `dtype` (fp32) on inputs of that dtype: its nn.Linears upcast their
    weight per call, its other half-precision parameters and buffers are `dtype`. On exit those go
    back to their dtype (rounding what calibration folded into them, as the half-precision pass
    would have) and the Linears to their own forward. `dtype` None: nothing changes."""
    if dtype is None:
        yield
        return
    linears = [m for m in block.modules() if type(m) is nn.Linear]
    for linear in linears:
        linear.forward = _upcasting_forward(linear)
    upcast = _upcast_other_tensors(block, dtype)
    try:
        yield
    finally:
        for linear in linears:
            del linear.forward  # the class's forward again
        for module, leaf, tensor, original in upcast:
            if getattr(module, leaf, None) is tensor:  # not replaced by calibration (a quantized module's own)
                _cast_in_place(tensor, original)


def _upcasting_forward(linear: nn.Linear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype == linear.weight.dtype:
            return cpu_blas.linear(x, linear.weight, linear.bias)
        bias = None if linear.bias is None else linear.bias.to(x.dtype)
        return cpu_blas.linear(x, linear.weight.to(x.dtype), bias)
    return forward


Upcast = Tuple[nn.Module, str, torch.Tensor, torch.dtype]  # (module, tensor name, the tensor, its own dtype)


def _upcast_other_tensors(block: nn.Module, dtype: torch.dtype) -> List[Upcast]:
    """Make the half-precision parameters and buffers of the block's modules other than nn.Linear
    and quantized ones (whose scales keep their dtype) `dtype`, in place; [(module, name, tensor, its dtype)]."""
    upcast = []
    for module in block.modules():
        if type(module) is nn.Linear or isinstance(module, (QuantLinear, QuantExperts)):
            continue
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for leaf, tensor in own:
            if tensor is not None and tensor.dtype in HALF:
                upcast.append((module, leaf, tensor, tensor.dtype))
                _cast_in_place(tensor, dtype)
    return upcast


def _cast_in_place(tensor: torch.Tensor, dtype: torch.dtype) -> None:
    """The same Parameter or buffer object, its data in `dtype`: whoever holds it sees the change."""
    with torch.no_grad():
        tensor.data = tensor.data.to(dtype)
