"""The unified checkpoint (`modelopt-format.md` §6): what to write, and the checks before writing.

`plan_export(model)` reads a quantized model (its QuantLinears are the checkpoint's tensors) and
returns what the JSON files need, or a ValueError when the model cannot be written truthfully:
uncalibrated static or KV scales (never write made-up scales), several formats in one model, or
fused siblings (q/k/v, gate/up) with different `weight_scale_2` / `input_scale` where engines need
one. `write_quant_configs` puts ModelOpt's `quantization_config` into config.json and writes
hf_quant_config.json. Called by `export.save`.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

from .. import formats as F
from ..experts import checkpoint_namer, moe_unquantized
from ..kv_cache import attention_modules
from ..quant_linear import QuantLinear
from ..selection import fused_groups
from .exclude import summarize_exclude_modules
from .quant_config import FORMAT_VERSION, PRODUCER_NAME, checkpoint_quantization_config, hf_quant_config


@dataclass
class ExportPlan:
    fmt: F.Format
    group_size: Optional[int]
    kv_format: Optional[F.KVFormat]
    exclude_modules: List[str]
    ptq_fields: dict  # PTQConfig.to_dict() of the config the model was quantized with

    def safetensors_metadata(self) -> dict:
        return {"producer": PRODUCER_NAME, "hf_ptq_plugin_format": FORMAT_VERSION, "quant_method": "modelopt",
                "quant_algo": self.fmt.quant_algo}


def quantized_layers(model: nn.Module) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def plan_export(model: nn.Module, config) -> ExportPlan:
    """What to write for `model`, quantized per `config` (a PTQConfig); ValueError if it cannot be."""
    layers = quantized_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no quantized layer; quantize it first "
                         "(hf_ptq_plugin.quantize, or from_pretrained(..., quantization_config=PTQConfig(...)))")
    formats = {m.fmt.name for m in layers.values()}
    group_sizes = {m.group_size for m in layers.values()}
    if len(formats) > 1 or len(group_sizes) > 1:
        raise ValueError(f"one format and group size per model can be exported; found formats {sorted(formats)}, "
                         f"group sizes {sorted(group_sizes, key=str)}")
    fmt = next(iter(layers.values())).fmt
    _check_calibrated(layers, fmt)
    kv_format = _kv_format(model, config.kv_format)
    if fmt.weight == F.NVFP4 or fmt.fp8_weight_scale_2:
        _check_fused_scales_shared(layers)
    # MoE routers and fused experts are not nn.Linear; ModelOpt lists them. Names as the tensors are written.
    unquantized = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)] + moe_unquantized(model)
    to_checkpoint = checkpoint_namer(model)
    exclude = summarize_exclude_modules(map(to_checkpoint, unquantized), map(to_checkpoint, layers))
    return ExportPlan(fmt, next(iter(group_sizes)), kv_format, exclude, config.to_dict())


def _check_calibrated(layers: dict, fmt: F.Format) -> None:
    uncalibrated = [name for name, m in layers.items() if not m.input_calibrated]
    if uncalibrated:
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
    for group in fused_groups(layers):
        for suffix in ("weight_scale_2", "input_scale"):
            values = [getattr(layers[name], suffix, None) for name in group]
            if values[0] is None:
                continue
            if not all(torch.equal(v, values[0]) for v in values):
                raise ValueError(f"{group} have different {suffix} {[v.item() for v in values]}; engines run them "
                                 f"as one GEMM and need one shared {suffix} (TensorRT-LLM asserts it). Quantize "
                                 "them with hf_ptq_plugin, which shares it")


def untie_shared_buffers(model: nn.Module) -> None:
    """Give each QuantLinear buffer its own storage.

    Calibration may hand one scale tensor to a whole fused group (a shared pre_quant_scale);
    safetensors cannot store aliased tensors and transformers refuses them as mis-declared ties.
    """
    seen = set()
    for module in quantized_layers(model).values():
        for name, buffer in list(module.named_buffers(recurse=False)):
            key = (buffer.device, buffer.untyped_storage().data_ptr()) if buffer.device.type != "meta" else None
            if key in seen:
                persistent = name not in module._non_persistent_buffers_set
                module.register_buffer(name, buffer.clone(), persistent=persistent)
            elif key is not None:
                seen.add(key)


def write_quant_configs(directory: Path, plan: ExportPlan) -> None:
    """Put ModelOpt's quantization_config into config.json and write hf_quant_config.json."""
    config_path = Path(directory) / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["quantization_config"] = checkpoint_quantization_config(
        plan.fmt, plan.group_size, plan.kv_format, plan.exclude_modules, plan.ptq_fields)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    quant = hf_quant_config(plan.fmt, plan.group_size, plan.kv_format, plan.exclude_modules)
    (Path(directory) / "hf_quant_config.json").write_text(json.dumps(quant, indent=4) + "\n", encoding="utf-8")
