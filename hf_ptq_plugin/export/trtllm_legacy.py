"""The legacy TensorRT-LLM checkpoint (`config.json` + `rank{N}.safetensors`) of a Llama-style decoder.

`legacy_state_dict(model)` renames and merges a quantized model's tensors into TensorRT-LLM's names,
unsharded; `shard(...)` splits them for tp_size x pp_size ranks; `legacy_config(...)` builds config.json;
`save_trtllm_legacy` writes all of it atomically. It is the layout of the "trtllm-legacy" export target
(and of "trtllm" for the formats TensorRT-LLM serves only this way, `engines.py`). The files are the input
of `trtllm-build --checkpoint_dir`.

Verified (NVIDIA/TensorRT-LLM docs/source/architecture/checkpoint.md, tensorrt_llm/models/llama/convert.py,
models/modeling_utils.py; `docs/modelopt-facts.md` §8): names `transformer.vocab_embedding.weight`,
`transformer.layers.{i}.{input_layernorm,post_layernorm}.weight`, `attention.qkv` (q, k, v stacked along
the output dim), `attention.dense` (o_proj), `mlp.fc` (HF gate_proj, the activated branch), `mlp.gate`
(HF up_proj), `mlp.proj` (down_proj), `transformer.ln_f.weight`, `lm_head.weight`; per Linear
`weights_scaling_factor` (our weight_scale), `weights_scaling_factor_2`, `activation_scaling_factor`
(input_scale), `prequant_scaling_factor`, and per format what `trtllm_layers.py` lists (e.g.
`per_channel_scale` for FP8_PER_CHANNEL_PER_TOKEN); `attention.kv_cache_scaling_factor` = max(k_scale, v_scale)
(TensorRT-LLM merges separate k/v factors the same way). Layer indices are local to a pipeline stage.
INT4 weights are int8 [N/2, K] (nibbles along the output dim; TensorRT-LLM transposes them for its
mixed GEMM), FP8 weights float8_e4m3fn, scalar factors shape (1,). Config fields follow ModelOpt's
`convert_to_tensorrt_llm_config`. Merging q/k/v: per-channel and group scales concatenate exactly;
per-tensor FP8 weight scales are unified to their max and the smaller members requantized (one
rounding, `_unify_fp8`); NVFP4 / W4A8 `weights_scaling_factor_2` and AWQ pre-quant scales must already
be shared (our quantizer shares them). TP: column-parallel (qkv per q/k/v section, fc, gate, lm_head,
vocab embedding) split on dim 0, row-parallel (dense, proj) on dim 1 with group scales on dim 1 and
`prequant_scaling_factor` on dim 0; per-channel scales of row-parallel layers, scalars and biases of
row-parallel layers are replicated. W4A16_AWQ / W4A8_AWQ layers are zero-padded to the features their
TensorRT-LLM layer declares before the split (`trtllm_layers.pad_tensor`). PP: layers split evenly,
embedding on the first stage, ln_f / lm_head on the last. Config: LLaMAConfig's `attn_bias` / `mlp_bias`.
Checked against the loaders' source, not against a built engine: how the padded GEMMs treat the padded
activations is TensorRT-LLM's. Not handled: vocab padding (a vocab not divisible by tp_size is refused),
NVFP4 KV cache (not a legacy algorithm), models other than Llama-style.
"""

import json
import logging
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from .. import formats as F
from ..modules.quant_linear import QuantLinear
from .atomic import atomic_directory
from .save import Sidecars, write_sidecars
from .trtllm_layers import (
    LEGACY_QUANT_ALGO,
    check_buildable,
    check_legacy_format,
    linear_tensors,
    merge_qkv,
    pad_tensor,
    padding_multiple,
)
from .unified import plan_export

logger = logging.getLogger(__name__)

COLUMN, ROW = "column", "row"
# HF leaf -> (TensorRT-LLM module, parallel style); q/k/v become one attention.qkv.
LINEARS = {"self_attn.o_proj": ("attention.dense", ROW), "mlp.gate_proj": ("mlp.fc", COLUMN),
           "mlp.up_proj": ("mlp.gate", COLUMN), "mlp.down_proj": ("mlp.proj", ROW)}
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def _check_model(model: nn.Module, fmt: F.Format) -> None:
    check_legacy_format(fmt)
    names = dict(model.named_modules())
    needed = ["model.embed_tokens", "model.norm", "lm_head", "model.layers.0.input_layernorm",
              "model.layers.0.post_attention_layernorm"] + [f"model.layers.0.{leaf}" for leaf in (*QKV, *LINEARS)]
    missing = [name for name in needed if name not in names]
    if missing:
        raise ValueError(f"the legacy TensorRT-LLM export handles Llama-style decoders; {type(model).__name__} "
                         f"has no {missing}")
    plain = [n for n, m in names.items() if n.startswith("model.layers.") and isinstance(m, nn.Linear)]
    if plain:
        raise ValueError(f"the legacy export needs every decoder Linear quantized; unquantized: {plain[:4]}")


class Split(NamedTuple):
    """How a tensor is cut across tensor-parallel ranks: kind "column" / "row" / "replicate" / "qkv"
    (per q/k/v section), the q/k/v output sizes, and the (N, K) of its Linear when its layer pads."""

    kind: str
    sections: Optional[tuple] = None
    features: Optional[tuple] = None


def legacy_state_dict(model: nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, Split]]:
    """(unsharded, unpadded legacy tensors, {name: how it is split across ranks})."""
    first = next((m for m in model.modules() if isinstance(m, QuantLinear)), None)
    if first is None:
        raise ValueError(f"{type(model).__name__} has no quantized layer; quantize it before exporting")
    fmt = first.fmt
    _check_model(model, fmt)
    tensors, rules = {}, {}

    def put(prefix, layer_tensors, style, sizes=None, linears=()):
        features = _features(linears) if any(isinstance(m, QuantLinear) for m in linears) else None
        for key, value in layer_tensors.items():
            tensors[f"{prefix}.{key}"] = value
            rules[f"{prefix}.{key}"] = _rule(key, value, style, sizes, features)

    modules = dict(model.named_modules())
    put("transformer.vocab_embedding", {"weight": model.model.embed_tokens.weight.detach()}, COLUMN)
    for i, layer in enumerate(model.model.layers):
        prefix, hf = f"transformer.layers.{i}", f"model.layers.{i}"
        put(f"{prefix}.input_layernorm", {"weight": layer.input_layernorm.weight.detach()}, None)
        put(f"{prefix}.post_layernorm", {"weight": layer.post_attention_layernorm.weight.detach()}, None)
        qkv = [modules[f"{hf}.{leaf}"] for leaf in QKV]
        put(f"{prefix}.attention.qkv", merge_qkv([linear_tensors(m, fmt) for m in qkv], fmt), COLUMN,
            tuple(m.out_features for m in qkv), qkv)
        for leaf, (name, style) in LINEARS.items():
            module = modules[f"{hf}.{leaf}"]
            put(f"{prefix}.{name}", linear_tensors(module, fmt), style, linears=(module,))
        kv = [getattr(layer.self_attn.k_proj, "k_scale", None), getattr(layer.self_attn.v_proj, "v_scale", None)]
        if kv[0] is not None:
            put(f"{prefix}.attention", {"kv_cache_scaling_factor": torch.maximum(*kv).reshape(1).float()}, None)
    put("transformer.ln_f", {"weight": model.model.norm.weight.detach()}, None)
    put("lm_head", linear_tensors(model.lm_head, fmt), COLUMN, linears=(model.lm_head,))
    return tensors, rules


def _features(linears) -> tuple:
    """(N, K) of one Linear, or of q/k/v merged along N."""
    return sum(m.out_features for m in linears), linears[0].in_features


def _rule(key: str, value: torch.Tensor, style, sizes, features) -> Split:
    if style is None or value.numel() == 1 or (key == "prequant_scaling_factor" and style == COLUMN):
        return Split("replicate", features=features)
    if style == COLUMN:
        return Split("qkv", sizes, features) if sizes else Split("column", features=features)
    if key == "prequant_scaling_factor" or value.dim() == 2:
        return Split("row", features=features)
    return Split("replicate", features=features)  # row-parallel per-channel scales and bias


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
               pp_size: int, rank: int, multiple: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """The tensors of one rank; rank = pp_rank * tp_size + tp_rank, as TensorRT-LLM's Mapping numbers them.

    `multiple` (from `trtllm_layers.padding_multiple`) pads the features of layers that pad before
    they are split. Every tensor is its own contiguous copy (a split piece is a view), so no two names
    share storage, which safetensors refuses.
    """
    if num_layers % pp_size:
        raise ValueError(f"{num_layers} layers cannot be split into pp_size={pp_size} equal stages")
    per_stage, (pp_rank, tp_rank) = num_layers // pp_size, divmod(rank, tp_size)
    out = {}
    for name, value in tensors.items():
        stage, local_name = _stage(name, per_stage, pp_size)
        if stage == pp_rank:
            rule = rules[name]
            if rule.features is not None:
                value = pad_tensor(name.rsplit(".", 1)[1], value, rule.features, multiple)
            piece = _split(name, value, rule, tp_size)[tp_rank]
            out[local_name] = piece.clone(memory_format=torch.contiguous_format)
    return out


def shard(tensors: Dict[str, torch.Tensor], rules: Dict[str, Split], num_layers: int,
          tp_size: int, pp_size: int, multiple: Optional[int] = None) -> Dict[int, Dict[str, torch.Tensor]]:
    """{rank: tensors} for every rank (`shard_rank` for each)."""
    return {rank: shard_rank(tensors, rules, num_layers, tp_size, pp_size, rank, multiple)
            for rank in range(tp_size * pp_size)}


def _stage(name: str, per_stage: int, pp_size: int) -> Tuple[int, str]:
    """(pipeline stage, name within the stage): layers by index, embedding first, the rest last."""
    if name.startswith("transformer.layers."):
        index = int(name.split(".")[2])
        local = name.replace(f"transformer.layers.{index}.", f"transformer.layers.{index % per_stage}.", 1)
        return index // per_stage, local
    return (0 if name.startswith("transformer.vocab_embedding") else pp_size - 1), name


def legacy_config(model: nn.Module, plan, tp_size: int, pp_size: int) -> dict:
    """config.json for `trtllm-build` (TensorRT-LLM PretrainedConfig fields, as ModelOpt fills them)."""
    dtype = str(model.model.embed_tokens.weight.dtype).split(".")[1]
    if dtype not in ("float16", "bfloat16"):
        logger.warning("legacy TensorRT-LLM checkpoint in %s; TensorRT-LLM expects float16 or bfloat16 models", dtype)
    return {"producer": {"name": "hf_ptq_plugin"}, "architecture": "LlamaForCausalLM", "dtype": dtype,
            "logits_dtype": "float32", **_model_fields(model),
            "mapping": {"world_size": tp_size * pp_size, "tp_size": tp_size, "pp_size": pp_size},
            "quantization": _quantization_fields(model, plan)}


def _model_fields(model: nn.Module) -> dict:
    c = model.config
    rope = dict(getattr(c, "rope_parameters", None) or {})
    fields = {
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "hidden_size": c.hidden_size,
        "head_size": model.model.layers[0].self_attn.head_dim, "intermediate_size": c.intermediate_size,
        "norm_epsilon": c.rms_norm_eps, "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_position_embeddings,
        "hidden_act": c.hidden_act, "position_embedding_type": "rope_gpt_neox",
        "rotary_base": rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)),
        "use_parallel_embedding": True, "embedding_sharding_dim": 0, "share_embedding_table": False,
        # LLaMAConfig reads these two (TensorRT-LLM tensorrt_llm/models/llama/config.py).
        "attn_bias": bool(getattr(c, "attention_bias", False)), "mlp_bias": bool(getattr(c, "mlp_bias", False)),
    }
    if rope.get("rope_type", "default") != "default":
        fields["rotary_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return fields


def _quantization_fields(model: nn.Module, plan) -> dict:
    fmt = plan.fmt
    return {"quant_algo": LEGACY_QUANT_ALGO[fmt.name],
            "kv_cache_quant_algo": plan.kv_format.kv_cache_quant_algo if plan.kv_format else None,
            "group_size": plan.group_size if fmt.weight in (F.INT4, F.NVFP4) else None,
            "has_zero_point": False, "pre_quant_scale": fmt.pre_quant_scale,  # every Linear has the factor
            "exclude_modules": [] if isinstance(model.lm_head, QuantLinear) else ["lm_head"]}


def _check_parallel(config, tp_size: int, pp_size: int) -> None:
    for name in ("num_attention_heads", "num_key_value_heads"):
        if getattr(config, name) % tp_size:
            raise ValueError(f"{name}={getattr(config, name)} cannot be split into tp_size={tp_size} parts")
    if config.num_hidden_layers % pp_size:
        raise ValueError(f"{config.num_hidden_layers} layers cannot be split into pp_size={pp_size} equal stages")


def save_trtllm_legacy(model: nn.Module, export_dir, config, tp_size: int = 1, pp_size: int = 1,
                       sidecars: Sidecars = Sidecars()) -> None:
    """Write the legacy TensorRT-LLM checkpoint of `model` for tp_size x pp_size ranks, atomically."""
    from safetensors.torch import save_file

    plan = plan_export(model, config)
    if plan.layer_formats:
        raise ValueError("a model with per-layer formats (MIXED_PRECISION) exports only as the unified checkpoint "
                         "(target 'modelopt'); the legacy TensorRT-LLM writer takes one format")
    if plan.kv_format is not None and plan.kv_format.values != F.FP8:
        raise ValueError(f"the legacy TensorRT-LLM checkpoint has an FP8 or no KV cache, not {plan.kv_format.name!r}; "
                         "use target='trtllm' (unified checkpoint) for an NVFP4 KV cache")
    tensors, rules = legacy_state_dict(model)
    _check_parallel(model.config, tp_size, pp_size)
    check_buildable(model, plan.fmt, plan.group_size, tp_size)
    multiple = padding_multiple(plan.fmt, plan.group_size, tp_size)
    config_json = json.dumps(legacy_config(model, plan, tp_size, pp_size), indent=2) + "\n"
    with atomic_directory(export_dir) as staging:
        (staging / "config.json").write_text(config_json, encoding="utf-8")
        for rank in range(tp_size * pp_size):  # one rank in memory at a time
            rank_tensors = shard_rank(tensors, rules, model.config.num_hidden_layers, tp_size, pp_size, rank,
                                      multiple)
            save_file(rank_tensors, str(staging / f"rank{rank}.safetensors"), metadata={"format": "pt"})
        write_sidecars(model, staging, Path(export_dir), "trtllm-legacy", sidecars)  # trtllm-serve --tokenizer <dir>
    logger.info("wrote a legacy TensorRT-LLM %s checkpoint (tp=%d, pp=%d) to %s", plan.fmt.quant_algo, tp_size,
                pp_size, export_dir)
