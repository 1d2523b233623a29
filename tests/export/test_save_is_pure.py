"""Saving is a pure function of the model: every export leaves the model as it was, plans once, writes
config.json and the model card once, and what is reloaded computes exactly what was saved."""

import json

import pytest
import torch
from conftest import tiny_llama, word_tokenizer
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, PreTrainedModel

import hf_ptq_plugin.export.model_card as model_card_module
import hf_ptq_plugin.export.save as save_module
import hf_ptq_plugin.hf.quantizer as quantizer_module
from hf_ptq_plugin import PTQConfig, export_checkpoint, quantize
from hf_ptq_plugin.export.model_card import EvaluationRecord
from hf_ptq_plugin.export.unified import plan_export

MODELS = [("int4_awq", "awq_lite"),  # AWQ: a shared pre_quant_scale per fused group, folded into the norms
          ("int8_sq", "smoothquant"),  # a shared pre_quant_scale per fused group, kept on the layers
          ("fp8", "max")]
# Calibrated with pre_quant_scales="keep", o_proj's and down_proj's scales stay on the layers (and
# SmoothQuant's on every layer); compressed-tensors has no pre_quant_scale: those models are refused,
# and the refusal changes nothing either.
REFUSED = {("int4_awq", "vllm"), ("int8_sq", "vllm")}


def quantized(qformat, algorithm, token_ids):
    config = PTQConfig(qformat=qformat, algorithm=algorithm, pre_quant_scales="keep")
    return quantize(tiny_llama(), config, forward_loop=lambda m: m(token_ids))


def model_state(model):
    """Every parameter and buffer (name, storage, values) and the config, as comparable values."""
    tensors = {name: (t.untyped_storage().data_ptr(), t.detach().clone())
               for name, t in [*model.named_parameters(), *model.named_buffers()]}
    return tensors, model.config.to_dict()


def assert_same_state(before, after):
    (tensors, config), (tensors_after, config_after) = before, after
    assert tensors.keys() == tensors_after.keys()
    for name, (storage, value) in tensors.items():
        assert tensors_after[name][0] == storage, f"{name} has new storage"
        assert torch.equal(tensors_after[name][1], value), f"{name} changed"
    assert config_after == config


def save(model, directory, target):
    if target == "modelopt":
        model.save_pretrained(directory)
    else:
        export_checkpoint(model, directory, target=target)


@pytest.mark.parametrize("target", ["modelopt", "vllm", "trtllm-legacy"])
@pytest.mark.parametrize("qformat, algorithm", MODELS)
def test_every_export_leaves_the_model_as_it_was(qformat, algorithm, target, token_ids, tmp_path):
    model = quantized(qformat, algorithm, token_ids)
    before = model_state(model)
    if (qformat, target) in REFUSED:
        with pytest.raises(ValueError, match=r"keep a pre_quant_scale .* cannot express"):
            save(model, tmp_path / "out", target)
    else:
        save(model, tmp_path / "out", target)
    assert_same_state(before, model_state(model))
    assert model.hf_quantizer.export_plan is None


@pytest.mark.parametrize("qformat, algorithm", MODELS[:2])
def test_fused_siblings_hold_their_own_copy_of_the_shared_scale(qformat, algorithm, token_ids):
    model = quantized(qformat, algorithm, token_ids)
    buffers = [b for _, b in model.named_buffers()]
    assert len({b.untyped_storage().data_ptr() for b in buffers}) == len(buffers)
    attention = model.model.layers[0].self_attn
    if qformat == "int8_sq":  # not folded: q/k/v keep equal scales
        assert torch.equal(attention.q_proj.pre_quant_scale, attention.k_proj.pre_quant_scale)


def test_a_failed_save_also_leaves_the_model_as_it_was(token_ids, tmp_path, monkeypatch):
    model = quantized("fp8", "max", token_ids)
    before = model_state(model)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(save_module, "write_hf_quant_config", fail)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "out")
    assert_same_state(before, model_state(model))
    assert model.hf_quantizer.export_plan is None and model.config.quantization_config is model.ptq_config


@pytest.mark.parametrize("save_pretrained", [lambda m, d: m.save_pretrained(d), PreTrainedModel.save_pretrained])
def test_one_save_plans_the_export_once(save_pretrained, token_ids, tmp_path, monkeypatch):
    model, calls = quantized("fp8", "max", token_ids), []

    def spy(*args):
        calls.append(args)
        return plan_export(*args)

    monkeypatch.setattr(save_module, "plan_export", spy)
    monkeypatch.setattr(quantizer_module, "plan_export", spy)
    save_pretrained(model, tmp_path / "out")
    assert len(calls) == 1


def test_config_json_is_transformers_own_with_the_checkpoint_quantization_config(token_ids, tmp_path):
    model = quantized("int4_awq", "awq_lite", token_ids)
    model.save_pretrained(tmp_path / "ours")
    PreTrainedModel.save_pretrained(model, tmp_path / "plain")
    ours, plain = (json.loads((tmp_path / name / "config.json").read_text()) for name in ("ours", "plain"))
    assert ours.pop("quantization_config") == plan_export(model, model.ptq_config).quantization_config()
    assert plain.pop("quantization_config") == model.ptq_config.to_dict()
    assert ours == plain


@pytest.mark.parametrize("target", ["modelopt", "vllm", "trtllm-legacy"])
def test_the_tokenizer_and_the_one_card_are_written_before_the_checkpoint_is_in_place(target, token_ids, tmp_path,
                                                                                      monkeypatch):
    model, written = quantized("fp8", "max", token_ids), []
    write_model_card = model_card_module.write_model_card
    monkeypatch.setattr(model_card_module, "write_model_card",
                        lambda m, directory, **kwargs: written.append(directory) or write_model_card(m, directory,
                                                                                                     **kwargs))
    evaluation = EvaluationRecord("pride.txt", 3, 16, after=12.5, before=12.0)
    export_checkpoint(model, tmp_path / "out", target=target, tokenizer=word_tokenizer(), base_model="org/tiny",
                      evaluation=evaluation, model_id="me/tiny-fp8")
    assert len(written) == 1 and written[0] != tmp_path / "out"  # into the staging directory
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == "org/tiny" and "| quantized | 12.5000 |" in card.text
    assert card.text.lstrip().startswith("# tiny-fp8 (fp8)")  # named after model_id, not the directory
    assert (tmp_path / "out" / "tokenizer_config.json").exists()


@pytest.mark.parametrize("qformat", ["int4_awq", "nvfp4_awq"])
def test_an_awq_model_reloads_to_bit_identical_logits(qformat, token_ids, tmp_path):
    model = quantized(qformat, "awq_lite", token_ids)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(token_ids).logits, model(token_ids).logits)
