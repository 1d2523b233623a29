"""Which Linears get quantized, and which of them an engine fuses into one GEMM.

Default exclusions follow ModelOpt's default-disabled list (`docs/modelopt-facts.md` §1.3): the LM
head, MoE routers, vision towers and projectors. Patterns are fnmatch wildcards matched against
the module name; a plain name also excludes everything under it.
"""

import fnmatch
from typing import Dict, Iterable, List

import torch
from torch import nn

from .offload import onloaded

DEFAULT_EXCLUDE_PATTERNS = (
    "*lm_head*", "*router*", "*mlp.gate.*", "*block_sparse_moe.gate*", "*shared_expert_gate*",
    "*output_layer*", "*proj_out.*", "output.*", "mtp.*",
    "*vision_tower*", "*vision_model*", "*visual*", "*embed_vision*", "*multi_modal_projector*",
    "*connector*",  # Idefics3 / SmolVLM's image-to-text projection: text-only calibration never reaches it
)

# Sibling Linears that read the same input and that engines run as one fused GEMM; for NVFP4
# and W4A8 they must share `input_scale` and `weight_scale_2` (TensorRT-LLM asserts it). Each
# entry: (the parent module's name ends with this, "" for any parent; the siblings' names); the
# entries for a matching parent replace the generic ones. Cross-attention's q reads the decoder's
# states, its k and v the encoder's outputs, so only k and v are siblings there (BART and
# Whisper's `encoder_attn`, T5's `EncDecAttention`).
FUSED_SIBLINGS = (("encoder_attn", ("k_proj", "v_proj")), ("EncDecAttention", ("k", "v")),
                  ("SelfAttention", ("q", "k", "v")), ("DenseReluDense", ("wi_0", "wi_1")),
                  ("", ("q_proj", "k_proj", "v_proj")), ("", ("gate_proj", "up_proj")), ("", ("w1", "w3")))


def is_excluded(name: str, patterns: Iterable[str]) -> bool:
    """True if `name` matches a pattern, or sits under a module a pattern names exactly."""
    dotted = name + "."  # lets "*mlp.gate.*" match "x.mlp.gate" but not "x.mlp.gate_proj"
    return any(fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(dotted, pattern)
               or dotted.startswith(pattern + ".") for pattern in patterns)


def kept_in_fp32(model: nn.Module) -> tuple:
    """Patterns of the modules the model class keeps in fp32 (`_keep_in_fp32_modules`, e.g. T5's `wo`):
    transformers computes them in fp32, so they stay unquantized."""
    names = set(getattr(model, "_keep_in_fp32_modules", None) or ()) | set(
        getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return tuple(pattern for name in sorted(names) for pattern in (name, f"*.{name}", f"*.{name}.*"))


def target_linears(model: nn.Module, exclude_modules: Iterable[str] = ()) -> Dict[str, nn.Linear]:
    """{name: module} of the nn.Linear modules to quantize (exact type: subclasses are left alone)."""
    patterns = tuple(DEFAULT_EXCLUDE_PATTERNS) + kept_in_fp32(model) + tuple(exclude_modules)
    return {name: module for name, module in model.named_modules()
            if type(module) is nn.Linear and not is_excluded(name, patterns)}


def fused_groups(names: Iterable[str]) -> List[List[str]]:
    """Groups of target names that an engine fuses, e.g. [[...q_proj, ...k_proj, ...v_proj]]."""
    names = set(names)
    groups = []
    for name in sorted(names):
        parent, _, leaf = name.rpartition(".")
        rules = [siblings for suffix, siblings in FUSED_SIBLINGS if suffix and parent.endswith(suffix)]
        for siblings in rules or [siblings for suffix, siblings in FUSED_SIBLINGS if not suffix]:
            if leaf == siblings[0]:
                members = [f"{parent}.{s}" if parent else s for s in siblings]
                members = [m for m in members if m in names]
                if len(members) > 1:
                    groups.append(members)
    return groups


def _weight_amax(linear: nn.Module) -> torch.Tensor:
    with onloaded(linear):  # an accelerate-offloaded weight is read for this, then dropped again
        return linear.weight.detach().abs().amax().float()


def fused_weight_amax(linears: Dict[str, nn.Module]) -> Dict[str, torch.Tensor]:
    """{name: max |W| over its engine-fused group} for the members of fused groups.

    NVFP4 and W4A8 derive `weight_scale_2` from it, which fused siblings must share.
    """
    shared = {}
    for group in fused_groups(linears):
        amax = torch.stack([_weight_amax(linears[name]) for name in group]).amax()
        shared.update({name: amax for name in group})
    return shared

