"""Checkpoint export: the unified ("modelopt") checkpoint, and the dialect each serving engine reads.

`export_checkpoint(model, out_dir, target=...)` works on any model quantized by hf_ptq_plugin, also one
that `quantize()` made in memory. Targets:
- "modelopt": the unified checkpoint (what `model.save_pretrained` writes).
- "vllm", "sglang", "trtllm": the dialect `engines.py` says that engine serves the model's qformat
  (and KV-cache format) in: the unified checkpoint where it is accepted, else compressed-tensors
  (vLLM, SGLang) or the legacy TensorRT-LLM checkpoint (TensorRT-LLM); a ValueError names the engines
  that can serve the format otherwise.
- "trtllm-legacy": always the legacy TensorRT-LLM checkpoint (`config.json` + `rank{N}.safetensors`,
  for `trtllm-build`), split for `tp_size` x `pp_size` ranks. A separate target rather than a flag, so
  that every target names exactly one layout.
Every write is atomic: a temporary directory renamed into place only when complete.
"""

from torch import nn

EXPORT_TARGETS = ("modelopt", "vllm", "sglang", "trtllm", "trtllm-legacy")


def export_target_dialect(target: str, qformat: str, kv_cache_qformat: str = "none") -> str:
    """The checkpoint dialect `export_checkpoint` writes for `target`; ValueError if none serves it."""
    from .engines import TRTLLM_LEGACY, describe_serving, dialect_for

    if target not in EXPORT_TARGETS:
        raise ValueError(f"unknown export target {target!r}; valid: {', '.join(EXPORT_TARGETS)}")
    if target in ("modelopt", TRTLLM_LEGACY):  # each names its own dialect
        return target
    dialect = dialect_for(target, qformat, kv_cache_qformat)
    if dialect is None:
        raise ValueError(f"export target {target!r} cannot serve qformat {qformat!r} with kv_cache_qformat "
                         f"{kv_cache_qformat!r}; engines that can (dialect): "
                         f"{describe_serving(qformat, kv_cache_qformat)}")
    return dialect


def export_checkpoint(model: nn.Module, export_dir, target: str = "modelopt", tp_size: int = 1, pp_size: int = 1,
                      tokenizer=None, base_model=None, evaluation=None, model_id=None, **save_kwargs) -> None:
    """Write `model` as a checkpoint for `target` (see the module docstring), its tokenizer files and model card.

    `tp_size` / `pp_size` split the legacy TensorRT-LLM checkpoint; other dialects take 1. `tokenizer`,
    `base_model`, `evaluation`, `model_id`: see `save.Sidecars`. kwargs go to transformers' save_pretrained
    for the unified checkpoint (e.g. `max_shard_size`); the compressed-tensors writer takes `max_shard_size` too.
    """
    from ..hf.quantizer import attach_quantizer  # the quantizer layer sits above export
    from .save import Sidecars, ptq_config_of, save_unified

    config = ptq_config_of(model)
    qformats = sorted(set((config.layer_qformats or {}).values())) or [config.qformat]
    dialect = formats_dialect(target, qformats, config.kv_cache_qformat)
    if dialect != "trtllm-legacy" and (tp_size, pp_size) != (1, 1):
        raise ValueError(f"tp_size/pp_size ({tp_size}, {pp_size}) split only the legacy TensorRT-LLM checkpoint; "
                         f"target {target!r} writes the {dialect} checkpoint, which engines split themselves")
    sidecars = Sidecars(tokenizer, base_model, evaluation, model_id)
    if dialect == "modelopt":
        attach_quantizer(model, config)
        save_unified(model, export_dir, sidecars, **save_kwargs)
    elif dialect == "compressed-tensors":
        from .compressed_tensors import save_compressed_tensors

        save_compressed_tensors(model, export_dir, config, target=target, sidecars=sidecars, **save_kwargs)
    else:
        from .trtllm_legacy import save_trtllm_legacy

        save_trtllm_legacy(model, export_dir, config, tp_size=tp_size, pp_size=pp_size, sidecars=sidecars)


def formats_dialect(target: str, qformats, kv_cache_qformat: str = "none") -> str:
    """The dialect for a model holding every format of `qformats`. Several (per-layer formats) go into
    one MIXED_PRECISION checkpoint: unified, or legacy TensorRT-LLM; an engine target needs an engine
    that takes each of them as a mixed layer (`engines.MIXED_PRECISION_LAYERS`), else ValueError."""
    from .engines import ENGINES, MIXED_PRECISION_LAYERS, TRTLLM_LEGACY, mixed_dialect_for

    qformats = list(qformats)
    if len(qformats) == 1 or target not in ENGINES:  # "modelopt" and "trtllm-legacy" take any mix; others raise
        return export_target_dialect(target, qformats[0], kv_cache_qformat)
    dialect = mixed_dialect_for(target, qformats, kv_cache_qformat)
    if dialect is None:
        raise ValueError(f"export target {target!r} cannot serve per-layer formats {qformats} with kv_cache_qformat "
                         f"{kv_cache_qformat!r} (one MIXED_PRECISION checkpoint); its mixed layers may be "
                         f"{', '.join(MIXED_PRECISION_LAYERS[target])}; target 'modelopt' writes the checkpoint "
                         f"anyway, '{TRTLLM_LEGACY}' the legacy TensorRT-LLM one")
    return dialect
