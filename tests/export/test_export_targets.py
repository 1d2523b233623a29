"""export_checkpoint(target=...): each target writes the dialect engines.py names, reloads exactly, and a
target that cannot serve a format says which engines can."""

import json

import pytest
import torch
from conftest import tiny_llama
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from hf_ptq_plugin import PTQConfig, PTQHfQuantizer, export_checkpoint, quantize
from hf_ptq_plugin.export import EXPORT_TARGETS, export_target_dialect
from hf_ptq_plugin.export.card_sections import DIALECT_NAMES
from hf_ptq_plugin.modules.quant_linear import reference_forward


def quantized(name, token_ids, kv="none"):
    config = PTQConfig(qformat=name, algorithm="max", kv_cache_qformat=kv)
    return quantize(tiny_llama(), config, forward_loop=lambda m: m(token_ids))


def logits(model, token_ids):
    with torch.no_grad():
        return model(token_ids).logits


@pytest.mark.parametrize("target, name, kv", [
    ("modelopt", "w4a8_awq", "none"), ("vllm", "fp8", "fp8"), ("vllm", "nvfp4", "fp8"),
    ("vllm", "w4a16_nvfp4", "none"),
    ("sglang", "fp8", "fp8"), ("sglang", "nvfp4", "none"), ("trtllm", "int4_awq", "none"), ("trtllm", "nvfp4", "nvfp4"),
])
def test_unified_checkpoint_targets_reload_bit_identically(target, name, kv, token_ids, tmp_path):
    model = quantized(name, token_ids, kv)
    before = logits(model, token_ids)
    export_checkpoint(model, tmp_path, target=target)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] == "modelopt"
    assert (tmp_path / "hf_quant_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded.hf_quantizer, PTQHfQuantizer)
    assert torch.equal(logits(reloaded, token_ids), before)


@pytest.mark.parametrize("target, name", [("vllm", "int4_awq"), ("sglang", "int8_wo")])
def test_compressed_tensors_targets_load_through_transformers_compressed_tensors_support(target, name, token_ids,
                                                                                      tmp_path):
    # Weight-only formats: transformers' own compressed-tensors quantizer decompresses our tensors into
    # the very weights our layers use, so a float32 model gives our reference's logits bit for bit.
    model = quantized(name, token_ids)
    export_checkpoint(model, tmp_path, target=target)
    written = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert written["quant_method"] == "compressed-tensors"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded.hf_quantizer).__name__ == "CompressedTensorsHfQuantizer"
    with reference_forward(model):
        assert torch.equal(logits(reloaded, token_ids), logits(model, token_ids))


def test_trtllm_writes_the_legacy_checkpoint_for_formats_it_serves_only_that_way(token_ids, tmp_path):
    export_checkpoint(quantized("int8_sq", token_ids), tmp_path, target="trtllm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "rank0.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["quantization"]["quant_algo"] == "W8A8_SQ_PER_CHANNEL"


@pytest.mark.parametrize("target, name, kv, engines", [
    ("vllm", "w4a8_awq", "none", "engines that can (dialect): trtllm (modelopt)"),
    ("sglang", "mxfp8", "none", "engines that can (dialect): trtllm (modelopt), vllm (modelopt)"),
    ("trtllm", "w4a16_nvfp4", "none", "vllm (modelopt), sglang (compressed-tensors)"),
    ("sglang", "nvfp4", "nvfp4", "trtllm (modelopt)"),
    ("vllm", "nvfp4", "nvfp4", "engines that can (dialect): trtllm (modelopt)"),  # vLLM drops an NVFP4 KV cache
])
def test_a_target_that_cannot_serve_the_format_names_the_engines_that_can(target, name, kv, engines, token_ids,
                                                                         tmp_path):
    model = quantized(name, token_ids, kv)
    with pytest.raises(ValueError, match=f"target '{target}' cannot serve qformat '{name}'") as error:
        export_checkpoint(model, tmp_path / "out", target=target)
    assert str(error.value).endswith(engines)
    assert not (tmp_path / "out").exists()


def test_the_dialect_of_each_target():
    assert export_target_dialect("modelopt", "int8_sq") == "modelopt"
    assert export_target_dialect("vllm", "fp8") == "modelopt"
    assert export_target_dialect("vllm", "int4_awq") == "compressed-tensors"
    assert export_target_dialect("trtllm", "int8_wo") == "modelopt"  # TensorRT-LLM's PyTorch backend
    assert export_target_dialect("trtllm", "int8_sq") == "trtllm-legacy"
    assert export_target_dialect("trtllm-legacy", "fp8") == "trtllm-legacy"
    with pytest.raises(ValueError, match="unknown export target 'tensorrt'; valid: " + ", ".join(EXPORT_TARGETS)):
        export_target_dialect("tensorrt", "fp8")


def test_tp_and_pp_apply_to_the_legacy_checkpoint_only(token_ids, tmp_path):
    with pytest.raises(ValueError, match=r"tp_size/pp_size \(2, 1\) split only the legacy TensorRT-LLM checkpoint"):
        export_checkpoint(quantized("fp8", token_ids), tmp_path, target="vllm", tp_size=2)


@pytest.mark.parametrize("target, name", [("vllm", "int8_wo"), ("trtllm-legacy", "fp8_pc_pt")])
def test_a_failed_write_leaves_the_destination_as_it_was(target, name, token_ids, tmp_path, monkeypatch):
    destination = tmp_path / "ckpt"
    destination.mkdir()
    (destination / "notes.txt").write_text("kept")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", fail)
    # compressed-tensors files are written a tensor at a time: fail after a file's header is on disk
    monkeypatch.setattr("hf_ptq_plugin.export.compressed_tensors.Conversion.take", fail)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(quantized(name, token_ids), destination, target=target)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"] and [p.name for p in destination.iterdir()] == ["notes.txt"]


def test_tokenizer_files_of_the_source_come_along_in_every_dialect(tmp_path):
    source = tmp_path / "src"
    tiny_llama().save_pretrained(source)
    (source / "tokenizer.json").write_text('{"version": "1.0"}')
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=PTQConfig(qformat="fp8_pc_pt"))
    for target in ("sglang", "trtllm-legacy"):  # compressed-tensors, legacy TensorRT-LLM
        export_checkpoint(model, tmp_path / target, target=target)
        assert (tmp_path / target / "tokenizer.json").read_text() == '{"version": "1.0"}', target


@pytest.mark.parametrize("target, name, dialect", [
    ("modelopt", "fp8", "modelopt"), ("sglang", "int8_wo", "compressed-tensors"),
    ("trtllm", "int8_sq", "trtllm-legacy"),
])
def test_every_export_writes_the_model_card_of_its_layout(target, name, dialect, token_ids, tmp_path):
    export_checkpoint(quantized(name, token_ids), tmp_path, target=target)
    card = ModelCard.load(tmp_path / "README.md")
    other_layouts = {"compressed-tensors", "trtllm-legacy"} - {dialect}
    assert name in card.data.tags and not other_layouts & set(card.data.tags)
    assert dialect == "modelopt" or dialect in card.data.tags
    assert f"checkpoint layout: {DIALECT_NAMES[dialect]}" in card.text
