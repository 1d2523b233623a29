"""Candidate layers: every searched Linear (and MoE experts) quantized in one format, by the calibration pipeline.

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
import dataclasses
import logging
from typing import Callable, Dict, Tuple

from torch import nn

from ..calibration import pipeline
from ..calibration.shapes import fitting_group_sizes, unstorable_layers
from ..calibration.sources import InMemoryWeights
from ..config import PTQConfig
from ..evaluation import model_bytes
from ..hf.memory import release_freed_heap
from ..modules.fused_experts import is_fused_experts, projection_shapes
from ..modules.quant_experts import QuantExperts
from ..modules.quant_linear import QuantLinear
from .groups import weight_elements

logger = logging.getLogger(__name__)

_ABSENT = object()


class PristineWeights(InMemoryWeights):
    """The searched layers as the weight source; each is calibrated on a copy of itself.

    Linears are copied one streamed block at a time (the algorithm rescales the copy). Fused experts,
    which smoothing also rescales, are copied when their block is reached, so a model with experts
    is calibrated block by block whatever the algorithm (a data-free one on full-precision inputs,
    which is what its one pass over the model sees).
    """

    def __init__(self, layers: Dict[str, nn.Module]):
        self.linears = {name: m for name, m in layers.items() if not is_fused_experts(m)}
        self.experts = {name: m for name, m in layers.items() if is_fused_experts(m)}
        self.streams_blocks = bool(self.experts)

    def targets(self, model: nn.Module, exclude_modules=()):
        return dict(self.linears), dict(self.experts)

    def restore_block(self, model: nn.Module, linears: Dict[str, nn.Module]) -> Dict[str, nn.Module]:
        copies = {}
        for name, linear in linears.items():
            copies[name] = copy.deepcopy(linear)  # one block's worth: the algorithm rescales this one
            model.set_submodule(name, copies[name])
        return copies

    def restore_experts(self, model: nn.Module, name: str, module: nn.Module) -> nn.Module:
        restored = copy.deepcopy(module)
        model.set_submodule(name, restored)
        return restored


def storable(config: PTQConfig, layers: Dict[str, nn.Module]) -> Tuple[PTQConfig, Dict[str, nn.Module]]:
    """(config with the group size its layers share, the layers of `layers` its format can store).

    A layer the format cannot store (e.g. in_features not a multiple of NVFP4's 16; for fused
    experts, any of their projections) is simply not a candidate of that format, so one odd layer
    does not stop the search. An INT4 format without a requested group size takes the largest
    supported one that divides every layer, else its default.
    """
    fmt, group_size = config.format, config.group_size
    shapes = _shapes(layers)
    if group_size is None and fmt.group_size_choices:
        group_size = next(iter(fitting_group_sizes(fmt, shapes)), fmt.group_size)
        config = PTQConfig(qformat=config.qformat, algorithm=config.algorithm, group_size=group_size)
    problems = {}
    for shape_name, problem in unstorable_layers(fmt, shapes, group_size or fmt.group_size).items():
        problems.setdefault(_owner(shape_name, layers), problem)
    for name, problem in problems.items():
        logger.warning("%s cannot store %s (%s): not a candidate there", fmt.name, name, problem)
    return config, {name: module for name, module in layers.items() if name not in problems}


def _shapes(layers: Dict[str, nn.Module]) -> Dict[str, nn.Module]:
    """{name: something with in/out_features}: the Linears, and each fused-experts projection."""
    experts = {name: m for name, m in layers.items() if is_fused_experts(m)}
    return {**{name: m for name, m in layers.items() if name not in experts}, **projection_shapes(experts)}


def _owner(shape_name: str, layers: Dict[str, nn.Module]) -> str:
    """The searched layer a shape belongs to ("<experts>.gate" -> "<experts>")."""
    return shape_name if shape_name in layers else shape_name.rpartition(".")[0]


def build_candidates(model: nn.Module, layers: Dict[str, nn.Module], config: PTQConfig,
                     forward_loop: Callable) -> Dict[str, nn.Module]:
    """{name: QuantLinear or QuantExperts} of every layer in `layers` quantized as `config` says
    (format, algorithm); the model holds `layers` again afterwards. A calibration that fails part-way
    leaves the model refusing to run or save (the pipeline's rule for interrupted calibrations): load it again."""
    if not layers:
        return {}
    previous_config = model.__dict__.get("ptq_config", _ABSENT)
    try:
        # A producer (v_proj, up_proj) may end up in another format than its consumer: scales stay on the consumer.
        keep = dataclasses.replace(config, pre_quant_scales="keep")
        pipeline.run(model, keep, forward_loop, source=PristineWeights(layers), fold=False)
        built = {name: model.get_submodule(name) for name in layers}
    finally:
        for name, layer in layers.items():
            model.set_submodule(name, layer)
        _restore_attribute(model, "ptq_config", previous_config)
    for module in built.values():
        for linear in module.modules():
            if isinstance(linear, QuantLinear):
                linear.cpu_weight_cache = None  # a CPU forward's derived (dense) weight: no copy outlives its use
    release_freed_heap()  # calibration's temporaries, so the process holds what is alive
    logger.info("%s candidates: %d layers, %d bytes", config.qformat, len(built), candidate_bytes(built))
    return built


def candidate_bytes(layers: Dict[str, nn.Module]) -> int:
    """Bytes the layers hold (compressed weights, scales, biases)."""
    return sum(model_bytes(module) for module in layers.values())


def bits_per_weight(module: nn.Module) -> float:
    """Stored bits per weight element of a layer, scales included (biases not: they are not weights)."""
    if isinstance(module, QuantLinear):
        stored = sum(buffer.numel() * buffer.element_size() for buffer in module.buffers(recurse=False))
        return stored * 8 / (module.in_features * module.out_features)
    if isinstance(module, QuantExperts):
        return sum(bits_per_weight(m) * weight_elements(m) for m in module.modules()
                   if isinstance(m, QuantLinear)) / weight_elements(module)
    return float(next(module.parameters()).element_size() * 8)


def _restore_attribute(model: nn.Module, name: str, value) -> None:
    if value is _ABSENT:
        model.__dict__.pop(name, None)
    else:
        setattr(model, name, value)
