"""Round-to-nearest weight quantization with the native kernels of `native_quantize.c`.

`quantize_weight_native` returns what `numerics.quantize_weight` returns, bit for bit, for the
formats and inputs the kernels cover, reading the bf16 or fp16 weight once (twice where a per-tensor
scale comes from the weight's own amax: FP8, NVFP4) with no fp32 temporaries; elsewhere it returns
None and the caller keeps the torch path. Covered: INT4 group-wise (`int4_awq`, `w4a8_awq`),
per-channel INT8 and NVFP4 with max-derived scales (NVFP4's and W4A8's second-level scale from a
given `global_amax` or the weight's), per-tensor FP8 with a max-derived or a given scale. Weights
holding NaN or infinity also go to the torch path, whose handling of them the kernels do not reproduce.
"""

import math
from typing import Optional

import torch

from .. import formats as F
from ..numerics import FP8_MAX, scale_from_amax
from ..numerics.nvfp4 import E2M1_MAX, NVFP4_BLOCK, nvfp4_global_scale
from . import native

# The kernels' weight dtypes and the flag that selects fp16's conversion.
FP16_FLAG = {torch.bfloat16: 0, torch.float16: 1}
# Smallest magnitude pattern that is not finite: infinity's, then NaNs above it.
NON_FINITE_BITS = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}
INT4_GROUP_MULTIPLE = 32  # the INT4 kernel reads groups 32 weights at a time
# Every tensor a kernel writes is made on the CPU explicitly: under a default-device context (the loader's
# meta device) a pointer to a meta tensor's data would crash the process.
CPU = torch.device("cpu")


def quantize_weight_native(w: torch.Tensor, fmt: F.Format, group_size: Optional[int] = None,
                           global_amax: Optional[torch.Tensor] = None,
                           weight_scale: Optional[torch.Tensor] = None) -> Optional[dict]:
    """`numerics.quantize_weight(w, fmt, group_size, global_amax, weight_scale)`, or None where the
    kernels do not apply (no kernels, another format or dtype, a given INT scale, a non-finite weight)."""
    lib = native.quantize_library()
    if lib is None or not _fits(w):
        return None
    group_size = group_size or fmt.group_size
    if fmt.weight == F.INT4 and weight_scale is None:
        return _int4(lib, w, fmt, group_size, global_amax)
    if fmt.weight == F.INT8 and weight_scale is None:
        return _int8(lib, w)
    if fmt.weight == F.FP8 and fmt.weight_granularity == F.PER_TENSOR:
        return _fp8(lib, w, weight_scale)
    if fmt.weight == F.NVFP4 and weight_scale is None:
        return _nvfp4(lib, w, global_amax)
    return None


def abs_amax_native(w: torch.Tensor) -> Optional[torch.Tensor]:
    """`numerics.scales.abs_amax(w)` (max |w|, fp32) in one pass of the kernels, or None where they do not
    apply (then the caller's torch op decides, also for NaN and infinity)."""
    lib = native.quantize_library()
    if lib is None or not _fits(w):
        return None
    return _amax(lib.hfptq_amax16(w.data_ptr(), w.numel(), torch.get_num_threads()), w.dtype)


def _fits(w: torch.Tensor) -> bool:
    """A 2-D, contiguous, non-empty CPU weight of a dtype the kernels read."""
    return (w.device.type == "cpu" and w.dim() == 2 and w.dtype in FP16_FLAG and w.is_contiguous()
            and w.numel() > 0)


def _amax(bits: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The fp32 amax a kernel's largest magnitude pattern stands for; None when it is not finite."""
    if bits >= NON_FINITE_BITS[dtype]:
        return None
    return torch.tensor([bits], dtype=torch.int16, device=CPU).view(dtype)[0].float()


def _int4(lib, w: torch.Tensor, fmt: F.Format, group_size: int, global_amax) -> Optional[dict]:
    n, k = w.shape
    if n % 2 or k % group_size or group_size % INT4_GROUP_MULTIPLE:
        return None  # the torch path, which stores or rejects such shapes as it always has
    codes = torch.empty(n // 2, k, dtype=torch.uint8, device=CPU)
    scales = torch.empty(n, k // group_size, dtype=torch.float32, device=CPU)
    bits = lib.hfptq_quantize_int4(w.data_ptr(), n, k, group_size, FP16_FLAG[w.dtype], codes.data_ptr(),
                                   scales.data_ptr(), torch.get_num_threads())
    amax = _amax(bits, w.dtype)
    if amax is None:
        return None
    out = {"weight": codes, "weight_scale": scales}
    if fmt.fp8_weight_scale_2:
        out["weight_scale_2"] = scale_from_amax(amax if global_amax is None else global_amax, FP8_MAX)
    return out


def _int8(lib, w: torch.Tensor) -> Optional[dict]:
    n, k = w.shape
    codes = torch.empty(n, k, dtype=torch.int8, device=CPU)
    scales = torch.empty(n, dtype=torch.float32, device=CPU)
    bits = lib.hfptq_quantize_int8(w.data_ptr(), n, k, FP16_FLAG[w.dtype], codes.data_ptr(), scales.data_ptr(),
                                   torch.get_num_threads())
    return None if _amax(bits, w.dtype) is None else {"weight": codes, "weight_scale": scales}


def _fp8(lib, w: torch.Tensor, weight_scale: Optional[torch.Tensor]) -> Optional[dict]:
    threads = torch.get_num_threads()
    if weight_scale is None:  # the tensor's own scale, from its amax
        amax = _amax(lib.hfptq_amax16(w.data_ptr(), w.numel(), threads), w.dtype)
        if amax is None:
            return None
        weight_scale = scale_from_amax(amax, FP8_MAX)
    elif weight_scale.dim() != 0:
        return None  # a per-tensor format's scale is a scalar; anything else is the torch path's to judge
    scale = weight_scale.float().item()
    if not (math.isfinite(scale) and scale > 0):  # x / scale would make NaNs, which the kernel does not round
        return None
    codes = torch.empty(w.shape, dtype=torch.float8_e4m3fn, device=CPU)
    bits = lib.hfptq_quantize_fp8(w.data_ptr(), w.numel(), scale, FP16_FLAG[w.dtype], codes.data_ptr(), threads)
    return None if _amax(bits, w.dtype) is None else {"weight": codes, "weight_scale": weight_scale}


def _nvfp4(lib, w: torch.Tensor, global_amax: Optional[torch.Tensor]) -> Optional[dict]:
    n, k = w.shape
    if k % NVFP4_BLOCK:
        return None
    threads = torch.get_num_threads()
    if global_amax is None:  # the weight's own second-level scale, from its amax
        global_amax = _amax(lib.hfptq_amax16(w.data_ptr(), w.numel(), threads), w.dtype)
        if global_amax is None:
            return None
    scale_2 = nvfp4_global_scale(global_amax)
    if scale_2.dim() != 0 or not (math.isfinite(scale_2.item()) and scale_2.item() > 0):
        return None
    denominator = (E2M1_MAX * scale_2).item()  # the block amax's divisor, rounded as `nvfp4_block_scales` rounds it
    codes = torch.empty(n, k // 2, dtype=torch.uint8, device=CPU)
    block_scales = torch.empty(n, k // NVFP4_BLOCK, dtype=torch.float8_e4m3fn, device=CPU)
    bits = lib.hfptq_quantize_nvfp4(w.data_ptr(), n, k, scale_2.item(), denominator, FP16_FLAG[w.dtype],
                                    codes.data_ptr(), block_scales.data_ptr(), threads)
    if _amax(bits, w.dtype) is None:
        return None
    return {"weight": codes, "weight_scale": block_scales, "weight_scale_2": scale_2}
