"""Smoothing: moving per-input-channel scale between activations and weights.

One convention for every algorithm: `pre_quant_scale` multiplies the activation, and the weight
column is divided by it, so x @ W.T is unchanged before quantization. Siblings that read the same
input (q/k/v, gate/up) always get one shared scale, so the export can fold it into the norm.
"""

from typing import Dict, List

import torch
from torch import nn


@torch.no_grad()
def apply_pre_quant_scale(linears: List[nn.Linear], pre_quant_scale: torch.Tensor) -> torch.Tensor:
    """W[:, c] /= pre_quant_scale[c] for every Linear of a group, in place; returns the scale used.

    The scale is first rounded to the model dtype, the dtype it is stored and applied in, so the
    weights are divided by exactly the value the activations will be multiplied by.
    """
    dtype, device = linears[0].weight.dtype, linears[0].weight.device
    pre_quant_scale = pre_quant_scale.to(device=device, dtype=dtype)
    for linear in linears:
        w = linear.weight
        w.copy_((w.float() / pre_quant_scale.float()[None, :]).to(w.dtype))
    return pre_quant_scale


def groups_sharing_input(names: List[str], fused: List[List[str]]) -> List[List[str]]:
    """Every target name in exactly one group: the fused sibling groups, then singletons."""
    grouped = {name for group in fused for name in group}
    return [list(g) for g in fused] + [[name] for name in names if name not in grouped]


def stacked_weight(linears: Dict[str, nn.Linear], group: List[str]) -> torch.Tensor:
    """The group's weights concatenated along the output dim (sum N_i, K), in the model dtype: the
    searches widen to fp32 only the rows they work on (a Llama-3-8B gate/up pair is 0.5 GB in fp32)."""
    return torch.cat([linears[name].weight.detach() for name in group])


def evenly_strided(t: torch.Tensor, limit: int) -> torch.Tensor:
    """t, or every n-th row of it (the smallest n leaving at most `limit` rows): a search's loss, a
    sum over rows (output rows, or tokens), estimated on a subset spread over all of them."""
    stride = -(-t.shape[0] // limit)
    return t if stride == 1 else t[::stride]
