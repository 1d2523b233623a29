"""The legacy TensorRT-LLM checkpoint of an encoder-decoder model (T5, BART): `encoder/` and `decoder/`, each a
config.json + rank0.safetensors, built with `trtllm-build --checkpoint_dir <dir>/encoder` (and `<dir>/decoder`).

Verified (NVIDIA/TensorRT-LLM tensorrt_llm/models/enc_dec/model.py, the version with `EncDecTransformer`:
EncoderModel / DecoderModel hold `transformer.{vocab_embedding, position_embedding, ln_embed, layers, ln_f}`,
DecoderModel also `lm_head` and, with relative attention and not use_implicit_relative_attention, a top-level
`rel_attn_table` (heads, num_buckets); encoder layers `attention` (BertAttention) + `attention_layernorm`, decoder
layers `self_attention` + `self_attention_layernorm`, `cross_attention` + `cross_attention_layernorm`, both
`mlp.{fc, gate, proj}` + `mlp_layernorm`; tensorrt_llm/layers/attention.py: BertAttention declares `rel_attn_table`
per layer when relative, Attention only with use_implicit_relative_attention, so the decoder gets the top-level
table alone; examples/models/core/enc_dec/convert_checkpoint.py + helper.py: q, k, v concatenated along the output
dim (also for cross attention, whose qkv weights and activation factor also project the encoder output:
models/modeling_utils.py optimize_cross_qkv; hence one factor, the max), T5 wi / wi_0 -> mlp.fc (activated), wi_1 ->
mlp.gate, wo -> mlp.proj, table = block 0's relative_attention_bias.weight.T for every layer, BART
position_embedding = embed_positions.weight[2:], layernorm_embedding -> ln_embed, q_scaling 1/sqrt(d_kv) for T5 (its
attention is unscaled), 1 for BART, rescale_before_lm_head = T5's decoder-output scaling (transformers 5:
`scale_decoder_outputs`), config fields and encoder/ decoder/ layout; enum values from ModelOpt
modelopt/torch/export/tensorrt_llm_type.py; ModelOpt model_config_export.py / tensorrt_llm_utils.py write the same
layout, with BART post-layernorm). Per Linear the tensors are `trtllm_layers.py`'s FP8 ones.
Formats: TensorRT-LLM builds and tests enc-dec PTQ only as FP8 (examples/models/core/enc_dec/README.md "FP8
Post-Training Quantization", tests/integration/defs/examples/test_enc_dec.py: qformat fp8), so other qformats are
refused. Unquantized Linears (T5 keeps `wo` in fp32; lm_head) are listed in `exclude_modules`: quantization/
quantize.py's quantize_layers matches them with fnmatchcase against these module names, and an empty list means its
defaults (which exclude '*lm_head'), so a quantized lm_head is refused. Plain tensors are cast to the checkpoint
dtype, as the converter does. Not handled: tp/pp > 1, a quantized KV cache (T5 has no k_proj to calibrate; BART's
cross-attention KV factors are not verified), Whisper (its legacy checkpoint takes a `WhisperEncoder` with
convolutions, quantized only weight-only by examples/models/core/whisper/convert_checkpoint.py, from float weights).
"""

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch import nn

from ..modules.quant_linear import QuantLinear
from .atomic import atomic_directory
from .save import Sidecars, write_sidecars
from .trtllm_layers import LEGACY_QUANT_ALGO, linear_tensors, merge_qkv
from .trtllm_legacy import linear_format, model_formats
from .unified import plan_export

logger = logging.getLogger(__name__)

FAMILIES = {"T5ForConditionalGeneration": "t5", "BartForConditionalGeneration": "bart"}
ENC_DEC_FORMATS = ("fp8",)
ARCHITECTURES = {"encoder": "EncoderModel", "decoder": "DecoderModel"}
LAYERNORM, RMSNORM, PRE_LAYERNORM, POST_LAYERNORM, MLP, GATED_MLP = 0, 1, 0, 1, 0, 1  # tensorrt_llm.functional


@dataclass
class Component:
    """One of encoder / decoder in TensorRT-LLM's names: plain tensors, and each Linear's HF modules (q, k, v
    for a qkv)."""

    tensors: Dict[str, torch.Tensor] = field(default_factory=dict)
    linears: Dict[str, List[nn.Module]] = field(default_factory=dict)

    def norm(self, name: str, module: nn.Module) -> None:
        self.tensors[f"{name}.weight"] = module.weight
        if getattr(module, "bias", None) is not None:
            self.tensors[f"{name}.bias"] = module.bias


def model_family(model: nn.Module) -> str:
    """"t5" or "bart"; ValueError naming what to use for other encoder-decoders."""
    name = type(model).__name__
    if name.startswith("Whisper"):
        raise ValueError(f"{name}: TensorRT-LLM's legacy Whisper checkpoint (a WhisperEncoder with convolutions) is "
                         "quantized only weight-only by TensorRT-LLM's own converter; export Whisper with target "
                         "'modelopt' (the unified checkpoint)")
    if name not in FAMILIES:
        raise ValueError(f"the legacy TensorRT-LLM encoder-decoder export handles {', '.join(FAMILIES)}, not "
                         f"{name}; use target 'modelopt' (the unified checkpoint)")
    return FAMILIES[name]


def check_encdec(model: nn.Module, config, tp_size: int, pp_size: int) -> str:
    """The model's family, or a ValueError for what the legacy enc-dec checkpoint cannot hold truthfully."""
    family = model_family(model)
    if (tp_size, pp_size) != (1, 1):
        raise ValueError(f"tp_size={tp_size}, pp_size={pp_size}: the legacy TensorRT-LLM encoder-decoder export "
                         "writes tp_size=1, pp_size=1 only; export with tp_size=1, pp_size=1, or target 'modelopt'")
    names = sorted(model_formats(model))
    if names != list(ENC_DEC_FORMATS):
        raise ValueError(f"the legacy TensorRT-LLM encoder-decoder checkpoint takes qformat "
                         f"{' or '.join(map(repr, ENC_DEC_FORMATS))} (the one TensorRT-LLM builds for EncoderModel / "
                         f"DecoderModel), not {names}; use target 'modelopt' (the unified checkpoint)")
    plan = plan_export(model, config)  # calibration and fused-scale checks
    if plan.kv_format is not None:
        raise ValueError(f"kv_cache_qformat {plan.kv_format.name!r}: the legacy TensorRT-LLM encoder-decoder export "
                         "writes an unquantized KV cache only; use kv_cache_qformat='none' or target 'modelopt'")
    if isinstance(model.lm_head, QuantLinear):
        raise ValueError("a quantized lm_head cannot be written: TensorRT-LLM's enc-dec quantization excludes "
                         "lm_head by default; quantize with lm_head excluded (the default) or use target 'modelopt'")
    bias = getattr(model, "final_logits_bias", None)
    if bias is not None and bool(torch.any(bias != 0)):
        raise ValueError(f"{type(model).__name__} has a nonzero final_logits_bias, which TensorRT-LLM's "
                         "DecoderModel does not have; use target 'modelopt'")
    return family


def _t5(model: nn.Module, component: str) -> Component:
    stack, decoder = getattr(model, component), component == "decoder"
    attn = "self_attention" if decoder else "attention"
    table = stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight.T  # (heads, buckets)
    out = Component({"transformer.vocab_embedding.weight": stack.embed_tokens.weight})
    out.norm("transformer.ln_f", stack.final_layer_norm)
    for i, block in enumerate(stack.block):
        prefix, first, ff = f"transformer.layers.{i}", block.layer[0], block.layer[-1]
        _attention(out, f"{prefix}.{attn}", first.SelfAttention, ("q", "k", "v", "o"))
        out.norm(f"{prefix}.{attn}_layernorm", first.layer_norm)
        if decoder:
            _attention(out, f"{prefix}.cross_attention", block.layer[1].EncDecAttention, ("q", "k", "v", "o"))
            out.norm(f"{prefix}.cross_attention_layernorm", block.layer[1].layer_norm)
        else:
            out.tensors[f"{prefix}.attention.rel_attn_table"] = table
        dense = ff.DenseReluDense
        gated = hasattr(dense, "wi_0")  # T5 v1.1 / Flan: act(wi_0 x) * wi_1 x; TensorRT-LLM activates mlp.fc
        out.linears[f"{prefix}.mlp.fc"] = [dense.wi_0 if gated else dense.wi]
        if gated:
            out.linears[f"{prefix}.mlp.gate"] = [dense.wi_1]
        out.linears[f"{prefix}.mlp.proj"] = [dense.wo]
        out.norm(f"{prefix}.mlp_layernorm", ff.layer_norm)
    if decoder:
        out.tensors["rel_attn_table"] = table
        out.linears["lm_head"] = [model.lm_head]
    return out


def _bart(model: nn.Module, component: str) -> Component:
    stack, decoder = getattr(model.model, component), component == "decoder"
    attn = "self_attention" if decoder else "attention"
    positions = stack.embed_positions  # HF offsets position ids by 2; TensorRT-LLM counts from 0
    out = Component({"transformer.vocab_embedding.weight": stack.embed_tokens.weight,
                     "transformer.position_embedding.weight": positions.weight[positions.offset:]})
    out.norm("transformer.ln_embed", stack.layernorm_embedding)
    projections = ("q_proj", "k_proj", "v_proj", "out_proj")
    for i, layer in enumerate(stack.layers):
        prefix = f"transformer.layers.{i}"
        _attention(out, f"{prefix}.{attn}", layer.self_attn, projections)
        out.norm(f"{prefix}.{attn}_layernorm", layer.self_attn_layer_norm)
        if decoder:
            _attention(out, f"{prefix}.cross_attention", layer.encoder_attn, projections)
            out.norm(f"{prefix}.cross_attention_layernorm", layer.encoder_attn_layer_norm)
        out.linears[f"{prefix}.mlp.fc"] = [layer.fc1]
        out.linears[f"{prefix}.mlp.proj"] = [layer.fc2]
        out.norm(f"{prefix}.mlp_layernorm", layer.final_layer_norm)
    if decoder:
        out.linears["lm_head"] = [model.lm_head]
    return out


def _attention(out: Component, prefix: str, attention: nn.Module, names: Tuple[str, str, str, str]) -> None:
    out.linears[f"{prefix}.qkv"] = [getattr(attention, n) for n in names[:3]]
    out.linears[f"{prefix}.dense"] = [getattr(attention, names[3])]


def checkpoint_dtype(model: nn.Module) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype


def encdec_state_dict(model: nn.Module, component: str) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """(rank0 tensors of `component`, names of its unquantized Linears for exclude_modules). Each tensor is its
    own contiguous copy: safetensors refuses shared storage, and the relative table serves every layer."""
    parts = {"t5": _t5, "bart": _bart}[model_family(model)](model, component)
    dtype, exclude = checkpoint_dtype(model), []
    tensors = {name: t.detach().to(dtype) for name, t in parts.tensors.items()}
    for name, linears in parts.linears.items():
        found = linear_format(name, linears)  # q, k, v in one format, or a ValueError
        fmt = found[0] if found else None
        merged = merge_qkv([linear_tensors(m, fmt) for m in linears], fmt) if len(linears) > 1 else \
            linear_tensors(linears[0], fmt)
        for key, value in merged.items():
            plain = key in ("weight", "bias") and value.dtype in (torch.float32, torch.float16, torch.bfloat16)
            tensors[f"{name}.{key}"] = value.to(dtype) if plain else value  # FP8 codes and fp32 factors stay
        if fmt is None:
            exclude.append(name)
    return {n: t.clone(memory_format=torch.contiguous_format) for n, t in tensors.items()}, exclude


def _t5_fields(model: nn.Module, decoder: bool) -> dict:
    c = model.config
    return {"num_hidden_layers": c.num_decoder_layers if decoder else c.num_layers,
            "num_attention_heads": c.num_heads, "head_size": c.d_kv, "intermediate_size": c.d_ff,
            "norm_epsilon": c.layer_norm_epsilon, "hidden_act": c.dense_act_fn,
            "position_embedding_type": "relative", "max_position_embeddings": getattr(c, "n_positions", 512),
            "has_position_embedding": False, "has_embedding_layernorm": False, "has_embedding_scale": False,
            "layernorm_type": RMSNORM, "layernorm_position": PRE_LAYERNORM, "has_attention_qkvo_bias": False,
            "has_mlp_bias": False, "has_model_final_layernorm": True,
            "mlp_type": GATED_MLP if c.is_gated_act else MLP, "gated_act": c.is_gated_act,
            "q_scaling": 1 / math.sqrt(c.d_kv),  # T5 does not scale q.k; TensorRT-LLM divides by q_scaling*sqrt(d)
            "relative_attention": True, "num_buckets": c.relative_attention_num_buckets,
            "max_distance": c.relative_attention_max_distance,
            "rescale_before_lm_head": getattr(c, "scale_decoder_outputs", c.tie_word_embeddings),
            "encoder_hidden_size": c.d_model, "encoder_num_heads": c.num_heads, "encoder_head_size": c.d_kv}


def _bart_fields(model: nn.Module, decoder: bool) -> dict:
    c, side = model.config, "decoder" if decoder else "encoder"
    heads = getattr(c, f"{side}_attention_heads")
    return {"num_hidden_layers": getattr(c, f"{side}_layers"), "num_attention_heads": heads,
            "head_size": c.d_model // heads, "intermediate_size": getattr(c, f"{side}_ffn_dim"),
            "norm_epsilon": getattr(model.model, side).layernorm_embedding.eps,
            "hidden_act": c.activation_function, "position_embedding_type": "learned_absolute",
            "max_position_embeddings": c.max_position_embeddings, "has_position_embedding": True,
            "has_embedding_layernorm": True, "has_embedding_scale": bool(c.scale_embedding),
            "layernorm_type": LAYERNORM, "layernorm_position": POST_LAYERNORM, "has_attention_qkvo_bias": True,
            "has_mlp_bias": True, "has_model_final_layernorm": False, "mlp_type": MLP, "gated_act": False,
            "q_scaling": 1.0, "relative_attention": False, "num_buckets": 0, "max_distance": 0,
            "rescale_before_lm_head": False, "encoder_hidden_size": c.d_model,
            "encoder_num_heads": c.encoder_attention_heads, "encoder_head_size": c.d_model // c.encoder_attention_heads}


DECODER_ONLY = ("rescale_before_lm_head", "encoder_hidden_size", "encoder_num_heads", "encoder_head_size")


def encdec_config(model: nn.Module, component: str, exclude: List[str]) -> dict:
    """config.json of `component`: the PretrainedConfig fields TensorRT-LLM's enc-dec converter writes."""
    c, decoder = model.config, component == "decoder"
    family = model_family(model)
    fields = (_t5_fields if family == "t5" else _bart_fields)(model, decoder)
    if not decoder:
        fields = {k: v for k, v in fields.items() if k not in DECODER_ONLY}
    config = {"producer": {"name": "hf_ptq_plugin"}, "architecture": ARCHITECTURES[component],
              "dtype": str(checkpoint_dtype(model)).split(".")[1], "logits_dtype": "float32",
              "hidden_size": c.d_model, "vocab_size": c.vocab_size, **fields,
              "num_key_value_heads": fields["num_attention_heads"], "model_type": family,
              "use_parallel_embedding": False, "embedding_sharding_dim": 0,
              "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
              "quantization": {"quant_algo": LEGACY_QUANT_ALGO[ENC_DEC_FORMATS[0]], "kv_cache_quant_algo": None,
                               "exclude_modules": exclude}}
    if decoder:
        config.update(skip_cross_kv=False, use_implicit_relative_attention=False,
                      **{k: getattr(c, k, None) for k in ("decoder_start_token_id", "eos_token_id", "bos_token_id",
                                                          "pad_token_id")})
    return config


def save_trtllm_encdec(model: nn.Module, export_dir, config, tp_size: int = 1, pp_size: int = 1,
                       sidecars: Sidecars = Sidecars()) -> None:
    """Write `<export_dir>/{encoder,decoder}/{config.json,rank0.safetensors}`, tokenizer files and card, atomically."""
    from safetensors.torch import save_file

    check_encdec(model, config, tp_size, pp_size)
    if checkpoint_dtype(model) not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"checkpoint dtype {checkpoint_dtype(model)}: TensorRT-LLM takes float16, bfloat16, float32")
    with atomic_directory(export_dir) as staging:
        for component in ARCHITECTURES:  # one component in memory at a time
            tensors, exclude = encdec_state_dict(model, component)
            (staging / component).mkdir()
            text = json.dumps(encdec_config(model, component, exclude), indent=2) + "\n"
            (staging / component / "config.json").write_text(text, encoding="utf-8")
            save_file(tensors, str(staging / component / "rank0.safetensors"), metadata={"format": "pt"})
        write_sidecars(model, staging, Path(export_dir), "trtllm-legacy", sidecars)
    logger.info("wrote a legacy TensorRT-LLM FP8 encoder-decoder checkpoint to %s (encoder/, decoder/)", export_dir)
