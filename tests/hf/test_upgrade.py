"""An older ModelOpt export (hf_quant_config.json, no quantization_config in config.json): `hf-ptq upgrade DIR`
writes the missing entry so the checkpoint loads quantized; the CLI refuses to load it before, saying what to do."""

import json

import pytest
import torch
from conftest import tiny_llama
from transformers import AutoModelForCausalLM

from hf_ptq_plugin import PTQConfig, QuantLinear, export_checkpoint, quantize
from hf_ptq_plugin.cli import main
from hf_ptq_plugin.hf.upgrade import upgrade_checkpoint


@pytest.fixture
def old_export(tmp_path, token_ids):
    model = quantize(tiny_llama(), PTQConfig(qformat="fp8", kv_cache_qformat="fp8"), lambda m: m(token_ids))
    directory = tmp_path / "old"
    export_checkpoint(model, directory)
    config = json.loads((directory / "config.json").read_text())
    del config["quantization_config"]
    (directory / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        return directory, model(token_ids).logits


def test_upgrade_writes_quantization_config_and_the_checkpoint_loads_quantized(old_export, token_ids, capsys):
    directory, logits = old_export
    assert main(["upgrade", str(directory)]) == 0
    assert "upgraded" in capsys.readouterr().out
    assert json.loads((directory / "config.json").read_text())["quantization_config"]["quant_algo"] == "FP8"
    assert sorted(p.name for p in directory.iterdir() if p.name.startswith(".")) == []  # no temporary file left
    model = AutoModelForCausalLM.from_pretrained(directory)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(token_ids).logits, logits)
    assert upgrade_checkpoint(directory) is None  # a second run changes nothing


def test_cli_refuses_an_old_export_and_names_the_upgrade_command(old_export, tmp_path, capsys):
    directory, _ = old_export
    assert main(["export", str(directory), "--export_path", str(tmp_path / "out")]) == 1
    assert f"hf-ptq upgrade {directory}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_upgrade_refuses_an_invalid_hf_quant_config_and_leaves_config_json(old_export):
    directory, _ = old_export
    (directory / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "BOGUS"}}))
    before = (directory / "config.json").read_bytes()
    with pytest.raises(ValueError, match="hf_quant_config.json.*BOGUS"):
        upgrade_checkpoint(directory)
    assert (directory / "config.json").read_bytes() == before
