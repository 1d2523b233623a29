"""The safetensors header of a pre-quantized checkpoint checked against the model, before any tensor is read.

`read_header` gives names, dtypes and shapes (no data). `check_layer` checks that every tensor a quantized
layer's format needs is present with the dtype and shape of `docs/modelopt-facts.md` §6.4 and gives the
meta module the optional ones the checkpoint has; `check_pre_quant_scales` that a smoothing format's
`pre_quant_scale` is present on every layer whose export peers carry one; `declare_kv_scales` that k/v
cache scales are there for every attention layer or for none; `check_unquantized_parameters` that
full-precision parameters the checkpoint holds by name are float tensors of the model's shapes. A problem
raises a ValueError naming the tensor, what was expected and what was found.
"""

import re
from collections import defaultdict
from typing import Dict, Iterable, List, Tuple

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .. import formats as F
from ..calibration.selection import fused_groups
from ..modules.kv_cache import attention_modules
from ..modules.quant_experts import QuantExperts
from ..modules.quant_linear import QuantLinear
from ..numerics.weights import weight_buffer_specs

Header = Dict[str, Tuple[str, Tuple[int, ...]]]  # tensor name -> (safetensors dtype, shape)
SAFETENSORS_DTYPES = {torch.float8_e4m3fn: "F8_E4M3", torch.uint8: "U8", torch.int8: "I8",
                      torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
FLOAT_DTYPES = ("F32", "BF16", "F16")
UNQUANTIZED_DTYPES = ("F64",) + FLOAT_DTYPES
SCALAR = ()
KV_PROJECTIONS = (("k_proj", "k"), ("v_proj", "v"))


def model_named(header: Header, model: nn.Module) -> Header:
    """The header under the checkpoint's names and also under the model's own: the renamings
    transformers applies when it loads (a VLM saved as `language_model.model.layers...` loads as
    `model.language_model.layers...`). Linears are checked under the model's names; MoE experts,
    which loading converts, under the checkpoint's."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:
        return header
    renamings = [t for t in get_model_conversion_mapping(model) if not isinstance(t, WeightConverter)]
    if not renamings:
        return header
    return {**{rename_source_key(key, renamings, [])[0]: value for key, value in header.items()}, **header}


def read_header(checkpoint_files: Iterable[str]) -> Header:
    """Names, dtypes and shapes of every tensor in the checkpoint files (reads no tensor data)."""
    header = {}
    for path in checkpoint_files:
        try:
            with safe_open(path, framework="pt") as handle:
                for key in handle.keys():
                    tensor = handle.get_slice(key)
                    header[key] = (tensor.get_dtype(), tuple(tensor.get_shape()))
        except SafetensorError as error:  # a damaged or truncated file: its own error names no file
            raise ValueError(f"{str(path)!r} is not a readable safetensors file: {error}") from None
    return header


def expected_tensors(module: QuantLinear) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    specs = dict(weight_buffer_specs(module.fmt, module.out_features, module.in_features, module.group_size))
    if module.fmt.needs_calibration_data:
        specs["input_scale"] = (SCALAR, torch.float32)
    return specs


def check_layer(name: str, module: QuantLinear, header: Header, checked: Dict[str, F.Format]) -> None:
    """The header has every tensor `module` needs, as it needs it; the optional ones it has are declared.
    `checked` records the layer's format under its checkpoint name."""
    checked[name] = module.fmt
    for suffix, (shape, dtype) in expected_tensors(module).items():
        key = f"{name}.{suffix}"
        want = f"{SAFETENSORS_DTYPES[dtype]} {list(shape)}"
        if key not in header:
            raise ValueError(f"checkpoint tensor {key!r} is missing: {module.fmt.quant_algo} expects {want}; "
                             "found no such tensor")
        found_dtype, found_shape = header[key]
        shape_ok = found_shape == shape or (shape == SCALAR and found_shape == (1,))
        if found_dtype != SAFETENSORS_DTYPES[dtype] or not shape_ok:
            raise ValueError(f"checkpoint tensor {key!r}: {module.fmt.quant_algo} expects {want}; "
                             f"found {found_dtype} {list(found_shape)}")
    _declare_optional_tensors(name, module, header)


def _declare_optional_tensors(name: str, module: QuantLinear, header: Header) -> None:
    """Give the meta module the optional tensors the checkpoint has, in the checkpoint's shapes."""
    for suffix, (shape, dtype) in expected_tensors(module).items():
        if shape == SCALAR and header[f"{name}.{suffix}"][1] == (1,):  # a [1] scale, squeezed after loading
            setattr(module, suffix, torch.empty(1, dtype=dtype, device="meta"))
    key = f"{name}.pre_quant_scale"
    if key not in header:
        return
    found_dtype, found_shape = header[key]
    if found_dtype not in FLOAT_DTYPES or found_shape != (module.in_features,):
        raise ValueError(f"checkpoint tensor {key!r}: expects a float tensor [{module.in_features}] "
                         f"({' or '.join(FLOAT_DTYPES)}); found {found_dtype} {list(found_shape)}")
    if not module.fmt.pre_quant_scale:
        raise ValueError(f"checkpoint tensor {key!r}: {module.fmt.quant_algo} has no pre_quant_scale; "
                         "found one (formats with it: int8_sq and the AWQ formats)")
    module.pre_quant_scale = torch.empty(module.in_features, dtype=module.dtype, device="meta")


def check_pre_quant_scales(layers: Dict[str, F.Format], header: Header) -> None:
    """A layer of a smoothing format (AWQ, SmoothQuant) must carry `pre_quant_scale` where its peers do.

    The tensor may rightly be absent: exports fold AWQ scales into the norm before q/k/v and gate/up
    (NVFP4-AWQ ones also into v_proj / up_proj), and algorithms that do not smooth write none. But an
    export treats alike the engine-fused siblings of a group, and the layers in the same place of
    blocks whose quantized layers are the same: one of them without the scale while another has it
    is a damaged checkpoint, which would load computing on unsmoothed inputs.
    """
    smoothed = {name: fmt for name, fmt in layers.items() if fmt.pre_quant_scale}
    for peers in _smoothing_peers(smoothed):
        having = [name for name in peers if f"{name}.pre_quant_scale" in header]
        missing = [name for name in peers if f"{name}.pre_quant_scale" not in header]
        if having and missing:
            raise ValueError(f"checkpoint tensor '{missing[0]}.pre_quant_scale' is missing: {missing[0]!r} is "
                             f"{layers[missing[0]].quant_algo} and layers exported alike carry one (e.g. "
                             f"'{having[0]}.pre_quant_scale'); found no such tensor")


def _smoothing_peers(layers: Dict[str, F.Format]) -> List[List[str]]:
    """Groups of layers an export gives a pre_quant_scale alike: engine-fused siblings, and layers in the
    same place (block and expert indices aside) and format of blocks quantized alike."""
    signature = defaultdict(set)  # block -> {(place in the block, format)} of its quantized layers
    for name, fmt in layers.items():
        block, rest = _split_block(name)
        signature[block].add((_place(rest), fmt.name))
    by_place = defaultdict(list)
    for name, fmt in layers.items():
        block, _ = _split_block(name)
        by_place[_place(name), fmt.name, frozenset(signature[block])].append(name)
    return fused_groups(layers) + list(by_place.values())


def _split_block(name: str) -> Tuple[str, str]:
    """("model.layers.3", "mlp.down_proj") for "model.layers.3.mlp.down_proj"; ("", name) outside blocks."""
    match = re.match(r"(.*?\.\d+)\.(.*)", name)
    return (match.group(1), match.group(2)) if match else ("", name)


def _place(name: str) -> str:
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def check_unquantized_parameters(model: nn.Module, header: Header) -> None:
    """A full-precision parameter the checkpoint holds under its own name is a float tensor of its shape.

    transformers would cast integer or FP8 codes into it without a word, and a wrong shape fails
    there without naming the tensor.
    """
    for module_name, module in model.named_modules():
        if isinstance(module, (QuantLinear, QuantExperts)):  # checked against their format already
            continue
        for leaf, parameter in module.named_parameters(recurse=False):
            key = f"{module_name}.{leaf}" if module_name else leaf
            if key not in header or not parameter.is_floating_point():
                continue
            found_dtype, found_shape = header[key]
            if found_dtype not in UNQUANTIZED_DTYPES or found_shape != tuple(parameter.shape):
                raise ValueError(f"checkpoint tensor {key!r}: the model's full-precision parameter expects a float "
                                 f"tensor {list(parameter.shape)} ({' or '.join(UNQUANTIZED_DTYPES)}); found "
                                 f"{found_dtype} {list(found_shape)}")


def declare_kv_scales(model: nn.Module, header: Header) -> None:
    """Placeholders for the checkpoint's k/v scales: all of them, or none (ModelOpt's `fp8_cast` writes none)."""
    projections = {f"{name}.{proj}.{kind}_scale": (getattr(attention, proj), kind)
                   for name, attention in attention_modules(model).items() for proj, kind in KV_PROJECTIONS}
    present = [key for key in projections if key in header]
    missing = [key for key in projections if key not in header]
    if present and missing:  # the lost scale would default to 1.0 beside calibrated ones
        raise ValueError(f"checkpoint tensor {missing[0]!r} is missing: the checkpoint has KV cache scales for "
                         f"other layers (e.g. {present[0]!r}); found no such tensor")
    for key in present:
        found_dtype, found_shape = header[key]
        if found_dtype != "F32" or found_shape not in (SCALAR, (1,)):
            raise ValueError(f"checkpoint tensor {key!r}: KV cache expects F32 []; found {found_dtype} "
                             f"{list(found_shape)}")
        projection, kind = projections[key]
        projection.register_buffer(f"{kind}_scale", torch.empty(found_shape, dtype=torch.float32, device="meta"))
