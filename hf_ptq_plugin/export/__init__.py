"""Checkpoint export: the unified ("modelopt") checkpoint that TensorRT-LLM, vLLM and SGLang load.

`export_checkpoint(model, out_dir)` works on any model quantized by hf_ptq_plugin, also one that
`quantize()` made in memory; for models loaded through `from_pretrained` it is what
`model.save_pretrained` does.
"""

from torch import nn

EXPORT_TARGETS = ("modelopt",)


def export_checkpoint(model: nn.Module, export_dir, target: str = "modelopt", **save_kwargs) -> None:
    """Write `model` as a checkpoint for `target` (kwargs go to transformers' save_pretrained,
    e.g. `max_shard_size`)."""
    if target not in EXPORT_TARGETS:
        raise ValueError(f"unknown export target {target!r}; valid: {', '.join(EXPORT_TARGETS)}")
    from ..hf_quantizer import attach_quantizer  # the quantizer layer sits above export
    from .save import ptq_config_of, save_unified

    attach_quantizer(model, ptq_config_of(model))
    save_unified(model, export_dir, **save_kwargs)
