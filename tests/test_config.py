"""PTQConfig: validation with errors that list the valid choices, and an exact dict round trip."""

import pytest

from hf_ptq_plugin import FORMATS, PTQConfig
from hf_ptq_plugin.calibration.algorithms import ALGORITHMS


def test_round_trip_through_dict_is_exact():
    config = PTQConfig(qformat="w4a8_awq", kv_cache_qformat="nvfp4", algorithm="max", group_size=64,
                       exclude_modules=["*.mlp.down_proj"], calib_dataset="texts/", calib_size=16,
                       calib_seq_len=128, calib_batch_size=2)
    assert PTQConfig.from_dict(config.to_dict()) == config
    assert PTQConfig.from_dict(PTQConfig().to_dict()) == PTQConfig()


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_qformat_constructs_with_its_default_algorithm(name):
    config = PTQConfig(qformat=name)
    assert config.resolved_algorithm == FORMATS[name].default_algorithm


@pytest.mark.parametrize("kwargs, message", [
    ({"qformat": "int3"}, r"unknown qformat 'int3'; valid: fp8, fp8_pc_pt, .*nvfp4.*"),
    ({"kv_cache_qformat": "int8"}, r"unknown kv_cache_qformat 'int8'; valid: none, fp8, nvfp4"),
    ({"algorithm": "awq"}, r"unknown algorithm 'awq'; valid: max, smoothquant, awq_lite"),
    ({"qformat": "fp8", "algorithm": "smoothquant"}, r"'smoothquant' does not fit qformat 'fp8'; valid for it: max"),
    ({"qformat": "int4_awq", "group_size": 32}, r"group_size=32 is not valid for qformat 'int4_awq'; valid: 128, 64"),
    ({"qformat": "fp8", "group_size": 128}, r"group_size=128 is not valid for qformat 'fp8'; valid: none"),
    ({"qformat": "nvfp4", "group_size": 32}, r"valid: 16"),
    ({"calib_size": 0}, r"calib_size must be a positive integer, got 0"),
    ({"exclude_modules": "lm_head"}, r"exclude_modules must be a list"),
    ({"qformat": ["fp8"]}, r"qformat must be one name, got \['fp8'\]; valid: fp8, .*auto_quantize"),
    ({"algorithm": ["max"]}, r"algorithm must be one name, got \['max'\]; valid: max, "),
    ({"kv_cache_qformat": None}, r"kv_cache_qformat must be one name, got None; valid: none, fp8, nvfp4"),
    ({"calib_dataset": 3}, r"calib_dataset must be a file, folder or Hub dataset name \(a string\), got int"),
])
def test_bad_values_name_the_value_and_the_valid_choices(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PTQConfig(**kwargs)


def test_unknown_field_in_a_dict_lists_the_valid_fields():
    with pytest.raises(ValueError,
                       match=r"unknown PTQConfig field\(s\) \['qfromat'\]; valid: algorithm, calib_batch_size"):
        PTQConfig.from_dict({"qfromat": "fp8"})


def test_every_algorithm_fits_at_least_one_format():
    for algorithm in ALGORITHMS:
        assert any(ALGORITHMS[algorithm].fits(fmt) for fmt in FORMATS.values()), algorithm
