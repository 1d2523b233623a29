"""quantize_model(model, config, forward_loop): quantize a model in memory (ModelOpt's mtq.quantize).

The public `hf_ptq_plugin.calibration.pipeline` (api.py) calls it, then attaches the transformers quantizer.

Steps: pick the target Linears and the group size (failing early on shapes a format cannot
store), calibrate (one pass of statistics for max; block-by-block streaming for SmoothQuant,
AWQ and GPTQ), unify the scales of engine-fused siblings, then swap each Linear for a QuantLinear, layer
by layer, so full-precision and quantized copies of the whole model never coexist.
"""

import contextlib
import dataclasses
import logging
from typing import Callable, Dict, Optional

import torch
from torch import nn

from .. import formats as F
from . import collect_input_stats
from .clipping import mse_weight_scale
from .streamed import STREAMED_ALGORITHMS, streamed_calibration
from ..config import PTQConfig
from ..modules.kv_cache import check_kv_support, enable_kv_quantization, observe_kv_amax
from .moe import ExpertQuantization
from .offload import materialize, onloaded
from ..modules.quant_linear import QuantLinear
from .selection import fused_groups, fused_weight_amax, target_linears
from .shapes import check_layer_shapes, resolve_group_size

logger = logging.getLogger(__name__)

def quantize_model(model: nn.Module, config: PTQConfig, forward_loop: Optional[Callable] = None) -> nn.Module:
    """Quantize `model` in place per `config` and return it.

    `forward_loop(model)` runs calibration data through the model; it is required when the
    format has static activation scales, when the KV cache is quantized, and for every algorithm
    other than weight-only `max`. `max` runs it once over the whole model; `smoothquant`, the AWQ
    algorithms and `gptq` run it once to capture the first block's inputs, then stream block by block.
    """
    if config.layer_qformats:
        raise ValueError("layer_qformats (per-layer formats) describe a MIXED_PRECISION checkpoint; quantize() takes "
                         "one qformat (leave layer_qformats=None)")
    fmt, kv_format, algorithm = config.format, config.kv_format, config.resolved_algorithm
    linears = target_linears(model, config.exclude_modules)
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear left to quantize after exclusions "
                         f"{config.exclude_modules}")
    moe = ExpertQuantization.of_model(model, config.exclude_modules, fmt, algorithm)  # fused MoE experts (moe.py)
    shapes = {**linears, **moe.shapes()}
    group_size = resolve_group_size(fmt, shapes, config.group_size)
    check_layer_shapes(fmt, shapes, group_size)
    _check_algorithm_and_loop(config, algorithm, forward_loop)
    if kv_format is not None:
        check_kv_support(model, kv_format)

    token_mask = getattr(forward_loop, "token_mask", None)
    with _kv_observation(model, kv_format, token_mask) as kv_amax, moe.observing(token_mask):
        if algorithm in STREAMED_ALGORITHMS:
            def quantize_block(block_linears, plan):
                quantize_linears(model, fmt, group_size, block_linears, plan)
                moe.quantize_observed(group_size)  # this block's experts, before they feed the next block

            streamed_calibration(model, linears, fmt, group_size, algorithm, forward_loop, quantize_block,
                                 sequential=config.sequential)
        else:
            # Weight-only max / mse reads no activation: a pass over the data would only cost time,
            # unless the KV cache's scales or the experts' token counts need it.
            observed = fmt.needs_calibration_data or kv_format is not None or bool(moe.experts)
            plan = _one_pass_plan(model, linears, fmt, group_size, algorithm, forward_loop if observed else None)
            quantize_linears(model, fmt, group_size, linears, plan)
    moe.finish(group_size)
    if kv_format is not None:
        enable_kv_quantization(model, kv_format, kv_amax)
    model.ptq_config = dataclasses.replace(config, group_size=group_size, algorithm=algorithm)
    logger.info("quantized %d Linear layers to %s with %s (group size %s)", len(linears), fmt.name, algorithm, group_size)
    return model


def _check_algorithm_and_loop(config: PTQConfig, algorithm: str, forward_loop: Optional[Callable]) -> None:
    if forward_loop is not None:
        return
    if algorithm not in ("max", "mse"):
        raise ValueError(f"algorithm {algorithm!r} needs calibration data: pass forward_loop=lambda model: ... "
                         "that runs samples through the model (or algorithm='max' for weight-only formats)")
    if config.format.needs_calibration_data:
        raise ValueError(f"qformat {config.qformat!r} has static activation scales, which need calibration data: "
                         "pass forward_loop=lambda model: ... that runs samples through the model")
    if config.kv_format is not None:
        raise ValueError(f"kv_cache_qformat {config.kv_cache_qformat!r} needs calibrated k/v scales: pass forward_loop")


@contextlib.contextmanager
def _kv_observation(model: nn.Module, kv_format, token_mask):
    """Observe K/V amax during calibration when the KV cache is quantized; yields {attn: {"k", "v"}}."""
    if kv_format is None:
        yield {}
        return
    with observe_kv_amax(model, token_mask) as kv_amax:
        yield kv_amax


def _one_pass_plan(model, linears, fmt: F.Format, group_size, algorithm: str, forward_loop) -> Dict[str, dict]:
    """max / mse: one pass of statistics, then {name: {"input_amax", ...}}."""
    plan = {name: {} for name in linears}
    if algorithm == "mse":  # data-free weight scales; activations still take their max below
        for name, linear in linears.items():
            with onloaded(linear):
                plan[name]["weight_scale"] = mse_weight_scale(linear.weight, fmt, group_size)
    if forward_loop is None:  # weight-only: nothing to observe
        return plan
    stats = collect_input_stats(model, linears, forward_loop)
    return {name: {**plan[name], "input_amax": s.amax} for name, s in stats.items()}


def quantize_linears(model: nn.Module, fmt: F.Format, group_size, linears: Dict[str, nn.Linear], plan: dict) -> None:
    """Unify fused siblings' scales, then swap each Linear for its QuantLinear (also used by requantize.py)."""
    input_amax = {name: p["input_amax"] for name, p in plan.items() if "input_amax" in p}
    weight_global_amax = _unify_fused_scales(fmt, linears, input_amax)
    weight_global_amax.update({name: p["weight_global_amax"] for name, p in plan.items() if "weight_global_amax" in p})
    for name, linear in linears.items():
        layer_plan = plan.get(name, {})
        materialize(linear)  # offloaded: in memory until its QuantLinear replaces it (offload.py)
        _swap(model, name, QuantLinear.from_linear(
            linear, fmt, group_size, input_amax.get(name), weight_global_amax.get(name),
            layer_plan.get("pre_quant_scale"), layer_plan.get("weight"), layer_plan.get("weight_scale")))


def _unify_fused_scales(fmt: F.Format, linears: Dict[str, nn.Linear], input_amax: Dict[str, torch.Tensor]) -> dict:
    """Give engine-fused siblings one input amax and one weight global amax (max of the group).

    Updates `input_amax` in place; returns {name: weight global amax} for NVFP4 / W4A8 layers,
    whose `weight_scale_2` must be shared before their block scales are computed.
    """
    if input_amax:
        for group in fused_groups(linears):
            shared = torch.stack([input_amax[name] for name in group]).amax()
            input_amax.update({name: shared for name in group})
    return fused_weight_amax(linears) if fmt.weight == F.NVFP4 or fmt.fp8_weight_scale_2 else {}


def _swap(model: nn.Module, name: str, new_module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new_module)
