"""Re-quantize a model loaded compressed with an algorithm that changes weights (SmoothQuant, AWQ, GPTQ).

A model from `from_pretrained(src, quantization_config=PTQConfig(...))` holds only quantized
weights (round to nearest, `max`). To apply SmoothQuant, AWQ or GPTQ, each decoder block's
full-precision weights are read again from `src`'s safetensors just before the block is
calibrated (its MoE experts included), the algorithm runs on them, and the block is quantized
again, the next block fed by this one's quantized outputs (layer streaming). Peak memory: the compressed model, one block
in full precision, and the calibration activations. Called by `calibrate()`.
"""

import dataclasses
import logging
from typing import Callable

from torch import nn

from .blocks import decoder_blocks
from .streamed import STREAMED_ALGORITHMS, streamed_calibration
from .moe import ExpertQuantization
from ..modules.quant_experts import QuantExperts
from ..modules.quant_linear import QuantLinear
from .pipeline import quantize_linears
from .sources import restore_experts, restore_full_precision

logger = logging.getLogger(__name__)

REQUANTIZING_ALGORITHMS = STREAMED_ALGORITHMS  # the ones that change weights, so need the source's


def requantize_from_source(model: nn.Module, algorithm: str, forward_loop: Callable) -> None:
    """Run `algorithm` block by block on the source weights of every QuantLinear and QuantExperts, in place.

    Each block's MoE experts are restored from the source too, observed in the block's pass and
    quantized again as quantize_model quantizes experts (moe.py): with this algorithm's expert
    variant (GPTQ, AWQ) or, for SmoothQuant, round to nearest with freshly observed input scales.
    """
    source = getattr(model, "ptq_source", None)
    if source is None:
        raise ValueError(f"algorithm {algorithm!r} needs the full-precision weights, and this model's are gone: "
                         "it was quantized in memory (quantize()) or loaded from a quantized checkpoint. Quantize "
                         f"the full-precision model with PTQConfig(..., algorithm={algorithm!r}) instead")
    config = model.ptq_config
    fmt, group_size = config.format, config.group_size
    experts = {name: m for name, m in model.named_modules() if isinstance(m, QuantExperts)}
    targets = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)
               and not any(name.startswith(e + ".") for e in experts)}
    _check_experts_are_in_calibrated_blocks(model, experts, targets, algorithm)
    names = next(iter(experts.values())).names if experts else None
    moe = ExpertQuantization(model, {}, fmt, algorithm, names)

    def prepare_block(prefix: str, block_linears: dict) -> dict:
        for name in [n for n in experts if n.startswith(prefix)]:
            moe.add(name, restore_experts(model, name, experts.pop(name), source))
        return restore_full_precision(model, block_linears, source)

    def quantize_block(block_linears: dict, plan: dict) -> None:
        quantize_linears(model, fmt, group_size, block_linears, plan)
        moe.quantize_observed(group_size)

    with moe.observing(getattr(forward_loop, "token_mask", None)):
        streamed_calibration(model, targets, fmt, group_size, algorithm, forward_loop, quantize_block,
                             prepare_block=prepare_block, sequential=config.sequential)
    moe.finish(group_size)
    _record_algorithm(model, dataclasses.replace(config, algorithm=algorithm))


def _check_experts_are_in_calibrated_blocks(model: nn.Module, experts: dict, targets: dict, algorithm: str) -> None:
    """Streaming restores a block's experts with its Linears: a block with experts and no Linear is never reached."""
    if not experts:
        return
    blocks_name, _ = decoder_blocks(model, targets)
    depth = blocks_name.count(".") + 2  # "<blocks>.<i>"
    calibrated = {".".join(name.split(".")[:depth]) for name in targets}
    orphans = [name for name in experts if ".".join(name.split(".")[:depth]) not in calibrated]
    if orphans:
        raise ValueError(f"the experts {sorted(orphans)[:3]} are in decoder blocks with no other quantized Linear; "
                         f"algorithm {algorithm!r} re-reads experts block by block with the block's Linears")


def _record_algorithm(model: nn.Module, config) -> None:
    """Every place the model's PTQConfig lives (what save_pretrained and the model card read)."""
    model.ptq_config = config
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.quantization_config = config
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        model.config.quantization_config = config
