"""An AutoQuantize result saves as ModelOpt's MIXED_PRECISION unified checkpoint and loads back exactly."""

import json

import pytest
import torch
from autoquant_data import calibration_loop, token_batch
from conftest import tiny_llama
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

from hf_ptq_plugin import auto_quantize
from hf_ptq_plugin.modules.quant_linear import QuantLinear

# §6.2: the per-layer configs ModelOpt writes under `quantized_layers`.
LAYER_CONFIGS = {"fp8": {"quant_algo": "FP8"},
                 "int4_awq": {"quant_algo": "W4A16_AWQ", "group_size": 128, "has_zero_point": False,
                              "pre_quant_scale": True}}
# §6.3: config.json's group per layer config, as ModelOpt's export writes it (FP8; W4A16_AWQ: int weights, group 128).
CONFIG_GROUPS = {"fp8": {"input_activations": {"dynamic": False, "num_bits": 8, "type": "float"},
                         "weights": {"dynamic": False, "num_bits": 8, "type": "float"}},
                 "int4_awq": {"weights": {"dynamic": False, "num_bits": 4, "type": "int", "group_size": 128}}}
# §6.3: the keys of config.json's quantization_config for MIXED_PRECISION (no kv_cache_scheme: no KV quantization).
MODELOPT_CONFIG_KEYS = {"config_groups", "ignore", "quant_algo", "producer", "quant_method", "quantized_layers"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    # ModelOpt's own algorithms for these formats: the layout below is the one ModelOpt writes for them.
    model, result = auto_quantize(tiny_llama(), ["fp8", "int4_awq"], 6.0, calibration_loop(),
                                  algorithms={"fp8": "max", "int4_awq": "awq_lite"})
    directory = tmp_path_factory.mktemp("mixed")
    model.save_pretrained(directory)
    return model, result, directory


def test_mixed_precision_result_reloads_to_bit_identical_logits(saved):
    model, result, directory = saved
    assert set(result.layer_qformats.values()) == {"fp8", "int4_awq"}
    reloaded = AutoModelForCausalLM.from_pretrained(directory)
    assert reloaded.dtype == torch.float32
    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, nn.Linear)):
            again = reloaded.get_submodule(name)
            assert type(again) is type(module) and getattr(again, "fmt", None) == getattr(module, "fmt", None), name
    batch = token_batch(seed=5)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, model(**batch).logits)


def expected_quantized_layers(result) -> dict:
    return {name: LAYER_CONFIGS[qformat] for name, qformat in sorted(result.layer_qformats.items())}


def expected_config_groups(result) -> dict:
    """One group per format, numbered in the order of each format's first layer by name."""
    layers = sorted(result.layer_qformats.items())
    qformats = list(dict.fromkeys(qformat for _, qformat in layers))
    return {f"group_{i}": {**CONFIG_GROUPS[q], "targets": [name for name, f in layers if f == q]}
            for i, q in enumerate(qformats)}


def test_hf_quant_config_is_modelopts_mixed_precision_layout(saved):
    _, result, directory = saved
    written = json.loads((directory / "hf_quant_config.json").read_text())
    assert set(written) == {"producer", "quantization"}
    assert set(written["producer"]) >= {"name", "version"}
    quantization = written["quantization"]
    assert set(quantization) == {"quant_algo", "kv_cache_quant_algo", "quantized_layers"}  # no exclude_modules
    assert quantization["quant_algo"] == "MIXED_PRECISION"
    assert quantization["kv_cache_quant_algo"] is None
    assert quantization["quantized_layers"] == expected_quantized_layers(result)
    unquantized = [m for g in result.groups if result.choice[g.name] == "none" for m in g.members]
    assert not set(unquantized) & set(quantization["quantized_layers"])  # unlisted = full precision


def test_config_json_quantization_config_matches_modelopts_fields(saved):
    _, result, directory = saved
    written = json.loads((directory / "config.json").read_text())["quantization_config"]
    # Ours: ModelOpt's fields, plus our own PTQConfig (transformers writes config.json's keys sorted).
    assert set(written) - {"ptq_config"} == MODELOPT_CONFIG_KEYS
    assert written["quant_algo"] == "MIXED_PRECISION"
    assert written["quant_method"] == "modelopt"
    assert written["ignore"] == []
    assert set(written["producer"]) >= {"name", "version"}
    assert written["quantized_layers"] == expected_quantized_layers(result)
    assert written["config_groups"] == expected_config_groups(result)
    assert written["ptq_config"]["layer_qformats"] == result.layer_qformats
    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata()["quant_algo"] == "MIXED_PRECISION"


def test_the_model_card_lists_the_formats_per_layer_type_and_the_bits(saved):
    _, result, directory = saved
    card = (directory / "README.md").read_text()
    assert f"Per-layer formats ({result.effective_bits:.3f} effective bits" in card
    assert "| format (`qformat`) | `fp8`, `int4_awq` (checkpoint `quant_algo`: `MIXED_PRECISION`) |" in card
    formats = {m: q for g in result.groups for m in g.members for q in [result.choice[g.name]]}
    columns = sorted(set(formats.values()), key=lambda q: (q == "none", q))
    assert "| layer | " + " | ".join(f"`{q}`" for q in columns) + " |" in card
    for kind in ("self_attn.q_proj", "mlp.down_proj"):
        layers = [q for name, q in formats.items() if name.endswith(kind)]
        assert f"| `{kind}` | " + " | ".join(str(layers.count(q)) for q in columns) + " |" in card
    # vLLM and SGLang take FP8 / NVFP4 mixed layers only; TensorRT-LLM serves this mix.
    assert "Does not accept these per-layer formats in one checkpoint." in card
    assert f"trtllm-serve {directory}" in card
