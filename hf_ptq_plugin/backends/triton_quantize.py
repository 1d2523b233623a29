"""Weight quantization with the Triton kernels: the same tensors as `numerics.quantize_weight`.

For the CUDA load path (one weight at a time, as it is read): FP8 (per tensor, channel or
128-tile), INT4 group-wise (`int4_awq`, `w4a8_awq`) and NVFP4 run the quantize kernels; INT8 and
MXFP8 have no kernel and use the reference. The amax reductions that fix the scales stay in
torch (one pass, already fast on a GPU); the kernels do the division, rounding and packing,
bit-identical to the reference (tested under TRITON_INTERPRET=1).
"""

from typing import Optional

import torch

from .. import formats as F
from ..numerics import FP8_MAX, quantize_weight, scale_from_amax
from ..numerics.nvfp4 import nvfp4_global_scale
from ..numerics.weights import fp8_weight_scale
from .triton_linear import load_kernels


def quantize_weight_triton(w: torch.Tensor, fmt: F.Format, group_size: Optional[int] = None,
                           global_amax: Optional[torch.Tensor] = None) -> dict:
    """Drop-in for `numerics.quantize_weight` (same keys, dtypes, shapes and bits) on a kernel device."""
    k = load_kernels()
    group_size = group_size or fmt.group_size
    w = w.detach()
    if global_amax is None:
        global_amax = w.abs().amax().float()
    if fmt.weight == F.FP8:
        scale = fp8_weight_scale(w, fmt, group_size)
        tile = group_size if fmt.weight_granularity == F.PER_TILE else None
        return {"weight": k.fp8_quantize(w, scale, tile=tile)[0], "weight_scale": scale}
    if fmt.weight == F.INT4:
        packed, scale = k.int4_quantize(w, group_size)
        out = {"weight": packed, "weight_scale": scale}
        if fmt.fp8_weight_scale_2:
            out["weight_scale_2"] = scale_from_amax(global_amax, FP8_MAX)
        return out
    if fmt.weight == F.NVFP4:
        scale_2 = nvfp4_global_scale(global_amax)
        packed, block_scale = k.nvfp4_quantize(w, scale_2)
        return {"weight": packed, "weight_scale": block_scale, "weight_scale_2": scale_2}
    return quantize_weight(w, fmt, group_size, global_amax)

