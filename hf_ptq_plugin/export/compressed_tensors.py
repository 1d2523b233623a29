"""The compressed-tensors checkpoint: the layout vLLM and SGLang load with `quant_method: "compressed-tensors"`.

Pure functions turn our unified-checkpoint tensors into compressed-tensors ones (`convert_layer`,
`convert_state_dict`) and build config.json's `quantization_config` (`quantization_config`);
`save_compressed_tensors` writes a model atomically, converting one layer at a time as its
tensors are written (`Conversion`, streamed_safetensors.py), so a converted copy of the whole model
never exists. It is what the "vllm" / "sglang" export
targets write for the formats `engines.py` says those engines serve in this dialect.

Layouts, as the compressed-tensors package (0.20) reads them (compressors/*/base.py):
- "pack-quantized" (INT weight-only, vLLM/SGLang WNA16): `weight_packed` int32 (N, K * bits / 32), value + 2^(bits-1)
  stored unsigned, element k of a row at bits [bits * (k % (32 / bits)), ...) of word k // (32 / bits);
  `weight_scale` (N, K / group) or (N, 1); `weight_shape` int64 [N, K]. Our INT4 packs two rows per byte
  along the OUTPUT dim, so it is unpacked and repacked along the input dim; the values do not change.
- "int-quantized" / "float-quantized": `weight` int8 / float8_e4m3fn as is, `weight_scale` (N, 1) or (1,),
  static `input_scale` (1,).
- "nvfp4-pack-quantized": `weight_packed` = our uint8 nibbles (same order), `weight_scale` FP8 blocks, and
  global scales stored as divisors: `weight_global_scale` = 1 / weight_scale_2, `input_global_scale`
  = 1 / input_scale (the package's own ModelOpt converter, entrypoints/convert/converters/modelopt_nvfp4.py).
  Weights and activations declare `scale_dtype` float8_e4m3fn, so the package rounds the activation block
  scales it computes at run time to FP8 as NVFP4 does; config.json's `dtype` is bfloat16, the dtype the
  package unpacks NVFP4 weights to, whatever the model's (`checkpoint_dtype`).
The dialect has no per-input-channel activation scale: a layer that still carries a pre_quant_scale
(calibrated with `PTQConfig(pre_quant_scales="keep")`, or a model whose scale could not fold) cannot
be written, and the error says which engines can serve it.
KV cache (FP8 only): `<attn>.k_scale` / `<attn>.v_scale` (1,), the names the package registers on attention.
"""

import json
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from .. import formats as F
from ..modules.quant_linear import QuantLinear
from ..numerics.integer import unpack_int4_rows
from ..numerics.nvfp4 import pack_nibbles
from .atomic import atomic_directory
from .save import Sidecars, write_sidecars
from .streamed_safetensors import write_streamed
from .unified import ExportPlan, plan_export

logger = logging.getLogger(__name__)

PACK_QUANTIZED, INT_QUANTIZED, FLOAT_QUANTIZED, NVFP4_PACKED = (
    "pack-quantized", "int-quantized", "float-quantized", "nvfp4-pack-quantized")


def _args(bits: int, kind: str, strategy: str, group_size: Optional[int] = None, dynamic=False,
          scale_dtype: Optional[str] = None) -> dict:
    args = {"num_bits": bits, "type": kind, "symmetric": True, "group_size": group_size, "strategy": strategy,
            "dynamic": dynamic}
    if scale_dtype is not None:
        args["scale_dtype"] = scale_dtype
    return args


# NVFP4 block scales are E4M3. Without `scale_dtype` the package keeps the activation block scales it
# computes at run time unrounded (quantization/utils/helpers.py, calculate_qparams), which is not NVFP4.
FP8_SCALE_DTYPE = "torch.float8_e4m3fn"  # as QuantizationArgs serializes torch.float8_e4m3fn


def _scheme(fmt: F.Format, group_size: Optional[int]) -> tuple:
    """(compression format, weights args, input_activations args or None) for a qformat."""
    if fmt.name == "int4_awq":
        return PACK_QUANTIZED, _args(4, "int", "group", group_size), None
    if fmt.name == "int8_wo":
        return PACK_QUANTIZED, _args(8, "int", "channel"), None
    if fmt.name == "int8_sq":
        return INT_QUANTIZED, _args(8, "int", "channel"), _args(8, "int", "tensor")
    if fmt.name == "fp8":
        return FLOAT_QUANTIZED, _args(8, "float", "tensor"), _args(8, "float", "tensor")
    if fmt.name == "fp8_pc_pt":
        return FLOAT_QUANTIZED, _args(8, "float", "channel"), _args(8, "float", "token", dynamic=True)
    if fmt.name in ("nvfp4", "nvfp4_awq", "w4a16_nvfp4"):
        acts = _args(4, "float", "tensor_group", 16, "local", FP8_SCALE_DTYPE) if fmt.act is not None else None
        return NVFP4_PACKED, _args(4, "float", "tensor_group", 16, scale_dtype=FP8_SCALE_DTYPE), acts
    valid = ", ".join(COMPRESSED_TENSORS_QFORMATS)
    raise ValueError(f"qformat {fmt.name!r} has no compressed-tensors layout here; valid: {valid}")


COMPRESSED_TENSORS_QFORMATS = ("fp8", "fp8_pc_pt", "int8_sq", "int8_wo", "int4_awq", "nvfp4", "nvfp4_awq",
                               "w4a16_nvfp4")


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed ints (N, K) in [-2^(bits-1), 2^(bits-1)) -> int32 (N, K * bits / 32), packed along K: value j
    of a word, plus 2^(bits-1), in its bits [j * bits, (j + 1) * bits).

    Built from bytes (two 4-bit values, or one 8-bit value, each) read as little-endian int32 words: a few
    passes of one byte per weight, instead of shifting and summing int64s. Adding 2^(bits-1) is flipping
    the top bit of the two's-complement value; the mask drops a 4-bit value's sign extension."""
    per_word = 32 // bits
    n, k = q.shape
    if k % per_word:
        raise ValueError(f"cannot pack {k} inputs {per_word} to an int32 word; the input size must be a multiple")
    unsigned = (q.to(torch.int8).view(torch.uint8) ^ (1 << (bits - 1))) & ((1 << bits) - 1)
    packed_bytes = pack_nibbles(unsigned) if bits == 4 else unsigned
    packed_bytes = packed_bytes.contiguous()
    if sys.byteorder == "big":  # the words' least significant byte first, as on little-endian machines
        packed_bytes = packed_bytes.view(n, -1, 4).flip(-1).contiguous()
    return packed_bytes.view(n, -1).view(torch.int32)


def _column(scale: torch.Tensor) -> torch.Tensor:
    return scale.reshape(-1, 1) if scale.dim() == 1 else scale.reshape(1)


def convert_layer(tensors: Dict[str, torch.Tensor], fmt: F.Format) -> Dict[str, torch.Tensor]:
    """One layer's unified tensors {weight, weight_scale, ...} -> its compressed-tensors tensors."""
    _scheme(fmt, None)  # raises for a format without a layout, naming the valid ones
    out = {k: v for k, v in tensors.items() if k == "bias"}
    if "pre_quant_scale" in tensors:
        raise ValueError("compressed-tensors has no pre_quant_scale; fold or remove it before converting")
    weight, scale = tensors["weight"], tensors["weight_scale"]
    if fmt.weight == F.INT4 or fmt.name == "int8_wo":
        q = unpack_int4_rows(weight) if fmt.weight == F.INT4 else weight  # (N, K) int8
        out.update(weight_packed=pack_int32(q, 4 if fmt.weight == F.INT4 else 8),
                   weight_scale=_column(scale) if scale.dim() == 1 else scale.clone(),
                   weight_shape=torch.tensor(list(q.shape), dtype=torch.int64))
    elif fmt.weight in (F.INT8, F.FP8):
        out.update(weight=weight.clone(), weight_scale=_column(scale))
        if "input_scale" in tensors:
            out["input_scale"] = tensors["input_scale"].reshape(1).clone()
    elif fmt.weight == F.NVFP4:
        out.update(weight_packed=weight.clone(), weight_scale=scale.clone(),
                   weight_global_scale=(1.0 / tensors["weight_scale_2"].float()).reshape(1))
        if "input_scale" in tensors:
            out["input_global_scale"] = (1.0 / tensors["input_scale"].float()).reshape(1)
    return out


def convert_state_dict(state_dict: Dict[str, torch.Tensor], layers: Dict[str, F.Format],
                       attention: List[str] = ()) -> Dict[str, torch.Tensor]:
    """A unified-checkpoint state dict -> compressed-tensors; the input is not modified.

    `layers` maps each quantized Linear's name to its Format; `attention` names the attention modules
    whose `k_proj.k_scale` / `v_proj.v_scale` move to `<attn>.k_scale` / `<attn>.v_scale` (shape (1,)).
    """
    conversion = Conversion(state_dict, layers, attention)
    return {key: conversion.take(key) for key in conversion.specs}


class Conversion:
    """`convert_state_dict`, a layer at a time on demand: `specs` holds every output tensor's shape
    and dtype (as meta tensors) without converting anything, `take(key)` the tensor itself, converting
    its layer when first asked and keeping that layer's other tensors only until they are taken."""

    def __init__(self, state_dict: Dict[str, torch.Tensor], layers: Dict[str, F.Format], attention: List[str] = ()):
        self.state_dict, self.layers = state_dict, layers
        self.leaves = {}  # quantized layer -> the names of its own tensors
        for key in state_dict:
            layer, _, leaf = key.rpartition(".")
            if layer in layers:
                self.leaves.setdefault(layer, []).append(leaf)
        self.renamed = {f"{attn}.{kind}_scale": f"{attn}.{proj}.{kind}_scale" for attn in attention
                        for proj, kind in (("k_proj", "k"), ("v_proj", "v"))
                        if f"{attn}.{proj}.{kind}_scale" in state_dict}
        taken = {f"{layer}.{leaf}" for layer, leaves in self.leaves.items() for leaf in leaves}
        taken |= set(self.renamed.values())
        kept = [key for key in state_dict if key not in taken]
        self.owner, self.pending = {}, {}  # output key -> its quantized layer; converted, not yet taken
        self.specs = {}  # every output tensor as a meta tensor: its shape and dtype, nothing converted
        for layer in self.leaves:
            for key, value in self._convert(layer, lambda t: t.to("meta")).items():
                self.specs[key], self.owner[key] = value, layer
        self.specs.update({new: state_dict[old].reshape(1).to("meta") for new, old in self.renamed.items()})
        self.specs.update({key: state_dict[key].to("meta") for key in kept})

    def take(self, key: str) -> torch.Tensor:
        if key in self.owner:
            if key not in self.pending:
                self.pending.update(self._convert(self.owner[key], lambda t: t))
            return self.pending.pop(key)
        if key in self.renamed:
            return self.state_dict[self.renamed[key]].reshape(1).clone()
        return self.state_dict[key]

    def _convert(self, layer: str, placed) -> Dict[str, torch.Tensor]:
        local = {leaf: placed(self.state_dict[f"{layer}.{leaf}"]) for leaf in self.leaves[layer]}
        return {f"{layer}.{leaf}": value for leaf, value in convert_layer(local, self.layers[layer]).items()}


def quantization_config(fmt: F.Format, group_size: Optional[int], kv_format: Optional[F.KVFormat],
                        ignore: List[str]) -> dict:
    """config.json's `quantization_config` in the compressed-tensors vocabulary (quant_config.py there)."""
    compression, weights, inputs = _scheme(fmt, group_size)
    if kv_format is not None and kv_format.values != F.FP8:
        raise ValueError(f"compressed-tensors KV cache: fp8 or none here, not kv_cache_qformat {kv_format.name!r}")
    group = {"targets": ["Linear"], "weights": weights, "input_activations": inputs, "output_activations": None,
             "format": compression}
    return {"quant_method": "compressed-tensors", "format": compression, "quantization_status": "compressed",
            "config_groups": {"group_0": group}, "ignore": sorted(ignore),
            "kv_cache_scheme": _args(8, "float", "tensor") if kv_format is not None else None,
            "global_compression_ratio": None}


def check_convertible(model: nn.Module, plan: ExportPlan, target: str) -> None:
    """ValueError when `model` cannot be written as compressed-tensors."""
    from .engines import COMPRESSED_TENSORS, DIALECTS, describe_serving

    kv = plan.kv_format.name if plan.kv_format else "none"
    leftover = [name for name, m in model.named_modules() if getattr(m, "pre_quant_scale", None) is not None]
    other = tuple(d for d in DIALECTS if d != COMPRESSED_TENSORS)  # the dialects that can keep the scale
    if leftover:
        serving = describe_serving(plan.fmt.name, kv, other)
        raise ValueError(f"{len(leftover)} layer(s) keep a pre_quant_scale (e.g. {leftover[0]!r}), which the "
                         f"compressed-tensors checkpoint for target {target!r} cannot express; qformat "
                         f"{plan.fmt.name!r} with that scale is served by: {serving} "
                         "(calibrating with PTQConfig(pre_quant_scales='fold'), the default, folds every scale into "
                         "the layer before; algorithm='max' or 'gptq' leaves none)")


def save_compressed_tensors(model: nn.Module, export_dir, config, target: str = "vllm", max_shard_size="5GB",
                            sidecars: Sidecars = Sidecars()) -> None:
    """Write `model` (quantized per PTQConfig `config`) as a compressed-tensors checkpoint, atomically."""
    plan = plan_export(model, config)
    if plan.layer_formats:
        raise ValueError("a model with per-layer formats (MIXED_PRECISION) exports only as the unified checkpoint "
                         "(target 'modelopt'); the compressed-tensors writer takes one format")
    check_convertible(model, plan, target)
    layers = {name: m.fmt for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    attention = [name for name, m in model.named_modules() if getattr(m, "kv_format", None) is not None]
    conversion = Conversion(_without_tied_copies(model), layers, attention)
    ignore = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    with atomic_directory(export_dir) as staging:
        _write_shards(conversion, staging, max_shard_size, {"format": "pt", "quant_method": "compressed-tensors"})
        _write_config(model, staging, quantization_config(plan.fmt, plan.group_size, plan.kv_format, ignore),
                      checkpoint_dtype(model, plan.fmt))
        write_sidecars(model, staging, Path(export_dir), "compressed-tensors", sidecars)
    logger.info("wrote a compressed-tensors (%s) checkpoint to %s", plan.fmt.name, export_dir)


def _without_tied_copies(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The state dict without the tied copies (lm_head.weight of a tied model), as transformers saves
    one: its loader re-ties them, and vLLM skips lm_head.weight of tied models, so the input embedding
    must be the name stored."""
    state_dict = model.state_dict()
    for copy, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if copy in state_dict and source in state_dict and _same_tensor(state_dict[copy], state_dict[source]):
            del state_dict[copy]
    return state_dict


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype


def _write_shards(conversion: Conversion, directory: Path, max_shard_size, metadata: dict) -> None:
    """The converted tensors as safetensors shards (and their index when there are several), each
    tensor converted just before it is written (streamed_safetensors.py)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    specs = conversion.specs
    split = split_torch_state_dict_into_shards(specs, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        write_streamed(directory / filename, {name: specs[name] for name in names}, conversion.take, metadata)
    if split.is_sharded:
        index = {"metadata": {**split.metadata, **metadata}, "weight_map": split.tensor_to_filename}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n",
                                                                encoding="utf-8")


def checkpoint_dtype(model: nn.Module, fmt: F.Format) -> str:
    """config.json's `dtype`: the model's, except bfloat16 for every NVFP4 checkpoint.

    compressed-tensors (0.20) unpacks NVFP4 weights to bfloat16 whatever the model dtype
    (compressors/nvfp4/helpers.py, unpack_fp4_from_uint8), so a float32 or float16 model fails in
    transformers with a dtype mismatch in its first matmul; bfloat16 is the dtype it loads in by default then.
    """
    dtype = str(model.dtype).removeprefix("torch.")
    if fmt.weight == F.NVFP4 and dtype != "bfloat16":
        logger.info("NVFP4 compressed-tensors checkpoint of a %s model: config.json says bfloat16, the dtype "
                    "compressed-tensors decompresses NVFP4 weights to", dtype)
        return "bfloat16"
    return dtype


def _write_config(model: nn.Module, directory, quant_config: dict, dtype: str) -> None:
    config = model.config.to_dict()
    config["quantization_config"] = quant_config
    config["dtype"] = dtype
    config["architectures"] = [type(model).__name__]
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(directory)
