"""The calibration pipeline: one function for every entry point, the weight source the only difference.

`run(model, config, forward_loop, source)`: pick the target Linears and fused experts and the
group size (failing early on shapes a format cannot store); calibrate, with one pass of statistics
for `max`/`mse`, or block by block for the layer-streamed algorithms (SmoothQuant, AWQ, GPTQ),
each block's full-precision weights read from `source` just before it is calibrated; unify the
scales of engine-fused siblings; swap each Linear for a QuantLinear, layer by layer, so
full-precision and quantized copies of the whole model never coexist; fold AWQ scales into the
norms that feed them (and, with `PTQConfig.pre_quant_scales="fold"`, SmoothQuant's too, and
o_proj's and down_proj's into v_proj's and up_proj's rows during calibration, producer_folding.py),
so the model in memory is exactly what its checkpoint will hold. `quantize()` runs it on the
model's own weights; `calibrate()` on a model loaded compressed runs it on the checkpoint's.
"""

import contextlib
import dataclasses
import logging
from typing import Callable, Dict, Optional

import torch
from torch import nn

from .. import formats as F
from ..backends import cpu_blas
from ..config import PTQConfig
from ..modules.kv_cache import check_kv_support, enable_kv_quantization, observe_kv_amax
from ..modules.layer_plan import LayerPlan
from ..modules.quant_linear import QuantLinear
from ..numerics.weights import shared_sibling_scales
from .algorithms import Algorithm, get_algorithm
from .expert_quantization import ExpertQuantization
from .folding import fold_pre_quant_scales
from .interrupted import WeightGuard, refuse_if_interrupted
from .offload import materialize, onloaded
from .selection import fused_groups, fused_weight_amax
from .sources import InMemoryWeights
from .stats import collect_input_stats
from .streamed import streamed_calibration

logger = logging.getLogger(__name__)


def run(model: nn.Module, config: PTQConfig, forward_loop: Optional[Callable] = None, source=None,
        fold: bool = True) -> nn.Module:
    """Quantize `model` in place per `config`, reading full-precision weights from `source`
    (default: the model's own, `InMemoryWeights`), and return it.

    `fold=False` leaves `pre_quant_scale`s on the layers instead of folding them into the norms,
    for callers that put the original Linears back and fold once on the model they assemble.

    `forward_loop(model)` runs calibration data through the model; it is required when the format
    has static activation scales, when the KV cache is quantized, and for every algorithm that
    reads activations (all but `max` and `mse` on weight-only formats).
    """
    if config.layer_qformats:
        raise ValueError("layer_qformats (per-layer formats) describe a MIXED_PRECISION checkpoint; quantize() takes "
                         "one qformat (leave layer_qformats=None)")
    refuse_if_interrupted(model)
    source = source or InMemoryWeights()
    fmt, kv_format, algorithm = config.format, config.kv_format, get_algorithm(_algorithm_name(config, forward_loop))
    linears, experts = source.targets(model, config.exclude_modules)
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear left to quantize after exclusions "
                         f"{config.exclude_modules}")
    group_size = source.group_size(config, linears, experts)
    _check_algorithm_and_loop(config, algorithm, forward_loop)
    if kv_format is not None:
        check_kv_support(model, kv_format)
    moe = ExpertQuantization(model, {} if source.streams_blocks else experts, fmt, algorithm,
                             source.expert_names(model, experts))
    token_mask = getattr(forward_loop, "token_mask", None)
    with cpu_blas.calibrating(), WeightGuard(model).watching() as guard:
        kv_observation = observe_kv_amax(model, token_mask) if kv_format else contextlib.nullcontext({})
        with kv_observation as kv_amax, moe.observing(token_mask):
            if algorithm.streamed or source.streams_blocks:
                # A data-free algorithm streamed from disk runs each block on full-precision inputs
                # (sequential=False), which is what its one pass over the whole model would see.
                sequential = config.resolved_sequential and algorithm.streamed
                _streamed(model, linears, experts, moe, fmt, group_size, algorithm, forward_loop, source, sequential,
                          config.pre_quant_scales == "fold", guard)
            else:
                # Weight-only max / mse reads no activation: a pass over the data would only cost time,
                # unless the KV cache's scales or the experts' token counts need it.
                observed = fmt.needs_calibration_data or kv_format is not None or bool(moe.experts)
                plans = _one_pass_plans(model, linears, fmt, group_size, algorithm,
                                        forward_loop if observed else None)
                guard.changing()
                quantize_linears(model, fmt, group_size, linears, plans)
        guard.changing()
        moe.finish(group_size)
        if fold:  # norm-fed scales into the norm now, so the model is what gets saved
            fold_pre_quant_scales(model, smoothquant=config.pre_quant_scales == "fold")
    if kv_format is not None:
        enable_kv_quantization(model, kv_format, kv_amax)
    model.ptq_config = dataclasses.replace(config, group_size=group_size, algorithm=algorithm.name)
    logger.info("quantized %d Linear layers to %s with %s (group size %s)", len(linears), fmt.name, algorithm.name,
                group_size)
    return model


def _streamed(model, linears, experts, moe, fmt, group_size, algorithm: Algorithm, forward_loop, source,
              sequential: bool, fold_scales: bool, guard) -> None:
    """Layer-streamed calibration: each block restored from `source`, planned, then quantized."""
    pending = dict(experts) if source.streams_blocks else {}

    def prepare_block(prefix: str, block_linears: dict) -> dict:
        guard.changing()  # from here on the block's weights are rescaled, restored or swapped
        for name in [n for n in pending if n.startswith(prefix)]:
            moe.add(name, source.restore_experts(model, name, pending.pop(name)))
        return source.restore_block(model, block_linears)

    def quantize_block(block_linears: dict, plans: Dict[str, LayerPlan]) -> None:
        quantize_linears(model, fmt, group_size, block_linears, plans)
        moe.quantize_observed(group_size)  # this block's experts, before they feed the next block

    streamed_calibration(model, linears, fmt, group_size, algorithm, forward_loop, prepare_block, quantize_block,
                         sequential=sequential, fold_scales=fold_scales)
    if pending:
        raise ValueError(f"the experts {sorted(pending)[:3]} are in decoder blocks with no other quantized Linear; "
                         f"algorithm {algorithm.name!r} re-reads experts block by block with the block's Linears")


def _algorithm_name(config: PTQConfig, forward_loop: Optional[Callable]) -> str:
    """The config's algorithm; but without data, a default one that reads activations gives way to
    `max` when nothing else needs data (a weight-only format, KV cache unquantized), as on loading:
    `PTQConfig(qformat="int8_wo")` rounds to nearest without data and runs GPTQ with it."""
    name = config.resolved_algorithm
    if forward_loop is None and config.needs_calibration_data and not config.cannot_run_without_data:
        logger.info("no calibration data: %s's default algorithm %r needs some, so its weights are rounded to nearest "
                    "('max'); pass forward_loop to calibrate with %r", config.qformat, name, name)
        return "max"
    return name


def _check_algorithm_and_loop(config: PTQConfig, algorithm: Algorithm, forward_loop: Optional[Callable]) -> None:
    if forward_loop is not None:
        return
    if algorithm.streamed:
        raise ValueError(f"algorithm {algorithm.name!r} needs calibration data: pass forward_loop=lambda model: ... "
                         "that runs samples through the model (or algorithm='max' for weight-only formats)")
    if config.format.needs_calibration_data:
        raise ValueError(f"qformat {config.qformat!r} has static activation scales, which need calibration data: "
                         "pass forward_loop=lambda model: ... that runs samples through the model")
    if config.kv_format is not None:
        raise ValueError(f"kv_cache_qformat {config.kv_cache_qformat!r} needs calibrated k/v scales: pass forward_loop")


def _one_pass_plans(model, linears, fmt: F.Format, group_size, algorithm: Algorithm,
                    forward_loop) -> Dict[str, LayerPlan]:
    """max / mse: data-free weight scales, then one pass of input statistics (when there is a loop)."""
    plans = {name: LayerPlan() for name in linears}
    for name, linear in linears.items() if algorithm.searches_weight_scales else ():
        with onloaded(linear):  # an offloaded weight is read only when a search needs it
            plans[name] = LayerPlan(weight_scale=algorithm.data_free_weight_scale(linear.weight, fmt, group_size))
    if forward_loop is None:  # weight-only: nothing to observe
        return plans
    stats = collect_input_stats(model, linears, forward_loop)
    return {name: plans[name].but(input_amax=s.amax) for name, s in stats.items()}


def quantize_linears(model: nn.Module, fmt: F.Format, group_size, linears: Dict[str, nn.Linear],
                     plans: Dict[str, LayerPlan]) -> None:
    """Unify fused siblings' scales, then swap each Linear for its QuantLinear."""
    plans = {name: plans.get(name, LayerPlan()) for name in linears}
    _unify_fused_scales(fmt, linears, plans)
    for name, linear in linears.items():
        materialize(linear)  # offloaded: in memory until its QuantLinear replaces it
        model.set_submodule(name, QuantLinear.from_linear(linear, fmt, group_size, plans[name]))


def _unify_fused_scales(fmt: F.Format, linears: Dict[str, nn.Linear], plans: Dict[str, LayerPlan]) -> None:
    """Give engine-fused siblings one input amax and, where engines need it, one per-tensor weight
    scale from the group's weight amax (`Format.fused_siblings_share_weight_scale`)."""
    for group in fused_groups(linears):
        amaxes = [plans[name].input_amax for name in group]
        if all(a is not None for a in amaxes):
            shared = torch.stack(amaxes).amax()
            for name in group:
                plans[name] = plans[name].but(input_amax=shared)
    if not fmt.fused_siblings_share_weight_scale:
        return
    for name, amax in fused_weight_amax(linears).items():
        global_amax, weight_scale = shared_sibling_scales(fmt, amax)
        plan = plans[name]
        if global_amax is not None and plan.weight_global_amax is None:
            plans[name] = plan.but(weight_global_amax=global_amax)
        if weight_scale is not None and plan.weight is None and plan.weight_scale is None:
            plans[name] = plan.but(weight_scale=weight_scale)
