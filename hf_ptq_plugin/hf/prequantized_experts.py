"""Loading the fused MoE experts of a pre-quantized checkpoint: meta QuantExperts in place of the fused modules.

Checkpoints hold experts per expert (`<experts>.{e}.<proj>.weight` and its scales); each fused
module whose experts the checkpoint quantizes becomes a QuantExperts on the meta device whose
per-expert buffers carry those names, checked against the header like any QuantLinear.
A checkpoint quantizing some MoE layers' experts and not others is refused: transformers merges
full-precision per-expert tensors into fused parameters with converters that our loader removes.
"""

from typing import Callable, Dict, Optional, Tuple

from torch import nn

from .. import formats as F
from ..modules.fused_experts import (
    DEFAULT_PROJECTION_NAMES,
    checkpoint_namer,
    is_fused_experts,
    projection_names,
    target_experts,
)
from ..modules.quant_experts import QuantExperts


def prepare_prequantized_experts(model: nn.Module, fmt: F.Format, exclude_modules, group_size: Optional[int],
                                 header: dict, check: Callable) -> int:
    """Swap the fused experts the checkpoint holds quantized for meta QuantExperts; returns how many.

    `check(header_name, quant_linear)` validates one projection against the checkpoint header
    (`prequantized_header.check_layer`). A checkpoint quantizing some MoE layers' experts and not others is refused.
    """
    fused = {name: m for name, m in model.named_modules() if is_fused_experts(m)}
    if not fused:
        return 0
    names, header_name = _checkpoint_layout(model, next(iter(fused)), header)
    targets = set(target_experts(model, exclude_modules))
    quantized = {n: m for n, m in fused.items()
                 if n in targets or f"{header_name(f'{n}.0.{names[0]}')}.weight_scale" in header}
    _refuse_partly_quantized(fused, quantized)
    for name, module in quantized.items():
        _swap_in(model, name, module, fmt, group_size, names, header_name, check)
    return len(quantized)


def prepare_mixed_experts(model: nn.Module, layer_qformats: Dict[str, str], group_size: Optional[int],
                          header: dict, check: Callable) -> set:
    """Per-layer formats: swap each MoE layer's experts for meta QuantExperts of the format listed for
    them, under the experts module's name (ours) or per expert by checkpoint name (ModelOpt's
    `quantized_layers`); returns the names of `layer_qformats` consumed."""
    fused = {name: m for name, m in model.named_modules() if is_fused_experts(m)}
    if not fused:
        return set()
    names, header_name = _checkpoint_layout(model, next(iter(fused)), header)
    quantized, consumed = {}, set()
    for name, module in fused.items():
        keys = [name] + [header_name(f"{name}.{e}.{proj}") for e in range(module.gate_up_proj.shape[0])
                         for proj in names]
        listed = {key: layer_qformats[key] for key in keys if key in layer_qformats}
        if listed and (len(set(listed.values())) > 1 or set(listed) not in ({name}, set(keys[1:]))):
            raise ValueError(f"the experts of {name!r} are one MoE kernel in one format; the checkpoint lists "
                             f"{len(listed)} of their {len(keys) - 1} projections in formats "
                             f"{sorted(set(listed.values()))}")
        if listed:
            quantized[name] = (module, F.get_format(next(iter(listed.values()))))
            consumed.update(listed)
    _refuse_partly_quantized(fused, quantized)
    for name, (module, fmt) in quantized.items():
        _swap_in(model, name, module, fmt, group_size if fmt.group_size_choices else None, names, header_name, check)
    return consumed


def _refuse_partly_quantized(fused: dict, quantized: dict) -> None:
    if quantized and len(quantized) < len(fused):
        left = sorted(set(fused) - set(quantized))
        raise ValueError(f"the checkpoint quantizes the experts of {len(quantized)} MoE layer(s) but not of "
                         f"{left[:3]}; checkpoints with some MoE layers' experts quantized and others not are "
                         "not supported")


def _swap_in(model: nn.Module, name: str, module: nn.Module, fmt: F.Format, group_size: Optional[int],
             names: Tuple[str, str, str], header_name: Callable, check: Callable) -> None:
    experts = QuantExperts.like(module, fmt, group_size, names, device="meta")
    for e in range(experts.num_experts):
        for proj in names:
            check(header_name(f"{name}.{e}.{proj}"), getattr(experts.expert(e), proj))
    model.set_submodule(name, experts)


def _checkpoint_layout(model: nn.Module, first: str, header: dict) -> Tuple[Tuple[str, str, str], Callable]:
    """(projection names, model name -> header name) of the checkpoint's per-expert tensors.

    Names: the family's (Mixtral w1/w3/w2), or gate_proj/up_proj/down_proj when the checkpoint
    holds those instead (ModelOpt HEAD splits every family that way). Header names: the model's
    names with save_pretrained's renamings (Mixtral `.mlp.` -> `.block_sparse_moe.`), or as they
    are when the checkpoint was written without them.
    """
    to_checkpoint = checkpoint_namer(model)

    def header_name(key: str) -> str:
        renamed = to_checkpoint(key)
        return renamed if f"{renamed}.weight" in header or f"{key}.weight" not in header else key

    names = projection_names(model)
    if f"{header_name(f'{first}.0.{names[0]}')}.weight" not in header and \
            f"{header_name(f'{first}.0.{DEFAULT_PROJECTION_NAMES[0]}')}.weight" in header:
        names = DEFAULT_PROJECTION_NAMES
    return names, header_name
