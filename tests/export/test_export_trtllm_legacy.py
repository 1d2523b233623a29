"""Legacy TensorRT-LLM checkpoint: names, merged q/k/v, TP/PP shards that reassemble exactly, config.json.

Reassembly here is written from `docs/modelopt-facts.md` §8 (column-parallel on dim 0 with q/k/v split per
section, row-parallel on dim 1, prequant factors of row-parallel layers on dim 0, the rest replicated;
rank = pp_rank * tp_size + tp_rank; layer indices local to a stage), not from the exporter's rules.
"""

import json

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file

from hf_ptq_plugin import PTQConfig, export_checkpoint, quantize
from hf_ptq_plugin.export.trtllm_legacy import LEGACY_QUANT_ALGO, legacy_state_dict
from hf_ptq_plugin.numerics.fp8 import fp8_quantize

LAYERS, HEAD_DIM, HEADS, KV_HEADS = 2, 32, 4, 2
ROW_PARALLEL = (".attention.dense.", ".mlp.proj.")


def same(a, b):
    """Bitwise equality, also for float8 tensors (torch.equal has no CPU float8 kernel)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.element_size() == 1 else torch.equal(a, b)


def quantized(name, token_ids, kv="none"):
    # Sizes that need no padding at tp=2 (test_trtllm_legacy_loadable.py covers padding): INT4 group 64 on
    # the 128-wide model; W4A8 takes group 128 only, so a 256-wide model (head_dim 64).
    group_size = {"int4_awq": 64, "w4a8_awq": 128}.get(name)
    model = tiny_llama(hidden_size=256, intermediate_size=512) if name == "w4a8_awq" else tiny_llama()
    config = PTQConfig(qformat=name, algorithm="max", kv_cache_qformat=kv, group_size=group_size)
    return quantize(model, config, forward_loop=lambda m: m(token_ids))


def stage_of(name, pp):
    if name.startswith("transformer.layers."):
        index = int(name.split(".")[2])
        per_stage = LAYERS // pp
        return index // per_stage, name.replace(f"layers.{index}.", f"layers.{index % per_stage}.", 1)
    return (0 if "vocab_embedding" in name else pp - 1), name


def reassemble(name, full, pieces, tp):
    """One tensor from its tp pieces, by §8's rules."""
    leaf = name.rsplit(".", 1)[1]
    if full.numel() == 1 or "layernorm" in name or "ln_f" in name or tp == 1:
        assert all(same(p, pieces[0]) for p in pieces)
        return pieces[0]
    if any(part in name for part in ROW_PARALLEL):
        if full.dim() == 2:
            return torch.cat(pieces, dim=1)
        if leaf == "prequant_scaling_factor":
            return torch.cat(pieces, dim=0)
        assert all(same(p, pieces[0]) for p in pieces)  # per-channel scales, bias
        return pieces[0]
    if leaf == "prequant_scaling_factor":
        assert all(same(p, pieces[0]) for p in pieces)
        return pieces[0]
    if ".attention.qkv." in name:
        rows = full.shape[0] // (HEADS + 2 * KV_HEADS)  # rows per head (half for packed INT4)
        per_rank = [HEADS * rows // tp, KV_HEADS * rows // tp, KV_HEADS * rows // tp]
        sections = [p.split(per_rank, dim=0) for p in pieces]
        return torch.cat([torch.cat([s[i] for s in sections], dim=0) for i in range(3)], dim=0)
    return torch.cat(pieces, dim=0)


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("name", ["fp8", "int4_awq", "nvfp4", "w4a8_awq", "int8_sq"])
def test_shards_reassemble_to_the_unsharded_tensors(name, tp, pp, token_ids, tmp_path):
    model = quantized(name, token_ids)
    export_checkpoint(model, tmp_path, target="trtllm-legacy", tp_size=tp, pp_size=pp)
    ranks = {r: load_file(tmp_path / f"rank{r}.safetensors") for r in range(tp * pp)}
    files = ["README.md", "config.json"] + [f"rank{r}.safetensors" for r in ranks]
    assert sorted(p.name for p in tmp_path.iterdir()) == files
    full, _ = legacy_state_dict(model)
    seen = 0
    for tensor_name, value in full.items():
        stage, local = stage_of(tensor_name, pp)
        pieces = [ranks[stage * tp + t][local] for t in range(tp)]
        assert same(reassemble(tensor_name, value, pieces, tp), value), tensor_name
        seen += tp
    assert seen == sum(len(r) for r in ranks.values())  # no tensor in a rank file that is not accounted for


def test_names_and_dtypes_follow_tensorrt_llm(token_ids):
    tensors, _ = legacy_state_dict(quantized("int4_awq", token_ids))
    expected = {"transformer.vocab_embedding.weight", "transformer.ln_f.weight", "lm_head.weight"}
    for i in range(LAYERS):
        p = f"transformer.layers.{i}."
        expected |= {p + "input_layernorm.weight", p + "post_layernorm.weight"}
        for linear in ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj"):
            expected |= {p + linear + s for s in (".weight", ".weights_scaling_factor", ".prequant_scaling_factor")}
    assert set(tensors) == expected
    assert tensors["transformer.layers.0.attention.qkv.weight"].dtype == torch.int8
    assert tensors["transformer.layers.0.attention.qkv.weight"].shape == ((HEADS + 2 * KV_HEADS) * HEAD_DIM // 2, 128)


@pytest.mark.parametrize("name", ["int4_awq", "nvfp4", "int8_sq", "fp8_pc_pt", "w4a8_awq"])
def test_qkv_is_the_exact_concatenation_when_scales_are_per_channel_or_shared(name, token_ids):
    model = quantized(name, token_ids)
    tensors, _ = legacy_state_dict(model)
    attention = model.model.layers[1].self_attn
    parts = (attention.q_proj, attention.k_proj, attention.v_proj)
    qkv = "transformer.layers.1.attention.qkv."
    weight = torch.cat([p.weight for p in parts], dim=0)
    assert same(tensors[qkv + "weight"].view(weight.dtype), weight)
    scale = "per_channel_scale" if name == "fp8_pc_pt" else "weights_scaling_factor"  # Fp8RowwiseLinear's name
    assert torch.equal(tensors[qkv + scale], torch.cat([p.weight_scale for p in parts], dim=0))
    if hasattr(attention.q_proj, "weight_scale_2"):
        assert torch.equal(tensors[qkv + "weights_scaling_factor_2"], attention.q_proj.weight_scale_2.reshape(1))
    # gate_proj (the activated branch) is TensorRT-LLM's mlp.fc, up_proj its mlp.gate.
    mlp = model.model.layers[1].mlp
    assert same(tensors["transformer.layers.1.mlp.fc.weight"].view(mlp.gate_proj.weight.dtype), mlp.gate_proj.weight)


def test_fp8_qkv_is_requantized_to_the_largest_weight_scale(token_ids):
    model = quantized("fp8", token_ids)
    attention = model.model.layers[0].self_attn
    parts = (attention.q_proj, attention.k_proj, attention.v_proj)
    # Our own siblings share one scale; a checkpoint from elsewhere may not: give k_proj a larger one.
    k_proj = attention.k_proj
    with torch.no_grad():
        dense = k_proj.weight.float() * k_proj.weight_scale
        k_proj.weight_scale.mul_(2)
        k_proj.weight.copy_((dense / k_proj.weight_scale).to(k_proj.weight.dtype))
    tensors, _ = legacy_state_dict(model)
    qkv = "transformer.layers.0.attention.qkv."
    s_max = torch.stack([p.weight_scale for p in parts]).amax()
    assert torch.equal(tensors[qkv + "weights_scaling_factor"], s_max.reshape(1))
    assert torch.equal(tensors[qkv + "activation_scaling_factor"],
                       torch.stack([p.input_scale for p in parts]).amax().reshape(1))
    assert sum(not torch.equal(p.weight_scale, s_max) for p in parts) >= 1  # a member really is requantized
    rows = tensors[qkv + "weight"].split([p.out_features for p in parts], dim=0)
    for part, q in zip(parts, rows):
        w = part.weight.float() * part.weight_scale  # what the member held
        if torch.equal(part.weight_scale, s_max):
            assert same(q, part.weight)  # untouched bytes
        else:
            assert same(q, fp8_quantize(w / s_max, torch.tensor(1.0)))  # one rounding
        # Within half an FP8 step of the original (3 mantissa bits: relative 2^-4, plus subnormals).
        assert ((q.float() * s_max - w).abs() <= w.abs() * 2**-4 + s_max * 2**-10).all()


def test_config_json_carries_the_fields_trtllm_build_reads(token_ids, tmp_path):
    model = quantized("w4a8_awq", token_ids, kv="fp8")
    export_checkpoint(model, tmp_path, target="trtllm-legacy", tp_size=2, pp_size=2)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "LlamaForCausalLM" and config["dtype"] == "float32"
    assert {k: config[k] for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
                                   "intermediate_size", "vocab_size", "head_size", "hidden_act")} == {
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 256,
        "intermediate_size": 512, "vocab_size": 320, "head_size": 64, "hidden_act": "silu"}
    # LLaMAConfig reads attn_bias / mlp_bias (TensorRT-LLM tensorrt_llm/models/llama/config.py), not bias.
    assert config["attn_bias"] is False and config["mlp_bias"] is False and "bias" not in config
    assert config["position_embedding_type"] == "rope_gpt_neox" and config["rotary_base"] == 10000.0
    assert config["mapping"] == {"world_size": 4, "tp_size": 2, "pp_size": 2}
    assert config["quantization"] == {"quant_algo": "W4A8_AWQ", "kv_cache_quant_algo": "FP8", "group_size": 128,
                                      "has_zero_point": False, "pre_quant_scale": True, "exclude_modules": ["lm_head"]}
    rank3 = load_file(tmp_path / "rank3.safetensors")
    attention = model.model.layers[1].self_attn
    assert torch.equal(rank3["transformer.layers.0.attention.kv_cache_scaling_factor"],
                       torch.maximum(attention.k_proj.k_scale, attention.v_proj.v_scale).reshape(1))


@pytest.mark.parametrize("name, kwargs, message", [
    ("mxfp8", {}, r"qformat 'mxfp8' has no legacy TensorRT-LLM checkpoint; valid: fp8, fp8_pc_pt"),
    ("int8_wo", {}, r"qformat 'int8_wo' has no legacy TensorRT-LLM checkpoint: trtllm-build re-quantizes"),
    ("fp8_pc_pt", {"tp_size": 3}, r"num_attention_heads=4 cannot be split into tp_size=3"),
    ("fp8_pc_pt", {"pp_size": 3}, r"2 layers cannot be split into pp_size=3"),
])
def test_unsupported_layouts_are_errors_and_write_nothing(name, kwargs, message, token_ids, tmp_path):
    with pytest.raises(ValueError, match=message):
        export_checkpoint(quantized(name, token_ids), tmp_path / "out", target="trtllm-legacy", **kwargs)
    assert not (tmp_path / "out").exists()


def test_every_legacy_algorithm_is_a_tensorrt_llm_name():
    # docs/source/architecture/checkpoint.md lists W4A16_AWQ, W4A8_AWQ, FP8, W8A8_SQ_PER_CHANNEL (and W8A16,
    # which trtllm-build takes only as float or GPU-specific int8 weights: refused);
    # models/modeling_utils.py preprocesses FP8_PER_CHANNEL_PER_TOKEN and NVFP4 checkpoints.
    assert set(LEGACY_QUANT_ALGO.values()) == {"W4A16_AWQ", "W4A8_AWQ", "FP8", "W8A8_SQ_PER_CHANNEL",
                                               "FP8_PER_CHANNEL_PER_TOKEN", "NVFP4"}


def test_smoothquant_scales_travel_as_prequant_factors_and_shared_buffers_are_written(token_ids, tmp_path):
    config = PTQConfig(qformat="int8_sq", pre_quant_scales="keep")  # smoothquant, scales left on the layers
    model = quantize(tiny_llama(), config, forward_loop=lambda m: m(token_ids))
    export_checkpoint(model, tmp_path, target="trtllm-legacy", tp_size=2)
    rank1 = load_file(tmp_path / "rank1.safetensors")
    layer = model.model.layers[0]
    assert torch.equal(rank1["transformer.layers.0.attention.qkv.prequant_scaling_factor"],
                       layer.self_attn.q_proj.pre_quant_scale)
    assert torch.equal(rank1["transformer.layers.0.mlp.proj.prequant_scaling_factor"],
                       layer.mlp.down_proj.pre_quant_scale.chunk(2)[1])  # row-parallel: split along the input


def test_a_quantized_lm_head_is_not_excluded_by_tensorrt_llm_defaults(token_ids, tmp_path):
    """Older TensorRT-LLM releases replace an empty exclude_modules by their defaults, '*lm_head' among them."""
    from hf_ptq_plugin import QuantLinear, get_format
    from hf_ptq_plugin.modules.layer_plan import LayerPlan

    model = quantized("fp8", token_ids)
    model.lm_head = QuantLinear.from_linear(model.lm_head, get_format("fp8"),
                                            plan=LayerPlan(input_amax=torch.tensor(3.0)))
    export_checkpoint(model, tmp_path, target="trtllm-legacy")
    excludes = json.loads((tmp_path / "config.json").read_text())["quantization"]["exclude_modules"]
    assert excludes and not any("lm_head" in pattern for pattern in excludes)
    assert load_file(tmp_path / "rank0.safetensors")["lm_head.weight"].dtype == torch.float8_e4m3fn
