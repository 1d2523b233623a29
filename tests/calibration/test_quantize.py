"""quantize() on tiny Llamas: modules swapped and excluded, logits close, scales set, errors."""

import logging

import pytest
import torch
from conftest import sqnr_db, tiny_llama
from torch import nn

from hf_ptq_plugin import FORMATS, PTQConfig, QuantLinear, quantize

# Logit SQNR floors on a random 2-layer model (measured: 8-bit formats 25-40 dB, 4-bit 13-16 dB).
LOGIT_SQNR_FLOOR_DB = {"fp8": 21, "fp8_pc_pt": 21, "fp8_pb_wo": 21, "int8_sq": 28, "int8_wo": 33, "mxfp8": 20,
                       "int4_awq": 10, "w4a8_awq": 10, "nvfp4": 10, "nvfp4_awq": 10, "w4a16_nvfp4": 11}
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def run(model, ids):
    with torch.no_grad():
        return model(ids).logits


def loop_over(ids):
    return lambda model: model(ids)


@pytest.mark.parametrize("name", list(FORMATS))
def test_tiny_llama_end_to_end(name, token_ids):
    model = tiny_llama(kv_heads=4) if name == "fp8_pb_wo" else tiny_llama()  # 128x128 tiles need k_proj out 128
    reference = run(model, token_ids)
    quantize(model, PTQConfig(qformat=name, algorithm="max"), forward_loop=loop_over(token_ids))
    swapped = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert swapped == {f"model.layers.{i}.{part}.{leaf}" for i in range(2) for leaf in LINEAR_NAMES
                       for part in (("self_attn",) if leaf.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
                                    else ("mlp",))}
    assert type(model.lm_head) is nn.Linear
    assert sqnr_db(reference, run(model, token_ids)) > LOGIT_SQNR_FLOOR_DB[name]


def test_exclude_modules_keeps_layers_in_full_precision(token_ids):
    model = tiny_llama()
    quantize(model, PTQConfig(qformat="int8_wo", exclude_modules=["*.mlp.down_proj", "model.layers.1.self_attn"]))
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert type(model.model.layers[1].self_attn.q_proj) is nn.Linear
    assert isinstance(model.model.layers[1].mlp.up_proj, QuantLinear)
    assert isinstance(model.model.layers[0].self_attn.o_proj, QuantLinear)


def test_weight_only_format_needs_no_forward_loop(token_ids):
    model = tiny_llama()
    quantize(model, PTQConfig(qformat="int4_awq", algorithm="max"))
    assert torch.isfinite(run(model, token_ids)).all()


@pytest.mark.parametrize("config, passes", [(PTQConfig(qformat="int4_awq", algorithm="max"), 0),
                                            (PTQConfig(qformat="int8_wo", algorithm="mse"), 0),
                                            (PTQConfig(qformat="int8_wo", kv_cache_qformat="fp8"), 1),
                                            (PTQConfig(qformat="fp8"), 1)])
def test_the_data_runs_only_when_a_scale_needs_it(config, passes, token_ids):
    calls = []
    quantize(tiny_llama(), config, forward_loop=lambda model: calls.append(model(token_ids)))
    assert len(calls) == passes


@pytest.mark.parametrize("config", [PTQConfig(qformat="fp8"), PTQConfig(qformat="nvfp4"),
                                    PTQConfig(qformat="int8_wo", kv_cache_qformat="fp8")])
def test_static_scales_without_forward_loop_is_an_error(config):
    with pytest.raises(ValueError, match="forward_loop"):
        quantize(tiny_llama(), config)


def test_calibration_hooks_are_removed_even_when_the_loop_raises():
    model = tiny_llama()

    def failing_loop(m):
        m(torch.zeros(1, 4, dtype=torch.long))
        raise RuntimeError("data error")

    with pytest.raises(RuntimeError, match="data error"):
        quantize(model, PTQConfig(qformat="fp8", kv_cache_qformat="fp8"), forward_loop=failing_loop)
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert not any(hasattr(m, "kv_amax_observer") for m in model.modules())
    assert model.config._attn_implementation == "sdpa"


def test_input_scale_is_the_calibrated_amax(token_ids):
    model = tiny_llama()
    seen = {}
    handle = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda m, args: seen.update(amax=args[0].abs().max()))
    run(model, token_ids)
    handle.remove()
    quantize(model, PTQConfig(qformat="fp8"), forward_loop=loop_over(token_ids))
    assert torch.equal(model.model.layers[0].mlp.down_proj.input_scale, seen["amax"] / 448)


@pytest.mark.parametrize("name", ["nvfp4", "w4a8_awq"])
def test_fused_siblings_share_input_scale_and_weight_scale_2(name, token_ids):
    model = tiny_llama()
    quantize(model, PTQConfig(qformat=name, algorithm="max"), forward_loop=loop_over(token_ids))
    for layer in model.model.layers:
        for group in ((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                      (layer.mlp.gate_proj, layer.mlp.up_proj)):
            for attr in ("input_scale", "weight_scale_2"):
                values = [getattr(m, attr) for m in group]
                assert all(torch.equal(v, values[0]) for v in values), attr
        assert not torch.equal(layer.self_attn.o_proj.weight_scale_2, layer.mlp.down_proj.weight_scale_2)


def test_int4_default_group_size_falls_back_to_64_when_128_does_not_divide(caplog, token_ids):
    model = tiny_llama(hidden_size=192, intermediate_size=384, heads=3, kv_heads=1)  # 192 = 3 * 64
    with caplog.at_level(logging.WARNING):
        quantize(model, PTQConfig(qformat="int4_awq", algorithm="max"))
    assert model.ptq_config.group_size == 64
    assert model.model.layers[0].mlp.up_proj.weight_scale.shape == (384, 3)
    assert "using group size 64" in caplog.text


def test_int4_group_size_that_does_not_divide_names_the_layer_and_the_sizes_that_fit():
    model = tiny_llama(hidden_size=192, intermediate_size=384, heads=3, kv_heads=1)
    with pytest.raises(ValueError, match=r"group_size=128 does not divide in_features=192 of layer "
                                         r"'model.layers.0.self_attn.q_proj'.*fit every layer: 64"):
        quantize(model, PTQConfig(qformat="int4_awq", algorithm="max", group_size=128))


def test_int4_without_any_supported_group_size_is_an_error_naming_the_layer():
    model = tiny_llama(hidden_size=96, intermediate_size=192, heads=3, kv_heads=1)  # 96: neither 64 nor 128
    with pytest.raises(ValueError, match=r"no supported int4_awq group size .* layer 'model.layers.0"):
        quantize(model, PTQConfig(qformat="int4_awq", algorithm="max"))


def test_int4_without_a_fitting_group_size_names_the_layer_that_breaks_it():
    model = tiny_llama(hidden_size=128, intermediate_size=96)  # only down_proj (in 96) fits neither size
    with pytest.raises(ValueError, match=r"divides in_features=96 of layer 'model.layers.0.mlp.down_proj'"):
        quantize(model, PTQConfig(qformat="int4_awq", algorithm="max"))


def test_nvfp4_layer_not_divisible_by_16_is_an_error_naming_the_layer():
    model = tiny_llama(hidden_size=72, intermediate_size=144, heads=3, kv_heads=1)  # 72 = 4.5 * 16
    with pytest.raises(ValueError, match=r"cannot store layer 'model.layers.0.self_attn.q_proj'.*block size 16"):
        quantize(model, PTQConfig(qformat="w4a16_nvfp4"))
