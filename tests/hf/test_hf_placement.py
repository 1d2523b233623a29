"""Placement and the model-level API: CPU + disk offload, memory footprint, dequantize()."""

import pytest
import torch
from conftest import tiny_llama, tiny_moe
from torch import nn
from transformers import AutoModelForCausalLM

from hf_ptq_plugin import PTQConfig, QuantLinear, calibrate, export_checkpoint, quantize

LINEAR_SHAPES = [(128, 128), (64, 128), (64, 128), (128, 128), (256, 128), (256, 128), (128, 256)]  # per layer


@pytest.fixture
def source(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "src")
    return tmp_path / "src"


def run(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.filterwarnings("ignore:Attempting to save a model with offloaded modules")
@pytest.mark.parametrize("pre_quantized", [False, True])
def test_cpu_and_disk_offload_load_and_run_like_the_in_memory_model(pre_quantized, source, tmp_path, token_ids):
    config = PTQConfig(qformat="w4a16_nvfp4")
    reference = AutoModelForCausalLM.from_pretrained(source, quantization_config=config)
    reference.save_pretrained(tmp_path / "q")
    kwargs = {} if pre_quantized else {"quantization_config": config}
    # 400 KB of CPU: the embeddings fit, the ~190 KB of quantized layers and the LM head go to disk.
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q" if pre_quantized else source, device_map="auto",
                                                 max_memory={"cpu": "400KB"}, offload_folder=str(tmp_path / "off"),
                                                 **kwargs)
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    assert model.hf_device_map["model.layers"] == "disk"
    assert torch.equal(run(model, token_ids), run(reference, token_ids))
    model.save_pretrained(tmp_path / "again")  # offloaded tensors are read back from disk to be written
    assert torch.equal(run(AutoModelForCausalLM.from_pretrained(tmp_path / "again"), token_ids),
                       run(reference, token_ids))


CALIBRATIONS = [("llama", "fp8", "max"), ("llama", "int4_awq", "mse"), ("llama", "int4_awq", "awq_full"),
                ("llama", "nvfp4", "gptq"), ("llama", "int8_sq", "smoothquant"), ("qwen3_moe", "w4a8_awq", "awq_lite"),
                ("qwen3_moe", "int4_awq", "gptq")]


@pytest.mark.filterwarnings("ignore:Attempting to save a model with offloaded modules")
@pytest.mark.parametrize("family, qformat, algorithm", CALIBRATIONS)
def test_calibrating_a_disk_offloaded_model_saves_what_it_computes(family, qformat, algorithm, tmp_path, token_ids):
    """Every weight starts on disk (accelerate hooks load it per forward); calibration brings one
    layer (or block) into memory at a time. The result is quantize()'s in memory:
    tests/calibration/test_weight_sources.py."""
    (tiny_llama() if family == "llama" else tiny_moe(family)).save_pretrained(tmp_path / "src")
    config = PTQConfig(qformat=qformat, algorithm=algorithm)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "src", device_map="auto", max_memory={"cpu": "100KB"},
                                                 offload_folder=str(tmp_path / "off"))
    assert set(model.hf_device_map.values()) == {"disk"}
    quantize(model, config, forward_loop=lambda m: m(token_ids))
    model.save_pretrained(tmp_path / "offloaded")  # reads back the norms and the LM head still on disk
    assert torch.equal(run(AutoModelForCausalLM.from_pretrained(tmp_path / "offloaded"), token_ids),
                       run(model, token_ids))


@pytest.mark.filterwarnings("ignore:Attempting to save a model with offloaded modules")
@pytest.mark.parametrize("family, qformat, algorithm", [("llama", "int4_awq", "awq_full"),
                                                       ("qwen3_moe", "nvfp4", "gptq")])
def test_calibrating_after_an_offloaded_compressed_load_saves_what_it_computes(family, qformat, algorithm,
                                                                               tmp_path, token_ids):
    """The result is quantize()'s in memory: tests/calibration/test_weight_sources.py."""
    (tiny_llama() if family == "llama" else tiny_moe(family)).save_pretrained(tmp_path / "src")
    config = PTQConfig(qformat=qformat, algorithm=algorithm)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "src", quantization_config=config, device_map="auto",
                                                 max_memory={"cpu": "100KB"}, offload_folder=str(tmp_path / "off"))
    assert "disk" in set(model.hf_device_map.values())
    calibrate(model, lambda m: m(token_ids))  # re-reads each block's weights from the source checkpoint
    model.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(run(reloaded, token_ids), run(model, token_ids))


def test_memory_footprint_is_the_compressed_size(source):
    dense = AutoModelForCausalLM.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=PTQConfig(qformat="int4_awq"))
    fp32_linears = sum(4 * n * k for n, k in LINEAR_SHAPES) * 2
    int4_linears = sum(n * k // 2 + 4 * n * (k // 128) for n, k in LINEAR_SHAPES) * 2  # packed weight + fp32 scales
    assert model.get_memory_footprint() == dense.get_memory_footprint() - fp32_linears + int4_linears


def test_dequantize_returns_a_plain_model_that_computes_the_same(source, tmp_path, token_ids):
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=PTQConfig(qformat="int4_awq"))
    quantized = run(model, token_ids)
    model.dequantize()
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert not model.is_quantized and not hasattr(model.config, "quantization_config")
    torch.testing.assert_close(run(model, token_ids), quantized, rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / "hf_quant_config.json").exists()
    assert torch.equal(run(AutoModelForCausalLM.from_pretrained(tmp_path / "plain"), token_ids), run(model, token_ids))


def test_dequantize_turns_kv_quantization_off(tmp_path, token_ids):
    model = quantize(tiny_llama(), PTQConfig(qformat="int8_wo", kv_cache_qformat="fp8"),
                     forward_loop=lambda m: m(token_ids))
    export_checkpoint(model, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded.dequantize()
    assert loaded.config._attn_implementation == "sdpa"
    assert not hasattr(loaded.model.layers[0].self_attn.k_proj, "k_scale")


def test_dequantize_after_save_pretrained(source, tmp_path, token_ids):
    """save_pretrained leaves config.dtype a string; dequantize() must still take it as the dtype."""
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=PTQConfig(qformat="int8_wo"))
    quantized = run(model, token_ids)
    model.save_pretrained(tmp_path / "q")
    model.dequantize()
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(run(model, token_ids), quantized, rtol=1e-4, atol=1e-4)
