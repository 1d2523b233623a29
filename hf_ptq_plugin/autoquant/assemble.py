"""From a choice and its chosen candidate layers to the quantized model `save_pretrained` writes.

The chosen QuantLinears replace their Linears, AWQ scales are folded into the norms once (on the
model as it will be saved), the KV cache is calibrated on that model when asked, and the model
gets its PTQConfig: one format everywhere gives the plain config `quantize()` would record (the
unquantized groups in `exclude_modules`), several give `layer_qformats`, which export writes as
a MIXED_PRECISION checkpoint.
"""

import logging
from collections import Counter
from typing import Callable, Dict

from torch import nn
from transformers import PreTrainedModel

from ..calibration.folding import fold_pre_quant_scales
from ..calibration.record import calibration_record
from ..config import PTQConfig
from ..hf.quantizer import attach_quantizer
from ..modules.kv_cache import check_kv_support, enable_kv_quantization, observe_kv_amax
from ..modules.quant_linear import QuantLinear
from .result import AutoQuantizeResult

logger = logging.getLogger(__name__)


def assemble(model: nn.Module, result: AutoQuantizeResult, chosen: Dict[str, QuantLinear],
             forward_loop: Callable) -> nn.Module:
    """Put `chosen` ({layer: QuantLinear}) into `model` and finish it as `result` describes."""
    for name, module in chosen.items():
        model.set_submodule(name, module)
    if not chosen:
        logger.warning("auto_quantize kept every searched layer in full precision (effective bits %.3g)",
                       result.effective_bits)
        return model
    fold_pre_quant_scales(model)
    config = final_config(result, chosen)
    if config.kv_format is not None:
        calibrate_kv_cache(model, config, forward_loop)
    model.ptq_config = config
    model.calibration_record = calibration_record(forward_loop)
    if isinstance(model, PreTrainedModel):
        attach_quantizer(model, config)
    return model


def final_config(result: AutoQuantizeResult, chosen: Dict[str, QuantLinear]) -> PTQConfig:
    """The PTQConfig of the assembled model (see the module docstring)."""
    qformats = Counter(module.fmt.name for module in chosen.values())
    if len(qformats) == 1:  # one format: the config quantize() records, with the unquantized groups excluded
        qformat = next(iter(qformats))
        unquantized = [m for g in result.groups for m in g.members if m not in chosen]
        return PTQConfig(qformat=qformat, kv_cache_qformat=result.kv_cache_qformat,
                         algorithm=result.algorithms[qformat], group_size=next(iter(chosen.values())).group_size,
                         exclude_modules=list(result.exclude_modules) + unquantized, pre_quant_scales="keep")
    # Several: each layer's format; export allows one INT4 group size, which every INT4 candidate resolved alike.
    int4_group_sizes = {module.group_size for module in chosen.values() if module.fmt.group_size_choices}
    group_size = int4_group_sizes.pop() if int4_group_sizes else None
    return PTQConfig(qformat=qformats.most_common(1)[0][0], kv_cache_qformat=result.kv_cache_qformat,
                     group_size=group_size, exclude_modules=list(result.exclude_modules), pre_quant_scales="keep",
                     layer_qformats={name: module.fmt.name for name, module in chosen.items()})


def calibrate_kv_cache(model: nn.Module, config: PTQConfig, forward_loop: Callable) -> None:
    """k_scale / v_scale observed on the assembled (quantized) model, then the KV cache quantized."""
    check_kv_support(model, config.kv_format)
    with observe_kv_amax(model, getattr(forward_loop, "token_mask", None)) as kv_amax:
        forward_loop(model)
    enable_kv_quantization(model, config.kv_format, kv_amax)
