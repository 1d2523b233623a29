"""Where a model loaded compressed came from: its full-precision safetensors, readable again by name.

`from_pretrained(src, quantization_config=PTQConfig(...))` quantizes each weight as it is read and
keeps no full-precision copy. Algorithms that change weights (SmoothQuant, AWQ, GPTQ) need that
copy, one decoder block at a time: `LoadSource` remembers the checkpoint files (and the algorithm
the load asked for), `restore_full_precision` swaps a block's QuantLinears back to Linears
holding the source weights, and `restore_experts` a QuantExperts back to a fused-experts module
(`SourceExperts`) holding its experts' source weights. Set by `PTQHfQuantizer`; used by
`requantize.py`.
"""

from dataclasses import dataclass, field
from typing import Dict, List

import torch
import torch.nn.functional as F_nn
from safetensors import safe_open
from torch import nn

from ..hf.prequantized import replace_module
from ..modules.fused_experts import checkpoint_namer, route_tokens
from .offload import execution_device, onloaded
from ..modules.quant_experts import QuantExperts
from ..modules.quant_linear import QuantLinear


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

    @property
    def locations(self) -> Dict[str, str]:
        """{tensor name: file}, read from the files' headers on first use."""
        if self._locations is None:
            self._locations = tensor_locations(self.files)
        return self._locations

    def has(self, name: str) -> bool:
        return name in self.locations

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name` as stored in the source checkpoint (its own dtype), on the CPU."""
        if name not in self.locations:
            raise ValueError(f"tensor {name!r} is not in the source checkpoint files {self.files}; the "
                             "full-precision weights are needed again to calibrate with this algorithm")
        with torch.device("cpu"), safe_open(self.locations[name], framework="pt") as handle:
            return handle.get_tensor(name)


@torch.no_grad()
def restore_full_precision(model: nn.Module, modules: Dict[str, QuantLinear], source: LoadSource) -> Dict[str, nn.Linear]:
    """Swap each QuantLinear for an nn.Linear holding its source weight (in the layer's dtype)."""
    restored = {}
    for name, module in modules.items():
        device = execution_device(module)  # an accelerate-offloaded layer's weights sit on meta
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           dtype=module.dtype, device=device)
        linear.weight.copy_(source.read(f"{name}.weight"))  # cast as the loader casts it
        if module.bias is not None:
            with onloaded(module):
                linear.bias.copy_(module.bias)
        linear.requires_grad_(False)
        replace_module(model, name, linear)
        restored[name] = linear
    return restored


class SourceExperts(nn.Module):
    """A fused-experts module in full precision, as transformers 5 holds one: `gate_up_proj`
    (E, 2I, H), gate rows first, and `down_proj` (E, H, I), run by the eager experts forward."""

    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, act_fn: nn.Module):
        super().__init__()
        self.gate_up_proj = nn.Parameter(gate_up_proj, requires_grad=False)
        self.down_proj = nn.Parameter(down_proj, requires_grad=False)
        self.num_experts, self.act_fn = gate_up_proj.shape[0], act_fn

    def forward(self, hidden_states, top_k_index, top_k_weights):
        def run_expert(e, x, token_idx):
            gate, up = F_nn.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
            return F_nn.linear(self.act_fn(gate) * up, self.down_proj[e])

        return route_tokens(hidden_states, top_k_index, top_k_weights, self.num_experts, run_expert)


@torch.no_grad()
def restore_experts(model: nn.Module, name: str, module: QuantExperts, source: LoadSource) -> SourceExperts:
    """Swap the QuantExperts `name` for a SourceExperts holding its source weights (in its dtype).

    The source holds the experts as the family's checkpoints do, per expert (e.g.
    `...experts.{e}.gate_proj.weight`, Mixtral `...block_sparse_moe.experts.{e}.w1.weight`), or
    already fused (`...experts.gate_up_proj`).
    """
    device = execution_device(module.projections("down")[0])  # an offloaded layer's weights sit on meta
    prefix = checkpoint_namer(model)(name)
    dtype = module.projections("down")[0].dtype
    if source.has(f"{prefix}.gate_up_proj"):
        gate_up, down = source.read(f"{prefix}.gate_up_proj"), source.read(f"{prefix}.down_proj")
    else:
        gate, up, down_name = module.names

        def read(e: int, proj: str) -> torch.Tensor:
            return source.read(f"{prefix}.{e}.{proj}.weight")

        gate_up = torch.stack([torch.cat([read(e, gate), read(e, up)]) for e in range(module.num_experts)])
        down = torch.stack([read(e, down_name) for e in range(module.num_experts)])
    expected = {"gate_up_proj": (module.num_experts, 2 * module.intermediate_dim, module.hidden_dim),
                "down_proj": (module.num_experts, module.hidden_dim, module.intermediate_dim)}
    for param, tensor in (("gate_up_proj", gate_up), ("down_proj", down)):
        if tuple(tensor.shape) != expected[param]:
            raise ValueError(f"source weights of {prefix}.{param}: expected shape {list(expected[param])}, "
                             f"found {list(tensor.shape)}")
    restored = SourceExperts(gate_up.to(device=device, dtype=dtype), down.to(device=device, dtype=dtype),
                             module.act_fn)
    replace_module(model, name, restored)
    return restored
