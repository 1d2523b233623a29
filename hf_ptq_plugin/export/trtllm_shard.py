"""Splitting the legacy TensorRT-LLM tensors across tensor- and pipeline-parallel ranks.

Column-parallel tensors (qkv per q/k/v section, fc, gate, lm_head, vocab embedding) split on dim 0,
row-parallel ones (dense, proj) on dim 1 with group scales on dim 1 and `prequant_scaling_factor` on
dim 0; per-channel scales of row-parallel layers, scalars and biases of row-parallel layers are
replicated. Layers whose format pads (`trtllm_layers.padding_multiple`) are zero-padded before the
split. Pipeline stages take the layers evenly, the embedding on the first stage, ln_f / lm_head on the
last; layer indices are local to a stage.
"""

from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from .trtllm_layers import pad_tensor

COLUMN, ROW = "column", "row"


class Split(NamedTuple):
    """How a tensor is cut across tensor-parallel ranks: kind "column" / "row" / "replicate" / "qkv"
    (per q/k/v section), the q/k/v output sizes, the (N, K) of its quantized Linear, and what its layer pads
    N and K to a multiple of per rank (x tp_size; None when its own format does not pad). Per tensor, since
    with per-layer formats only some layers pad."""

    kind: str
    sections: Optional[tuple] = None
    features: Optional[tuple] = None
    multiple: Optional[int] = None


def split_rule(key: str, value: torch.Tensor, style, sizes) -> Split:
    if style is None or value.numel() == 1 or (key == "prequant_scaling_factor" and style == COLUMN):
        return Split("replicate")
    if style == COLUMN:
        return Split("qkv", sizes) if sizes else Split("column")
    if key == "prequant_scaling_factor" or value.dim() == 2:
        return Split("row")
    return Split("replicate")  # row-parallel per-channel scales and bias


def _split(name: str, value: torch.Tensor, rule: Split, tp: int) -> List[torch.Tensor]:
    if rule.kind == "replicate" or tp == 1:
        return [value] * tp
    dim = 1 if rule.kind == "row" and value.dim() == 2 else 0
    if rule.kind == "qkv":
        # Packed INT4 rows hold two outputs each, so sections scale with the tensor's own dim 0.
        sections = [size * value.shape[0] // sum(rule.sections) for size in rule.sections]
        pieces = [_split(name, part, Split("column"), tp) for part in value.split(sections, dim=0)]
        return [torch.cat(ranks, dim=0) for ranks in zip(*pieces)]
    if value.shape[dim] % tp:
        raise ValueError(f"{name} {list(value.shape)} cannot be split into tp_size={tp} parts along dim {dim}")
    return list(value.chunk(tp, dim=dim))


def shard_rank(tensors: Dict[str, torch.Tensor], rules: Dict[str, Split], num_layers: int, tp_size: int,
               pp_size: int, rank: int) -> Dict[str, torch.Tensor]:
    """The tensors of one rank; rank = pp_rank * tp_size + tp_rank, as TensorRT-LLM's Mapping numbers them.

    A tensor whose rule has a `multiple` is padded to `multiple` x tp_size (`trtllm_layers.padding_multiple`)
    before it is split. Every tensor is its own contiguous copy (a split piece is a view), so no two names
    share storage, which safetensors refuses.
    """
    per_stage, (pp_rank, tp_rank) = num_layers // pp_size, divmod(rank, tp_size)
    out = {}
    for name, value in tensors.items():
        stage, local_name = stage_of(name, per_stage, pp_size)
        if stage == pp_rank:
            rule = rules[name]
            if rule.multiple is not None:
                value = pad_tensor(name.rsplit(".", 1)[1], value, rule.features, rule.multiple * tp_size)
            piece = _split(name, value, rule, tp_size)[tp_rank]
            out[local_name] = piece.clone(memory_format=torch.contiguous_format)
    return out


def stage_of(name: str, per_stage: int, pp_size: int) -> Tuple[int, str]:
    """(pipeline stage, name within the stage): layers by index, embedding first, the rest last."""
    if name.startswith("transformer.layers."):
        index = int(name.split(".")[2])
        local = name.replace(f"transformer.layers.{index}.", f"transformer.layers.{index % per_stage}.", 1)
        return index // per_stage, local
    return (0 if name.startswith("transformer.vocab_embedding") else pp_size - 1), name
