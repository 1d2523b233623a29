"""Loading a pre-quantized unified checkpoint (ours or ModelOpt's) through `from_pretrained`.

Before any tensor is read, `prepare_prequantized` decides from the safetensors headers which Linears
are quantized, checks the checkpoint's tensors against what their formats need (`prequantized_header`),
and swaps in QuantLinears on the meta device whose buffers have exactly those names, so transformers'
loader fills them with no translation. A problem (a damaged or truncated file included) raises a
ValueError naming the tensor or file, what was expected and what was found.
`finalize_prequantized` runs after loading: refuses a parameter the checkpoint did not provide
(which transformers would initialize at random), marks static scales as calibrated and turns KV
quantization on (scale 1.0 with one warning when the checkpoint has none, as ModelOpt's newer
default writes).
"""

import functools
import logging
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from .. import formats as F
from ..calibration.selection import target_linears
from ..modules.kv_cache import attention_modules, use_kv_attention
from ..modules.quant_linear import QuantLinear
from .prequantized_experts import prepare_mixed_experts, prepare_prequantized_experts
from .prequantized_header import (
    KV_PROJECTIONS,
    SCALAR,
    Header,
    check_layer,
    check_pre_quant_scales,
    check_unquantized_parameters,
    declare_kv_scales,
    expected_tensors,
)
from .scale_checks import check_model_scales

logger = logging.getLogger(__name__)


def prepare_prequantized(model: nn.Module, fmt: F.Format, exclude_modules, group_size: Optional[int],
                         kv_format: Optional[F.KVFormat], header: Header,
                         layer_qformats: Optional[Dict[str, str]] = None) -> int:
    """Swap the checkpoint's quantized Linears (and fused MoE experts) for meta modules; returns the group size.

    `layer_qformats` (a MIXED_PRECISION checkpoint) names every quantized Linear and its format.
    """
    checked = {}  # header name -> Format of every quantized layer, filled by `check`
    check = functools.partial(check_layer, header=header, checked=checked)
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
    check_pre_quant_scales(checked, header)
    check_unquantized_parameters(model, header)
    if kv_format is not None:  # after the swaps: the scales go on the k/v projections the model keeps
        declare_kv_scales(model, header)
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


def finalize_prequantized(model: nn.Module, kv_format: Optional[F.KVFormat]) -> None:
    """After loading: the parameters came from the checkpoint, scales are calibrated, 1-element scales
    become 0-d, KV quantization is on."""
    _check_parameters_loaded(model)
    for module in model.modules():
        if isinstance(module, QuantLinear):
            for suffix, (shape, _) in expected_tensors(module).items():
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
             for suffix, spec in expected_tensors(module).items() if suffix != "weight"}
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
