"""The unified checkpoint (`docs/modelopt-facts.md` §6): what to write, and the checks before writing.

`plan_export(model)` reads a quantized model (its QuantLinears are the checkpoint's tensors) and
returns what the JSON files need, or a ValueError when the model cannot be written truthfully:
uncalibrated static or KV scales (never write made-up scales), INT4 layers with different group
sizes, or fused siblings (q/k/v, gate/up) with different formats, or different `weight_scale_2` /
`input_scale` where engines need one. Layers in different formats make a MIXED_PRECISION checkpoint
(`quantized_layers` lists each layer's format). The plan gives config.json's `quantization_config` and
hf_quant_config.json (`write_hf_quant_config`), both in ModelOpt's vocabulary.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .. import formats as F
from ..calibration.selection import fused_groups
from ..modules.fused_experts import checkpoint_namer, moe_unquantized
from ..modules.kv_cache import attention_modules
from ..modules.quant_linear import QuantLinear
from .exclude import summarize_exclude_modules
from .quant_config import (
    FORMAT_VERSION,
    MIXED_PRECISION,
    PRODUCER_NAME,
    checkpoint_quantization_config,
    hf_quant_config,
    mixed_checkpoint_quantization_config,
    mixed_hf_quant_config,
)


@dataclass
class ExportPlan:
    fmt: F.Format
    group_size: Optional[int]
    kv_format: Optional[F.KVFormat]
    exclude_modules: List[str]
    ptq_fields: dict  # PTQConfig.to_dict() of the config the model was quantized with
    # {checkpoint name: (Format, group size)} when layers differ in format (MIXED_PRECISION); `fmt`
    # is then the most common one.
    layer_formats: Optional[Dict[str, Tuple[F.Format, Optional[int]]]] = None

    def safetensors_metadata(self) -> dict:
        quant_algo = MIXED_PRECISION if self.layer_formats else self.fmt.quant_algo
        return {"producer": PRODUCER_NAME, "hf_ptq_plugin_format": FORMAT_VERSION, "quant_method": "modelopt",
                "quant_algo": quant_algo}

    def quantization_config(self) -> dict:
        """config.json's `quantization_config`."""
        if self.layer_formats:
            return mixed_checkpoint_quantization_config(self.layer_formats, self.kv_format, self.ptq_fields)
        return checkpoint_quantization_config(self.fmt, self.group_size, self.kv_format, self.exclude_modules,
                                              self.ptq_fields)


def quantized_layers(model: nn.Module) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def plan_export(model: nn.Module, config) -> ExportPlan:
    """What to write for `model`, quantized per `config` (a PTQConfig); ValueError if it cannot be."""
    layers = quantized_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no quantized layer; quantize it first "
                         "(hf_ptq_plugin.quantize, or from_pretrained(..., quantization_config=PTQConfig(...)))")
    names = [m.fmt.name for m in layers.values()]
    int4_group_sizes = {m.group_size for m in layers.values() if m.fmt.group_size_choices}
    if len(int4_group_sizes) > 1:
        raise ValueError(f"one INT4 group size per model can be exported; found {sorted(int4_group_sizes)}")
    fmt = F.get_format(max(set(names), key=names.count))
    _check_calibrated(layers)
    kv_format = _kv_format(model, config.kv_format)
    _check_fused_scales_shared(layers)
    # MoE routers and fused experts are not nn.Linear; ModelOpt lists them. Names as the tensors are written.
    unquantized = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)] + moe_unquantized(model)
    to_checkpoint = checkpoint_namer(model)
    exclude = summarize_exclude_modules(map(to_checkpoint, unquantized), map(to_checkpoint, layers))
    if "lm_head" in unquantized and to_checkpoint("lm_head") != "lm_head":
        # A VLM saved under legacy names (Llava: language_model.lm_head). TensorRT-LLM builds the text model without
        # that prefix and matches exclude_modules against its own names (tensorrt_llm/_torch/models/modeling_utils.py,
        # apply_quant_config_exclude_modules); vLLM matches either name (modelopt.py, is_layer_excluded).
        exclude = sorted({*exclude, "lm_head"})
    mixed = len(set(names)) > 1
    group_size = next(iter(int4_group_sizes), None if mixed else next(iter(layers.values())).group_size)
    layer_formats = {to_checkpoint(name): (m.fmt, m.group_size) for name, m in layers.items()} if mixed else None
    return ExportPlan(fmt, group_size, kv_format, exclude, config.to_dict(), layer_formats)


def _check_calibrated(layers: dict) -> None:
    uncalibrated = [name for name, m in layers.items() if not m.input_calibrated]
    if uncalibrated:
        fmt = layers[uncalibrated[0]].fmt
        raise ValueError(f"{len(uncalibrated)} layer(s) have no calibrated input_scale (e.g. {uncalibrated[0]!r}); "
                         f"qformat {fmt.name!r} needs static activation scales from calibration data. Call "
                         "hf_ptq_plugin.calibrate(model, data) first; made-up scales are never written")


def _kv_format(model: nn.Module, configured: Optional[F.KVFormat]) -> Optional[F.KVFormat]:
    """The KV format in use; a ValueError when the config asks for one the model has no scales for."""
    formats = [getattr(m, "kv_format", None) for m in attention_modules(model).values()]
    in_use = set(formats) - {None}
    if len(in_use) > 1:
        raise ValueError(f"one KV-cache format per model can be exported; found {sorted(k.name for k in in_use)}")
    if configured is not None and (not formats or None in formats):
        raise ValueError(f"kv_cache_qformat {configured.name!r} is configured but the KV cache has no calibrated "
                         "k/v scales; call hf_ptq_plugin.calibrate(model, data) first, or use "
                         "kv_cache_qformat='none'")
    return next(iter(in_use), None)


def _check_fused_scales_shared(layers: dict) -> None:
    """Engines run q/k/v and gate/up as one GEMM: one format, one pre_quant_scale, and for NVFP4 / W4A8
    one weight_scale_2 and input_scale."""
    for group in fused_groups(layers):
        formats = {layers[name].fmt.name for name in group}
        if len(formats) > 1:
            raise ValueError(f"{group} have different formats {sorted(formats)}; engines run them as one GEMM and "
                             "need one format for the group")
        shared = ("pre_quant_scale", "weight_scale_2", "input_scale") if layers[group[0]].fmt.has_weight_scale_2 \
            else ("pre_quant_scale",)
        for suffix in shared:
            values = [getattr(layers[name], suffix, None) for name in group]
            if all(v is None for v in values):
                continue
            if any(v is None for v in values) or not all(torch.equal(v, values[0]) for v in values):
                shown = [None if v is None else (v.item() if v.numel() == 1 else f"({v.numel()},) tensor")
                         for v in values]
                raise ValueError(f"{group} have different {suffix} {shown}; engines run them as one GEMM and "
                                 f"need one shared {suffix} (TensorRT-LLM asserts it). Quantize them with "
                                 "hf_ptq_plugin, which shares it")


def write_hf_quant_config(directory: Path, plan: ExportPlan) -> None:
    if plan.layer_formats:
        quant = mixed_hf_quant_config(plan.layer_formats, plan.kv_format)
    else:
        quant = hf_quant_config(plan.fmt, plan.group_size, plan.kv_format, plan.exclude_modules)
    (Path(directory) / "hf_quant_config.json").write_text(json.dumps(quant, indent=4) + "\n", encoding="utf-8")
