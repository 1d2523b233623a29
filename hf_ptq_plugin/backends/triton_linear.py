"""QuantLinear's Triton backend: maps a layer's checkpoint buffers onto one kernel launcher.

It serves CUDA inputs (and CPU tensors under TRITON_INTERPRET=1, for the tests). The kernels live
in `hf_ptq_plugin.kernels` and import triton; they are imported here on first use, behind
functools.cache, so the package imports on machines without triton or CUDA. Each kernel
reproduces the reference's rounding exactly; the tolerances are those of the dot dtype (see the
kernel headers).
"""

import functools
import importlib
import importlib.util
from types import SimpleNamespace

import torch

from .. import formats as F


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


# One kernel per module, its launcher named like the module (kernels/README.md).
KERNEL_MODULES = ("fp8_block_gemm", "fp8_gemm", "fp8_quantize", "int4_gemm", "int4_quantize", "int8_gemm",
                  "mxfp8_gemm", "nvfp4_gemm", "nvfp4_quantize", "w4a8_gemm")


@functools.cache
def load_kernels() -> SimpleNamespace:
    """The launchers, GEMMs and weight quantizers; the first call imports triton (the package's only lazy
    imports are here)."""
    return SimpleNamespace(**{name: getattr(importlib.import_module(f"..kernels.{name}", __package__), name)
                              for name in KERNEL_MODULES})


def triton_linear(module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` computed by the format's Triton kernel; x (..., K) -> (..., N)."""
    fmt, k = module.fmt, load_kernels()
    x, pqs = _fusable_pre_quant_scale(module, x)
    x_scale = module._activation_scale(x)  # None for weight-only and dynamic formats
    w, scale, bias = module.weight, module.weight_scale, module.bias
    if fmt.weight == F.INT4 and fmt.act is None:
        return k.int4_gemm(x, w, scale, module.group_size, pqs, bias)
    if fmt.weight == F.INT8:
        return k.int8_gemm(x, w, scale, x_scale if fmt.act == F.INT8 else None, pqs, bias)
    if fmt.weight == F.NVFP4:
        return k.nvfp4_gemm(x, w, scale, module.weight_scale_2, x_scale if fmt.act == F.NVFP4 else None, pqs, bias)
    if fmt.weight == F.MXFP8:
        return k.mxfp8_gemm(x, w, scale, bias)
    if fmt.weight == F.FP8 and fmt.act is None:
        return k.fp8_block_gemm(x, w, scale, module.group_size, bias)
    x2d = x.reshape(-1, x.shape[-1])
    a, a_scale = k.fp8_quantize(x2d, x_scale, pre_quant_scale=pqs, activation=True)  # None: dynamic per token
    if fmt.weight == F.INT4:  # W4A8
        out = k.w4a8_gemm(a, a_scale, w, scale, module.weight_scale_2, module.group_size, x.dtype, bias)
    else:
        out = k.fp8_gemm(a, a_scale, w, scale, x.dtype, bias)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _fusable_pre_quant_scale(module, x: torch.Tensor):
    """(x, pre_quant_scale for the kernel to fuse, or None after applying it here).

    The kernels fuse `x * pre_quant_scale` rounded to x's dtype. It is applied here instead when
    torch would promote the product to another dtype, when a static format is not calibrated
    yet (the live scale is the amax of the scaled x), or when the kernel has no such input.
    """
    pqs = module.pre_quant_scale
    if pqs is None:
        return x, None
    fuses = module.fmt.weight in (F.INT4, F.INT8, F.NVFP4) or module.fmt.act == F.FP8
    if pqs.dtype == x.dtype and module.input_calibrated and fuses:
        return x, pqs
    return x * pqs, None
