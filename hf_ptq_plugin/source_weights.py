"""Where a model loaded compressed came from: its full-precision safetensors, readable again by name.

`from_pretrained(src, quantization_config=PTQConfig(...))` quantizes each weight as it is read and
keeps no full-precision copy. Algorithms that change weights (SmoothQuant, AWQ, GPTQ) need that
copy, one decoder block at a time: `LoadSource` remembers the checkpoint files (and the algorithm
the load asked for), and `restore_full_precision` swaps a block's QuantLinears back to Linears
holding the source weights. Set by `PTQHfQuantizer`; used by `requantize.py`.
"""

from dataclasses import dataclass, field
from typing import Dict, List

import torch
from safetensors import safe_open
from torch import nn

from .checkpoint_load import replace_module
from .quant_linear import QuantLinear


def tensor_locations(checkpoint_files) -> Dict[str, str]:
    """{tensor name: safetensors file holding it} for the given checkpoint files."""
    locations = {}
    for path in checkpoint_files:
        if str(path).endswith(".safetensors"):
            with safe_open(path, framework="pt") as handle:
                locations.update({key: str(path) for key in handle.keys()})
    return locations


@dataclass
class LoadSource:
    """The full-precision checkpoint a compressed model was quantized from while loading."""

    files: List[str]
    algorithm: str  # the calibration algorithm the load asked for (loading itself applies max)
    _locations: Dict[str, str] = field(default=None, repr=False)

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name` as stored in the source checkpoint (its own dtype), on the CPU."""
        if self._locations is None:
            self._locations = tensor_locations(self.files)
        if name not in self._locations:
            raise ValueError(f"tensor {name!r} is not in the source checkpoint files {self.files}; the "
                             "full-precision weights are needed again to calibrate with this algorithm")
        with torch.device("cpu"), safe_open(self._locations[name], framework="pt") as handle:
            return handle.get_tensor(name)


@torch.no_grad()
def restore_full_precision(model: nn.Module, modules: Dict[str, QuantLinear], source: LoadSource) -> Dict[str, nn.Linear]:
    """Swap each QuantLinear for an nn.Linear holding its source weight (in the layer's dtype)."""
    restored = {}
    for name, module in modules.items():
        device = module.weight.device
        if device.type == "meta":
            raise ValueError(f"layer {name!r} is offloaded (on the meta device); re-reading full-precision weights "
                             "for SmoothQuant/AWQ/GPTQ needs the model's layers in memory (no disk offload)")
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           dtype=module.dtype, device=device)
        linear.weight.copy_(source.read(f"{name}.weight"))  # cast as the loader casts it
        if module.bias is not None:
            linear.bias.copy_(module.bias)
        linear.requires_grad_(False)
        replace_module(model, name, linear)
        restored[name] = linear
    return restored
