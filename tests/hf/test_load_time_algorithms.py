"""Data-free algorithms apply while loading: `mse` at load gives quantize(..., mse)'s tensors
(tests/calibration/test_weight_sources.py, for dense and MoE models).

With a data-free algorithm (max, mse) the loader quantizes each weight with it as it is read; no
warning claims data is needed, and calibration data, if given, is not needed for weight-only formats.
"""

import logging

import pytest
import torch
from conftest import tiny_llama, word_tokenizer
from transformers import AutoModelForCausalLM

from hf_ptq_plugin import PTQConfig, calibrate, quantize


@pytest.fixture
def source(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "src")
    word_tokenizer().save_pretrained(tmp_path / "src")
    (tmp_path / "calib.txt").write_text("the a of and to in is it " * 200)
    return tmp_path


def assert_same_tensors(a, b):
    sd_a, sd_b = a.state_dict(), b.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert not [k for k in sd_a if not torch.equal(sd_a[k], sd_b[k])]


@pytest.mark.parametrize("qformat", ["int4_awq", "int8_wo"])
def test_mse_while_loading_needs_no_data_and_is_not_round_to_nearest(source, qformat, caplog):
    """The tensors are quantize(..., mse)'s: tests/calibration/test_weight_sources.py."""
    with caplog.at_level(logging.WARNING):
        loaded = AutoModelForCausalLM.from_pretrained(source / "src",
                                                      quantization_config=PTQConfig(qformat=qformat, algorithm="mse"))
    assert not [r for r in caplog.records if "needs calibration data" in r.getMessage()]
    rounded = quantize(AutoModelForCausalLM.from_pretrained(source / "src"),
                       PTQConfig(qformat=qformat, algorithm="max"))
    scales = [k for k in loaded.state_dict() if k.endswith("weight_scale")]
    assert any(not torch.equal(loaded.state_dict()[k], rounded.state_dict()[k]) for k in scales)  # mse really ran
    assert loaded.ptq_config.algorithm == "mse"


def test_mse_with_calibration_data_loads_and_later_calibrate_says_what_it_can_do(source):
    config = PTQConfig(qformat="int4_awq", algorithm="mse", calib_dataset=str(source / "calib.txt"), calib_size=4,
                       calib_seq_len=16)
    loaded = AutoModelForCausalLM.from_pretrained(source / "src", quantization_config=config)
    assert loaded.ptq_config.algorithm == "mse"
    with pytest.raises(ValueError, match="no quantized layer or KV cache with static scales"):
        calibrate(loaded, str(source / "calib.txt"), tokenizer=word_tokenizer(), calib_size=4, seq_len=16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton quantize kernels run at load on CUDA only")
@pytest.mark.parametrize("qformat", ["fp8", "int4_awq", "w4a8_awq", "nvfp4"])
def test_loading_onto_cuda_quantizes_with_the_kernels_to_the_same_tensors(source, qformat):
    config = PTQConfig(qformat=qformat)
    on_cpu = AutoModelForCausalLM.from_pretrained(source / "src", quantization_config=config)
    on_cuda = AutoModelForCausalLM.from_pretrained(source / "src", quantization_config=config, device_map="cuda")
    assert_same_tensors(on_cpu, on_cuda.cpu())
