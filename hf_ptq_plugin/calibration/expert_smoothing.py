"""Smoothing for the fused experts of one MoE layer: AWQ (lite, clip, full) and SmoothQuant.

What the checkpoint must hold decides the search. ModelOpt's export averages the experts'
pre_quant_scales per projection and re-smooths them (`docs/modelopt-facts.md` §6.1 step 3b), so every
expert of a layer carries one gate/up and one down pre_quant_scale, and TensorRT-LLM's MoE
loaders fold them into one activation scale per expert input. Rather than search each expert and
average afterwards (which leaves every expert with a scale no search chose), the one shared scale
is searched directly, from statistics over every token routed to any expert of the layer and
over all its experts' weights, choosing alpha by the output error summed over the experts, each
measured on a sample of its own routed tokens:

    AWQ:          s = x_mean^alpha / w_mean^(1 - alpha)   (awq.scale_for), pre_quant_scale = 1 / s
    SmoothQuant:  pre_quant_scale = w_max^(1 - alpha) / x_max^alpha   (smoothquant.smoothquant_scale)

The experts' weights are divided by the pre_quant_scale in place (their QuantExperts replaces
them next). AWQ's clipping is then per expert, on its own tokens after smoothing. An expert that
no token reached is smoothed with the shared scale like the others and rounded to nearest.

The scale is not folded into the norm before the experts, as ModelOpt does not: the router (and
a shared expert) read that norm's output too.
"""

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from .. import formats as F
from ..modules.layer_plan import LayerPlan
from .awq import ALPHA_GRID, alpha_losses, best_scale, block_size, normalized_weight_mean
from .clipping import clip_nvfp4_global_amax, clip_weight_scale
from .smoothquant import ALPHAS, alpha_errors, best_alpha, smoothquant_scale

SAMPLE_TOKENS = 128  # per expert and projection input: 128 to 256 tokens kept for the losses


@dataclass
class ExpertPlan:
    """What calibration decided for one projection kind ("gate_up" or "down") of a MoE layer's experts."""

    pre_quant_scale: Optional[torch.Tensor]  # (K,) in the weights' dtype, shared by every expert; None: no smoothing
    input_amax: Optional[torch.Tensor]  # 0-d fp32: static input amax of the smoothed inputs; None: the observed one
    chosen: Dict[int, LayerPlan] = field(default_factory=dict)  # {expert: its weight's plan}; others: nearest


@torch.no_grad()
def expert_awq_plan(w: torch.Tensor, stat, kind: str, fmt: F.Format, group_size: int, search: bool,
                    clip: bool) -> ExpertPlan:
    """Smooth fused expert weights w (E, N, K) in place and clip them, from `stat` (ExpertStats, reduced)."""
    samples = [sample.tokens for sample in stat.samples[kind]]
    plan = ExpertPlan(None, stat.shared_amax(kind))
    if search:
        scale = _shared_awq_scale(w, samples, stat.channel_mean(kind), stat.channel_amax[kind], fmt, group_size)
        plan = _smoothed(w, (1.0 / scale).to(w.dtype), stat.channel_amax[kind])
        samples = [None if x is None else x * plan.pre_quant_scale.float() for x in samples]
    if clip:
        plan.chosen = _clipped(w, samples, stat.tokens, fmt, group_size)
    return plan


@torch.no_grad()
def expert_smoothquant_plan(w: torch.Tensor, stat, kind: str, fmt: F.Format) -> ExpertPlan:
    """SmoothQuant's shared scale for fused expert weights w (E, N, K), applied in place."""
    x_amax = stat.channel_amax[kind]
    w_amax = torch.stack([w[e].abs().amax(dim=0).float() for e in range(w.shape[0])]).amax(dim=0)
    errors = torch.zeros(len(ALPHAS))
    for e, sample in enumerate(stat.samples[kind]):
        if sample.tokens is not None:
            errors += alpha_errors(w[e], x_amax, sample.tokens, fmt, w_amax)
    scale = smoothquant_scale(w[0], x_amax, best_alpha(errors), w_amax)
    return _smoothed(w, scale.to(w.dtype), x_amax)


def _smoothed(w: torch.Tensor, pre_quant_scale: torch.Tensor, x_amax: torch.Tensor) -> ExpertPlan:
    """Divide every expert's input columns by `pre_quant_scale` (model dtype), one at a time (no
    fp32 copy of the layer); the plan with the static input amax of the scaled inputs."""
    for e in range(w.shape[0]):
        w[e].copy_((w[e].float() / pre_quant_scale.float()).to(w.dtype))
    return ExpertPlan(pre_quant_scale, (x_amax * pre_quant_scale.float()).amax())


def _shared_awq_scale(w, samples, x_mean, x_amax, fmt: F.Format, group_size: int) -> torch.Tensor:
    block = block_size(fmt, group_size)
    # Every expert has N rows, so the mean over all rows is the mean of the experts' means.
    w_mean = torch.stack([normalized_weight_mean(w[e].float(), block) for e in range(w.shape[0])]).mean(dim=0)
    losses = torch.zeros(len(ALPHA_GRID))
    for e, x in enumerate(samples):
        if x is not None:
            losses += alpha_losses(w[e], x, x_mean, x_amax, w_mean, fmt, group_size)
    return best_scale(losses, x_mean, w_mean)


def _clipped(w, samples, tokens: torch.Tensor, fmt: F.Format, group_size: int) -> Dict[int, LayerPlan]:
    """{expert: its clipped weight plan} for every expert some process routed tokens to.

    Each clip search sums its errors over processes, so every process searches the same experts,
    with an empty sample where it saw none of that expert's tokens.
    """
    args = {}
    for e, x in enumerate(samples):
        if int(tokens[e]) == 0:
            continue  # no token anywhere: rounded to nearest
        x = x if x is not None else w.new_zeros((0, w.shape[2]), dtype=torch.float32)
        if fmt.weight == F.NVFP4:
            args[e] = LayerPlan(weight_global_amax=clip_nvfp4_global_amax(w[e], x, fmt))
        else:
            args[e] = LayerPlan(weight_scale=clip_weight_scale(w[e], x, fmt, group_size))
    return args
