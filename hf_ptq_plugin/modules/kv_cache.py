"""KV-cache quantization: keys and values quantized right before the attention kernel.

Serving engines store K (after RoPE) and V quantized with per-tensor scales `k_scale` /
`v_scale` = amax / 448, found in the checkpoint as `<attn>.k_proj.k_scale` and
`<attn>.v_proj.v_scale`; we register those buffers on the k_proj / v_proj modules so the names
need no translation. To see K after RoPE we register, once at import, an attention function
per base implementation (`hf_ptq_kv_sdpa`, ...) in transformers' AttentionInterface: it
quantizes (or, while calibrating, observes) K and V, then calls the base implementation.

Quantizing each token's K/V independently of the others is what makes this exact even though
the cache holds unquantized values: re-quantizing the whole cache at every step gives the values
a quantized cache would hold.
"""

import contextlib
import logging
import sys

import torch
from torch import nn

from .. import formats as F
from ..calibration.distributed import all_reduce_number
from ..numerics.fp8 import FP8_MAX, fp8_fake_quantize
from ..numerics.nvfp4 import E2M1_MAX, NVFP4_BLOCK, nvfp4_fake_quantize
from ..numerics.scales import scale_from_amax

logger = logging.getLogger(__name__)

KV_ATTENTION_PREFIX = "hf_ptq_kv_"
BASE_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def register_kv_attention_functions() -> None:
    """Register `hf_ptq_kv_<base>` attention and mask functions (called once, at import)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for base in BASE_IMPLEMENTATIONS:
        name = KV_ATTENTION_PREFIX + base
        ALL_ATTENTION_FUNCTIONS.register(name, _kv_quantizing_attention(base))
        mask_base = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(base)
        if mask_base is not None:
            ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask_base)


def _kv_quantizing_attention(base: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        key, value = quantize_key_value(module, key, value)
        return _base_attention(module, base)(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{KV_ATTENTION_PREFIX}{base}"
    return attention


def _base_attention(module: nn.Module, base: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base != "eager":
        return ALL_ATTENTION_FUNCTIONS[base]
    # Each model family defines its own eager attention next to its attention module.
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ValueError(f"{type(module).__name__} has no eager_attention_forward; use attn_implementation='sdpa'")
    return eager


def quantize_key_value(module: nn.Module, key: torch.Tensor, value: torch.Tensor):
    """Fake-quantize (B, H_kv, S, D) keys and values with the module's KV format and scales."""
    observer = getattr(module, "kv_amax_observer", None)
    if observer is not None:  # calibrating: record statistics, leave the values untouched
        observer["k"] = max(observer["k"], _real_token_amax(key, observer["token_mask"]))
        observer["v"] = max(observer["v"], _real_token_amax(value, observer["token_mask"]))
        return key, value
    kv_format = getattr(module, "kv_format", None)
    if kv_format is None:
        return key, value
    return (_fake_quantize_kv(key, module.k_proj.k_scale, kv_format),
            _fake_quantize_kv(value, module.v_proj.v_scale, kv_format))


def _real_token_amax(states: torch.Tensor, token_mask) -> float:
    """max |states| over real tokens of (B, H, S, D) states (the cache may hold more than the batch)."""
    mask = None if token_mask is None else token_mask.mask
    if mask is not None and states.shape[0] == mask.shape[0] and states.shape[2] == mask.shape[1]:
        states = states.transpose(1, 2)[mask.to(states.device)]  # (real tokens, H, D)
    if not states.numel():
        return 0.0
    amax = states.detach().abs().amax()
    if not torch.isfinite(amax):  # the calibration rule: non-finite values are left out (stats.finite_values)
        logger.warning("NaN or Inf in the keys/values seen during calibration; left out of the k/v scales")
        amax = torch.where(torch.isfinite(states), states,
                           torch.zeros((), dtype=states.dtype, device=states.device)).abs().amax()
    return amax.item()


def _fake_quantize_kv(x: torch.Tensor, scale: torch.Tensor, kv_format: F.KVFormat) -> torch.Tensor:
    if kv_format.values == F.FP8:
        return fp8_fake_quantize(x, scale).to(x.dtype)
    # NVFP4: the checkpoint's scale is amax / 448 (ModelOpt >= 0.43); the global scale is amax / (6 * 448).
    return nvfp4_fake_quantize(x, scale / E2M1_MAX).to(x.dtype)


def attention_modules(model: nn.Module) -> dict:
    """{name: module} of the attention modules that have separate k_proj and v_proj."""
    return {name: module for name, module in model.named_modules()
            if hasattr(module, "k_proj") and hasattr(module, "v_proj") and hasattr(module, "config")}


def check_kv_support(model: nn.Module, kv_format: F.KVFormat) -> dict:
    """The model's attention modules, or a ValueError saying why its KV cache cannot be quantized."""
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"kv_cache_qformat={kv_format.name!r}: {type(model).__name__} has no attention module "
                         "with separate k_proj and v_proj; use kv_cache_qformat='none'")
    for name, module in modules.items():
        _check_head_dim(name, module, kv_format)
    base = model.config._attn_implementation or "eager"
    if base.removeprefix(KV_ATTENTION_PREFIX) not in BASE_IMPLEMENTATIONS:
        raise ValueError(f"KV-cache quantization supports attn_implementation in {BASE_IMPLEMENTATIONS}; "
                         f"the model uses {base!r}")
    return modules


def enable_kv_quantization(model: nn.Module, kv_format: F.KVFormat, amax: dict) -> None:
    """Attach `k_scale`/`v_scale` from {attn_name: {"k": amax, "v": amax}} and switch attention."""
    for name, module in check_kv_support(model, kv_format).items():
        device = module.k_proj.weight.device
        for proj, kind in ((module.k_proj, "k"), (module.v_proj, "v")):
            scale = scale_from_amax(torch.tensor(amax[name][kind]), FP8_MAX)  # () fp32 = amax / 448
            proj.register_buffer(f"{kind}_scale", scale.to(device))
        module.kv_format = kv_format
    use_kv_attention(model)


def _check_head_dim(name: str, module: nn.Module, kv_format: F.KVFormat) -> None:
    head_dim = getattr(module, "head_dim", None)
    if kv_format.values == F.NVFP4 and head_dim is not None and head_dim % NVFP4_BLOCK:
        raise ValueError(f"kv_cache_qformat='nvfp4' needs head_dim divisible by {NVFP4_BLOCK}; "
                         f"{name} has head_dim={head_dim}; use kv_cache_qformat='fp8'")


def use_kv_attention(model: nn.Module) -> None:
    base = model.config._attn_implementation or "eager"
    if not base.startswith(KV_ATTENTION_PREFIX):
        model.set_attn_implementation(KV_ATTENTION_PREFIX + base)


@contextlib.contextmanager
def observe_kv_amax(model: nn.Module, token_mask=None):
    """Inside the block, forwards record K/V amax per attention module; yields {name: {"k", "v"}}.

    `token_mask` (a TokenMask) excludes padding. The observers are removed on exit, also when
    the forward loop raises.
    """
    modules = attention_modules(model)
    stats = {name: {"k": 0.0, "v": 0.0, "token_mask": token_mask} for name in modules}
    previous = model.config._attn_implementation
    try:
        for name, module in modules.items():
            module.kv_amax_observer = stats[name]
        use_kv_attention(model)
        yield stats
        for amax in stats.values():  # several calibrating processes agree on one scale
            amax["k"], amax["v"] = all_reduce_number(amax["k"], "max"), all_reduce_number(amax["v"], "max")
    finally:
        for module in modules.values():
            module.__dict__.pop("kv_amax_observer", None)
        if previous != model.config._attn_implementation:
            model.set_attn_implementation(previous)
