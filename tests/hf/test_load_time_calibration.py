"""Calibration of a model loaded compressed: during from_pretrained (calib_dataset) or afterwards.

SmoothQuant, AWQ and GPTQ re-read each block's full-precision weights from the source checkpoint,
so a model that never held its full-precision weights in memory gets the same tensors as
quantize() on the full-precision model, bit for bit: tests/calibration/test_weight_sources.py.
"""

import logging
import random

import pytest
from conftest import WORDS, tiny_llama, tiny_moe, word_tokenizer
from transformers import AutoModelForCausalLM

from hf_ptq_plugin import PTQConfig, calibrate
from hf_ptq_plugin.hf import quantize_on_load, quantizer

CALIB = {"calib_size": 8, "calib_seq_len": 32, "calib_batch_size": 4}


@pytest.fixture
def source(tmp_path):
    """A full-precision checkpoint with its tokenizer, and a text file of calibration data."""
    tiny_llama().save_pretrained(tmp_path / "src")
    word_tokenizer().save_pretrained(tmp_path / "src")
    random.seed(0)
    (tmp_path / "calib.txt").write_text(" ".join(random.choice(WORDS) for _ in range(2000)))
    return tmp_path


def load(source, **config):
    return AutoModelForCausalLM.from_pretrained(source / "src", quantization_config=PTQConfig(**config))


@pytest.mark.parametrize("qformat,algorithm", [("int4_awq", "awq_lite"), ("int4_awq", "gptq"),
                                               ("w4a8_awq", "awq_full")])
def test_calibrating_while_loading_records_the_algorithm_and_allows_the_save(source, qformat, algorithm, tmp_path):
    loaded = load(source, qformat=qformat, algorithm=algorithm, calib_dataset=str(source / "calib.txt"), **CALIB)
    assert loaded.ptq_config.algorithm == algorithm
    loaded.save_pretrained(tmp_path / "out")  # calibrated: the save is allowed
    assert '"algorithm": "' + algorithm in (tmp_path / "out" / "config.json").read_text()


def log_quantization(monkeypatch) -> list:
    """"weight" for each weight (dense or merged experts) quantized, "calibration" when calibration starts."""
    events = []
    for module, name, event in ((quantize_on_load, "quantize_weight_in_row_blocks", "weight"),
                                (quantize_on_load.QuantExperts, "quantize_fused", "weight"),
                                (quantizer, "calibrate_while_loading", "calibration")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _e=event, **k: events.append(_e) or _f(*a, **k))
    return events


@pytest.mark.parametrize("model", ["llama", "qwen3_moe"])
def test_a_load_that_calibration_follows_quantizes_nothing_itself(model, source, monkeypatch):
    if model != "llama":
        tiny_moe(model).save_pretrained(source / "src")
    events = log_quantization(monkeypatch)
    calibrated = load(source, qformat="int4_awq", calib_dataset=str(source / "calib.txt"), **CALIB)
    assert events[0] == "calibration"  # it reads every weight from the checkpoint: loading quantized none
    assert calibrated.ptq_config.algorithm == "gptq"  # int4_awq's default
    events.clear()
    load(source, qformat="int4_awq")  # without data the load rounds to nearest itself
    assert events and set(events) == {"weight"}


def test_smoothquant_while_loading_smooths_and_calibrates_the_layers(source):
    loaded = load(source, qformat="int8_sq", calib_dataset=str(source / "calib.txt"), pre_quant_scales="keep",
                  **CALIB)  # "keep": the smoothing scales stay on the layers, where this test sees them
    q_proj = loaded.model.layers[1].self_attn.q_proj
    assert q_proj.pre_quant_scale is not None and q_proj.input_calibrated
    assert loaded.ptq_config.algorithm == "smoothquant"


def test_calibrate_later_applies_the_algorithm_the_load_asked_for(source, caplog):
    with caplog.at_level(logging.WARNING):
        later = load(source, qformat="int4_awq", algorithm="gptq")
    assert "calibrate(model, data) can apply 'gptq' later" in caplog.text
    assert later.ptq_config.algorithm == "max"  # rounded to nearest meanwhile
    calibrate(later, str(source / "calib.txt"), tokenizer=word_tokenizer(), calib_size=8, seq_len=32, batch_size=4)
    assert later.ptq_config.algorithm == "gptq"  # its tensors are quantize()'s: test_weight_sources.py


def test_static_scales_and_kv_cache_are_calibrated_while_loading(source, tmp_path):
    loaded = load(source, qformat="fp8", kv_cache_qformat="fp8", calib_dataset=str(source / "calib.txt"), **CALIB)
    layers = [m for m in loaded.modules() if hasattr(m, "input_calibrated")]
    assert layers and all(m.input_calibrated for m in layers)
    assert loaded.model.layers[0].self_attn.k_proj.k_scale.item() != 1.0
    loaded.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "hf_quant_config.json").exists()


def test_bad_requests_name_the_problem(source, tmp_path):
    loaded = load(source, qformat="int4_awq")
    with pytest.raises(ValueError, match="'smoothquant' does not fit qformat 'int4_awq'"):
        calibrate(loaded, str(source / "calib.txt"), algorithm="smoothquant", tokenizer=word_tokenizer())
    with pytest.raises(ValueError, match="unknown algorithm 'awq'; valid: max, "):
        calibrate(loaded, str(source / "calib.txt"), algorithm="awq", tokenizer=word_tokenizer())
    (source / "src" / "tokenizer.json").unlink()
    (source / "src" / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        load(source, qformat="int4_awq", calib_dataset=str(source / "calib.txt"), **CALIB)


def test_the_saved_config_names_a_local_calibration_file_without_its_path(source, tmp_path):
    import json

    loaded = load(source, qformat="int4_awq", algorithm="max", calib_dataset=str(source / "calib.txt"), **CALIB)
    loaded.save_pretrained(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["ptq_config"]
    assert written["calib_dataset"] == "calib.txt" and str(source) not in (tmp_path / "out" / "config.json").read_text()
