"""What `trtllm-build` requires of a legacy TensorRT-LLM checkpoint's rank files, written from TensorRT-LLM's
source (NVIDIA/TensorRT-LLM), independently of our exporter.

`required_tensors(config, rank)` gives {tensor name: (allowed dtypes, shape)} for the rank file of a
Llama-style checkpoint described by its config.json. The chain it encodes:
- tensorrt_llm/models/modeling_utils.py: `PretrainedModel.from_checkpoint` loads `rank{N}.safetensors`,
  runs `preprocess_weights` (which renames or derives some tensors per quant_algo, listed below), then
  `load` raises "Required but not provided tensors" for any missing parameter; tensorrt_llm/parameter.py
  asserts each shape (a dtype mismatch only warns, and changes the engine's dtype: we require the
  declared dtype, or one preprocess casts from).
- tensorrt_llm/quantization/quantize.py (`quantize`): the layer class each Linear becomes per quant_algo;
  W8A8_SQ_PER_CHANNEL is not in mode.py's W8A8_SQ_PLUGIN_LIST, so it takes `smooth_quantize_ootb`.
- tensorrt_llm/quantization/layers.py: the parameters of FP8Linear, Fp8RowwiseLinear,
  Int8SmoothQuantLinear, WeightOnlyGroupwiseQuantLinear (features padded to a multiple of
  max(64 or 128 for W4A8, group) x tp) and FP4Linear, and their Row variants.
- tensorrt_llm/layers/linear.py: ColumnLinear holds out_features / tp rows, RowLinear in_features / tp
  columns; layers/embedding.py: a parallel embedding (sharding dim 0) holds ceil(vocab / tp) rows.
- tensorrt_llm/mapping.py: layers split evenly over pipeline stages; the embedding lives on the first,
  ln_f and lm_head on the last. tensorrt_llm/quantization/functional.py (validate_group_size): W4A8 takes
  group 128 only. tensorrt_llm/models/llama/config.py: LLaMAConfig reads attn_bias and mlp_bias.
"""

import math

import torch

F32, I8, U8, FP8 = torch.float32, torch.int8, torch.uint8, torch.float8_e4m3fn
MODEL_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
AWQ = ("W4A16_AWQ", "W4A8_AWQ")


def _local(algo: str, out_features: int, in_features: int, group, tp: int, row: bool) -> tuple:
    """(out, in) features one rank's layer holds, after the padding WeightOnlyGroupwiseQuantLinear applies."""
    if algo in AWQ:
        multiple = max(128 if algo == "W4A8_AWQ" else 64, group) * tp
        out_features = math.ceil(out_features / multiple) * multiple
        in_features = math.ceil(in_features / multiple) * multiple
    return (out_features, in_features // tp) if row else (out_features // tp, in_features)


def linear(algo, out_features: int, in_features: int, dtype, tp: int, row: bool, group=None, bias=False) -> dict:
    """{suffix: (dtypes, shape)} of one Linear as the checkpoint must hold it (before preprocess_weights)."""
    out_l, in_l = _local(algo, out_features, in_features, group, tp, row)
    if algo is None:  # an excluded layer stays a plain (Row/Column)Linear
        spec = {"weight": ({dtype}, (out_l, in_l))}
    elif algo == "FP8":  # FP8Linear / FP8RowLinear
        spec = {"weight": ({FP8}, (out_l, in_l)), "weights_scaling_factor": ({F32}, (1,)),
                "activation_scaling_factor": ({F32}, (1,))}
    elif algo == "FP8_PER_CHANNEL_PER_TOKEN":  # Fp8RowwiseLinear / Fp8RowwiseRowLinear
        spec = {"weight": ({FP8}, (out_l, in_l)), "per_channel_scale": ({F32}, (out_l,))}
    elif algo == "W8A8_SQ_PER_CHANNEL":  # Int8SmoothQuantLinear / Int8SmoothQuantRowLinear
        spec = {"weight": ({I8}, (out_l, in_l)), "weights_scaling_factor": ({F32}, (out_l,)),
                "activation_scaling_factor": ({F32}, (1,)), "prequant_scaling_factor": ({dtype}, (in_l,))}
    elif algo in AWQ:  # WeightOnlyGroupwiseQuant(Row)Linear; preprocess transposes weight and scales
        assert algo != "W4A8_AWQ" or group == 128, "validate_group_size: W4A8_AWQ with group 64 not implemented"
        spec = {"weight": ({I8}, (out_l // 2, in_l)), "weights_scaling_factor": ({F32, dtype}, (out_l, in_l // group)),
                "prequant_scaling_factor": ({dtype}, (in_l,))}
        if algo == "W4A8_AWQ":  # preprocess turns these two into alpha
            spec.update(activation_scaling_factor=({F32}, (1,)), weights_scaling_factor_2=({F32}, (1,)))
    elif algo == "NVFP4":  # FP4Linear / FP4RowLinear; preprocess derives the interleaved scales and alpha
        assert in_l % 16 == 0, "FP4Linear: input features must be a multiple of 16"
        spec = {"weight": ({U8}, (out_l, in_l // 2)), "weights_scaling_factor": ({FP8}, (out_l, in_l // 16)),
                "weights_scaling_factor_2": ({F32}, (1,)), "activation_scaling_factor": ({F32}, (1,))}
    else:
        raise ValueError(f"no TensorRT-LLM legacy layer spec for quant_algo {algo!r}")
    if bias:
        spec["bias"] = ({dtype}, (out_l,))
    return spec


def _layer(config: dict, algo, dtype, tp: int, group) -> dict:
    """{name within transformer.layers.{i}: (dtypes, shape)} of one decoder layer."""
    heads, kv_heads, head = config["num_attention_heads"], config["num_key_value_heads"], config["head_size"]
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    attn_bias, mlp_bias = config["attn_bias"], config["mlp_bias"]
    qkv_out = (heads + 2 * kv_heads) * head
    linears = {"attention.qkv": linear(algo, qkv_out, hidden, dtype, tp, False, group, attn_bias),
               "attention.dense": linear(algo, hidden, heads * head, dtype, tp, True, group, attn_bias),
               "mlp.fc": linear(algo, inter, hidden, dtype, tp, False, group, mlp_bias),
               "mlp.gate": linear(algo, inter, hidden, dtype, tp, False, group, mlp_bias),
               "mlp.proj": linear(algo, hidden, inter, dtype, tp, True, group, mlp_bias)}
    out = {f"{module}.{suffix}": spec for module, specs in linears.items() for suffix, spec in specs.items()}
    out.update({"input_layernorm.weight": ({dtype}, (hidden,)), "post_layernorm.weight": ({dtype}, (hidden,))})
    if config["quantization"]["kv_cache_quant_algo"]:  # quantize.py kv_cache_quantize
        out["attention.kv_cache_scaling_factor"] = ({F32}, (1,))
    return out


def required_tensors(config: dict, rank: int) -> dict:
    """{name: (allowed dtypes, shape)} that rank `rank` of a LlamaForCausalLM checkpoint must hold."""
    assert config["architecture"] == "LlamaForCausalLM"
    assert "attn_bias" in config and "mlp_bias" in config and "bias" not in config  # LLaMAConfig's fields
    quant, mapping = config["quantization"], config["mapping"]
    algo, group, dtype = quant["quant_algo"], quant["group_size"], MODEL_DTYPES[config["dtype"]]
    assert quant["pre_quant_scale"] or algo not in AWQ  # else the layers declare no prequant_scaling_factor
    tp, pp = mapping["tp_size"], mapping["pp_size"]
    pp_rank = rank // tp  # rank = pp_rank * tp + tp_rank (mapping.py); every tp rank holds the same shapes
    per_stage = config["num_hidden_layers"] // pp
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    out = {}
    for i in range(per_stage):
        out.update({f"transformer.layers.{i}.{k}": v for k, v in _layer(config, algo, dtype, tp, group).items()})
    if pp_rank == 0:
        out["transformer.vocab_embedding.weight"] = ({dtype}, (math.ceil(vocab / tp), hidden))
    if pp_rank == pp - 1:
        out["transformer.ln_f.weight"] = ({dtype}, (hidden,))
        lm_algo = None if "lm_head" in (quant["exclude_modules"] or []) else algo
        out.update({f"lm_head.{k}": v for k, v in linear(lm_algo, vocab, hidden, dtype, tp, False, group).items()})
    return out


def mismatches(config: dict, rank: int, tensors: dict) -> list:
    """Human-readable differences between a rank file's tensors and what trtllm-build requires; [] if none."""
    required = required_tensors(config, rank)
    problems = [f"missing {name}" for name in sorted(set(required) - set(tensors))]
    problems += [f"not a parameter: {name}" for name in sorted(set(tensors) - set(required))]
    for name in sorted(set(required) & set(tensors)):
        dtypes, shape = required[name]
        value = tensors[name]
        if value.dtype not in dtypes or tuple(value.shape) != shape:
            problems.append(f"{name}: {value.dtype} {tuple(value.shape)}, needs {sorted(map(str, dtypes))} {shape}")
    return problems
