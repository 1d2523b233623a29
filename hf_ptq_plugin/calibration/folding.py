"""Fold AWQ (and SmoothQuant) `pre_quant_scale`s into the norm that feeds a fused group
(`docs/modelopt-facts.md` §6.1 step 3e).

Engines apply `pre_quant_scale` only on layers whose input is not a norm output (o_proj,
down_proj); for q/k/v and gate/up the scale must live in the preceding RMSNorm/LayerNorm
(`gamma <- gamma * s`, and `(gamma + 1) * s - 1` for zero-centred Gemma norms). The calibration
pipeline folds right after quantizing, so the model in memory (what perplexity is measured on)
computes exactly what its checkpoint will hold, and saving changes nothing.
Which norm feeds which Linears is found the way ModelOpt does it: one two-token forward with
hooks that match a norm's output tensor to the Linears that receive it. That cannot see a norm
whose output also feeds the residual stream (post-norm models: BART), where a folded scale would
change the model, so the outputs of a second forward are compared and every fold is undone if
they moved.
"""

import contextlib
import logging
from collections import defaultdict
from typing import List

import torch
from torch import nn

from ..modules.quant_linear import QuantLinear
from .offload import input_device, materialize

logger = logging.getLogger(__name__)


def fold_pre_quant_scales(model: nn.Module, smoothquant: bool = False) -> List[str]:
    """Fold the shared pre_quant_scale of every norm-fed AWQ group (and SmoothQuant group, with
    `smoothquant`; ModelOpt leaves those) into its norm; returns the norms.

    A ValueError names a group whose members carry different scales (one norm can hold only one);
    a norm that feeds the layers of several blocks, each with its own scale, keeps them on the layers.
    """
    def _foldable(module: nn.Module) -> bool:
        return isinstance(module, QuantLinear) and module.pre_quant_scale is not None and (
            module.fmt.is_awq or smoothquant)

    if not any(_foldable(m) for m in model.modules()) or not any(_is_norm(m) for m in model.modules()):
        return []
    folded, undo = [], []
    modules = dict(model.named_modules())
    norm_consumers, before = _norm_consumers(model)
    for norm_name, consumers in norm_consumers.items():
        members = [modules[name] for name in consumers]
        if not all(_foldable(m) for m in members):
            if any(_foldable(m) for m in members):
                logger.warning("%s feeds %s, not all of which are layers with a foldable pre_quant_scale; "
                               "their pre_quant_scale stays on the layers", norm_name, consumers)
            continue
        scale = members[0].pre_quant_scale
        differing = [name for name, m in zip(consumers, members) if not torch.equal(m.pre_quant_scale, scale)]
        if differing and len({name.rpartition(".")[0] for name in consumers}) > 1:
            # One norm read by the layers of several blocks (a T5 encoder's final norm feeds every
            # decoder block's cross-attention k and v), each block calibrated with its own scale.
            logger.info("%s feeds layers of several blocks with their own pre_quant_scale; the scales stay on "
                        "the layers", norm_name)
            continue
        if differing:
            raise ValueError(f"layers fed by {norm_name!r} carry different pre_quant_scale ({consumers[0]!r} vs "
                             f"{differing}); engines fold one scale into the norm, so calibration must give "
                             "the fused group one shared pre_quant_scale")
        materialize(modules[norm_name])  # accelerate-offloaded: its weight in memory, to save and to change
        undo.append(_saved(modules[norm_name], members))
        _scale_norm(norm_name, modules[norm_name], scale)
        for m in members:
            m.pre_quant_scale = None
        folded.append(norm_name)
    if folded and not _same_outputs(before, _tracing_outputs(model)):
        for restore in undo:
            restore()
        logger.warning("folding pre_quant_scale into the norms changed the model's outputs (a norm whose output "
                       "also feeds the residual stream, as in post-norm models such as BART); the scales stay on "
                       "the layers")
        return []
    logger.info("folded pre_quant_scale into %d norms", len(folded))
    return folded


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


@torch.no_grad()
def _norm_consumers(model: nn.Module):
    """({norm name: [names of the Linears whose input is exactly that norm's output]}, the model's
    outputs on the tracing inputs)."""
    producer, consumers, keep_alive = {}, defaultdict(list), []

    def on_norm(name):
        def hook(module, args, output):
            producer[id(output)] = name
            keep_alive.append(output)  # ids stay unique only while the tensors live
        return hook

    def on_linear(name):
        def hook(module, args):
            if id(args[0]) in producer:
                consumers[producer[id(args[0])]].append(name)
        return hook

    with contextlib.ExitStack() as hooks:
        for name, module in model.named_modules():
            if _is_norm(module):
                hooks.enter_context(module.register_forward_hook(on_norm(name)))
            elif isinstance(module, (nn.Linear, QuantLinear)):
                hooks.enter_context(module.register_forward_pre_hook(on_linear(name)))
        outputs = _tracing_outputs(model)
    return dict(consumers), outputs


@torch.no_grad()
def _tracing_outputs(model: nn.Module) -> torch.Tensor:
    outputs = model(**_tracing_inputs(model))
    return (outputs.logits if hasattr(outputs, "logits") else outputs[0]).detach().float()


def _same_outputs(before: torch.Tensor, after: torch.Tensor, tolerance: float = 0.05) -> bool:
    """True if a fold left the outputs as they were, up to the rounding it moves (relative L2 error)."""
    return bool((after - before).norm() <= tolerance * before.norm())


def _saved(norm: nn.Module, members: List[nn.Module]):
    """A function that puts back the norm's parameters and the members' scales as they are now."""
    weight = norm.weight.detach().clone()
    bias = None if getattr(norm, "bias", None) is None else norm.bias.detach().clone()
    scales = [m.pre_quant_scale for m in members]

    def restore():
        norm.weight.data.copy_(weight)
        if bias is not None:
            norm.bias.data.copy_(bias)
        for m, scale in zip(members, scales):
            m.pre_quant_scale = scale
    return restore


def _tracing_inputs(model: nn.Module) -> dict:
    """The smallest inputs that run every layer: two tokens (for the encoder and the decoder of an
    encoder-decoder model); a speech encoder (Whisper) takes the silent log-mel frames of its length."""
    config, device = getattr(model, "config", None), input_device(model)
    ids = torch.ones((1, 2), dtype=torch.long, device=device)
    inputs = {"input_ids": ids}
    if getattr(model, "main_input_name", "input_ids") == "input_features":
        frames = 2 * config.max_source_positions  # Whisper's convolutions halve the frames to its positions
        inputs = {"input_features": torch.zeros((1, config.num_mel_bins, frames), dtype=model.dtype, device=device)}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids
    return inputs


def _scale_norm(name: str, norm: nn.Module, scale: torch.Tensor) -> None:
    materialize(norm)  # accelerate-offloaded: its changed weight must stay (it is small)
    weight = norm.weight
    if weight is None or weight.shape != scale.shape:
        raise ValueError(f"cannot fold a pre_quant_scale of shape {list(scale.shape)} into {name!r} "
                         f"({type(norm).__name__} with weight {None if weight is None else list(weight.shape)})")
    s = scale.float()
    zero_centred = type(norm).__name__.startswith("Gemma")  # Gemma norms compute x * (1 + weight)
    new_weight = (weight.float() + 1) * s - 1 if zero_centred else weight.float() * s
    weight.data.copy_(new_weight.to(weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.data.copy_((norm.bias.float() * s).to(norm.bias.dtype))
