"""Candidate layers: every searched Linear quantized in one format, by the calibration pipeline.

Each format runs `pipeline.run` over all searched layers with its own algorithm, exactly as
`quantize()` would, so a choice of one format everywhere is `quantize()`'s model. The pipeline
swaps QuantLinears into the model and smoothing algorithms (AWQ, SmoothQuant) rescale the weights
they calibrate, so the model's own Linears are kept aside and stay untouched: a layer-streamed
algorithm calibrates copies of one block's Linears at a time (`PristineWeights`), AWQ scales stay
on the candidates (no folding into the norms the other formats and the final model read), and
the original Linears go back into the model afterwards. Memory then holds the full-precision
model, one block's copies and the candidates in their compressed form.
"""

import copy
import logging
from typing import Callable, Dict, Tuple

from torch import nn

from ..calibration import pipeline
from ..calibration.shapes import unstorable_layers
from ..calibration.sources import InMemoryWeights
from ..config import PTQConfig
from ..evaluation import model_bytes
from ..hf.memory import release_freed_heap
from ..modules.quant_linear import QuantLinear

logger = logging.getLogger(__name__)

_ABSENT = object()


class PristineWeights(InMemoryWeights):
    """The searched Linears as the weight source; each streamed block is calibrated on copies of them."""

    def __init__(self, linears: Dict[str, nn.Linear]):
        self.linears = linears

    def targets(self, model: nn.Module, exclude_modules=()):
        return dict(self.linears), {}

    def restore_block(self, model: nn.Module, linears: Dict[str, nn.Module]) -> Dict[str, nn.Module]:
        copies = {}
        for name, linear in linears.items():
            copies[name] = copy.deepcopy(linear)  # one block's worth: the algorithm rescales this one
            model.set_submodule(name, copies[name])
        return copies


def storable(config: PTQConfig, linears: Dict[str, nn.Linear]) -> Tuple[PTQConfig, Dict[str, nn.Linear]]:
    """(config with the group size its layers share, the layers of `linears` its format can store).

    A layer the format cannot store (e.g. in_features not a multiple of NVFP4's 16) is simply not a
    candidate of that format, so one odd layer does not stop the search. An INT4 format without a
    requested group size takes the largest supported one that divides every layer, else its default.
    """
    fmt, group_size = config.format, config.group_size
    if group_size is None and fmt.group_size_choices:
        fitting = [g for g in fmt.group_size_choices if all(m.in_features % g == 0 for m in linears.values())]
        group_size = fitting[0] if fitting else fmt.group_size
        config = PTQConfig(qformat=config.qformat, algorithm=config.algorithm, group_size=group_size)
    problems = unstorable_layers(fmt, linears, group_size or fmt.group_size)
    for name, problem in problems.items():
        logger.warning("%s cannot store %s (%s): not a candidate there", fmt.name, name, problem)
    return config, {name: module for name, module in linears.items() if name not in problems}


def build_candidates(model: nn.Module, linears: Dict[str, nn.Linear], config: PTQConfig,
                     forward_loop: Callable) -> Dict[str, QuantLinear]:
    """{name: QuantLinear} of every layer in `linears` quantized as `config` says (format, algorithm); the
    model holds `linears` again afterwards. A calibration that fails part-way leaves the model
    refusing to run or save (the pipeline's rule for interrupted calibrations): load it again."""
    if not linears:
        return {}
    previous_config = model.__dict__.get("ptq_config", _ABSENT)
    try:
        pipeline.run(model, config, forward_loop, source=PristineWeights(linears), fold=False)
        built = {name: model.get_submodule(name) for name in linears}
    finally:
        for name, linear in linears.items():
            model.set_submodule(name, linear)
        _restore_attribute(model, "ptq_config", previous_config)
    for module in built.values():
        module.cpu_weight_cache = None  # a CPU forward's derived (dense) weight: no copy outlives its use
    release_freed_heap()  # calibration's temporaries, so the process holds what is alive
    logger.info("%s candidates: %d layers, %d bytes", config.qformat, len(built), candidate_bytes(built))
    return built


def candidate_bytes(layers: Dict[str, nn.Module]) -> int:
    """Bytes the layers hold (compressed weights, scales, biases)."""
    return sum(model_bytes(module) for module in layers.values())


def bits_per_weight(module: nn.Module) -> float:
    """Stored bits per weight element of a layer, scales included (biases not: they are not weights)."""
    if not isinstance(module, QuantLinear):
        return float(module.weight.element_size() * 8)
    stored = sum(buffer.numel() * buffer.element_size() for buffer in module.buffers(recurse=False))
    return stored * 8 / (module.in_features * module.out_features)


def _restore_attribute(model: nn.Module, name: str, value) -> None:
    if value is _ABSENT:
        model.__dict__.pop(name, None)
    else:
        setattr(model, name, value)
