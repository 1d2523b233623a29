"""compressed-tensors export, checked by the compressed-tensors package itself (its packer, its config
models, its decompressors) against our own dequantized weights."""

import json

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig
from conftest import tiny_llama
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from hf_ptq_plugin import PTQConfig, QuantLinear, quantize
from hf_ptq_plugin.export import export_checkpoint
from hf_ptq_plugin.export.compressed_tensors import (
    COMPRESSED_TENSORS_QFORMATS,
    convert_layer,
    pack_int32,
    save_compressed_tensors,
)

# Keys of config.json's quantization_config that the package's QuantizationConfig model holds.
CONFIG_FIELDS = ("config_groups", "quant_method", "kv_cache_scheme", "format", "quantization_status",
                 "global_compression_ratio", "ignore")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(6, 64), (5, 136), (3, 8)])
def test_packing_is_the_packages_own_packing(bits, shape):
    torch.manual_seed(0)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1)
    q = torch.randint(low, high, shape, dtype=torch.int8)
    if shape[1] % (32 // bits):
        with pytest.raises(ValueError, match="multiple"):
            pack_int32(q, bits)
        return
    packed = pack_int32(q, bits)
    assert packed.dtype == torch.int32 and torch.equal(packed, pack_to_int32(q, bits))
    assert torch.equal(unpack_from_int32(packed, bits, torch.Size(shape)), q)


def quantized(name, token_ids, kv="none"):
    config = PTQConfig(qformat=name, algorithm="max", kv_cache_qformat=kv)
    model = tiny_llama(kv_heads=4) if name == "fp8_pb_wo" else tiny_llama()  # 128x128 tiles need 128-row k/v
    return quantize(model, config, forward_loop=lambda m: m(token_ids))


def package_config(directory):
    values = json.loads((directory / "config.json").read_text())["quantization_config"]
    return QuantizationConfig.model_validate({k: values[k] for k in CONFIG_FIELDS}), values


def decompress(tensors, layer, config):
    """The package's decompressor for one layer's tensors, chosen by the format the config names."""
    scheme = config.config_groups["group_0"]
    local = {k[len(layer) + 1:]: v for k, v in tensors.items() if k.startswith(layer + ".")}
    compressor = BaseCompressor.get_value_from_registry(scheme.format or config.format)
    return compressor.decompress(local, scheme)["weight"]


@pytest.mark.parametrize("name", COMPRESSED_TENSORS_QFORMATS)
def test_the_package_decompresses_every_format_to_our_dequantized_weights(name, token_ids, tmp_path):
    model = quantized(name, token_ids)
    save_compressed_tensors(model, tmp_path, model.ptq_config)
    config, raw = package_config(tmp_path)
    assert raw["quant_method"] == "compressed-tensors" and config.quantization_status == "compressed"
    assert config.ignore == ["lm_head"]
    tensors = load_file(tmp_path / "model.safetensors")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 14
    for layer, module in layers.items():
        ours, theirs = module.dequantized_weight(), decompress(tensors, layer, config)
        if module.fmt.weight == "nvfp4":
            # The package stores the global scale as a divisor (1 / weight_scale_2) and returns bf16: one
            # bf16 rounding of q * s / (1 / ws2) instead of our fp32 q * s * ws2.
            assert theirs.dtype == torch.bfloat16
            torch.testing.assert_close(theirs.float(), ours.to(torch.bfloat16).float(), rtol=2**-7, atol=0)
        else:
            assert torch.equal(theirs.float(), ours), layer


@pytest.mark.parametrize("name, keys", [
    ("int4_awq", {"weight_packed": (torch.int32, [256, 16]), "weight_scale": (torch.float32, [256, 1]),
                  "weight_shape": (torch.int64, [2])}),
    ("int8_wo", {"weight_packed": (torch.int32, [256, 32]), "weight_scale": (torch.float32, [256, 1]),
                 "weight_shape": (torch.int64, [2])}),
    ("int8_sq", {"weight": (torch.int8, [256, 128]), "weight_scale": (torch.float32, [256, 1]),
                 "input_scale": (torch.float32, [1])}),
    ("fp8_pc_pt", {"weight": (torch.float8_e4m3fn, [256, 128]), "weight_scale": (torch.float32, [256, 1])}),
    ("nvfp4", {"weight_packed": (torch.uint8, [256, 64]), "weight_scale": (torch.float8_e4m3fn, [256, 8]),
               "weight_global_scale": (torch.float32, [1]), "input_global_scale": (torch.float32, [1])}),
])
def test_tensor_names_dtypes_and_shapes(name, keys, token_ids, tmp_path):
    model = quantized(name, token_ids)
    save_compressed_tensors(model, tmp_path, model.ptq_config)
    tensors = load_file(tmp_path / "model.safetensors")
    prefix = "model.layers.0.mlp.up_proj."
    found = {k[len(prefix):]: (v.dtype, list(v.shape)) for k, v in tensors.items() if k.startswith(prefix)}
    assert found == {k: (dtype, shape) for k, (dtype, shape) in keys.items()}
    if "weight_shape" in found:
        assert tensors[prefix + "weight_shape"].tolist() == [256, 128]


def test_nvfp4_global_scales_are_the_reciprocals_of_ours(token_ids):
    layer = quantized("nvfp4", token_ids).model.layers[0].self_attn.q_proj
    out = convert_layer(dict(layer.state_dict()), layer.fmt)
    assert torch.equal(out["weight_packed"], layer.weight) and torch.equal(out["weight_scale"], layer.weight_scale)
    assert torch.equal(out["weight_global_scale"], (1 / layer.weight_scale_2).reshape(1))
    assert torch.equal(out["input_global_scale"], (1 / layer.input_scale).reshape(1))


def test_fp8_kv_cache_scales_move_to_the_attention_module(token_ids, tmp_path):
    model = quantized("int8_sq", token_ids, kv="fp8")
    export_checkpoint(model, tmp_path, target="vllm")
    config, raw = package_config(tmp_path)
    assert isinstance(config.kv_cache_scheme, QuantizationArgs) and config.kv_cache_scheme.num_bits == 8
    tensors = load_file(tmp_path / "model.safetensors")
    attention = model.model.layers[1].self_attn
    assert torch.equal(tensors["model.layers.1.self_attn.k_scale"], attention.k_proj.k_scale.reshape(1))
    assert torch.equal(tensors["model.layers.1.self_attn.v_scale"], attention.v_proj.v_scale.reshape(1))
    assert not any(k.endswith("k_proj.k_scale") for k in tensors)


@pytest.mark.parametrize("name, engines", [("int4_awq", "trtllm (modelopt)"), ("int8_sq", "trtllm (trtllm-legacy)")])
def test_a_layer_keeping_a_pre_quant_scale_is_refused_naming_only_engines_that_serve_it(name, engines, token_ids,
                                                                                       tmp_path):
    # The engines listed can serve the layer with its scale: not those whose dialect is compressed-tensors.
    model = quantized(name, token_ids)
    model.model.layers[0].self_attn.o_proj.pre_quant_scale = torch.rand(128) + 0.5  # a scale on o_proj
    with pytest.raises(ValueError, match=r"o_proj.*served by: (.*) \(calibrating") as error:
        export_checkpoint(model, tmp_path / "out", target="vllm")
    assert error.value.args[0].split("served by: ")[1].split(" (calibrating")[0] == engines
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, acts", [("nvfp4", True), ("w4a16_nvfp4", False)])
def test_nvfp4_block_scales_are_declared_fp8(name, acts, token_ids, tmp_path):
    # Without scale_dtype the package keeps run-time activation block scales unrounded, which is not NVFP4.
    model = quantized(name, token_ids)
    save_compressed_tensors(model, tmp_path, model.ptq_config)
    config, _ = package_config(tmp_path)
    scheme = config.config_groups["group_0"]
    assert scheme.weights.scale_dtype == torch.float8_e4m3fn
    assert (scheme.input_activations is not None) == acts
    if acts:
        assert scheme.input_activations.scale_dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("name, dtype, written", [
    ("nvfp4", torch.float32, "bfloat16"), ("w4a16_nvfp4", torch.float16, "bfloat16"),
    ("nvfp4", torch.bfloat16, "bfloat16"), ("int8_wo", torch.float32, "float32"), ("int8_wo", torch.float16, "float16"),
])
def test_config_dtype_is_the_one_compressed_tensors_computes_in(name, dtype, written, token_ids, tmp_path):
    # compressed-tensors unpacks NVFP4 weights to bfloat16 (compressors/nvfp4/helpers.py, unpack_fp4_from_uint8).
    config = PTQConfig(qformat=name, algorithm="max")
    model = quantize(tiny_llama().to(dtype), config, forward_loop=lambda m: m(token_ids))
    save_compressed_tensors(model, tmp_path, model.ptq_config)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == written


def test_the_model_card_describes_the_compressed_tensors_layout(token_ids, tmp_path):
    export_checkpoint(quantized("int4_awq", token_ids), tmp_path, target="vllm")
    card = ModelCard.load(tmp_path / "README.md")
    assert {"int4_awq", "compressed-tensors"} <= set(card.data.tags)
    assert "checkpoint layout: compressed-tensors" in card.text
    assert "transformers loads this layout without hf-ptq-plugin" in card.text
    usage = card.text.split("## Use with transformers")[1].split("## Serving")[0]
    assert "from_pretrained" in usage and "import hf_ptq_plugin" not in usage  # no plugin needed


def test_a_pre_quant_scale_left_on_norm_fed_layers_is_refused_not_folded(token_ids, tmp_path):
    model = quantized("int4_awq", token_ids)
    attention = model.model.layers[0].self_attn
    scale = torch.rand(128) + 0.5  # one scale for the fused group, as calibration gives it, left unfolded
    for proj in (attention.q_proj, attention.k_proj, attention.v_proj):
        proj.pre_quant_scale = scale.clone()
    norm = model.model.layers[0].input_layernorm.weight.clone()
    with pytest.raises(ValueError, match=r"3 layer\(s\) keep a pre_quant_scale \(e.g. 'model.layers.0.self_attn.q_proj'"
                                         r"\), which the compressed-tensors checkpoint for target 'sglang' cannot"):
        export_checkpoint(model, tmp_path / "out", target="sglang")
    assert torch.equal(model.model.layers[0].input_layernorm.weight, norm)
    assert attention.q_proj.pre_quant_scale is not None and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["w4a8_awq", "fp8_pb_wo", "mxfp8"])
def test_formats_without_a_layout_are_refused_naming_those_with_one(name, token_ids):
    layer = quantized(name, token_ids).model.layers[0].mlp.down_proj
    with pytest.raises(ValueError, match=f"qformat '{name}' has no compressed-tensors layout here; valid: fp8, "):
        convert_layer(dict(layer.state_dict()), layer.fmt)
