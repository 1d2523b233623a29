"""Quantization while `from_pretrained` reads a full-precision checkpoint (the 5.x `get_quantize_ops` path).

`prepare_load_time` swaps the target Linears for meta QuantLinears before any weight is read;
transformers' loader then reads one weight at a time, and `QuantizeOnLoad` turns it into the
layer's checkpoint tensors before the next is read, so the full-precision model never exists.
Engines need one `weight_scale_2` per fused group (q/k/v, gate/up) for NVFP4 and W4A8; since the
group's other weights are not loaded yet when the first one is quantized, their amax is read
ahead from the checkpoint files, a few rows at a time. On the CPU the native kernels
(`backends/native_quantize.py`) quantize a weight in one pass straight into its checkpoint tensors
where they cover the format; otherwise torch's ops run on blocks of rows (every format's scales are
per row, per row block or per tensor), so the temporaries stay a few MiB however large the layer:
peak memory is the quantized model plus about one layer. Static
activation scales cannot come from weights: such layers stay uncalibrated (dynamic scales, a
warning) until `calibrate()`. When a layer-streamed algorithm (SmoothQuant, AWQ, GPTQ) will
calibrate right after loading (`PTQConfig.calib_dataset`), nothing is quantized here: it re-reads
each block's weights from the checkpoint, so loading only allocates the tensors it will overwrite.
"""

import dataclasses
import logging
import math
from typing import Dict, Iterable, Optional

import torch
from safetensors import safe_open
from torch import nn
from transformers.core_model_loading import ConversionOps

from .. import formats as F
from ..backends.native_quantize import abs_amax_native, quantize_weight_native
from ..backends.triton_linear import triton_available
from ..backends.triton_quantize import quantize_weight_triton
from ..calibration.algorithms import Algorithm
from ..calibration.selection import fused_groups, target_linears
from ..calibration.shapes import check_layer_shapes, resolve_group_size
from ..calibration.sources import tensor_locations
from ..modules.fused_experts import FUSED_PARAMS, projection_names, projection_shapes, target_experts
from ..modules.quant_experts import QuantExperts
from ..modules.quant_linear import QuantLinear
from ..numerics.scales import abs_amax
from ..numerics.weights import quantize_weight_in_row_blocks, shared_sibling_scales
from .memory import release_freed_heap

logger = logging.getLogger(__name__)

# Bytes of model-dtype rows read at a time when pre-reading a fused sibling's amax: the rows are a view of
# the memory-mapped file unless a cast copies them, and fewer, larger reads spend less per read.
AMAX_CHUNK_BYTES = 8 << 20


def prepare_load_time(model: nn.Module, fmt: F.Format, exclude_modules: Iterable[str],
                      requested_group_size: Optional[int], checkpoint_files) -> tuple:
    """Swap target Linears for meta QuantLinears; returns (group size, {name: shared weight amax})."""
    linears = target_linears(model, exclude_modules)
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear left to quantize after exclusions "
                         f"{list(exclude_modules)}")
    experts = target_experts(model, exclude_modules)  # fused MoE experts: merged, then quantized (below)
    shapes = {**linears, **projection_shapes(experts)}
    group_size = resolve_group_size(fmt, shapes, requested_group_size)
    check_layer_shapes(fmt, shapes, group_size)
    prepare_load_time_experts(model, experts, fmt, group_size)
    shared_amax = {}
    if fmt.fused_siblings_share_weight_scale:
        dtype = next(iter(linears.values())).weight.dtype
        shared_amax = _fused_group_amax(fused_groups(linears), checkpoint_files, dtype)
    for name, linear in linears.items():
        model.set_submodule(name, QuantLinear(linear.in_features, linear.out_features, linear.bias is not None,
                                                fmt, group_size, dtype=linear.weight.dtype, device="meta"))
    return group_size, shared_amax


def _fused_group_amax(groups, checkpoint_files, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """{layer: max |W| over its fused group}, read from the checkpoint before loading starts.

    Rows are cast to the model dtype first, as the loader will cast them, so the amax is the one
    of the weights the layer actually quantizes.
    """
    locations = tensor_locations(checkpoint_files or [])
    shared = {}
    for group in groups:
        keys = [f"{name}.weight" for name in group]
        missing = [k for k in keys if k not in locations]
        if missing:
            logger.warning("cannot pre-read %s from the checkpoint; %s get separate weight_scale_2 values, "
                           "which engines that fuse them reject", missing, group)
            continue
        amax = torch.stack([_weight_amax(locations[k], k, dtype) for k in keys]).amax()
        shared.update({name: amax for name in group})
    return shared


def _weight_amax(path: str, key: str, dtype: torch.dtype) -> torch.Tensor:
    # The caller runs inside transformers' meta-device init context; real data needs a real device.
    with torch.device("cpu"), safe_open(path, framework="pt") as handle:
        tensor = handle.get_slice(key)
        rows, *rest = tensor.get_shape()
        row_bytes = max(1, math.prod(rest) * dtype.itemsize)
        step = max(1, AMAX_CHUNK_BYTES // row_bytes)
        chunks = (_rows_amax(tensor[i:i + step].to(dtype)) for i in range(0, rows, step))
        return torch.stack(list(chunks)).amax()


def _rows_amax(rows: torch.Tensor) -> torch.Tensor:
    amax = abs_amax_native(rows)  # the native kernels' single pass where they apply: the same value
    return abs_amax(rows) if amax is None else amax


class QuantizeOnLoad(ConversionOps):
    """Turns one full-precision `<layer>.weight` into the layer's checkpoint tensors with a data-free
    `algorithm` (max, mse), or allocates them (`_unfilled`) when `algorithm` is None."""

    def __init__(self, shared_amax: Dict[str, torch.Tensor], algorithm: Optional[Algorithm]):
        self.shared_amax, self.algorithm = shared_amax, algorithm

    def convert(self, input_dict, source_patterns=None, target_patterns=None, full_layer_name=None, model=None,
                **kwargs) -> dict:
        release_freed_heap()  # the previous weight's temporaries, so the heap does not keep them resident
        value = next(iter(input_dict.values()))
        w = value[0] if isinstance(value, list) else value  # (N, K) in the model dtype
        layer, _, param = full_layer_name.rpartition(".")
        module = model.get_submodule(layer)
        if isinstance(module, QuantExperts):  # a merged (E, 2I, H) gate_up_proj or (E, H, I) down_proj
            return quantize_experts_on_load(module, layer, param, w, self.algorithm)
        if self.algorithm is None:
            return _unfilled(layer, module, w.device)
        amax, weight_scale = None, self.algorithm.data_free_weight_scale(w, module.fmt, module.group_size)
        if layer in self.shared_amax:  # an engine-fused sibling: the group's per-tensor scale
            amax, shared_scale = shared_sibling_scales(module.fmt, self.shared_amax[layer].to(w.device))
            weight_scale = weight_scale if shared_scale is None else shared_scale
        if w.is_cuda and weight_scale is None and triton_available():  # the quantize kernels, same bits
            tensors = quantize_weight_triton(w, module.fmt, module.group_size, amax)
        else:  # the native CPU kernels where they apply (one pass, same bits), else torch's ops
            tensors = quantize_weight_native(w, module.fmt, module.group_size, amax, weight_scale)
            if tensors is None:
                tensors = quantize_weight_in_row_blocks(w, module.fmt, module.group_size, amax, weight_scale)
        out = {f"{layer}.{name}": tensor for name, tensor in tensors.items()}
        if module.fmt.needs_calibration_data:
            # A placeholder, never saved: the layer stays uncalibrated (dynamic scales) until calibrate().
            out[f"{layer}.input_scale"] = torch.ones((), dtype=torch.float32, device=w.device)
        return out


def _unfilled(prefix: str, module: nn.Module, device) -> dict:
    """`module`'s checkpoint tensors, allocated but never written (their pages are not even touched):
    the calibration that follows replaces the module with one built from the source weights."""
    return {f"{prefix}.{name}": torch.empty_like(buffer, device=device) for name, buffer in module.named_buffers()}


def prepare_load_time_experts(model: nn.Module, experts: Dict[str, nn.Module], fmt: F.Format,
                              group_size: Optional[int]) -> None:
    """Swap fused experts for meta QuantExperts with `gate_up_proj` / `down_proj` placeholders.

    transformers merges the source's per-expert tensors into those names (its conversion mapping),
    so each merged tensor reaches the quantize op, which returns the per-expert tensors; the
    placeholders are dropped after loading. Peak memory: one MoE layer's merged experts in full precision.
    """
    names = projection_names(model)
    for name, module in experts.items():
        quantized = QuantExperts.like(module, fmt, group_size, names, device="meta")
        quantized.add_fused_placeholders()
        model.set_submodule(name, quantized)


def quantize_experts_on_load(module: QuantExperts, name: str, param: str, w: torch.Tensor,
                             algorithm: Optional[Algorithm]) -> dict:
    """The quantize op for one merged fused tensor `w` (see `QuantizeOnLoad`): {full tensor name: tensor}."""
    projections = module.names[2:] if param == "down_proj" else module.names[:2]
    if algorithm is None:
        out = {}
        for e in range(module.num_experts):
            for proj in projections:
                out.update(_unfilled(f"{name}.{e}.{proj}", getattr(module.expert(e), proj), w.device))
    else:
        plan = algorithm.plan_unobserved_experts(w, module.fmt, module.group_size)
        chosen = plan.chosen if plan is not None else None
        out = {f"{name}.{key}": tensor for key, tensor in module.quantize_fused(param, w, chosen).items()}
        if module.fmt.needs_calibration_data:  # placeholders, never saved: uncalibrated until calibrate()
            out.update({f"{name}.{e}.{proj}.input_scale": torch.ones((), dtype=torch.float32, device=w.device)
                        for e in range(module.num_experts) for proj in projections})
    out[f"{name}.{param}"] = torch.empty(0, dtype=w.dtype, device=w.device)  # replaces the placeholder's data
    module.consumed_placeholders.add(param)  # recorded here too: a disk-offloaded placeholder keeps its meta data
    return out


def drop_load_placeholders(model: nn.Module) -> None:
    """Remove the consumed placeholders; a placeholder never loaded means the source lacks the experts."""
    for name, module in model.named_modules():
        if not isinstance(module, QuantExperts):
            continue
        unloaded = [p for p in FUSED_PARAMS if p in module._parameters and p not in module.consumed_placeholders]
        if unloaded:
            raise ValueError(f"the source checkpoint has no weights for {name}.{unloaded[0]} (per-expert "
                             f"{', '.join(module.names)} tensors); cannot quantize those experts")
        module.drop_fused_placeholders()


def finalize_load_time(model: nn.Module, fmt: F.Format, kv_format: Optional[F.KVFormat], calibrating: bool) -> None:
    """Freeze biases, drop the experts' load placeholders and, unless calibration follows, say once
    what still needs it."""
    drop_load_placeholders(model)
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.bias is not None:
            module.bias.requires_grad_(False)
    if calibrating:
        return
    needs = []
    if fmt.needs_calibration_data:
        needs.append(f"qformat {fmt.name!r} has static activation scales; until then every layer uses "
                     "dynamic (per-batch) activation scales")
    if kv_format is not None:
        needs.append(f"kv_cache_qformat {kv_format.name!r} needs calibrated k/v scales; until then the KV cache "
                     "is not quantized")
    if needs:
        logger.warning("the model is not calibrated: %s. Call hf_ptq_plugin.calibrate(model, data) before "
                       "save_pretrained, which refuses to write made-up scales.", "; ".join(needs))


def calibrate_while_loading(model: nn.Module, config) -> None:
    """Run `config`'s calibration (data, sizes, algorithm) on a model just loaded compressed.

    The tokenizer is read from the same source as the model, as `from_pretrained`'s caller would.
    """
    from transformers import AutoTokenizer

    from ..calibration.calibrate import calibrate  # calibrate imports the quantizer's modules; import at use

    source = model.ptq_source
    if not dataclasses.replace(config, algorithm=source.algorithm).needs_calibration_data:
        logger.info("calib_dataset is not needed: qformat %r with %r calibrates from the weights alone",
                    config.qformat, source.algorithm)
        return
    try:
        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    except (OSError, ValueError) as error:
        raise ValueError(f"calib_dataset needs the model's tokenizer, which could not be loaded from "
                         f"{model.name_or_path!r}: {error}") from error
    logger.info("calibrating with %r on %d samples of %d tokens from %s", source.algorithm, config.calib_size,
                config.calib_seq_len, config.calib_dataset)
    calibrate(model, config.calib_dataset, algorithm=source.algorithm, tokenizer=tokenizer,
              calib_size=config.calib_size, seq_len=config.calib_seq_len, batch_size=config.calib_batch_size)
