"""The units AutoQuantize decides a format for: layer groups that must share one format.

Engines run q/k/v and gate/up as one GEMM, so each such sibling set is one decision; the fused
experts of one MoE layer are one decision too (engines run them as one MoE kernel in one format);
every other quantizable Linear is its own. The layers are exactly those `quantize()` would quantize
(`target_linears` and `target_experts`: the LM head, MoE routers and vision towers are left out by
default), so a choice of one format everywhere gives `quantize()`'s model.
"""

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from torch import nn

from ..calibration.selection import fused_groups, target_linears
from ..calibration.smoothing import groups_sharing_input
from ..modules.fused_experts import FUSED_PARAMS, is_fused_experts, target_experts
from ..modules.quant_experts import QuantExperts


@dataclass(frozen=True)
class LayerGroup:
    """Layers that take one format together; `elements` counts their weights. `experts`: one MoE
    layer's fused experts, which always take a format (see `search_groups`)."""

    name: str
    members: Tuple[str, ...]
    elements: int
    experts: bool = False


def search_groups(model: nn.Module, exclude_modules: Sequence[str] = ()
                  ) -> Tuple[List[LayerGroup], Dict[str, nn.Module]]:
    """(groups in model order, {name: nn.Linear or fused-experts module} of every searched layer).

    A ValueError for a model with nothing to search.
    """
    linears, experts = target_linears(model, exclude_modules), target_experts(model, exclude_modules)
    if not linears and not experts:
        raise ValueError(f"{type(model).__name__} has no nn.Linear left to search after exclusions "
                         f"{list(exclude_modules)}")
    layers = {name: module for name, module in model.named_modules() if name in linears or name in experts}
    order = {name: index for index, name in enumerate(layers)}
    member_lists = groups_sharing_input(list(linears), fused_groups(linears)) + [[name] for name in experts]
    groups = [LayerGroup(group_name(members), tuple(members), sum(weight_elements(layers[m]) for m in members),
                         experts=members[0] in experts)
              for members in sorted(member_lists, key=lambda members: min(order[m] for m in members))]
    return groups, layers


def weight_elements(module: nn.Module) -> int:
    """Weights of a Linear, or of every expert of a fused-experts module (full precision or quantized)."""
    if is_fused_experts(module):
        return sum(getattr(module, param).numel() for param in FUSED_PARAMS)
    if isinstance(module, QuantExperts):  # E x (gate + up + down)
        return module.num_experts * 3 * module.hidden_dim * module.intermediate_dim
    return module.in_features * module.out_features


def group_name(members: Sequence[str]) -> str:
    """"a.b.q_proj" for one layer, "a.b.{q_proj,k_proj,v_proj}" for siblings under one parent."""
    if len(members) == 1:
        return members[0]
    parent = members[0].rpartition(".")[0]
    leaves = ",".join(m.rpartition(".")[2] for m in members)
    return f"{parent}.{{{leaves}}}" if parent else f"{{{leaves}}}"
