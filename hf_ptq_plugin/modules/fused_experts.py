"""Fused Mixture-of-Experts modules of transformers 5: finding them, routing tokens, naming their tensors.

transformers 5 holds a MoE layer's experts as one module with two 3-D parameters, not as
nn.Linear: `gate_up_proj` (E, 2*I, H) (gate rows first, then up) and `down_proj` (E, H, I),
e.g. `MixtralExperts`, `Qwen2MoeExperts`, `Qwen3MoeExperts`, `OlmoeExperts`. Its forward takes
`(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k))`; the `@use_experts_implementation`
decorator dispatches it on `config._experts_implementation` ("grouped_mm" by default when a
model is built from a config, or "eager": per routed expert, `F.linear` on the expert's slice).
`route_tokens` is that eager computation with the expert's work left to a callback, so that
observing experts and running quantized ones route tokens exactly as the replaced module does.

Checkpoints store the experts per expert, under the names of the model family's original
layout, which transformers' conversion mapping merges into the fused parameters on load and
splits back on save: Qwen2/Qwen3-MoE, OLMoE `mlp.experts.{e}.gate_proj/up_proj/down_proj`,
Mixtral `block_sparse_moe.experts.{e}.w1/w3/w2` (its `.block_sparse_moe.` -> `.mlp.` renaming
is applied by transformers both ways). `projection_names` reads those names off the mapping.
"""

import logging
import re
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..calibration.selection import DEFAULT_EXCLUDE_PATTERNS, is_excluded

logger = logging.getLogger(__name__)

FUSED_PARAMS = ("gate_up_proj", "down_proj")
DEFAULT_PROJECTION_NAMES = ("gate_proj", "up_proj", "down_proj")  # ModelOpt's per-expert names
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")
_CHECKPOINT_PROJ = re.compile(r"experts\.\*\.(\w+)\.weight$")


def _default_apply_gate():
    try:
        from transformers.integrations.moe import _default_apply_gate as default
    except ImportError:  # an older or newer layout: only classes without their own gate are accepted
        return None
    return default


def is_fused_experts(module: nn.Module) -> bool:
    """A module holding 3-D `gate_up_proj` and `down_proj` expert weights."""
    params = [getattr(module, name, None) for name in FUSED_PARAMS]
    return all(isinstance(p, torch.Tensor) and p.dim() == 3 for p in params)


def unsupported_reason(module: nn.Module) -> Optional[str]:
    """Why QuantExperts cannot reproduce this fused-experts module, or None."""
    gate_up, down = module.gate_up_proj, module.down_proj
    experts, two_i, hidden = gate_up.shape
    if down.shape != (experts, hidden, two_i // 2) or two_i % 2:
        return (f"shapes gate_up_proj {tuple(gate_up.shape)} / down_proj {tuple(down.shape)} are not "
                "(E, 2I, H) / (E, H, I)")
    flags = {"is_transposed": False, "has_bias": False, "has_gate": True, "is_concatenated": True,
             "has_post_expert_norm": False}
    odd = [f"{k}={getattr(module, k)}" for k, want in flags.items() if getattr(module, k, want) != want]
    if odd:
        return "layout " + ", ".join(odd)
    gate = getattr(type(module), "_apply_gate", None)
    if gate is not None and gate is not _default_apply_gate():
        return f"its own gating function {type(module).__name__}._apply_gate"
    if getattr(module, "num_experts", experts) != experts or not callable(getattr(module, "act_fn", None)):
        return "no num_experts / act_fn attributes matching its weights"
    return None


def target_experts(model: nn.Module, exclude_modules=()) -> Dict[str, nn.Module]:
    """{name: fused-experts module} to quantize; unsupported layouts are named in a warning and skipped."""
    patterns = tuple(DEFAULT_EXCLUDE_PATTERNS) + tuple(exclude_modules)
    found, skipped = {}, {}
    for name, module in model.named_modules():
        if not is_fused_experts(module) or is_excluded(name, patterns):
            continue
        reason = unsupported_reason(module)
        if reason is None:
            found[name] = module
        else:
            skipped[name] = reason
    if skipped:
        name, reason = next(iter(skipped.items()))
        logger.warning("%d fused-experts module(s) stay unquantized: their layout is not supported (%s: %s); "
                       "exclude them with exclude_modules to silence this", len(skipped), name, reason)
    return found


class ProjectionShape:
    """The (out, in) of one expert projection, for the group-size and shape checks of shapes.py."""

    def __init__(self, out_features: int, in_features: int):
        self.out_features, self.in_features = out_features, in_features


def projection_shapes(experts: Dict[str, nn.Module]) -> Dict[str, ProjectionShape]:
    """{"<experts>.<gate|up|down>": shape}: every expert of a module has the same three shapes."""
    shapes = {}
    for name, module in experts.items():
        _, two_i, hidden = module.gate_up_proj.shape
        shapes.update({f"{name}.gate": ProjectionShape(two_i // 2, hidden),
                       f"{name}.up": ProjectionShape(two_i // 2, hidden),
                       f"{name}.down": ProjectionShape(hidden, two_i // 2)})
    return shapes


def route_tokens(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 num_experts: int, run_expert: Callable) -> torch.Tensor:
    """The eager experts forward: `run_expert(e, x (n, H), token_idx (n,))` per routed expert.

    Tokens reach an expert in (top-k slot, token) order and each expert's weighted output is
    added in expert order, as transformers' eager implementation does; indices outside
    [0, num_experts) (experts of other processes under expert parallelism) are skipped.
    """
    out = torch.zeros_like(hidden)  # (T, H)
    for e in torch.unique(top_k_index).tolist():
        if not 0 <= e < num_experts:
            continue
        slot, token_idx = torch.where(top_k_index.t() == e)  # (n,), (n,)
        y = run_expert(e, hidden[token_idx], token_idx) * top_k_weights[token_idx, slot, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


def _conversions(model: nn.Module, as_loaded: bool = True) -> list:
    """The weight transforms of this model (empty for plain modules): with `as_loaded`, the ones
    from_pretrained used, which save_pretrained reverses; else the model type's full mapping."""
    loaded = getattr(model, "_weight_conversions", None)
    if as_loaded and loaded is not None:
        return list(loaded)
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange
    except ImportError:
        return []
    if not isinstance(model, PreTrainedModel):
        return []
    return [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]


def projection_names(model: nn.Module) -> Tuple[str, str, str]:
    """Checkpoint names of an expert's (gate, up, down) projections, from the model's conversion mapping."""
    from transformers.core_model_loading import WeightConverter

    names = {}
    for conversion in _conversions(model, as_loaded=False):
        if not isinstance(conversion, WeightConverter):
            continue
        target = conversion._original_target_patterns[0]
        sources = [_CHECKPOINT_PROJ.search(s) for s in conversion._original_source_patterns]
        if not all(sources):
            continue
        if target.endswith("experts.gate_up_proj") and len(sources) == 2:
            names["gate"], names["up"] = sources[0].group(1), sources[1].group(1)
        elif target.endswith("experts.down_proj") and len(sources) == 1:
            names["down"] = sources[0].group(1)
    if len(names) != 3:
        return DEFAULT_PROJECTION_NAMES
    return names["gate"], names["up"], names["down"]


def checkpoint_namer(model: nn.Module) -> Callable[[str], str]:
    """Maps a module or tensor name of the model to the name save_pretrained writes it under."""
    from transformers.core_model_loading import WeightRenaming, apply_renamings

    # In reverse order, as transformers' revert_weight_conversion applies them when it saves.
    reverse = [c.reverse_transform() for c in _conversions(model)[::-1] if isinstance(c, WeightRenaming)]
    if not reverse:
        return lambda name: name
    # Renaming patterns are written with their dots (".block_sparse_moe."): rename "name." then strip.
    return lambda name: apply_renamings(name + ".", reverse)[:-1]


def moe_unquantized(model: nn.Module) -> List[str]:
    """MoE modules that stay in full precision and are not nn.Linear: routers and still-fused experts.

    Routers: `gate`, `router`, `shared_expert_gate` with a weight, next to `experts`. transformers 5
    routers are not nn.Linear; ModelOpt lists them in exclude_modules anyway (`docs/modelopt-facts.md` §6.2).
    """
    routers = [name for name, module in model.named_modules() if is_fused_experts(module)]
    for name, module in model.named_modules():
        if not hasattr(module, "experts"):
            continue
        for leaf in ROUTER_NAMES:
            router = getattr(module, leaf, None)
            if isinstance(router, nn.Module) and isinstance(getattr(router, "weight", None), torch.Tensor):
                routers.append(f"{name}.{leaf}" if name else leaf)
    return routers


def without_expert_converters(conversions: list, model: nn.Module) -> list:
    """Drop the converters that merge per-expert tensors into fused params the model no longer has.

    Loading a pre-quantized checkpoint: its per-expert tensors load by name into QuantExperts.
    """
    from transformers.core_model_loading import WeightConverter

    params = [name for name, _ in model.named_parameters()]

    def merges_into_missing(conversion) -> bool:
        targets = [t.strip(".") for t in conversion._original_target_patterns]
        expert_targets = all(t.endswith(tuple(f"experts.{p}" for p in FUSED_PARAMS)) for t in targets)
        return expert_targets and not any(t in name for t in targets for name in params)

    return [c for c in conversions if not (isinstance(c, WeightConverter) and merges_into_missing(c))]
