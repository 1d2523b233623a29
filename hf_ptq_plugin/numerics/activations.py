"""Activation fake quantization at run time: what the serving engine does to a Linear's input.

Static formats use the calibrated `input_scale`; dynamic ones compute scales from the live
tensor (per token for FP8_PER_CHANNEL_PER_TOKEN, per 32-block for MXFP8, per 16-block under the
calibrated global scale for NVFP4). Returns fp32 values on the quantization grid.

FP8 and NVFP4 activations are rounded with the serving engines' arithmetic, not ModelOpt's: the
engines' kernels quantize activations at inference, so that is what the model computes there
(`fp8.fp8_quantize_static_activation`, `fp8.fp8_token_scales`, `nvfp4.nvfp4_activation_quantize`).
"""

from typing import Optional

import torch

from .. import formats as F
from .fp8 import FP8_MAX, fp8_dequantize, fp8_fake_quantize, fp8_quantize_static_activation, fp8_token_scales
from .integer import INT8_MAX, int_dequantize, int_quantize
from .mx import mxfp8_fake_quantize
from .nvfp4 import nvfp4_activation_fake_quantize, nvfp4_global_scale
from .scales import scale_from_amax


def quantize_activation(x: torch.Tensor, fmt: F.Format, input_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """Fake-quantize activations x (..., K) per `fmt`; weight-only formats return x as fp32."""
    if fmt.act is None:
        return x.float()
    if fmt.act_scaling == F.DYNAMIC_TOKEN:
        return fp8_fake_quantize(x, fp8_token_scales(x))
    if fmt.act == F.MXFP8:
        return mxfp8_fake_quantize(x)
    if fmt.act == F.NVFP4:
        return nvfp4_activation_fake_quantize(x, input_scale)
    if fmt.act == F.FP8:
        return fp8_dequantize(fp8_quantize_static_activation(x, input_scale), input_scale)
    if fmt.act == F.INT8:
        return int_dequantize(int_quantize(x, input_scale, 8), input_scale)
    raise ValueError(f"unknown activation encoding {fmt.act!r} in format {fmt.name!r}")


def input_scale_from_amax(amax: torch.Tensor, fmt: F.Format) -> torch.Tensor:
    """Static per-tensor activation scale from a calibrated amax (`input_scale` in the checkpoint).

    FP8 and W4A8: amax / 448; INT8: amax / 127; NVFP4: the global scale amax / (6 * 448).
    """
    if fmt.act == F.NVFP4:
        return nvfp4_global_scale(amax)
    if fmt.act == F.INT8:
        return scale_from_amax(amax, INT8_MAX)
    return scale_from_amax(amax, FP8_MAX)
