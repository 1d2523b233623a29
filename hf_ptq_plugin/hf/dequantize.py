"""`model.dequantize()`: back to a plain model of nn.Linear layers.

Each QuantLinear becomes an nn.Linear holding the weight the engine multiplies with (times its
`pre_quant_scale`, which the dense layer can no longer apply to its input); activation and KV
quantization are switched off. Scales already folded into norms stay there: the dense model
computes the same function.
"""

from typing import Union

import torch
from torch import nn

from ..modules.kv_cache import KV_ATTENTION_PREFIX, attention_modules
from ..modules.quant_linear import QuantLinear


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: Union[torch.dtype, str, None] = None) -> nn.Module:
    if isinstance(dtype, str):  # transformers passes config.dtype, a string once the config was saved
        dtype = getattr(torch, dtype.removeprefix("torch."))
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]:
        model.set_submodule(name, _dense(module, dtype or module.dtype))
    for attention in attention_modules(model).values():
        if getattr(attention, "kv_format", None) is not None:
            del attention.kv_format
            for proj, kind in ((attention.k_proj, "k"), (attention.v_proj, "v")):
                proj._buffers.pop(f"{kind}_scale", None)
    implementation = model.config._attn_implementation or ""
    if implementation.startswith(KV_ATTENTION_PREFIX):
        model.set_attn_implementation(implementation.removeprefix(KV_ATTENTION_PREFIX))
    vars(model).pop("save_pretrained", None)
    vars(model).pop("ptq_config", None)
    return model


def _dense(module: QuantLinear, dtype: torch.dtype) -> nn.Linear:
    w = module.dequantized_weight()  # (N, K) fp32
    if module.pre_quant_scale is not None:
        w = w * module.pre_quant_scale.float()
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                       device=w.device, dtype=dtype)
    linear.weight.copy_(w)
    if module.bias is not None:
        linear.bias.copy_(module.bias)
    linear.requires_grad_(False)
    return linear
