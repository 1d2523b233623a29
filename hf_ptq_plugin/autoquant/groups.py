"""The units AutoQuantize decides a format for: layer groups that must share one format.

Engines run q/k/v and gate/up as one GEMM, so each such sibling set is one decision; every other
quantizable Linear is its own. The layers are exactly those `quantize()` would quantize
(`target_linears`: the LM head, MoE routers and vision towers are left out by default), so a
choice of one format everywhere gives `quantize()`'s model.
"""

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from torch import nn

from ..calibration.selection import fused_groups, target_linears
from ..calibration.smoothing import groups_sharing_input
from ..modules.fused_experts import target_experts


@dataclass(frozen=True)
class LayerGroup:
    """Linears that take one format together; `elements` counts their weights."""

    name: str
    members: Tuple[str, ...]
    elements: int


def search_groups(model: nn.Module, exclude_modules: Sequence[str] = ()
                  ) -> Tuple[List[LayerGroup], Dict[str, nn.Linear]]:
    """(groups in model order, {name: nn.Linear} of every searched layer).

    A ValueError names fused MoE experts (not searched yet) and models with nothing to search.
    """
    experts = target_experts(model, exclude_modules)
    if experts:
        names = sorted(experts)
        raise ValueError(f"auto_quantize searches nn.Linear layers only; {type(model).__name__} has fused MoE experts "
                         f"({names[:2]}{' ...' if len(names) > 2 else ''}), which it cannot assign a format yet. "
                         "Keep them in full precision with exclude_modules=['*experts*'] to search the other "
                         "layers, or quantize the model with one format (hf_ptq_plugin.quantize)")
    linears = target_linears(model, exclude_modules)
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear left to search after exclusions "
                         f"{list(exclude_modules)}")
    order = {name: index for index, name in enumerate(linears)}
    member_lists = sorted(groups_sharing_input(list(linears), fused_groups(linears)),
                          key=lambda members: min(order[m] for m in members))
    groups = [LayerGroup(group_name(members), tuple(members), sum(linears[m].weight.numel() for m in members))
              for members in member_lists]
    return groups, linears


def group_name(members: Sequence[str]) -> str:
    """"a.b.q_proj" for one layer, "a.b.{q_proj,k_proj,v_proj}" for siblings under one parent."""
    if len(members) == 1:
        return members[0]
    parent = members[0].rpartition(".")[0]
    leaves = ",".join(m.rpartition(".")[2] for m in members)
    return f"{parent}.{{{leaves}}}" if parent else f"{{{leaves}}}"
