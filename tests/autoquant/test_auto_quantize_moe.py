"""AutoQuantize on MoE models: each MoE layer's fused experts are one group, calibrated, scored, exported
and loaded back like the Linears (qwen3_moe: gate_proj/up_proj/down_proj; Mixtral: w1/w3/w2 under
block_sparse_moe in the checkpoint)."""

import dataclasses
import json

import pytest
import torch
from autoquant_data import calibration_loop, token_batch
from conftest import tiny_moe
from test_auto_quantize_search import assert_same_state
from transformers import AutoModelForCausalLM

from hf_ptq_plugin import PTQConfig, apply_choice, auto_quantize, quantize
from hf_ptq_plugin.autoquant.solver import nominal_bits
from hf_ptq_plugin.modules.quant_experts import QuantExperts

FAMILIES = ("qwen3_moe", "mixtral")


# A choice with both formats among the experts and a full-precision attention group, whatever the scores say.
FORCED = {"model.layers.0.mlp.experts": "fp8", "model.layers.1.mlp.experts": "int4_awq",
          "model.layers.0.self_attn.{q_proj,k_proj,v_proj}": "none"}


@pytest.fixture(scope="module", params=FAMILIES)
def mixed(request, tmp_path_factory):
    """A tiny MoE searched over {fp8, int4_awq} at 7 bits, built again with FORCED applied to the choice, and
    saved: (family, model, result, directory)."""
    _, searched = auto_quantize(tiny_moe(request.param), ["fp8", "int4_awq"], 7.0, calibration_loop())
    result = dataclasses.replace(searched, choice={**searched.choice, **FORCED})
    model = apply_choice(tiny_moe(request.param), result, calibration_loop())
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    return request.param, model, result, directory


def experts_groups(result):
    return [g for g in result.groups if g.name.endswith(".experts")]


def test_each_moe_layers_experts_are_one_group_that_always_takes_a_format(mixed):
    _, model, result, _ = mixed
    experts = experts_groups(result)
    assert [g.name for g in experts] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    for group in experts:
        assert group.members == [group.name] and group.qformats == ["fp8", "int4_awq"]  # no "none"
        module = model.get_submodule(group.name)
        assert isinstance(module, QuantExperts) and module.fmt.name == result.choice[group.name]
        assert all(score > 0 for score in group.scores)
    assert all(g.qformats[-1] == "none" for g in result.groups if g not in experts)


def test_the_mixed_checkpoint_reloads_to_bit_identical_logits(mixed):
    _, model, _, directory = mixed
    batch = token_batch(seed=5)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(directory)(**batch).logits, model(**batch).logits)


def test_quantized_layers_name_every_expert_projection_as_the_checkpoint_does(mixed):
    family, _, result, directory = mixed
    layers = json.loads((directory / "hf_quant_config.json").read_text())["quantization"]["quantized_layers"]
    parent, projections = {"qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
                           "mixtral": ("block_sparse_moe", ("w1", "w3", "w2"))}[family]
    algo = {"fp8": "FP8", "int4_awq": "W4A16_AWQ"}
    for i, group in enumerate(experts_groups(result)):
        expected = {f"model.layers.{i}.{parent}.experts.{e}.{p}" for e in range(4) for p in projections}
        listed = {name: layer["quant_algo"] for name, layer in layers.items() if ".experts." in name
                  and name.startswith(f"model.layers.{i}.")}
        assert listed == dict.fromkeys(expected, algo[result.choice[group.name]])


def test_a_modelopt_style_config_with_only_quantized_layers_loads_the_same(mixed, tmp_path):
    _, model, _, directory = mixed
    config = json.loads((directory / "config.json").read_text())
    del config["quantization_config"]["ptq_config"]  # ModelOpt writes none: per-expert quantized_layers only
    for path in directory.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(config))
    batch = token_batch(seed=6)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(**batch).logits, model(**batch).logits)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("qformat", ["fp8", "int4_awq"])
def test_one_format_everywhere_equals_quantize(family, qformat):
    model, result = auto_quantize(tiny_moe(family), [qformat], nominal_bits(qformat), calibration_loop())
    reference = quantize(tiny_moe(family), PTQConfig(qformat=qformat), calibration_loop())
    assert set(result.choice.values()) == {qformat}
    assert_same_state(model, reference)
    batch = token_batch(seed=3)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference(**batch).logits)


def test_a_partly_listed_experts_module_is_refused(mixed, tmp_path):
    _, _, _, directory = mixed
    config = json.loads((directory / "config.json").read_text())
    quantization = config["quantization_config"]
    del quantization["ptq_config"]
    first = next(name for name in quantization["quantized_layers"] if ".experts." in name)
    del quantization["quantized_layers"][first]
    for path in directory.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"one MoE kernel in one format; the checkpoint lists 11 of their 12"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
