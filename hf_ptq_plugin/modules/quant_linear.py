"""QuantLinear: the module swapped in for nn.Linear.

Its registered buffers are exactly the unified-checkpoint tensors of its format (`weight`,
`weight_scale`, `weight_scale_2`, `input_scale`, `pre_quant_scale`), so `state_dict()` is the
checkpoint. `forward` computes what the serving engine computes: multiply by
`pre_quant_scale`, quantize the activation as the format says, multiply with the weight the
engine reconstructs.
"""

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn.functional as F_nn
from torch import nn

from .. import formats as F
from ..backends.cpu_linear import cpu_linear
from ..backends.triton_linear import triton_available, triton_linear
from ..numerics import dequantize_weight, input_scale_from_amax, quantize_activation
from ..numerics.weights import WEIGHT_BUFFERS, quantize_weight_in_row_blocks, weight_buffer_specs
from .frozen_grad import linear_with_input_grad
from .layer_plan import LayerPlan


class QuantLinear(nn.Module):
    """A Linear whose weight is stored quantized in `fmt`; see the module docstring."""

    # Set True (on one layer, or on all with `reference_forward(model)`) to bypass the kernels
    # and run the pure-torch reference, e.g. to tell a kernel bug from a quantization error.
    force_reference: bool = False
    # The CPU backend's derived weight (`backends.cpu_weights.CpuWeight`): a plain attribute, so
    # never in state_dict; rebuilt whenever the checkpoint buffers change.
    cpu_weight_cache = None

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: F.Format,
                 group_size: Optional[int] = None, dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.fmt, self.group_size, self.dtype = fmt, group_size or fmt.group_size, dtype
        for name, (shape, buffer_dtype) in weight_buffer_specs(fmt, out_features, in_features, group_size).items():
            self.register_buffer(name, torch.zeros(shape, dtype=buffer_dtype, device=device))
        if fmt.needs_calibration_data:
            self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))
        # Set only by smoothing algorithms (SmoothQuant, AWQ); absent from the checkpoint otherwise.
        self.register_buffer("pre_quant_scale", None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None
        # False until a calibrated `input_scale` is set; until then a static format measures the
        # scale from each live activation, so the model runs but is not yet what an engine runs.
        self.input_calibrated = not fmt.needs_calibration_data

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: F.Format, group_size: Optional[int] = None,
                    plan: Optional[LayerPlan] = None) -> "QuantLinear":
        """Quantize `linear.weight` (already smoothed, if a smoothing algorithm ran) into a new module,
        with what calibration decided in `plan` (None: round to nearest, no static input scale)."""
        plan = plan or LayerPlan()
        w = linear.weight
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, fmt, group_size,
                     dtype=w.dtype, device=w.device)
        w = w if plan.weight is None else plan.weight
        for name, tensor in quantize_weight_in_row_blocks(w, fmt, module.group_size, plan.weight_global_amax,
                                                          plan.weight_scale).items():
            getattr(module, name).copy_(tensor)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.data)
        if plan.pre_quant_scale is not None:
            # Its own copy: calibration hands a fused group one scale, and aliased buffers cannot be saved.
            module.pre_quant_scale = plan.pre_quant_scale.to(device=w.device, dtype=w.dtype, copy=True)
        if plan.input_amax is not None and fmt.needs_calibration_data:
            module.set_input_amax(plan.input_amax)
        return module

    def set_input_amax(self, amax: torch.Tensor) -> None:
        """Set the static activation scale from a calibrated amax (of the pre-scaled input)."""
        self.input_scale.copy_(input_scale_from_amax(amax.detach().reshape(()), self.fmt))
        self.input_calibrated = True

    def weight_buffers(self) -> dict:
        return {name: getattr(self, name) for name in WEIGHT_BUFFERS if getattr(self, name, None) is not None}

    def dequantized_weight(self) -> torch.Tensor:
        """The (N, K) fp32 weight the engine multiplies with."""
        return dequantize_weight(self.weight_buffers(), self.fmt, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The one backend choice point. The reference defines the numbers; the kernels reproduce
        # them within the tolerances their modules document, but have no backward, so inputs
        # that need a gradient (adapters on a quantized base) take the reference with an
        # input-only backward, and torch.compile traces the reference (the CPU kernels' cached
        # weight forms are state it cannot trace).
        if x.requires_grad and torch.is_grad_enabled():
            return linear_with_input_grad(self, x)
        if self.force_reference:
            return self._reference_forward(x)
        if x.is_cuda and triton_available():
            return triton_linear(self, x)
        if x.device.type == "cpu" and not torch.compiler.is_compiling():
            return cpu_linear(self, x)
        return self._reference_forward(x)

    def _reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale  # in the activation dtype, as engines apply it
        x_q = quantize_activation(x, self.fmt, self._activation_scale(x))
        bias = None if self.bias is None else self.bias.float()
        return F_nn.linear(x_q, self.dequantized_weight(), bias).to(x.dtype)

    def _activation_scale(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        if not self.fmt.needs_calibration_data:
            return None
        if self.input_calibrated:
            return self.input_scale
        return input_scale_from_amax(x.detach().float().abs().amax(), self.fmt)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt.name}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


@contextmanager
def reference_forward(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every QuantLinear of `model` runs the reference instead of a kernel.

    For debugging: `with reference_forward(model): ref = model(x)` gives the numbers the kernels
    are tested against. Restores each layer's previous setting on exit.
    """
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    previous = [layer.__dict__.get("force_reference") for layer in layers]
    for layer in layers:
        layer.force_reference = True
    try:
        yield model
    finally:
        for layer, value in zip(layers, previous):
            if value is None:
                del layer.force_reference  # back to the class default
            else:
                layer.force_reference = value
