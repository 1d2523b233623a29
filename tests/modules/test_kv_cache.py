"""KV-cache quantization: calibrated k/v scales, quantized K and V in attention, cache consistency."""

import pytest
import torch
import transformers.models.llama.modeling_llama as llama
from conftest import sqnr_db, tiny_llama
from torch import nn

from hf_ptq_plugin import PTQConfig, quantize
from hf_ptq_plugin.modules.kv_cache import quantize_key_value


def _calibrate(kv, token_ids, qformat="int8_wo"):
    model = tiny_llama()
    quantize(model, PTQConfig(qformat=qformat, kv_cache_qformat=kv), forward_loop=lambda m: m(token_ids))
    return model


def test_scales_are_amax_over_448_of_k_after_rope_and_of_v(monkeypatch, token_ids):
    model = tiny_llama()
    k_amax, v_amax = [], []
    original_rope = llama.apply_rotary_pos_emb

    def recording_rope(q, k, cos, sin, *args, **kwargs):
        q, k = original_rope(q, k, cos, sin, *args, **kwargs)
        k_amax.append(k.abs().max())
        return q, k

    monkeypatch.setattr(llama, "apply_rotary_pos_emb", recording_rope)
    hooks = [layer.self_attn.v_proj.register_forward_hook(lambda m, a, out: v_amax.append(out.abs().max()))
             for layer in model.model.layers]
    with torch.no_grad():
        model(token_ids)
    for hook in hooks:
        hook.remove()
    quantize(model, PTQConfig(qformat="int8_wo", kv_cache_qformat="fp8", algorithm="max"),
             forward_loop=lambda m: m(token_ids))
    for i, layer in enumerate(model.model.layers):
        assert torch.equal(layer.self_attn.k_proj.k_scale, k_amax[i] / 448)
        assert torch.equal(layer.self_attn.v_proj.v_scale, v_amax[i] / 448)
        assert layer.self_attn.k_proj.k_scale.dtype == torch.float32 and layer.self_attn.k_proj.k_scale.dim() == 0


def test_fp8_kv_values_land_on_the_fp8_grid(token_ids):
    model = _calibrate("fp8", token_ids)
    attention = model.model.layers[0].self_attn
    key, value = torch.randn(1, 2, 5, 32), torch.randn(1, 2, 5, 32)
    qk, qv = quantize_key_value(attention, key, value)
    k_steps = qk / attention.k_proj.k_scale
    assert torch.equal(k_steps.to(torch.float8_e4m3fn).float(), k_steps)
    assert not torch.equal(qk, key) and not torch.equal(qv, value)


@pytest.mark.parametrize("kv", ["fp8", "nvfp4"])
def test_kv_quantization_changes_logits_a_little(kv, token_ids):
    weights_only = _calibrate("none", token_ids)
    with_kv = _calibrate(kv, token_ids)
    with torch.no_grad():
        a, b = weights_only(token_ids).logits, with_kv(token_ids).logits
    assert not torch.equal(a, b)
    assert sqnr_db(a, b) > (25 if kv == "fp8" else 12)


@pytest.mark.parametrize("kv", ["fp8", "nvfp4"])
def test_incremental_decoding_with_cache_matches_the_full_forward(kv, token_ids):
    model = _calibrate(kv, token_ids)
    with torch.no_grad():
        full = model(token_ids).logits[:, -1]
        prefix = model(token_ids[:, :-1], use_cache=True)
        step = model(token_ids[:, -1:], cache=prefix.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


def test_generate_runs_with_a_quantized_cache(token_ids):
    model = _calibrate("fp8", token_ids, qformat="fp8")
    out = model.generate(token_ids[:1, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)


def test_model_without_separate_k_and_v_projections_is_an_error():
    class FusedQKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)

        def forward(self, x):
            return self.qkv(x)

    with pytest.raises(ValueError, match="separate k_proj and v_proj"):
        quantize(FusedQKV(), PTQConfig(qformat="int8_wo", kv_cache_qformat="fp8"),
                 forward_loop=lambda m: m(torch.ones(1, 16)))
