"""Loading a pre-quantized unified checkpoint (ours or ModelOpt's) through `from_pretrained`.

Before any tensor is read, `prepare_prequantized` reads the safetensors headers (names, dtypes,
shapes; no data), decides which Linears are quantized, checks that every tensor their format needs
is present with the dtype and shape of `docs/modelopt-facts.md` §6.4, and swaps in QuantLinears on the
meta device whose buffers have exactly those names, so transformers' loader fills them with no
translation. It also checks that a smoothing format's `pre_quant_scale` is present on every layer
whose export peers carry one, that k/v cache scales are there for every attention layer or for
none, and that full-precision parameters the checkpoint holds by name are float tensors of the
model's shapes. A problem (a damaged or truncated file included) raises a
ValueError naming the tensor or file, what was expected and what was found.
`finalize_prequantized` runs after loading: refuses a parameter the checkpoint did not provide
(which transformers would initialize at random), marks static scales as calibrated and turns KV
quantization on (scale 1.0 with one warning when the checkpoint has none, as ModelOpt's newer
default writes).
"""

import functools
import logging
import re
from collections import defaultdict
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .. import formats as F
from ..calibration.selection import fused_groups, target_linears
from ..modules.kv_cache import attention_modules, use_kv_attention
from ..modules.quant_experts import QuantExperts
from ..modules.quant_linear import QuantLinear
from ..numerics.weights import weight_buffer_specs
from .prequantized_experts import prepare_mixed_experts, prepare_prequantized_experts
from .scale_checks import check_model_scales

logger = logging.getLogger(__name__)

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


def prepare_prequantized(model: nn.Module, fmt: F.Format, exclude_modules, group_size: Optional[int],
                         kv_format: Optional[F.KVFormat], header: Header,
                         layer_qformats: Optional[Dict[str, str]] = None) -> int:
    """Swap the checkpoint's quantized Linears (and fused MoE experts) for meta modules; returns the group size.

    `layer_qformats` (a MIXED_PRECISION checkpoint) names every quantized Linear and its format.
    """
    checked = {}  # header name -> Format of every quantized layer, filled by `check`
    check = functools.partial(_check_layer, header=header, checked=checked)
    if layer_qformats:
        group_size = _prepare_mixed(model, layer_qformats, group_size, header, check)
    else:
        linears = _quantized_linears(model, exclude_modules, header)
        group_size = _group_size(fmt, linears, group_size, header)
        experts = prepare_prequantized_experts(model, fmt, exclude_modules, group_size, header, check)
        if not linears and not experts:
            raise ValueError("the checkpoint's quantization_config quantizes no Linear of this model "
                             f"(exclude_modules={list(exclude_modules)})")
        for name, linear in linears.items():
            _swap_in(model, name, linear, fmt, group_size, check)
    _check_pre_quant_scales(checked, header)
    _check_unquantized_parameters(model, header)
    if kv_format is not None:  # after the swaps: the scales go on the k/v projections the model keeps
        _declare_kv_scales(model, header)
    return group_size


def _swap_in(model: nn.Module, name: str, linear: nn.Linear, fmt: F.Format, group_size: Optional[int],
             check: Callable) -> None:
    module = QuantLinear(linear.in_features, linear.out_features, linear.bias is not None, fmt, group_size,
                         dtype=linear.weight.dtype, device="meta")
    check(name, module)
    model.set_submodule(name, module)


def _prepare_mixed(model: nn.Module, layer_qformats: Dict[str, str], group_size: Optional[int],
                   header: Header, check: Callable) -> Optional[int]:
    """Per-layer formats: exactly the listed Linears and MoE experts, each in its own format."""
    consumed = prepare_mixed_experts(model, layer_qformats, group_size, header, check)
    linears, modules = {}, dict(model.named_modules(remove_duplicate=False))
    for name in [n for n in layer_qformats if n not in consumed]:
        module = modules.get(name)
        if type(module) is not nn.Linear:
            raise ValueError(f"quantized_layers lists {name!r}, which is not an nn.Linear of "
                             f"{type(model).__name__} (found {type(module).__name__})")
        linears[name] = module
    int4 = {name: m for name, m in linears.items() if F.get_format(layer_qformats[name]).group_size_choices}
    if int4:
        group_size = _group_size(F.get_format(layer_qformats[next(iter(int4))]), int4, group_size, header)
    for name, linear in linears.items():
        fmt = F.get_format(layer_qformats[name])
        _swap_in(model, name, linear, fmt, group_size if fmt.group_size_choices else None, check)
    int4_experts = any(F.get_format(layer_qformats[n]).group_size_choices for n in consumed)
    return group_size if int4 or int4_experts else None


def _quantized_linears(model: nn.Module, exclude_modules, header: Header) -> Dict[str, nn.Linear]:
    """Linears the config does not exclude, plus any whose `weight_scale` is in the checkpoint."""
    linears = target_linears(model, exclude_modules)
    linears.update({name: m for name, m in model.named_modules()
                    if type(m) is nn.Linear and f"{name}.weight_scale" in header})
    return linears


def _group_size(fmt: F.Format, linears: Dict[str, nn.Linear], requested: Optional[int], header: Header):
    """INT4 group size: the config's, else read off the `weight_scale` shapes (ModelOpt's config.json has none)."""
    if not fmt.group_size_choices or requested is not None:
        return requested or fmt.group_size
    found = {}
    for name, linear in linears.items():
        shape = header.get(f"{name}.weight_scale", (None, ()))[1]
        if len(shape) == 2 and shape[1] and linear.in_features % shape[1] == 0:
            found.setdefault(linear.in_features // shape[1], name)
    if len(found) > 1:
        raise ValueError(f"{fmt.quant_algo} layers in the checkpoint use different group sizes ({found}, "
                         "size: first layer); one group size per model is supported")
    return next(iter(found), fmt.group_size)


def _expected(module: QuantLinear) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    specs = dict(weight_buffer_specs(module.fmt, module.out_features, module.in_features, module.group_size))
    if module.fmt.needs_calibration_data:
        specs["input_scale"] = (SCALAR, torch.float32)
    return specs


def _check_layer(name: str, module: QuantLinear, header: Header, checked: Dict[str, F.Format]) -> None:
    """The header has every tensor `module` needs, as it needs it; the optional ones it has are declared.
    `checked` records the layer's format under its checkpoint name."""
    checked[name] = module.fmt
    for suffix, (shape, dtype) in _expected(module).items():
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
    for suffix, (shape, dtype) in _expected(module).items():
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


def _check_pre_quant_scales(layers: Dict[str, F.Format], header: Header) -> None:
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


def _check_unquantized_parameters(model: nn.Module, header: Header) -> None:
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


def _declare_kv_scales(model: nn.Module, header: Header) -> None:
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


def finalize_prequantized(model: nn.Module, kv_format: Optional[F.KVFormat]) -> None:
    """After loading: the parameters came from the checkpoint, scales are calibrated, 1-element scales
    become 0-d, KV quantization is on."""
    _check_parameters_loaded(model)
    for module in model.modules():
        if isinstance(module, QuantLinear):
            for suffix, (shape, _) in _expected(module).items():
                if shape == SCALAR and getattr(module, suffix).shape == (1,):
                    setattr(module, suffix, getattr(module, suffix).reshape(()))
            module.input_calibrated = True
            if module.bias is not None:
                module.bias.requires_grad_(False)
    if kv_format is not None:
        _enable_loaded_kv(model, kv_format)
    check_model_scales(model, _scale_specs(model))


def _check_parameters_loaded(model: nn.Module) -> None:
    """A parameter the checkpoint did not provide: transformers initializes it at random and only lists it
    in its load report; in a quantized checkpoint it is a damaged or renamed tensor. transformers marks
    each parameter it loaded with `_is_hf_initialized`; with none marked (another loader) there is
    nothing to tell."""
    loaded = {name: getattr(p, "_is_hf_initialized", False) for name, p in model.named_parameters()
              if p.device.type != "meta"}  # an offloaded parameter stays on meta, loaded or not
    missing = [name for name, was_loaded in loaded.items() if not was_loaded]
    if missing and any(loaded.values()):
        raise ValueError(f"checkpoint tensor {missing[0]!r} is missing ({len(missing)} parameter(s) of "
                         f"{type(model).__name__} not in the checkpoint); transformers would have initialized it at "
                         "random")


def _scale_specs(model: nn.Module) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """Expected (shape, dtype) of every QuantLinear scale and KV scale, by full buffer name."""
    specs = {f"{name}.{suffix}": spec for name, module in model.named_modules() if isinstance(module, QuantLinear)
             for suffix, spec in _expected(module).items() if suffix != "weight"}
    for name, attention in attention_modules(model).items():
        for proj, kind in KV_PROJECTIONS:
            specs[f"{name}.{proj}.{kind}_scale"] = (SCALAR, torch.float32)
    return specs


def _enable_loaded_kv(model: nn.Module, kv_format: F.KVFormat) -> None:
    defaulted = []
    for name, attention in attention_modules(model).items():
        for proj, kind in ((attention.k_proj, "k"), (attention.v_proj, "v")):
            scale = getattr(proj, f"{kind}_scale", None)
            if scale is None:
                # Not persistent: a default is never written back as if it had been calibrated.
                proj.register_buffer(f"{kind}_scale", torch.ones((), device=proj.weight.device), persistent=False)
                defaulted.append(f"{name}.{kind}_proj.{kind}_scale")
            elif scale.dim() == 1:
                proj.register_buffer(f"{kind}_scale", scale.reshape(()))
        attention.kv_format = kv_format
    if defaulted:
        logger.warning("the checkpoint quantizes the KV cache (%s) but has no k/v scales (%d missing, e.g. %s); "
                       "using scale 1.0, as the serving engines do", kv_format.kv_cache_quant_algo, len(defaulted),
                       defaulted[0])
    use_kv_attention(model)
