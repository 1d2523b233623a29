"""Re-quantize a model loaded compressed with an algorithm that changes weights (SmoothQuant, AWQ, GPTQ).

A model from `from_pretrained(src, quantization_config=PTQConfig(...))` holds only quantized
weights (round to nearest, `max`). To apply SmoothQuant, AWQ or GPTQ, each decoder block's
full-precision weights are read again from `src`'s safetensors just before the block is
calibrated, the algorithm runs on them, and the block is quantized again, the next block fed
by this one's quantized outputs (layer streaming). Peak memory: the compressed model, one block
in full precision, and the calibration activations. Called by `calibrate()`.
"""

import dataclasses
import logging
from typing import Callable

from torch import nn

from .calibration.stats import collect_input_stats
from .calibration.streamed import STREAMED_ALGORITHMS, streamed_calibration
from .quant_linear import QuantLinear
from .quantize import quantize_linears
from .source_weights import restore_full_precision

logger = logging.getLogger(__name__)

REQUANTIZING_ALGORITHMS = STREAMED_ALGORITHMS  # the ones that change weights, so need the source's


def requantize_from_source(model: nn.Module, algorithm: str, forward_loop: Callable) -> None:
    """Run `algorithm` block by block on the source weights of every QuantLinear, in place."""
    source = getattr(model, "ptq_source", None)
    if source is None:
        raise ValueError(f"algorithm {algorithm!r} needs the full-precision weights, and this model's are gone: "
                         "it was quantized in memory (quantize()) or loaded from a quantized checkpoint. Quantize "
                         f"the full-precision model with PTQConfig(..., algorithm={algorithm!r}) instead")
    config = model.ptq_config
    fmt, group_size = config.format, config.group_size
    targets = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    experts = {name: m for name, m in targets.items() if getattr(m, "shared_input", None) is not None}
    targets = {name: m for name, m in targets.items() if name not in experts}
    streamed_calibration(
        model, targets, fmt, group_size, algorithm, forward_loop,
        quantize_block=lambda block_linears, plan: quantize_linears(model, fmt, group_size, block_linears, plan),
        prepare_block=lambda block_modules: restore_full_precision(model, block_modules, source))
    if experts:
        _calibrate_experts(model, experts, algorithm, forward_loop)
    _record_algorithm(model, dataclasses.replace(config, algorithm=algorithm))


def _calibrate_experts(model: nn.Module, experts: dict, algorithm: str, forward_loop: Callable) -> None:
    """MoE experts keep their round-to-nearest weights (moe.py); static formats get their input scales
    (shared per layer and projection, calibration/shared_inputs.py) from one more pass over the data."""
    logger.warning("algorithm %r is not applied to MoE experts: their %d projections (e.g. %s) keep their 'max' "
                   "weights", algorithm, len(experts), min(experts))
    if next(iter(experts.values())).fmt.needs_calibration_data:
        for name, stats in collect_input_stats(model, experts, forward_loop).items():
            experts[name].set_input_amax(stats.channel_amax.amax())


def _record_algorithm(model: nn.Module, config) -> None:
    """Every place the model's PTQConfig lives (what save_pretrained and the model card read)."""
    model.ptq_config = config
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.quantization_config = config
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        model.config.quantization_config = config
