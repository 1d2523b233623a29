"""save_pretrained / export_checkpoint: the unified checkpoint's files, tensors and JSON, and reload.

Expected tensor layouts are written from the reference table (docs/modelopt-facts.md §6.4), not from
the code's specs. Every format: quantize -> save -> from_pretrained -> bit-identical logits.
"""

import json

import pytest
import torch
from conftest import tiny_llama
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from hf_ptq_plugin import FORMATS, PTQConfig, PTQHfQuantizer, QuantLinear, export_checkpoint, quantize

F32, FP8, U8, I8 = "F32", "F8_E4M3", "U8", "I8"


def expected_tensors(name, n, k):
    """{suffix: (safetensors dtype, shape)} of one quantized Linear (out n, in k), per §6.4."""
    return {
        "fp8": {"weight": (FP8, [n, k]), "weight_scale": (F32, []), "input_scale": (F32, [])},
        "fp8_pc_pt": {"weight": (FP8, [n, k]), "weight_scale": (F32, [n])},
        "fp8_pb_wo": {"weight": (FP8, [n, k]), "weight_scale": (F32, [n // 128, 1, k // 128, 1])},
        "int8_sq": {"weight": (I8, [n, k]), "weight_scale": (F32, [n]), "input_scale": (F32, [])},
        "int8_wo": {"weight": (I8, [n, k]), "weight_scale": (F32, [n])},
        "int4_awq": {"weight": (U8, [n // 2, k]), "weight_scale": (F32, [n, k // 128])},
        "w4a8_awq": {"weight": (U8, [n // 2, k]), "weight_scale": (F32, [n, k // 128]), "weight_scale_2": (F32, []),
                     "input_scale": (F32, [])},
        "nvfp4": {"weight": (U8, [n, k // 2]), "weight_scale": (FP8, [n, k // 16]), "weight_scale_2": (F32, []),
                  "input_scale": (F32, [])},
        "nvfp4_awq": {"weight": (U8, [n, k // 2]), "weight_scale": (FP8, [n, k // 16]), "weight_scale_2": (F32, []),
                      "input_scale": (F32, [])},
        "w4a16_nvfp4": {"weight": (U8, [n, k // 2]), "weight_scale": (FP8, [n, k // 16]), "weight_scale_2": (F32, [])},
        "mxfp8": {"weight": (FP8, [n, k]), "weight_scale": (U8, [n, k // 32])},
    }[name]


# hf_quant_config.json "quantization" per format (§6.2 table); group_size/kv/exclude always present.
EXPECTED_QUANTIZATION = {
    "fp8": {"quant_algo": "FP8", "group_size": None},
    "fp8_pc_pt": {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN", "group_size": None},
    "fp8_pb_wo": {"quant_algo": "fp8_pb_wo", "group_size": None},
    "int8_sq": {"quant_algo": "W8A8_SQ_PER_CHANNEL", "group_size": None},
    "int8_wo": {"quant_algo": "W8A16", "group_size": None},
    "int4_awq": {"quant_algo": "W4A16_AWQ", "group_size": 128, "has_zero_point": False, "pre_quant_scale": True},
    "w4a8_awq": {"quant_algo": "W4A8_AWQ", "group_size": 128, "has_zero_point": False, "pre_quant_scale": True},
    "nvfp4": {"quant_algo": "NVFP4", "group_size": 16},
    "nvfp4_awq": {"quant_algo": "NVFP4_AWQ", "group_size": 16, "has_zero_point": False, "pre_quant_scale": True},
    "w4a16_nvfp4": {"quant_algo": "W4A16_NVFP4", "group_size": 16},
    "mxfp8": {"quant_algo": "MXFP8", "group_size": 32},
}
LAYER_SHAPES = {"self_attn.q_proj": (128, 128), "self_attn.k_proj": (64, 128), "self_attn.v_proj": (64, 128),
                "self_attn.o_proj": (128, 128), "mlp.gate_proj": (256, 128), "mlp.up_proj": (256, 128),
                "mlp.down_proj": (128, 256)}


def quantized_model(name, token_ids, kv="none", **overrides):
    model = tiny_llama(kv_heads=4) if name == "fp8_pb_wo" else tiny_llama(**overrides)
    config = PTQConfig(qformat=name, algorithm="max", kv_cache_qformat=kv)
    return quantize(model, config, forward_loop=lambda m: m(token_ids))


def logits(model, token_ids):
    with torch.no_grad():
        return model(token_ids).logits


def header(directory):
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            out.update({k: (handle.get_slice(k).get_dtype(), handle.get_slice(k).get_shape()) for k in handle.keys()})
            metadata = handle.metadata()
    return out, metadata


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_writes_the_reference_layout_and_reloads_bit_identically(name, token_ids, tmp_path):
    model = quantized_model(name, token_ids)
    export_checkpoint(model, tmp_path / "out")
    before = logits(model, token_ids)
    tensors, metadata = header(tmp_path / "out")
    shapes = dict(LAYER_SHAPES, **({"self_attn.k_proj": (128, 128), "self_attn.v_proj": (128, 128)}
                                   if name == "fp8_pb_wo" else {}))
    for layer in range(2):
        for leaf, (n, k) in shapes.items():
            prefix = f"model.layers.{layer}.{leaf}"
            found = {key[len(prefix) + 1:]: (dtype, shape) for key, (dtype, shape) in tensors.items()
                     if key.startswith(prefix + ".")}
            assert found == expected_tensors(name, n, k), prefix
        assert tensors[f"model.layers.{layer}.input_layernorm.weight"] == ("F32", [128])
    assert (tensors["lm_head.weight"] == ("F32", [320, 128])
            and tensors["model.embed_tokens.weight"] == ("F32", [320, 128]))
    assert metadata["quant_method"] == "modelopt" and metadata["hf_ptq_plugin_format"] == "1"

    quantization = json.loads((tmp_path / "out" / "hf_quant_config.json").read_text())["quantization"]
    assert quantization == {"kv_cache_quant_algo": None, **EXPECTED_QUANTIZATION[name], "exclude_modules": ["lm_head"]}
    assert list(quantization)[:3] == ["quant_algo", "kv_cache_quant_algo", "group_size"]
    assert list(quantization)[-1] == "exclude_modules"

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert isinstance(reloaded.hf_quantizer, PTQHfQuantizer) and reloaded.hf_quantizer.pre_quantized
    assert isinstance(reloaded.model.layers[1].mlp.down_proj, QuantLinear)
    assert torch.equal(logits(reloaded, token_ids), before)


@pytest.mark.parametrize("name, groups", [
    ("fp8", {"group_0": {"input_activations": {"dynamic": False, "num_bits": 8, "type": "float"},
                         "weights": {"dynamic": False, "num_bits": 8, "type": "float"}, "targets": ["Linear"]}}),
    ("nvfp4", {"group_0": {"input_activations": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
                           "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
                           "targets": ["Linear"]}}),
    ("w4a16_nvfp4", {"group_0": {"weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
                                 "targets": ["Linear"]}}),
    ("int4_awq", None),
])
def test_config_json_carries_modelopts_quantization_config(name, groups, token_ids, tmp_path):
    export_checkpoint(quantized_model(name, token_ids), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "modelopt" and config["ignore"] == ["lm_head"]
    assert config["quant_algo"] == EXPECTED_QUANTIZATION[name]["quant_algo"]
    assert config.get("config_groups") == groups
    assert "kv_cache_scheme" not in config and config["producer"]["name"] == "hf_ptq_plugin"
    assert config["ptq_config"]["qformat"] == name and "group_size" not in config


@pytest.mark.parametrize("kv, scheme", [("fp8", {"dynamic": False, "num_bits": 8, "type": "float"}),
                                        ("nvfp4", "NVFP4")])
def test_kv_cache_scales_are_written_on_k_and_v_proj_and_reload(kv, scheme, token_ids, tmp_path):
    model = quantized_model("nvfp4", token_ids, kv=kv)
    export_checkpoint(model, tmp_path)
    tensors, _ = header(tmp_path)
    for layer in range(2):
        assert tensors[f"model.layers.{layer}.self_attn.k_proj.k_scale"] == ("F32", [])
        assert tensors[f"model.layers.{layer}.self_attn.v_proj.v_scale"] == ("F32", [])
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["kv_cache_scheme"] == scheme
    hf_quant = json.loads((tmp_path / "hf_quant_config.json").read_text())["quantization"]
    assert hf_quant["kv_cache_quant_algo"] == kv.upper()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config._attn_implementation == "hf_ptq_kv_sdpa"
    assert torch.equal(logits(reloaded, token_ids), logits(model, token_ids))


def test_nvfp4_fused_siblings_share_scales_in_the_files(token_ids, tmp_path):
    export_checkpoint(quantized_model("nvfp4", token_ids), tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as handle:
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            part = "self_attn" if group[0] == "q_proj" else "mlp"
            for suffix in ("weight_scale_2", "input_scale"):
                values = [handle.get_tensor(f"model.layers.0.{part}.{leaf}.{suffix}") for leaf in group]
                assert all(torch.equal(v, values[0]) for v in values)


def test_sharded_save_writes_an_index_and_reloads(token_ids, tmp_path):
    model = quantized_model("int4_awq", token_ids)
    export_checkpoint(model, tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert index["weight_map"]["model.layers.0.mlp.up_proj.weight_scale"].startswith("model-0000")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path), token_ids), logits(model, token_ids))


def test_user_exclusions_become_exact_names_or_prefix_wildcards(token_ids, tmp_path):
    model = tiny_llama()
    quantize(model, PTQConfig(qformat="int8_wo", exclude_modules=["*.mlp.down_proj", "model.layers.1.self_attn"]))
    export_checkpoint(model, tmp_path)
    quantization = json.loads((tmp_path / "hf_quant_config.json").read_text())["quantization"]
    assert quantization["exclude_modules"] == ["lm_head", "model.layers.0.mlp.down_proj",
                                               "model.layers.1.mlp.down_proj", "model.layers.1.self_attn*"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded.model.layers[1].self_attn.q_proj).__name__ == "Linear"
    assert torch.equal(logits(reloaded, token_ids), logits(model, token_ids))


def test_tied_embeddings_model_round_trips(token_ids, tmp_path):
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    quantize(model, PTQConfig(qformat="int8_wo"))
    export_checkpoint(model, tmp_path)
    tensors, _ = header(tmp_path)
    assert "lm_head.weight" not in tensors
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path), token_ids), logits(model, token_ids))


def test_unknown_export_target_lists_the_valid_ones(token_ids, tmp_path):
    with pytest.raises(ValueError,
                       match=r"unknown export target 'tensorrt'; valid: modelopt, vllm, sglang, trtllm, trtllm-legacy"):
        export_checkpoint(quantized_model("int8_wo", token_ids), tmp_path, target="tensorrt")


def test_a_model_that_was_never_quantized_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not quantized by hf_ptq_plugin"):
        export_checkpoint(tiny_llama(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
