"""Value checks of a loaded checkpoint's scale tensors.

The safetensors header gives names, dtypes and shapes only (checked before loading, `prequantized_header.py`);
a NaN, infinite, zero or negative scale loads without complaint and gives finite but wrong logits,
which an export would then republish. After loading, every scale buffer is checked once, with one
vectorized test per tensor (scales are small): finite and > 0, with the dtype and shape its format
expects. FP8 E4M3 block scales (NVFP4) are checked as their float values; MXFP8's E8M0 exponents
(uint8) can be any byte except 255, which is E8M0's NaN.
"""

from typing import Dict, Optional, Tuple

import torch
from torch import nn

SCALE_NAMES = ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale", "k_scale", "v_scale")
E8M0_NAN = 255
Spec = Tuple[Tuple[int, ...], torch.dtype]


def check_scale(name: str, tensor: torch.Tensor, spec: Optional[Spec] = None) -> None:
    """ValueError naming `name` if `tensor` is not a valid scale (or has not the (shape, dtype) of `spec`)."""
    if spec is not None:
        shape, dtype = spec
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"checkpoint tensor {name!r}: expected {dtype} {list(shape)}; "
                             f"found {tensor.dtype} {list(tensor.shape)}")
    if tensor.numel() == 0:
        return
    if tensor.dtype == torch.uint8:  # E8M0 exponents: every byte but 255 is a power of two > 0
        bad = tensor == E8M0_NAN
        if bool(bad.any()):
            raise ValueError(f"checkpoint tensor {name!r}: E8M0 scale is NaN (byte 255) at index "
                             f"{_first(bad)}; found {int(tensor.flatten()[bad.flatten()][0])}")
        return
    if not tensor.is_floating_point():
        raise ValueError(f"checkpoint tensor {name!r}: a scale must be a float tensor; found {tensor.dtype}")
    values = tensor.float()
    for bad, what in ((~torch.isfinite(values), "is not finite"), (values <= 0, "is not > 0")):
        if bool(bad.any()):
            found = values.flatten()[bad.flatten()][0].item()
            raise ValueError(f"checkpoint tensor {name!r}: scale {what} at index {_first(bad)}; found {found}")


def check_model_scales(model: nn.Module, specs: Dict[str, Spec]) -> None:
    """Check every scale buffer of `model`; `specs` gives the expected (shape, dtype) by full buffer name."""
    for name, buffer in model.named_buffers():
        if name.rpartition(".")[2] in SCALE_NAMES and buffer.device.type != "meta":
            check_scale(name, buffer, specs.get(name))


def _first(mask: torch.Tensor) -> list:
    return [int(i) for i in mask.nonzero()[0]] if mask.dim() else []
