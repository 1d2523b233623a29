"""A checkpoint whose quantization is stated wrongly, or incompletely, fails to load naming what is wrong, and
our own exports keep loading exactly: hf_quant_config.json against config.json, an older export with only
hf_quant_config.json, a missing AWQ pre_quant_scale or KV scale, a full-precision tensor of the wrong dtype or
missing, and a truncated weights file (one-line CLI error)."""

import json
import logging
import shutil

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

from hf_ptq_plugin import PTQConfig, QuantLinear, auto_quantize, export_checkpoint, quantize
from hf_ptq_plugin.calibration.data import CalibrationLoop
from hf_ptq_plugin.cli import main

# (qformat, kv_cache_qformat) of the exports every check must keep loading; "mixed" is an AutoQuantize result.
# Algorithms named, not the formats' defaults: the AWQ exports must carry pre_quant_scale (o_proj, down_proj).
ALGORITHMS = {"fp8": "max", "nvfp4": "max", "int4_awq": "awq_lite", "w4a8_awq": "awq_lite"}
EXPORTS = [("fp8", "fp8"), ("int4_awq", "none"), ("nvfp4", "fp8"), ("w4a8_awq", "none"), ("mixed", "none")]
_SAVED = {}


def calibration_ids():
    return torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))


def exported(tmp_path_factory, qformat, kv):
    """(directory, logits of the model in memory) of one export, shared by the tests (copy before changing)."""
    if (qformat, kv) not in _SAVED:
        ids = calibration_ids()
        if qformat == "mixed":
            loop = CalibrationLoop([{"input_ids": ids, "attention_mask": torch.ones_like(ids)}],
                                   source="random token ids")
            model, result = auto_quantize(tiny_llama(), ["fp8", "int4_awq"], 6.0, loop,
                                          algorithms={q: ALGORITHMS[q] for q in ("fp8", "int4_awq")})
            assert set(result.layer_qformats.values()) == {"fp8", "int4_awq"}
        else:
            # "keep": AWQ's o_proj / down_proj scales stay in the checkpoint, for the tests that check them
            config = PTQConfig(qformat=qformat, kv_cache_qformat=kv, algorithm=ALGORITHMS[qformat],
                               pre_quant_scales="keep")
            model = quantize(tiny_llama(), config, lambda m: m(ids))
        directory = tmp_path_factory.mktemp(f"{qformat}-{kv}")
        export_checkpoint(model, directory)
        with torch.no_grad():
            _SAVED[qformat, kv] = directory, model(ids).logits
    return _SAVED[qformat, kv]


def copy_of(tmp_path_factory, tmp_path, qformat="fp8", kv="fp8"):
    source, _ = exported(tmp_path_factory, qformat, kv)
    return shutil.copytree(source, tmp_path / "copy")


def edit_json(path, change):
    values = json.loads(path.read_text())
    change(values)
    path.write_text(json.dumps(values))


def edit_hf_quant(directory, **fields):
    edit_json(directory / "hf_quant_config.json", lambda values: values["quantization"].update(fields))


def edit_quantization_config(directory, change):
    edit_json(directory / "config.json", lambda values: change(values["quantization_config"]))


@pytest.mark.parametrize("qformat,kv", EXPORTS, ids=[f"{q}-{k}" for q, k in EXPORTS])
def test_our_exports_load_with_both_configs_checked(qformat, kv, tmp_path_factory):
    directory, logits = exported(tmp_path_factory, qformat, kv)
    model = AutoModelForCausalLM.from_pretrained(directory)
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(calibration_ids()).logits, logits)


def test_hf_quant_config_that_is_not_json_names_the_file_and_the_json_error(tmp_path_factory, tmp_path):
    directory = copy_of(tmp_path_factory, tmp_path)
    (directory / "hf_quant_config.json").write_text('{"quantization": {"quant_algo": "FP8",,}}')
    with pytest.raises(ValueError, match=r"hf_quant_config.json' is not valid JSON: Expecting property name"):
        AutoModelForCausalLM.from_pretrained(directory)


@pytest.mark.parametrize("quant_algo", ["BOGUS", "NVFP4"])
def test_a_quant_algo_disagreement_names_both_values_and_both_files(quant_algo, tmp_path_factory, tmp_path):
    directory = copy_of(tmp_path_factory, tmp_path)
    edit_hf_quant(directory, quant_algo=quant_algo)
    with pytest.raises(ValueError, match=rf"disagree on quant_algo: '{directory}/hf_quant_config.json' says "
                                         rf"'{quant_algo}', '{directory}/config.json' says 'FP8'"):
        AutoModelForCausalLM.from_pretrained(directory)


@pytest.mark.parametrize("qformat,kv,hf_kv,config_kv", [("int4_awq", "none", "FP8", "none"),
                                                       ("fp8", "fp8", None, "FP8")])
def test_a_kv_cache_disagreement_names_both_values(qformat, kv, hf_kv, config_kv, tmp_path_factory, tmp_path):
    directory = copy_of(tmp_path_factory, tmp_path, qformat, kv)
    edit_hf_quant(directory, kv_cache_quant_algo=hf_kv)
    with pytest.raises(ValueError, match=rf"kv_cache_quant_algo: '.*hf_quant_config.json' says '{hf_kv or 'none'}', "
                                         rf"'.*config.json' says '{config_kv}'"):
        AutoModelForCausalLM.from_pretrained(directory)


@pytest.mark.parametrize("fields,message", [
    ({"group_size": 64}, r"group_size: '.*hf_quant_config.json' says 64, '.*config.json' says 128"),
    ({"exclude_modules": ["lm_head", "model.layers.0.mlp.down_proj"]},
     r"exclude_modules: '.*hf_quant_config.json' says \['lm_head', 'model.layers.0.mlp.down_proj'\], "
     r"'.*config.json' says \['lm_head'\]"),
])
def test_group_size_and_exclude_list_disagreements_are_refused(fields, message, tmp_path_factory, tmp_path):
    directory = copy_of(tmp_path_factory, tmp_path, "int4_awq", "none")
    edit_hf_quant(directory, **fields)
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(directory)


def test_a_mixed_precision_layer_disagreement_names_the_layer(tmp_path_factory, tmp_path):
    directory = copy_of(tmp_path_factory, tmp_path, "mixed", "none")
    layers = json.loads((directory / "hf_quant_config.json").read_text())["quantization"]["quantized_layers"]
    name = next(n for n, layer in layers.items() if layer["quant_algo"] == "FP8")
    edit_hf_quant(directory, quantized_layers={**layers, name: {"quant_algo": "NVFP4", "group_size": 16}})
    with pytest.raises(ValueError, match=rf"quantized_layers: .* says \{{'{name}': \('NVFP4', 16\)\}}, "
                                         rf".* says \{{'{name}': \('FP8', None\)\}}"):
        AutoModelForCausalLM.from_pretrained(directory)


def test_config_json_whose_ptq_config_contradicts_its_quant_algo_is_refused(tmp_path_factory, tmp_path):
    # The tensors of nvfp4 and w4a16_nvfp4 differ by input_scale only, which a weight-only load ignores.
    directory = copy_of(tmp_path_factory, tmp_path, "nvfp4", "fp8")
    edit_quantization_config(directory, lambda q: q["ptq_config"].update(qformat="w4a16_nvfp4"))
    with pytest.raises(ValueError, match=r"config.json' disagrees with itself: quantization_config.quant_algo is "
                                         r"'NVFP4' but its ptq_config says qformat 'w4a16_nvfp4'"):
        AutoModelForCausalLM.from_pretrained(directory)


@pytest.fixture
def old_export(tmp_path_factory, tmp_path):
    """An fp8 export as an older ModelOpt one: hf_quant_config.json only."""
    directory = copy_of(tmp_path_factory, tmp_path)
    edit_json(directory / "config.json", lambda values: values.pop("quantization_config"))
    return directory


def test_an_older_export_loads_quantized_with_a_warning_and_is_left_unchanged(old_export, tmp_path_factory, caplog):
    _, logits = exported(tmp_path_factory, "fp8", "fp8")
    before = {path.name: path.read_bytes() for path in old_export.iterdir()}
    with caplog.at_level(logging.WARNING, logger="hf_ptq_plugin"):
        model = AutoModelForCausalLM.from_pretrained(old_export)
    assert [r.message.count(f"hf-ptq upgrade {old_export}") for r in caplog.records] == [1]
    again = LlamaForCausalLM.from_pretrained(old_export)  # a model class's own from_pretrained reads it too
    for loaded in (model, again):
        assert isinstance(loaded.model.layers[0].self_attn.q_proj, QuantLinear)
        with torch.no_grad():
            assert torch.equal(loaded(calibration_ids()).logits, logits)
    assert AutoConfig.from_pretrained(old_export).quantization_config["quant_algo"] == "FP8"
    assert {path.name: path.read_bytes() for path in old_export.iterdir()} == before


def test_an_older_export_with_an_invalid_hf_quant_config_fails_naming_it(old_export):
    edit_hf_quant(old_export, quant_algo="BOGUS")
    with pytest.raises(ValueError, match=r"hf_quant_config.json': its 'quantization' section is not valid: "
                                         r"unknown quant_algo 'BOGUS'"):
        AutoModelForCausalLM.from_pretrained(old_export)


def rewrite_tensors(directory, change):
    tensors = load_file(directory / "model.safetensors")
    change(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_an_awq_layer_missing_the_pre_quant_scale_its_peers_carry_is_named(tmp_path_factory, tmp_path):
    directory = copy_of(tmp_path_factory, tmp_path, "int4_awq", "none")
    rewrite_tensors(directory, lambda t: t.pop("model.layers.1.self_attn.o_proj.pre_quant_scale"))
    with pytest.raises(ValueError, match=r"'model.layers.1.self_attn.o_proj.pre_quant_scale' is missing: .* "
                                         r"W4A16_AWQ .*'model.layers.0.self_attn.o_proj.pre_quant_scale'"):
        AutoModelForCausalLM.from_pretrained(directory)


def test_a_fused_sibling_without_the_pre_quant_scale_of_its_group_is_named(tmp_path_factory, tmp_path):
    directory = copy_of(tmp_path_factory, tmp_path, "int4_awq", "none")
    pqs = {"model.layers.0.self_attn.q_proj.pre_quant_scale": torch.ones(128)}
    rewrite_tensors(directory, lambda t: t.update(pqs))
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.k_proj.pre_quant_scale' is missing"):
        AutoModelForCausalLM.from_pretrained(directory)


def test_an_awq_checkpoint_without_any_pre_quant_scale_still_loads(tmp_path_factory, tmp_path):
    """As algorithms that do not smooth (max, mse, gptq) write it, under the same quant_algo."""
    directory = copy_of(tmp_path_factory, tmp_path, "int4_awq", "none")
    rewrite_tensors(directory, lambda t: [t.pop(k) for k in list(t) if k.endswith("pre_quant_scale")])
    model = AutoModelForCausalLM.from_pretrained(directory)
    assert all(m.pre_quant_scale is None for m in model.modules() if isinstance(m, QuantLinear))


def test_a_full_precision_tensor_stored_as_integers_is_named(tmp_path_factory, tmp_path):
    directory = copy_of(tmp_path_factory, tmp_path)
    rewrite_tensors(directory, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].view(torch.int32)}))
    with pytest.raises(ValueError, match=r"'model.norm.weight': the model's full-precision parameter expects a float "
                                         r"tensor \[128\] .*; found I32 \[128\]"):
        AutoModelForCausalLM.from_pretrained(directory)


def test_a_kv_scale_missing_beside_the_others_is_named(tmp_path_factory, tmp_path):
    directory = copy_of(tmp_path_factory, tmp_path)
    rewrite_tensors(directory, lambda t: t.pop("model.layers.1.self_attn.v_proj.v_scale"))
    with pytest.raises(ValueError, match=r"'model.layers.1.self_attn.v_proj.v_scale' is missing: the checkpoint has "
                                         r"KV cache scales for other layers"):
        AutoModelForCausalLM.from_pretrained(directory)


@pytest.mark.parametrize("name", ["model.norm.weight", "lm_head.weight"])
def test_a_renamed_full_precision_tensor_is_named(name, tmp_path_factory, tmp_path):
    directory = copy_of(tmp_path_factory, tmp_path)
    rewrite_tensors(directory, lambda t: t.update({f"{name}x": t.pop(name)}))
    with pytest.raises(ValueError, match=rf"'{name}' is missing .*initialized it at random"):
        AutoModelForCausalLM.from_pretrained(directory)


def test_cli_export_of_a_truncated_checkpoint_is_a_one_line_error_naming_the_file(tmp_path_factory, tmp_path,
                                                                                  capsys):
    directory = copy_of(tmp_path_factory, tmp_path)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    assert main(["export", str(directory), "--export_path", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("hf-ptq: error: ") and f"'{weights}'" in err, err
    assert not (tmp_path / "out").exists()
