"""AWQ pre_quant_scale: folded into the norm for q/k/v and gate/up, kept on o_proj and down_proj."""

import pytest
import torch
from conftest import tiny_llama
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

from hf_ptq_plugin import PTQConfig, export_checkpoint, quantize
from hf_ptq_plugin.calibration.folding import _scale_norm, fold_pre_quant_scales

GROUPS = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}


def with_scales(name, token_ids, shared=True):
    """A quantized tiny Llama whose layers carry AWQ-style pre_quant_scales (one per fused group)."""
    model = quantize(tiny_llama(), PTQConfig(qformat=name, algorithm="max"), forward_loop=lambda m: m(token_ids))
    torch.manual_seed(5)
    for layer in model.model.layers:
        for part, leaves in GROUPS.items():
            scale = torch.rand(128) + 0.5
            for i, leaf in enumerate(leaves):
                module = getattr(getattr(layer, part), leaf)
                module.pre_quant_scale = scale.clone() if shared or i == 0 else scale.flip(0)
        layer.self_attn.o_proj.pre_quant_scale = torch.rand(128) + 0.5
        layer.mlp.down_proj.pre_quant_scale = torch.rand(256) + 0.5
    return model


def run(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name", ["int4_awq", "nvfp4_awq", "w4a8_awq"])
def test_awq_scales_fold_into_norms_and_the_checkpoint_reloads_bit_identically(name, token_ids, tmp_path):
    model = with_scales(name, token_ids)
    layer = model.model.layers[0]
    norm_before = layer.input_layernorm.weight.detach().clone()
    qkv_scale = layer.self_attn.q_proj.pre_quant_scale.clone()
    unfolded = run(model, token_ids)
    fold_pre_quant_scales(model)  # the calibration pipeline's last step
    folded = run(model, token_ids)
    export_checkpoint(model, tmp_path)
    torch.testing.assert_close(folded, unfolded, rtol=1e-4, atol=1e-4)  # the same function, up to rounding
    with safe_open(tmp_path / "model.safetensors", framework="pt") as handle:
        keys = set(handle.keys())
        assert torch.equal(handle.get_tensor("model.layers.0.input_layernorm.weight"), norm_before * qkv_scale)
    for i in range(2):
        for part, leaves in GROUPS.items():
            assert not any(f"model.layers.{i}.{part}.{leaf}.pre_quant_scale" in keys for leaf in leaves)
        assert {f"model.layers.{i}.self_attn.o_proj.pre_quant_scale",
                f"model.layers.{i}.mlp.down_proj.pre_quant_scale"} <= keys
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.model.layers[1].mlp.down_proj.pre_quant_scale.shape == (256,)
    assert torch.equal(run(reloaded, token_ids), folded)


def test_smoothquant_scales_are_not_folded(token_ids, tmp_path):
    model = with_scales("int8_sq", token_ids)
    export_checkpoint(model, tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as handle:
        assert "model.layers.0.self_attn.q_proj.pre_quant_scale" in set(handle.keys())
    assert torch.equal(run(AutoModelForCausalLM.from_pretrained(tmp_path), token_ids), run(model, token_ids))


def test_a_fused_group_with_different_scales_is_an_error_naming_the_norm(token_ids, tmp_path):
    model = with_scales("int4_awq", token_ids, shared=False)
    with pytest.raises(ValueError, match=r"fed by 'model.layers.0.input_layernorm' carry different pre_quant_scale"):
        fold_pre_quant_scales(model)
    with pytest.raises(ValueError, match=r"_proj'\] have different pre_quant_scale"):
        export_checkpoint(model, tmp_path / "out")  # nor can engines fuse the group
    assert not (tmp_path / "out").exists()


def test_fold_returns_the_norms_and_is_idempotent(token_ids):
    model = with_scales("int4_awq", token_ids)
    assert fold_pre_quant_scales(model) == [f"model.layers.{i}.{n}" for i in range(2)
                                           for n in ("input_layernorm", "post_attention_layernorm")]
    assert fold_pre_quant_scales(model) == []


class GemmaRMSNorm(nn.Module):  # the name marks a zero-centred norm: x * (1 + weight)
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([0.0, 0.5, -0.25]))


def test_zero_centred_norms_fold_as_one_plus_weight():
    norm, scale = GemmaRMSNorm(), torch.tensor([2.0, 0.5, 4.0])
    _scale_norm("norm", norm, scale)
    assert torch.equal(1 + norm.weight.detach(), torch.tensor([1.0, 1.5, 0.75]) * scale)


@pytest.mark.parametrize("name", ["int4_awq", "w4a8_awq"])
def test_saving_an_awq_model_changes_nothing_so_what_was_measured_is_what_is_saved(name, token_ids, tmp_path):
    model = quantize(tiny_llama(), PTQConfig(qformat=name, algorithm="awq_lite"), forward_loop=lambda m: m(token_ids))
    measured = run(model, token_ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "out")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(run(model, token_ids), measured)
    assert torch.equal(run(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), token_ids), measured)
