"""PTQConfig as a transformers QuantizationConfigMixin, and the guarded "modelopt" registration."""

import json
import logging

import pytest
from torch import nn
from transformers.quantizers import AutoHfQuantizer, AutoQuantizationConfig, HfQuantizer
from transformers.quantizers import auto as transformers_auto
from transformers.utils.quantization_config import QuantizationConfigMixin

import hf_ptq_plugin.hf.quantizer as hf_quantizer
from hf_ptq_plugin import PTQConfig, PTQHfQuantizer, QuantLinear, get_format
from hf_ptq_plugin.export.quant_config import written_quant_algo
from hf_ptq_plugin.formats import FORMATS


def test_import_registers_config_and_quantizer_under_modelopt():
    assert transformers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["modelopt"] is PTQConfig
    assert transformers_auto.AUTO_QUANTIZER_MAPPING["modelopt"] is PTQHfQuantizer
    quantizer = AutoHfQuantizer.from_config(PTQConfig(qformat="nvfp4"), pre_quantized=False)
    assert isinstance(quantizer, PTQHfQuantizer) and not quantizer.pre_quantized


def test_config_is_a_json_serializable_mixin_that_round_trips_through_transformers():
    config = PTQConfig(qformat="int4_awq", group_size=64, exclude_modules=["*.down_proj"])
    assert isinstance(config, QuantizationConfigMixin) and config.quant_method == "modelopt"
    as_json = json.loads(config.to_json_string(use_diff=False))
    assert as_json["quant_method"] == "modelopt" and as_json["group_size"] == 64
    assert AutoQuantizationConfig.from_dict(config.to_dict()) == config
    assert "int4_awq" in repr(config)


def test_registering_again_is_a_no_op():
    assert hf_quantizer.register() and hf_quantizer.register()
    assert transformers_auto.AUTO_QUANTIZER_MAPPING["modelopt"] is PTQHfQuantizer


def test_classes_left_by_an_earlier_copy_of_the_package_are_replaced(monkeypatch):
    stale = type("PTQHfQuantizer", (PTQHfQuantizer,), {"__module__": "hf_ptq_plugin.hf.quantizer"})
    monkeypatch.setitem(transformers_auto.AUTO_QUANTIZER_MAPPING, "modelopt", stale)
    assert hf_quantizer.register()
    assert transformers_auto.AUTO_QUANTIZER_MAPPING["modelopt"] is PTQHfQuantizer


def test_a_modelopt_quantizer_owned_by_someone_else_is_kept_with_a_clear_warning(monkeypatch, caplog):
    foreign = type("ModelOptHfQuantizer", (HfQuantizer,), {"__module__": "transformers.quantizers.quantizer_modelopt"})
    monkeypatch.setitem(transformers_auto.AUTO_QUANTIZER_MAPPING, "modelopt", foreign)
    with caplog.at_level(logging.WARNING):
        assert hf_quantizer.register() is False
    assert transformers_auto.AUTO_QUANTIZER_MAPPING["modelopt"] is foreign
    assert "already has quant_method 'modelopt' registered" in caplog.text
    assert "transformers.quantizers.quantizer_modelopt.ModelOptHfQuantizer" in caplog.text


@pytest.mark.parametrize("name", list(FORMATS))
def test_modelopt_quantization_configs_translate_to_our_fields(name):
    fmt = FORMATS[name]
    config = PTQConfig.from_dict({"quant_method": "modelopt", "quant_algo": written_quant_algo(fmt),
                                  "ignore": ["lm_head", "model.visual*"], "producer": {"name": "modelopt"}})
    assert (config.qformat, config.kv_cache_qformat) == (name, "none")
    assert config.exclude_modules == ["lm_head", "model.visual*"]


@pytest.mark.parametrize("values, expected", [
    ({"kv_cache_scheme": {"dynamic": False, "num_bits": 8, "type": "float"}}, ("fp8", None)),
    ({"kv_cache_scheme": "NVFP4"}, ("nvfp4", None)),
    ({"kv_cache_quant_algo": None, "group_size": 64}, ("none", 64)),
    ({"config_groups": {"group_0": {"weights": {"num_bits": 4, "group_size": 64}}}}, ("none", 64)),
])
def test_kv_scheme_and_group_size_are_read_from_either_spelling(values, expected):
    config = PTQConfig.from_dict({"quant_method": "modelopt", "quant_algo": "w4a16_awq", **values})
    assert (config.qformat, config.kv_cache_qformat, config.group_size) == ("int4_awq", *expected)


def test_our_own_checkpoint_config_restores_the_exact_ptq_config():
    config = PTQConfig(qformat="nvfp4", kv_cache_qformat="fp8", exclude_modules=["*.o_proj"], calib_size=8)
    written = {"quant_algo": "NVFP4", "ignore": ["lm_head", "model.layers.0.self_attn.o_proj"],
               "quant_method": "modelopt", "ptq_config": config.to_dict()}
    assert PTQConfig.from_dict(written) == config


@pytest.mark.parametrize("values, message", [
    ({"quant_method": "fp8"}, r"quant_method 'fp8' is not PTQConfig's; valid: 'modelopt'"),
    ({"quant_algo": "INT3"}, r"unknown quant_algo 'INT3'; valid: FP8, FP8_PER_CHANNEL_PER_TOKEN, fp8_pb_wo"),
    ({"quant_algo": "FP8", "kv_cache_scheme": {"num_bits": 4, "type": "int"}}, r"unknown KV-cache algorithm 'int4'"),
])
def test_bad_checkpoint_configs_name_the_value_and_the_choices(values, message):
    with pytest.raises(ValueError, match=message):
        PTQConfig.from_dict(values)


def test_from_dict_follows_the_mixins_kwargs_protocol():
    config, unused = PTQConfig.from_dict({"qformat": "fp8"}, return_unused_kwargs=True, calib_size=7, other=1)
    assert config.calib_size == 7 and unused == {"other": 1}


def test_quantizer_quantizes_only_quant_linear_weights_and_only_when_not_pre_quantized():
    model = nn.Module()
    model.q = QuantLinear(32, 16, False, get_format("int8_wo"), device="meta")
    model.dense = nn.Linear(32, 16, device="meta")
    fresh = PTQHfQuantizer(PTQConfig(qformat="int8_wo"), pre_quantized=False)
    assert fresh.param_needs_quantization(model, "q.weight")
    assert not fresh.param_needs_quantization(model, "q.weight_scale")
    assert not fresh.param_needs_quantization(model, "dense.weight")
    loaded = PTQHfQuantizer(PTQConfig(qformat="int8_wo"), pre_quantized=True)
    assert not loaded.param_needs_quantization(model, "q.weight")
    assert loaded.is_serializable() and loaded.is_trainable and loaded.is_qat_trainable  # adapters; unquantized params
    with pytest.raises(ValueError, match="needs a PTQConfig"):
        PTQHfQuantizer({"qformat": "fp8"})
