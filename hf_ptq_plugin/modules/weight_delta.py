"""Adding a full-precision update to a QuantLinear's weight: dequantize, add, round onto the layer's grid.

Merging a LoRA adapter into its quantized base (`hf/lora.py`) needs W + delta stored in the
layer's own format. The layer keeps its scales (`weight_scale`, `weight_scale_2`, `input_scale`,
`pre_quant_scale`): W + delta is rounded onto the grid W is stored on, so the merged layer has
the same checkpoint tensors with new codes, and its calibrated activation scales stay valid.
The two formats whose scales cannot be handed to the quantizer (fp8_pb_wo's 128 x 128 tiles,
MXFP8's shared block exponents) get scales computed again from W + delta, with the same layout.

Accuracy: W is a grid point, so rounding W + delta to the nearest grid point never lands farther
from W + delta than W itself: the merged weight is at least as close to the target as the
unmerged one, element by element (W4A8 only on average: its INT4 code times a ratio is rounded
to FP8, so the nearest code is not always the nearest value). But each element moves only by a
whole number of steps: an update smaller than half a quantization step is lost. LoRA updates are
typically much smaller than an INT4 or FP4 step (a group's amax / 7 or / 6), so merging into a
4-bit layer keeps little of what the adapter learned (BENCHMARKS.md, "LoRA on INT4 SmolLM2-135M",
measures it); an 8-bit grid keeps more. To keep all of it, run the adapter unmerged, or merge
into the dense model that `model.dequantize()` gives.
"""

import torch

from .. import formats as F
from ..numerics.nvfp4 import nvfp4_quantize, pack_nibbles
from ..numerics.weights import _takes_weight_scale, quantize_weight_in_row_blocks

SCALE_BUFFERS = ("weight_scale", "weight_scale_2")
# Whether a merge into a format rounds onto the layer's stored scales (else: fresh scales): exactly
# where the quantizer takes a given weight_scale.
keeps_grid = _takes_weight_scale


@torch.no_grad()
def weight_buffers_plus(module, delta: torch.Tensor) -> dict:
    """The weight tensors of QuantLinear `module` after adding `delta` (N, K) to the weight it
    multiplies its *input* with (before `pre_quant_scale`), rounded onto the layer's grid."""
    expected = (module.out_features, module.in_features)
    if tuple(delta.shape) != expected:
        raise ValueError(f"weight update of shape {tuple(delta.shape)} does not fit the layer's weight; "
                         f"expected {expected} (out_features, in_features)")
    delta = delta.to(device=module.weight.device, dtype=torch.float32)
    if module.pre_quant_scale is not None:  # the layer computes (x * s) W^T, so x delta^T = (x * s) (delta / s)^T
        delta = delta / module.pre_quant_scale.float()
    return requantize_on_grid(module.dequantized_weight() + delta, module.fmt, module.group_size,
                              module.weight_buffers())


def requantize_on_grid(w: torch.Tensor, fmt: F.Format, group_size: int, buffers: dict) -> dict:
    """Quantize fp32 w (N, K) with the scales in `buffers` (a layer's weight tensors) where the
    format accepts given scales, and with fresh scales of the same layout where it does not."""
    scales = {name: buffers[name] for name in SCALE_BUFFERS if name in buffers}
    if fmt.weight == F.NVFP4:  # its codes depend on the second-level scale too: use both as stored
        codes, _ = nvfp4_quantize(w, scales["weight_scale_2"], scales["weight_scale"])
        return {"weight": pack_nibbles(codes), **scales}
    if not keeps_grid(fmt):
        return quantize_weight_in_row_blocks(w, fmt, group_size)
    quantized = quantize_weight_in_row_blocks(w, fmt, group_size, weight_scale=scales["weight_scale"])
    return {**quantized, **scales}  # W4A8's codes depend only on weight_scale; keep its stored weight_scale_2


def set_weight_buffers(module, buffers: dict) -> None:
    """Replace the module's weight tensors (new tensors, so any cached kernel form is rebuilt)."""
    for name, tensor in buffers.items():
        setattr(module, name, tensor)
