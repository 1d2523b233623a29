"""Weight fake quantization for the calibration searches: the reference's values, on the fastest path.

AWQ's scale search and the clip of NVFP4's global amax quantize and dequantize a layer's weight dozens of
times and need only the values. For NVFP4 on the CPU the native kernel (`native_fake_quantize.c`) does it
in one pass, bit for bit `numerics.weights.fake_quantize_weight`; every other case is that function.
"""

from typing import Optional

import torch

from .. import formats as F
from ..numerics.nvfp4 import NVFP4_BLOCK, nvfp4_global_scale
from ..numerics.scales import abs_amax
from ..numerics.weights import fake_quantize_weight as reference_fake_quantize_weight
from . import native


def fake_quantize_weight(w: torch.Tensor, fmt: F.Format, group_size: Optional[int] = None,
                         global_amax: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`numerics.weights.fake_quantize_weight(w, fmt, group_size, global_amax)`, bit for bit."""
    if fmt.weight == F.NVFP4 and w.device.type == "cpu" and w.shape[-1] % NVFP4_BLOCK == 0 and native.library():
        w32 = w.detach().float().contiguous()
        scale_2 = nvfp4_global_scale(abs_amax(w32) if global_amax is None else global_amax)
        fake = native.nvfp4_fake_quantize_weight(w32, scale_2.item()) if scale_2.numel() == 1 else None
        if fake is not None:
            return fake
    return reference_fake_quantize_weight(w, fmt, group_size, global_amax)
