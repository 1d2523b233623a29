"""calibrate(model, data, algorithm): calibrate a model whose weights are already quantized.

- A model loaded compressed by `from_pretrained(src, quantization_config=PTQConfig(...))` is
  calibrated as `quantize()` would have calibrated the full-precision model, with any algorithm:
  the pipeline reads `src`'s weights again, one decoder block at a time
  (`sources.CheckpointWeights`), so activations are observed on full-precision weights and
  `smoothquant`, `awq_*` and `gptq` can change the weights. `algorithm=None` means the algorithm
  its PTQConfig asked for.
- Any other quantized model (quantized in memory, or loaded from a quantized checkpoint) has no
  full-precision weights left: only `max` (the default), which runs the data through the model
  and sets every static `input_scale` from the observed maxima.
The KV cache's `k_scale`/`v_scale` are set in the same pass whenever the KV cache is quantized.
"""

import contextlib
import dataclasses
from typing import Optional

import torch
from torch import nn

from ..config import PTQConfig
from ..formats import KVFormat
from ..modules.kv_cache import attention_modules, enable_kv_quantization, observe_kv_amax
from ..modules.quant_linear import QuantLinear
from . import calibration_forward_loop, collect_input_stats, pipeline
from .algorithms import get_algorithm
from .interrupted import refuse_if_interrupted
from .record import calibration_record


def calibrate(model: nn.Module, data, algorithm: Optional[str] = None, tokenizer=None, calib_size: int = 512,
              seq_len: int = 512, batch_size: int = 4) -> nn.Module:
    """Calibrate a quantized model on `data` and return it.

    `data` is a forward loop (`data(model)` runs the samples), or anything
    `calibration_forward_loop` accepts (texts, files, datasets, token ids), then tokenized with
    `tokenizer`.
    """
    refuse_if_interrupted(model)
    algorithm = _resolve_algorithm(model, algorithm)
    loop = data if callable(data) else _loop_from(data, tokenizer, calib_size, seq_len, batch_size)
    kv_format = _kv_format(model)
    token_mask = getattr(loop, "token_mask", None)
    was_training = model.training
    model.eval()
    try:
        with observe_kv_amax(model, token_mask) if kv_format else contextlib.nullcontext({}) as kv_amax:
            if _rereads_source(model, algorithm, kv_format):
                _requantize_from_source(model, algorithm, loop)
            else:
                _calibrate_input_scales(model, loop, kv_format is not None)
    finally:
        model.train(was_training)
    if kv_format is not None:  # also switches on a KV cache that a compressed load left unquantized
        enable_kv_quantization(model, kv_format, kv_amax)
    model.calibration_record = calibration_record(loop)  # what the model card reports
    return model


def _kv_format(model: nn.Module) -> Optional[KVFormat]:
    """The KV-cache format the model's config asks for, or the one its attention modules already use."""
    config = getattr(model, "ptq_config", None)
    if config is not None and config.kv_format is not None:
        return config.kv_format
    formats = {getattr(m, "kv_format", None) for m in attention_modules(model).values()} - {None}
    return formats.pop() if formats else None


def _resolve_algorithm(model: nn.Module, algorithm: Optional[str]) -> str:
    """The algorithm to run: a weight-changing one needs the full-precision weights' source."""
    source = getattr(model, "ptq_source", None)
    if algorithm is None:
        return source.algorithm if source is not None else "max"
    config = getattr(model, "ptq_config", None)
    if config is not None:  # raises on an unknown algorithm or one that does not fit the format
        PTQConfig(qformat=config.qformat, algorithm=algorithm)
    if get_algorithm(algorithm).streamed and source is None:
        raise ValueError(f"algorithm {algorithm!r} changes the weights and needs the full-precision ones, which this "
                         "model no longer has (quantized in memory, or loaded from a quantized checkpoint); only "
                         f"'max' can calibrate it. Run quantize(model, PTQConfig(..., algorithm={algorithm!r}), "
                         "forward_loop) on the full-precision model, or load it with from_pretrained(src, "
                         "quantization_config=PTQConfig(...)), which can re-read src's weights")
    return algorithm


def _rereads_source(model: nn.Module, algorithm: str, kv_format: Optional[KVFormat]) -> bool:
    """Loaded compressed and something to calibrate: the source's weights give the scales quantize() would."""
    if getattr(model, "ptq_source", None) is None:
        return False
    return get_algorithm(algorithm).streamed or kv_format is not None or model.ptq_config.format.needs_calibration_data


def _requantize_from_source(model: nn.Module, algorithm: str, loop) -> None:
    """Run the pipeline again on the source checkpoint's weights, block by block, with `algorithm`.

    The KV cache is observed by the caller, so the pipeline runs without it."""
    kv_cache_qformat = model.ptq_config.kv_cache_qformat
    config = dataclasses.replace(model.ptq_config, algorithm=algorithm, kv_cache_qformat="none")
    pipeline.run(model, config, loop, source=model.ptq_source)
    _record_config(model, dataclasses.replace(model.ptq_config, kv_cache_qformat=kv_cache_qformat))


def _record_config(model: nn.Module, config: PTQConfig) -> None:
    """Every place the model's PTQConfig lives (what save_pretrained and the model card read)."""
    model.ptq_config = config
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.quantization_config = config
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        model.config.quantization_config = config


def _calibrate_input_scales(model: nn.Module, loop, has_kv: bool) -> None:
    static = {name: m for name, m in model.named_modules()
              if isinstance(m, QuantLinear) and m.fmt.needs_calibration_data}
    if not static and not has_kv:
        raise ValueError(f"{type(model).__name__} has no quantized layer or KV cache with static scales to calibrate")
    stats = collect_input_stats(model, static, loop)
    for name, module in static.items():
        module.set_input_amax(_pre_scaled_amax(module, stats[name].channel_amax))


def _loop_from(data, tokenizer, calib_size, seq_len, batch_size):
    if tokenizer is None and not isinstance(data, torch.Tensor):
        raise ValueError("calibration data that is text needs a tokenizer: calibrate(model, data, tokenizer=...)")
    return calibration_forward_loop(tokenizer, data, calib_size, seq_len, batch_size)


def _pre_scaled_amax(module: QuantLinear, channel_amax: torch.Tensor) -> torch.Tensor:
    """amax of the input after `pre_quant_scale`, which is what the activation quantizer sees."""
    if module.pre_quant_scale is None:
        return channel_amax.amax()
    return (channel_amax * module.pre_quant_scale.float().to(channel_amax.device)).amax()
