"""Per-tensor FP8: engine-fused siblings (q/k/v, gate/up) share one weight_scale, as vLLM
(`requantize_with_max_scale`) and TensorRT-LLM (fused-QKV loading) otherwise requantize the fused
weight to the largest scale and compute other weights than ours. In memory and while loading."""

import pytest
import torch
from conftest import tiny_llama
from transformers import AutoModelForCausalLM

from hf_ptq_plugin import PTQConfig, quantize
from hf_ptq_plugin.numerics import dequantize_weight

GROUPS = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}


def assert_siblings_share_the_groups_scale(model, reference):
    for i, layer in enumerate(model.model.layers):
        for part, leaves in GROUPS.items():
            members = [getattr(getattr(layer, part), leaf) for leaf in leaves]
            dense = [getattr(getattr(reference.model.layers[i], part), leaf).weight for leaf in leaves]
            group_amax = torch.stack([w.abs().amax() for w in dense]).amax()
            for member in members:
                torch.testing.assert_close(member.weight_scale, (group_amax / 448).reshape(()), rtol=0, atol=0)


def test_fp8_siblings_share_one_weight_scale_when_quantized_in_memory(token_ids):
    reference = tiny_llama()
    model = quantize(tiny_llama(), PTQConfig(qformat="fp8", algorithm="max"), forward_loop=lambda m: m(token_ids))
    assert_siblings_share_the_groups_scale(model, reference)
    o_proj = model.model.layers[0].self_attn.o_proj  # not fused: its own scale
    assert torch.equal(o_proj.weight_scale, reference.model.layers[0].self_attn.o_proj.weight.abs().amax() / 448)
    dense = reference.model.layers[0].self_attn.k_proj.weight
    error = (dequantize_weight(model.model.layers[0].self_attn.k_proj.weight_buffers(), model.ptq_config.format)
             .float() - dense).abs().max()
    assert error <= dense.abs().max() / 8  # still an FP8 rounding of k_proj


def test_gptq_fp8_siblings_share_one_weight_scale(token_ids):
    model = quantize(tiny_llama(), PTQConfig(qformat="fp8", algorithm="gptq"), forward_loop=lambda m: m(token_ids))
    for layer in model.model.layers:
        for part, leaves in GROUPS.items():
            scales = [getattr(getattr(layer, part), leaf).weight_scale for leaf in leaves]
            assert all(torch.equal(scale, scales[0]) for scale in scales), (part, scales)


@pytest.mark.parametrize("algorithm", ["max"])
def test_fp8_siblings_share_one_weight_scale_when_quantized_while_loading(algorithm, tmp_path):
    reference = tiny_llama()
    reference.save_pretrained(tmp_path / "src")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "src", quantization_config=PTQConfig(qformat="fp8"))
    assert_siblings_share_the_groups_scale(loaded, reference)
