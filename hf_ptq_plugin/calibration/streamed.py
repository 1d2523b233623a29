"""Layer-streamed calibration (AWQ lite/clip/full, GPTQ; SmoothQuant too), one decoder block at a time.

For each block: run it in full precision on its inputs with hooks that collect what the
algorithm needs about every distinct Linear input (AWQ: per-channel statistics and a token
sample; GPTQ: the Hessian), compute the block's plan (smoothing scales, or GPTQ-updated weights
with their scales), hand it to `quantize_block` (which swaps in the QuantLinears), then run the
now-quantized block to produce the next block's inputs (bf16 models: on the block's dequantized
weights, `bf16_dense_weights`, 2-3x faster than the packed kernels at this many tokens). With
`sequential=False` the statistics pass runs the whole full-precision block and its outputs are
the next block's inputs: one pass per block instead of two. Memory
holds one block's activations and statistics, never the whole model's. `prepare_block` lets the
caller materialize a block's full-precision Linears just before it is calibrated (re-reading
them from the source checkpoint when the model was loaded compressed). SmoothQuant streams too: its alpha search needs a token
sample of each layer's input, which only one block at a time can hold.
"""

import contextlib
import functools
from typing import Callable, Dict, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import formats as F
from ..backends.cpu_weights import bf16_dense_weights
from ..modules.fused_experts import is_fused_experts
from .offload import materialize
from ..modules.quant_linear import QuantLinear
from .selection import fused_groups, fused_weight_amax
from .awq import AWQ_STEPS, awq_search
from .blocks import capture_block_inputs, decoder_blocks, observe_block, run_block
from .clipping import clip_nvfp4_global_amax, clip_weight_scale
from .data import TokenMask
from .gptq import HessianStats, gptq_quantize
from .smoothing import apply_pre_quant_scale, groups_sharing_input, stacked_weight
from .smoothquant import smoothquant_group_plan
from .stats import InputStats, input_hooks

MAX_SEARCH_TOKENS = 2048  # tokens per input kept for the search: loss estimates, not statistics


STREAMED_ALGORITHMS = ("smoothquant", "awq_lite", "awq_clip", "awq_full", "gptq")


def streamed_calibration(model: nn.Module, linears: Dict[str, nn.Module], fmt: F.Format, group_size: int,
                         algorithm: str, forward_loop: Callable, quantize_block: Callable,
                         max_tokens: int = MAX_SEARCH_TOKENS, prepare_block: Optional[Callable] = None,
                         sequential: bool = True) -> None:
    """Run `algorithm` over every decoder block; `quantize_block(linears, plan)` swaps one block's Linears.

    `prepare_block(prefix, block_linears) -> {name: nn.Linear}`, when given, turns the modules of
    the block whose names start with `prefix` into full-precision ones right before the block is
    calibrated, and returns its Linears. `sequential`: each block is fed the outputs of the
    quantized blocks before it (a second pass per block, after quantizing it); False feeds the
    full-precision outputs that its statistics pass computes anyway, as ModelOpt's AWQ and
    SmoothQuant calibrate, in one pass per block.
    """
    calibrate_block = _block_algorithm(algorithm)
    blocks_name, blocks = decoder_blocks(model, linears)
    outside = [name for name in linears if not name.startswith(blocks_name + ".")]
    if outside:
        raise ValueError(f"layer-streamed calibration handles Linears inside {blocks_name!r}; {outside[:3]} are "
                         "outside it: exclude them with exclude_modules or use algorithm='max'")
    inputs = capture_block_inputs(model, blocks, forward_loop)
    token_mask = getattr(forward_loop, "token_mask", None) or TokenMask()
    total_tokens = sum(args[0].shape[:-1].numel() for args, _, _ in inputs)
    stride = max(1, total_tokens // max_tokens)
    for index, block in enumerate(tqdm(blocks, desc=f"{algorithm} {fmt.name}", disable=None)):
        prefix = f"{blocks_name}.{index}."
        block_linears = {n: m for n, m in linears.items() if n.startswith(prefix)}
        if block_linears:
            if prepare_block is not None:
                block_linears = prepare_block(prefix, block_linears)
            for linear in block_linears.values():
                materialize(linear)  # accelerate-offloaded: this block's weights in memory (offload.py)
            outputs = None if sequential else []
            plan = calibrate_block(block, block_linears, inputs, token_mask, fmt, group_size, stride, outputs)
            quantize_block(block_linears, plan)
            if outputs:
                inputs = outputs
                continue
        with _feeding_weights(block, inputs):
            inputs = run_block(block, inputs)


def _feeding_weights(block: nn.Module, inputs: list):
    """The weights a just-quantized block feeds the next one with: bf16 dense ones on CPU for bf16
    hidden states (`bf16_dense_weights`), else the layers' own forward (fp32 runs the reference)."""
    hidden = inputs[0][0][0]
    if hidden.dtype != torch.bfloat16 or hidden.device.type != "cpu":
        return contextlib.nullcontext()
    return bf16_dense_weights(m for m in block.modules() if isinstance(m, QuantLinear))


def _block_algorithm(algorithm: str) -> Callable:
    if algorithm == "gptq":
        return _gptq_block
    if algorithm == "smoothquant":
        return _smoothquant_block
    return functools.partial(_awq_block, steps=AWQ_STEPS[algorithm])


def _statistics_pass(block, inputs, leaders, token_mask, outputs: Optional[list] = None) -> None:
    """Run the block for the hooks on its Linears, stopping each batch once they all had their input.

    Fused experts are observed inside the block's forward (calibration/experts.py), possibly after
    its last Linear: a block that has them runs to its end.
    """
    if outputs is not None:  # not sequential: the whole full-precision block, its outputs feed the next one
        outputs.extend(run_block(block, inputs, token_mask))
        return
    has_fused_experts = any(is_fused_experts(m) for m in block.modules())
    observe_block(block, inputs, () if has_fused_experts else leaders.values(), token_mask)


def _smoothquant_block(block, block_linears, inputs, token_mask, fmt, group_size, stride, outputs=None) -> dict:
    """SmoothQuant for one block: per-channel input amax per group, then the shared smoothing scale."""
    groups = groups_sharing_input(list(block_linears), fused_groups(block_linears))
    leaders = {group[0]: block_linears[group[0]] for group in groups}
    stats = {name: InputStats(sample_stride=stride) for name in leaders}
    with input_hooks(leaders, stats, token_mask):
        _statistics_pass(block, inputs, leaders, token_mask, outputs)
    plan = {}
    for group in groups:
        s = stats[group[0]]
        s.reduce_across_processes()
        plan.update(smoothquant_group_plan(block_linears, group, s.channel_amax, s.sample, fmt))
    return plan


def _awq_block(block, block_linears, inputs, token_mask, fmt, group_size, stride, outputs=None, steps=None) -> dict:
    """AWQ for one block: scale search and/or clipping per group of Linears sharing an input.

    Returns {name: {"input_amax", and "pre_quant_scale" / "weight_scale" / "weight_global_amax"}}.
    """
    search, clip = steps
    groups = groups_sharing_input(list(block_linears), fused_groups(block_linears))
    leaders = {group[0]: block_linears[group[0]] for group in groups}
    stats = {name: InputStats(sample_stride=stride) for name in leaders}
    with input_hooks(leaders, stats, token_mask):
        _statistics_pass(block, inputs, leaders, token_mask, outputs)
    for s in stats.values():
        s.reduce_across_processes()
    plan = {}
    for group in groups:
        s, members = stats[group[0]], [block_linears[name] for name in group]
        layer_plan = {"input_amax": s.amax}
        x_sample = s.sample
        if search:
            scale = awq_search(stacked_weight(block_linears, group), x_sample, s.channel_mean, s.channel_amax, fmt,
                               group_size)
            pre_quant_scale = apply_pre_quant_scale(members, 1.0 / scale)
            x_sample = x_sample * pre_quant_scale.float()
            layer_plan = {"pre_quant_scale": pre_quant_scale,
                          "input_amax": (s.channel_amax * pre_quant_scale.float()).amax()}
        for name in group:
            plan[name] = dict(layer_plan)
        if clip:
            _clip_group(plan, group, block_linears, x_sample, fmt, group_size)
    return plan


def _clip_group(plan, group, block_linears, x_sample, fmt, group_size) -> None:
    if fmt.weight == F.NVFP4:
        global_amax = clip_nvfp4_global_amax(stacked_weight(block_linears, group), x_sample, fmt)
        for name in group:
            plan[name]["weight_global_amax"] = global_amax
        return
    for name in group:
        plan[name]["weight_scale"] = clip_weight_scale(block_linears[name].weight, x_sample, fmt, group_size)


def _gptq_block(block, block_linears, inputs, token_mask, fmt, group_size, stride, outputs=None) -> dict:
    """GPTQ for one block; return {name: {"weight", "weight_scale"(, "input_amax" for static activation scales)}}."""
    groups = groups_sharing_input(list(block_linears), fused_groups(block_linears))
    leaders = {group[0]: block_linears[group[0]] for group in groups}
    hessians = {name: HessianStats() for name in leaders}
    # The input amax only sets static activation scales: weight-only formats skip that statistic.
    stats = {name: InputStats() for name in leaders} if fmt.needs_calibration_data else {}
    with input_hooks(leaders, hessians, token_mask), input_hooks({n: leaders[n] for n in stats}, stats, token_mask):
        _statistics_pass(block, inputs, leaders, token_mask, outputs)
    for s in list(hessians.values()) + list(stats.values()):
        s.reduce_across_processes()
    # NVFP4: the shared weight_scale_2 that quantize_linears will also give fused siblings.
    global_amax = fused_weight_amax(block_linears) if fmt.weight == F.NVFP4 else {}
    plan = {}
    for group in groups:
        for name in group:
            weight, scale = gptq_quantize(block_linears[name].weight, hessians[group[0]].hessian, fmt, group_size,
                                          global_amax=global_amax.get(name))
            plan[name] = {"weight": weight, "weight_scale": scale}
            if stats:
                plan[name]["input_amax"] = stats[group[0]].amax
    return plan
