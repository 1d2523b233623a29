"""The legacy TensorRT-LLM checkpoint (`config.json` + `rank{N}.safetensors`) of a Llama-style decoder.

`legacy_state_dict(model)` renames and merges a quantized model's tensors into TensorRT-LLM's names,
unsharded; `trtllm_shard.shard_rank` splits them per rank of tp_size x pp_size; `legacy_config(...)` builds config.json;
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
be shared (our quantizer shares them). Splitting across ranks: `trtllm_shard.py`; W4A16_AWQ / W4A8_AWQ
layers are zero-padded to the features their TensorRT-LLM layer declares before the split
(`trtllm_layers.pad_tensor`; per layer, `Split.multiple`). Config: LLaMAConfig's `attn_bias` / `mlp_bias`.
Per-layer formats (AutoQuantize) make a MIXED_PRECISION checkpoint, as TensorRT-LLM's loader reads it
(tensorrt_llm/models/modeling_utils.py: `PretrainedConfig.from_json_file` loads `quant_cfg.json` beside
config.json into a `LayerQuantConfig`, whose `quantized_layers` give each module name matched by fnmatch
its own `QuantConfig`, no match meaning unquantized; quantization/quantize.py swaps each listed Linear,
`preprocess_weights` prepares each Linear's tensors by its own algorithm). config.json's quantization
keeps only quant_algo and kv_cache_quant_algo, as ModelOpt's export writes it; each Linear's tensors are
those of its own format (plain weights when unquantized); q/k/v must share one format. quant_cfg.json's
names use stage-local layer indices, like the tensors (`quant_cfg` says why).
Checked against the loaders' source, not against a built engine: how the padded GEMMs treat the padded
activations is TensorRT-LLM's. Not handled: vocab padding (a vocab not divisible by tp_size is refused),
NVFP4 KV cache (not a legacy algorithm), FP8_PER_CHANNEL_PER_TOKEN among per-layer formats
(`trtllm_layers.py`), models other than Llama-style (encoder-decoders: `trtllm_encdec.py`).
"""

import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .. import formats as F
from ..modules.quant_linear import QuantLinear
from .atomic import atomic_directory
from .quant_config import MIXED_PRECISION
from .save import Sidecars, write_sidecars
from .trtllm_layers import (
    LEGACY_QUANT_ALGO,
    check_buildable,
    check_legacy_format,
    check_mixed_legacy_format,
    linear_tensors,
    merge_qkv,
    padding_multiple,
)
from .trtllm_shard import COLUMN, ROW, Split, shard_rank, split_rule, stage_of
from .unified import plan_export

logger = logging.getLogger(__name__)

# HF leaf -> (TensorRT-LLM module, parallel style); q/k/v become one attention.qkv.
LINEARS = {"self_attn.o_proj": ("attention.dense", ROW), "mlp.gate_proj": ("mlp.fc", COLUMN),
           "mlp.up_proj": ("mlp.gate", COLUMN), "mlp.down_proj": ("mlp.proj", ROW)}
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


LayerFormat = Tuple[F.Format, Optional[int]]  # (format, group size) of one Linear

# exclude_modules when lm_head is quantized: TensorRT-LLM's own defaults without '*lm_head'. Not []: older
# releases replace an empty list by those defaults (tensorrt_llm/quantization/quantize.py, quantize_layers:
# `quant_config.exclude_modules or [...]`), which would exclude the quantized lm_head; newer ones keep it.
QUANTIZED_LM_HEAD_EXCLUDES = ["*router", "*vocab_embedding", "*position_embedding", "*block_embedding",
                              "*shared_expert_gate"]


def model_formats(model: nn.Module) -> Dict[str, LayerFormat]:
    """{qformat name: (Format, group size)} of the model's quantized Linears; ValueError when there are none."""
    formats = {m.fmt.name: (m.fmt, m.group_size) for m in model.modules() if isinstance(m, QuantLinear)}
    if not formats:
        raise ValueError(f"{type(model).__name__} has no quantized layer; quantize it before exporting")
    return formats


def _check_model(model: nn.Module, formats: Dict[str, LayerFormat]) -> None:
    """ValueError unless every format has a legacy algorithm and `model` is a Llama-style decoder. With one
    format, config.json names no layers, so every decoder Linear must be quantized; per-layer formats
    (MIXED_PRECISION) list the quantized Linears and leave the rest in full precision."""
    mixed = len(formats) > 1
    for fmt, _ in formats.values():
        (check_mixed_legacy_format if mixed else check_legacy_format)(fmt)
    names = dict(model.named_modules())
    needed = ["model.embed_tokens", "model.norm", "lm_head", "model.layers.0.input_layernorm",
              "model.layers.0.post_attention_layernorm"] + [f"model.layers.0.{leaf}" for leaf in (*QKV, *LINEARS)]
    missing = [name for name in needed if name not in names]
    if missing:
        raise ValueError(f"the legacy TensorRT-LLM export handles Llama-style decoders; {type(model).__name__} "
                         f"has no {missing}")
    plain = [n for n, m in names.items() if n.startswith("model.layers.") and isinstance(m, nn.Linear)]
    if plain and not mixed:
        raise ValueError(f"the legacy export needs every decoder Linear quantized; unquantized: {plain[:4]}")


def legacy_state_dict(model: nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, Split]]:
    """(unsharded, unpadded legacy tensors, {name: how it is split across ranks}). Each Linear is written in
    its own format (`module.fmt`; an nn.Linear as its plain weight), which is all per-layer formats need here."""
    _check_model(model, model_formats(model))
    tensors, rules = {}, {}

    def put(prefix, layer_tensors, style, sizes=None, features=None, multiple=None):
        for key, value in layer_tensors.items():
            tensors[f"{prefix}.{key}"] = value
            rule = split_rule(key, value, style, sizes)
            rules[f"{prefix}.{key}"] = rule._replace(features=features, multiple=multiple)

    def put_linear(name, linears, style):
        found = linear_format(name, linears)
        fmt = found[0] if found else None
        parts = [linear_tensors(m, fmt) for m in linears]
        merged = merge_qkv(parts, fmt) if len(parts) > 1 else parts[0]
        sizes = tuple(m.out_features for m in linears) if len(linears) > 1 else None
        put(name, merged, style, sizes, _features(linears) if found else None,
            padding_multiple(fmt, found[1], 1) if found else None)

    put("transformer.vocab_embedding", {"weight": model.model.embed_tokens.weight.detach()}, COLUMN)
    linears = legacy_linears(model)
    for i, layer in enumerate(model.model.layers):
        prefix = f"transformer.layers.{i}"
        put(f"{prefix}.input_layernorm", {"weight": layer.input_layernorm.weight.detach()}, None)
        put(f"{prefix}.post_layernorm", {"weight": layer.post_attention_layernorm.weight.detach()}, None)
        for name in [f"{prefix}.attention.qkv"] + [f"{prefix}.{legacy}" for legacy, _ in LINEARS.values()]:
            put_linear(name, *linears[name])
        kv = [getattr(layer.self_attn.k_proj, "k_scale", None), getattr(layer.self_attn.v_proj, "v_scale", None)]
        if kv[0] is not None:
            put(f"{prefix}.attention", {"kv_cache_scaling_factor": torch.maximum(*kv).reshape(1).float()}, None)
    put("transformer.ln_f", {"weight": model.model.norm.weight.detach()}, None)
    put_linear("lm_head", *linears["lm_head"])
    return tensors, rules


def legacy_linears(model: nn.Module) -> Dict[str, Tuple[List[nn.Module], str]]:
    """{TensorRT-LLM Linear name (global layer index): (its HF Linears, parallel style)}; q/k/v are one qkv."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        out[f"transformer.layers.{i}.attention.qkv"] = ([layer.get_submodule(leaf) for leaf in QKV], COLUMN)
        for leaf, (name, style) in LINEARS.items():
            out[f"transformer.layers.{i}.{name}"] = ([layer.get_submodule(leaf)], style)
    out["lm_head"] = ([model.lm_head], COLUMN)
    return out


def linear_format(name: str, linears: List[nn.Module]) -> Optional[LayerFormat]:
    """(Format, group size) of one legacy Linear, None when unquantized. q/k/v become one GEMM with one
    format (AutoQuantize decides them together), so q/k/v in different formats are a ValueError."""
    found = [(m.fmt, m.group_size) if isinstance(m, QuantLinear) else None for m in linears]
    if any(f != found[0] for f in found):
        shown = [(f[0].name + (f" group {f[1]}" if f[1] else "")) if f else "unquantized" for f in found]
        raise ValueError(f"{name}: q_proj, k_proj, v_proj are {shown}; TensorRT-LLM runs them as one GEMM, which "
                         "takes one format. Quantize them alike (auto_quantize decides them together)")
    return found[0]


def _features(linears) -> tuple:
    """(N, K) of one Linear, or of q/k/v merged along N."""
    return sum(m.out_features for m in linears), linears[0].in_features


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
    fmt, kv = plan.fmt, plan.kv_format.kv_cache_quant_algo if plan.kv_format else None
    if plan.layer_formats:  # the per-layer fields go to quant_cfg.json; ModelOpt's export keeps these two here
        return {"quant_algo": MIXED_PRECISION, "kv_cache_quant_algo": kv}
    return {"quant_algo": LEGACY_QUANT_ALGO[fmt.name], "kv_cache_quant_algo": kv,
            "group_size": plan.group_size if fmt.weight in (F.INT4, F.NVFP4) else None,
            "has_zero_point": False, "pre_quant_scale": fmt.pre_quant_scale,  # every Linear has the factor
            "exclude_modules": QUANTIZED_LM_HEAD_EXCLUDES if isinstance(model.lm_head, QuantLinear) else ["lm_head"]}


def quant_cfg(model: nn.Module, plan, pp_size: int) -> dict:
    """quant_cfg.json of a MIXED_PRECISION checkpoint: the QuantConfig fields of each quantized legacy Linear by
    name; an unquantized one is not listed (LayerQuantConfig then gives it no quantization).

    Names carry stage-local layer indices, like the rank files' tensors (`stage_of`), not global ones: TensorRT-LLM
    builds a stage's DecoderLayerList as a ModuleList of only its layers, numbered from 0 (models/modeling_utils.py,
    module.py), and quantize.py and preprocess_weights look quant_cfg.json up by those module and tensor names.
    One file serves every rank, so with pp_size > 1 the stages must agree layer by layer (`_local_entries`);
    with pp_size 1 local and global indices are the same.
    """
    return {"quant_algo": MIXED_PRECISION,
            "kv_cache_quant_algo": plan.kv_format.kv_cache_quant_algo if plan.kv_format else None,
            "quantized_layers": {name: e for name, e in _local_entries(model, pp_size).items() if e is not None}}


def _layer_entry(fmt: F.Format, group_size: Optional[int]) -> dict:
    """One Linear's QuantConfig fields, as a single-format config.json has them; group_size only for the formats
    whose layers read it (TensorRT-LLM's default stands for the others)."""
    grouped = {"group_size": group_size} if fmt.weight in (F.INT4, F.NVFP4) else {}
    return {"quant_algo": LEGACY_QUANT_ALGO[fmt.name], **grouped, "has_zero_point": False,
            "pre_quant_scale": fmt.pre_quant_scale}


def _local_entries(model: nn.Module, pp_size: int) -> Dict[str, Optional[dict]]:
    """{stage-local legacy Linear name: its entry, None if unquantized}; ValueError when stages differ in one."""
    per_stage, entries, first = model.config.num_hidden_layers // pp_size, {}, {}
    for name, (linears, _) in legacy_linears(model).items():
        found = linear_format(name, linears)
        entry, local = _layer_entry(*found) if found else None, stage_of(name, per_stage, pp_size)[1]
        if local in entries and entries[local] != entry:
            shown = [e["quant_algo"] if e else "unquantized" for e in (entries[local], entry)]
            raise ValueError(f"pp_size={pp_size}: one quant_cfg.json serves every pipeline stage and TensorRT-LLM "
                             f"names layers by their index within the stage, so {first[local]} ({shown[0]}) and "
                             f"{name} ({shown[1]}) would both be {local}. Use pp_size=1, or target 'modelopt'")
        entries.setdefault(local, entry)
        first.setdefault(local, name)
    return entries


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

    if getattr(model.config, "is_encoder_decoder", False):  # encoder/ + decoder/ checkpoints
        from .trtllm_encdec import save_trtllm_encdec

        return save_trtllm_encdec(model, export_dir, config, tp_size, pp_size, sidecars)
    plan = plan_export(model, config)
    if plan.kv_format is not None and plan.kv_format.values != F.FP8:
        raise ValueError(f"the legacy TensorRT-LLM checkpoint has an FP8 or no KV cache, not {plan.kv_format.name!r}; "
                         "use target='trtllm' (unified checkpoint) for an NVFP4 KV cache")
    tensors, rules = legacy_state_dict(model)
    _check_parallel(model.config, tp_size, pp_size)
    for fmt, group_size in model_formats(model).values():
        check_buildable(model, fmt, group_size, tp_size)
    config_json = json.dumps(legacy_config(model, plan, tp_size, pp_size), indent=2) + "\n"
    layers_json = json.dumps(quant_cfg(model, plan, pp_size), indent=2) + "\n" if plan.layer_formats else None
    with atomic_directory(export_dir) as staging:
        (staging / "config.json").write_text(config_json, encoding="utf-8")
        if layers_json is not None:  # PretrainedConfig.from_json_file reads it from beside config.json
            (staging / "quant_cfg.json").write_text(layers_json, encoding="utf-8")
        for rank in range(tp_size * pp_size):  # one rank in memory at a time
            rank_tensors = shard_rank(tensors, rules, model.config.num_hidden_layers, tp_size, pp_size, rank)
            save_file(rank_tensors, str(staging / f"rank{rank}.safetensors"), metadata={"format": "pt"})
        write_sidecars(model, staging, Path(export_dir), "trtllm-legacy", sidecars)  # trtllm-serve --tokenizer <dir>
    quant_algo = MIXED_PRECISION if plan.layer_formats else plan.fmt.quant_algo
    logger.info("wrote a legacy TensorRT-LLM %s checkpoint (tp=%d, pp=%d) to %s", quant_algo, tp_size, pp_size,
                export_dir)
