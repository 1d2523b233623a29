"""Weight sources: where the calibration pipeline reads the full-precision weights it quantizes.

The pipeline is the same for every entry point; only the source differs:
- `InMemoryWeights`: the model's own weights (`quantize()`), also when accelerate offloads them to
  CPU or disk (each block is loaded for good only when it is quantized).
- `CheckpointWeights`: the safetensors a model was loaded compressed from by
  `from_pretrained(src, quantization_config=PTQConfig(...))`. Algorithms that change weights
  (SmoothQuant, AWQ, GPTQ) need the full-precision copy, one decoder block at a time: the block's
  QuantLinears become Linears holding the source weights again (`restore_full_precision`) and its
  QuantExperts a fused-experts module holding the experts' source weights (`SourceExperts`).
"""

import functools
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F_nn
from safetensors import safe_open
from torch import nn

from ..modules.fused_experts import checkpoint_namer, projection_names, projection_shapes, route_tokens, target_experts
from ..modules.quant_experts import QuantExperts
from ..modules.quant_linear import QuantLinear
from .offload import execution_device, materialize, onloaded
from .selection import target_linears
from .shapes import check_layer_shapes, resolve_group_size


class InMemoryWeights:
    """The model's own full-precision Linears and fused experts."""

    # Every full-precision weight is at hand: one pass serves data-free algorithms, and every
    # fused-experts module is known (and observed) from the start.
    streams_blocks = False

    def targets(self, model: nn.Module, exclude_modules) -> Tuple[Dict[str, nn.Module], Dict[str, nn.Module]]:
        """({name: Linear}, {name: fused experts}) to quantize."""
        return target_linears(model, exclude_modules), target_experts(model, exclude_modules)

    def expert_names(self, model: nn.Module, experts: Dict[str, nn.Module]):
        return projection_names(model) if experts else None

    def group_size(self, config, linears: Dict[str, nn.Module], experts: Dict[str, nn.Module]) -> Optional[int]:
        """The config's group size, or the format's default that divides every layer; checked on the shapes."""
        shapes = {**linears, **projection_shapes(experts)}
        group_size = resolve_group_size(config.format, shapes, config.group_size)
        check_layer_shapes(config.format, shapes, group_size)
        return group_size

    def restore_block(self, model: nn.Module, linears: Dict[str, nn.Module]) -> Dict[str, nn.Module]:
        """The block's Linears with their weights in memory (loaded for good when offloaded)."""
        for linear in linears.values():
            materialize(linear)
        return linears

    def restore_experts(self, model: nn.Module, name: str, module: nn.Module) -> nn.Module:
        return module


def tensor_locations(checkpoint_files) -> Dict[str, str]:
    """{tensor name: safetensors file holding it} for the given checkpoint files."""
    locations = {}
    for path in checkpoint_files:
        if str(path).endswith(".safetensors"):
            with safe_open(path, framework="pt") as handle:
                locations.update({key: str(path) for key in handle.keys()})
    return locations


@dataclass
class CheckpointWeights:
    """The full-precision checkpoint a compressed model was quantized from while loading."""

    files: List[str]
    algorithm: str  # the calibration algorithm the load asked for
    # One block's full-precision weights at a time, whatever the algorithm; each block's experts
    # are restored from the files when the block is reached.
    streams_blocks = True

    def targets(self, model: nn.Module, exclude_modules=()) -> Tuple[Dict[str, nn.Module], Dict[str, nn.Module]]:
        """The model's QuantLinears (outside experts) and QuantExperts: what the load quantized."""
        experts = {name: m for name, m in model.named_modules() if isinstance(m, QuantExperts)}
        linears = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)
                   and not any(name.startswith(e + ".") for e in experts)}
        return linears, experts

    def expert_names(self, model: nn.Module, experts: Dict[str, nn.Module]):
        return next(iter(experts.values())).names if experts else None

    def group_size(self, config, linears: Dict[str, nn.Module], experts: Dict[str, nn.Module]) -> Optional[int]:
        """The group size the load quantized with (the model's PTQConfig holds it resolved)."""
        return config.group_size

    def restore_block(self, model: nn.Module, linears: Dict[str, nn.Module]) -> Dict[str, nn.Module]:
        return restore_full_precision(model, linears, self)

    def restore_experts(self, model: nn.Module, name: str, module: nn.Module) -> nn.Module:
        return restore_experts(model, name, module, self)

    @functools.cached_property
    def locations(self) -> Dict[str, str]:
        """{tensor name: file}, read from the files' headers on first use."""
        return tensor_locations(self.files)

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name` as stored in the source checkpoint (its own dtype), on the CPU."""
        if name not in self.locations:
            raise ValueError(f"tensor {name!r} is not in the source checkpoint files {self.files}; the "
                             "full-precision weights are needed again to calibrate with this algorithm")
        with torch.device("cpu"), safe_open(self.locations[name], framework="pt") as handle:
            return handle.get_tensor(name)


def _source_weight(source: "CheckpointWeights", name: str, module: QuantLinear, device) -> torch.Tensor:
    """The source weight `name` of `module`, cast as the loader casts it (round to nearest), on `device`."""
    weight = source.read(name)
    expected = (module.out_features, module.in_features)
    if tuple(weight.shape) != expected:
        raise ValueError(f"source weight {name}: expected shape {list(expected)}, found {list(weight.shape)}")
    return weight.to(device=device, dtype=module.dtype)  # the tensor itself when nothing changes


@torch.no_grad()
def restore_full_precision(model: nn.Module, modules: Dict[str, QuantLinear],
                           source: CheckpointWeights) -> Dict[str, nn.Linear]:
    """Swap each QuantLinear for an nn.Linear holding its source weight (in the layer's dtype).

    A CPU weight already in the layer's dtype stays the safetensors memory map that `read` returns:
    file-backed pages the kernel can drop and read again, not anonymous memory (an 8B model's block
    is 0.44 GB of it). The map is private, so an algorithm that scales the weight in place
    (producer folding) writes a copy of the pages it touches, never the file.
    """
    restored = {}
    for name, module in modules.items():
        device = execution_device(module)  # an accelerate-offloaded layer's weights sit on meta
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           dtype=module.dtype, device="meta")
        linear.weight = nn.Parameter(_source_weight(source, f"{name}.weight", module, device), requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(torch.empty_like(linear.bias, device=device), requires_grad=False)
            with onloaded(module):
                linear.bias.copy_(module.bias)
        linear.requires_grad_(False)
        model.set_submodule(name, linear)
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
def restore_experts(model: nn.Module, name: str, module: QuantExperts, source: CheckpointWeights) -> SourceExperts:
    """Swap the QuantExperts `name` for a SourceExperts holding its source weights (in its dtype).

    The source holds the experts as the family's checkpoints do, per expert (e.g.
    `...experts.{e}.gate_proj.weight`, Mixtral `...block_sparse_moe.experts.{e}.w1.weight`), or
    already fused (`...experts.gate_up_proj`).
    """
    device = execution_device(module.projections("down")[0])  # an offloaded layer's weights sit on meta
    prefix = checkpoint_namer(model)(name)
    dtype = module.projections("down")[0].dtype
    if f"{prefix}.gate_up_proj" in source.locations:
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
    model.set_submodule(name, restored)
    return restored
