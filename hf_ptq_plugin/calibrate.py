"""calibrate(model, data): set the static activation and KV-cache scales of a quantized model.

For a model whose weights are already quantized (by `quantize()`, or loaded compressed by
`from_pretrained`), this runs calibration data through it and sets every `input_scale` and every
`k_scale`/`v_scale` from the observed maxima (ModelOpt's `max`). Algorithms that change the weights
(SmoothQuant, AWQ, GPTQ) need the full-precision weights: run them through `quantize()`.
"""

import contextlib
from typing import Optional

import torch
from torch import nn

from .calibration import calibration_forward_loop, collect_input_stats
from .kv_cache import attention_modules, observe_kv_amax
from .numerics.fp8 import FP8_MAX
from .numerics.scales import scale_from_amax
from .quant_linear import QuantLinear


def calibrate(model: nn.Module, data, algorithm: Optional[str] = None, tokenizer=None, calib_size: int = 512,
              seq_len: int = 512, batch_size: int = 4) -> nn.Module:
    """Calibrate a quantized model's static scales on `data` and return it.

    `data` is a forward loop (`data(model)` runs the samples), or anything
    `calibration_forward_loop` accepts (texts, files, datasets, token ids), then tokenized with
    `tokenizer`. Only `algorithm="max"` (or None) is possible on already-quantized weights.
    """
    if algorithm not in (None, "max"):
        raise ValueError(f"calibrate() sets activation and KV scales of already-quantized weights, which only "
                         f"algorithm 'max' can do; got {algorithm!r}: run quantize(model, PTQConfig(..., "
                         f"algorithm={algorithm!r}), forward_loop) on the full-precision model instead")
    loop = data if callable(data) else _loop_from(data, tokenizer, calib_size, seq_len, batch_size)
    static = {name: m for name, m in model.named_modules()
              if isinstance(m, QuantLinear) and m.fmt.needs_calibration_data}
    kv_modules = {name: m for name, m in attention_modules(model).items() if getattr(m, "kv_format", None)}
    if not static and not kv_modules:
        raise ValueError(f"{type(model).__name__} has no quantized layer or KV cache with static scales to calibrate")
    token_mask = getattr(loop, "token_mask", None)
    with observe_kv_amax(model, token_mask) if kv_modules else contextlib.nullcontext({}) as kv_amax:
        stats = collect_input_stats(model, static, loop)
    for name, module in static.items():
        module.set_input_amax(_pre_scaled_amax(module, stats[name].channel_amax))
    for name, module in kv_modules.items():
        for proj, kind in ((module.k_proj, "k"), (module.v_proj, "v")):
            getattr(proj, f"{kind}_scale").copy_(scale_from_amax(torch.tensor(kv_amax[name][kind]), FP8_MAX))
    return model


def _loop_from(data, tokenizer, calib_size, seq_len, batch_size):
    if tokenizer is None and not isinstance(data, torch.Tensor):
        raise ValueError("calibration data that is text needs a tokenizer: calibrate(model, data, tokenizer=...)")
    return calibration_forward_loop(tokenizer, data, calib_size, seq_len, batch_size)


def _pre_scaled_amax(module: QuantLinear, channel_amax: torch.Tensor) -> torch.Tensor:
    """amax of the input after `pre_quant_scale`, which is what the activation quantizer sees."""
    if module.pre_quant_scale is None:
        return channel_amax.amax()
    return (channel_amax * module.pre_quant_scale.float().to(channel_amax.device)).amax()
