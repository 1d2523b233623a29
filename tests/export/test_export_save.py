"""save_pretrained's guarantees: atomic writes, refusal to write made-up scales, files carried along."""

import logging

import pytest
import torch
import transformers.modeling_utils
from conftest import tiny_llama
from transformers import AutoModelForCausalLM, PreTrainedModel

import hf_ptq_plugin.export.save as save_module
from hf_ptq_plugin import PTQConfig, attach_quantizer, export_checkpoint, quantize


def snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def model_int8(token_ids):
    return quantize(tiny_llama(), PTQConfig(qformat="int8_wo"))


def fail(*args, **kwargs):
    raise OSError("disk full")


@pytest.mark.parametrize("target", [(transformers.modeling_utils, "safe_save_file"),
                                    (save_module, "write_hf_quant_config")])
def test_an_exception_mid_save_leaves_the_destination_as_it_was(target, model_int8, tmp_path, monkeypatch):
    destination = tmp_path / "ckpt"
    export_checkpoint(quantize(tiny_llama(seed=3), PTQConfig(qformat="int8_wo")), destination)
    (destination / "tokenizer.json").write_text("{}")
    before = snapshot(destination)
    monkeypatch.setattr(*target, fail)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(model_int8, destination)
    assert snapshot(destination) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary directory left behind


def test_a_failed_first_save_creates_nothing(model_int8, tmp_path, monkeypatch):
    monkeypatch.setattr(save_module, "write_hf_quant_config", fail)
    with pytest.raises(OSError):
        export_checkpoint(model_int8, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


def test_saving_over_a_checkpoint_keeps_other_files_and_drops_stale_shards(model_int8, token_ids, tmp_path):
    destination = tmp_path / "ckpt"
    export_checkpoint(quantize(tiny_llama(seed=3), PTQConfig(qformat="int8_wo")), destination, max_shard_size="100KB")
    (destination / "tokenizer.json").write_text('{"kept": true}')
    (destination / "notes").mkdir()
    (destination / "notes" / "eval.txt").write_text("ppl 10")
    export_checkpoint(model_int8, destination)
    names = sorted(p.name for p in destination.iterdir())
    assert names == ["README.md", "config.json", "generation_config.json", "hf_quant_config.json", "model.safetensors",
                     "notes", "tokenizer.json"]
    assert (destination / "notes" / "eval.txt").read_text() == "ppl 10"
    reloaded = AutoModelForCausalLM.from_pretrained(destination)
    with torch.no_grad():
        assert torch.equal(reloaded(token_ids).logits, model_int8(token_ids).logits)


def test_a_model_loaded_from_a_directory_can_be_saved_back_into_it(model_int8, token_ids, tmp_path):
    export_checkpoint(model_int8, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    reloaded.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(token_ids).logits, model_int8(token_ids).logits)


def test_tokenizer_files_of_the_source_directory_come_along(tmp_path, token_ids):
    source = tmp_path / "src"
    tiny_llama().save_pretrained(source)
    (source / "tokenizer.json").write_text('{"version": "1.0"}')
    (source / "tokenizer_config.json").write_text("{}")
    (source / "notes.txt").write_text("not a sidecar")
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=PTQConfig(qformat="int8_wo"))
    model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert (tmp_path / "out" / "tokenizer_config.json").exists() and not (tmp_path / "out" / "notes.txt").exists()


@pytest.mark.parametrize("config", [PTQConfig(qformat="fp8"), PTQConfig(qformat="nvfp4"),
                                    PTQConfig(qformat="int8_wo", kv_cache_qformat="fp8")])
def test_uncalibrated_models_refuse_to_save_and_say_to_calibrate(config, tmp_path, caplog):
    source = tmp_path / "src"
    tiny_llama().save_pretrained(source)
    with caplog.at_level(logging.WARNING):
        model = AutoModelForCausalLM.from_pretrained(source, quantization_config=config)
    assert "not calibrated" in caplog.text
    with pytest.raises(ValueError, match=r"calibrate\(model, data\)"):
        model.save_pretrained(tmp_path / "out")
    with pytest.raises(ValueError, match=r"calibrate\(model, data\)"):  # transformers' own save path too
        PreTrainedModel.save_pretrained(model, tmp_path / "raw")
    assert not (tmp_path / "out").exists() and not list((tmp_path / "raw").glob("*.safetensors"))


def test_fused_siblings_with_different_weight_scale_2_are_refused(token_ids, tmp_path):
    model = quantize(tiny_llama(), PTQConfig(qformat="w4a16_nvfp4"))
    model.model.layers[0].self_attn.k_proj.weight_scale_2.mul_(2)
    with pytest.raises(ValueError, match=r"k_proj.*different weight_scale_2.*one shared weight_scale_2"):
        export_checkpoint(model, tmp_path / "out")


def test_attach_quantizer_makes_save_pretrained_write_the_unified_checkpoint(model_int8, tmp_path):
    attach_quantizer(model_int8)
    attach_quantizer(model_int8)  # idempotent
    assert model_int8.is_quantized and model_int8.config.quantization_config.qformat == "int8_wo"
    model_int8.save_pretrained(tmp_path)
    assert (tmp_path / "hf_quant_config.json").exists()


def test_push_to_hub_through_save_pretrained_says_what_to_use_instead(model_int8, tmp_path):
    attach_quantizer(model_int8)
    with pytest.raises(ValueError, match=r"model.push_to_hub\(repo_id\)"):
        model_int8.save_pretrained(tmp_path, push_to_hub=True)
