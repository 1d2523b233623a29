"""calibrate(): static activation and KV scales of an already-quantized model, from new data."""

import pytest
import torch
from conftest import tiny_llama

from hf_ptq_plugin import PTQConfig, quantize
from hf_ptq_plugin.calibration.calibrate import calibrate


def test_sets_input_and_kv_scales_from_the_new_data(token_ids):
    model = tiny_llama()
    quantize(model, PTQConfig(qformat="nvfp4", kv_cache_qformat="fp8"), forward_loop=lambda m: m(token_ids[:1, :4]))
    down = model.model.layers[1].mlp.down_proj
    seen = {}
    hook = down.register_forward_pre_hook(lambda m, args: seen.update(amax=args[0].abs().max()))
    new_ids = token_ids * 0 + torch.arange(token_ids.shape[1]) % 7
    before_k = model.model.layers[0].self_attn.k_proj.k_scale.clone()
    calibrate(model, lambda m: m(new_ids))
    hook.remove()
    assert torch.equal(down.input_scale, seen["amax"] / 2688)
    assert down.input_calibrated
    assert not torch.equal(model.model.layers[0].self_attn.k_proj.k_scale, before_k)


def test_pre_quant_scale_is_included_in_the_activation_amax(token_ids):
    model = tiny_llama()
    quantize(model, PTQConfig(qformat="int8_sq", pre_quant_scales="keep"), forward_loop=lambda m: m(token_ids))
    q_proj = model.model.layers[0].self_attn.q_proj
    seen = {}
    hook = q_proj.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    calibrate(model, lambda m: m(token_ids))
    hook.remove()
    expected = (seen["x"] * q_proj.pre_quant_scale).abs().max() / 127
    torch.testing.assert_close(q_proj.input_scale, expected, rtol=1e-6, atol=0)


def test_algorithms_that_change_weights_are_refused():
    model = tiny_llama()
    quantize(model, PTQConfig(qformat="int4_awq", algorithm="max"))
    with pytest.raises(ValueError, match="only 'max' can calibrate it.*quantize"):
        calibrate(model, lambda m: None, algorithm="awq_lite")
    with pytest.raises(ValueError, match="no quantized layer or KV cache with static scales"):
        calibrate(model, lambda m: None)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        calibrate(model, ["some text"])


def test_non_finite_activations_are_left_out_of_the_statistics_with_a_warning(token_ids, caplog):
    """The documented rule: NaN/Inf calibration activations count as absent, and each layer says so once."""
    clean, poisoned = tiny_llama(), tiny_llama()
    down = poisoned.model.layers[0].mlp.down_proj

    def inject(module, args):
        x = args[0].clone()
        x[0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        x[0, 0, 3:] = 0.0  # the rest of that token carries nothing, so the clean run sees the same maxima
        return (x,)

    def zero_token(module, args):
        x = args[0].clone()
        x[0, 0, :] = 0.0
        return (x,)

    clean.model.layers[0].mlp.down_proj.register_forward_pre_hook(zero_token)
    down.register_forward_pre_hook(inject)
    with caplog.at_level("WARNING"):
        quantize(poisoned, PTQConfig(qformat="int8_sq", algorithm="max"), forward_loop=lambda m: m(token_ids))
    quantize(clean, PTQConfig(qformat="int8_sq", algorithm="max"), forward_loop=lambda m: m(token_ids))
    poisoned_down = poisoned.model.layers[0].mlp.down_proj
    assert torch.isfinite(poisoned_down.input_scale)
    assert torch.equal(poisoned_down.input_scale, clean.model.layers[0].mlp.down_proj.input_scale)
    assert caplog.text.count("model.layers.0.mlp.down_proj: 3 of") == 1 and "left out of the statistics" in caplog.text
