"""Encoder-decoder models (T5): the modules the class keeps in fp32 stay unquantized, and the checkpoint reloads."""

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from hf_ptq_plugin import PTQConfig, QuantLinear, quantize


def tiny_t5():
    torch.manual_seed(0)
    config = T5Config(vocab_size=320, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                      num_heads=4, decoder_start_token_id=0)
    return T5ForConditionalGeneration(config).eval()


def batch():
    torch.manual_seed(1)
    return {"input_ids": torch.randint(0, 320, (2, 12)), "decoder_input_ids": torch.randint(0, 320, (2, 8))}


def test_t5_keeps_wo_in_fp32_quantizes_the_rest_and_reloads(tmp_path):
    model, inputs = tiny_t5(), batch()
    quantize(model, PTQConfig(qformat="fp8", algorithm="max"), forward_loop=lambda m: m(**inputs))
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 28 and not [n for n in quantized if n.endswith(".wo")]  # T5's _keep_in_fp32_modules
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(T5ForConditionalGeneration.from_pretrained(tmp_path)(**inputs).logits, expected)


def test_layer_streamed_algorithms_name_the_encoder_layers_they_cannot_stream():
    model, inputs = tiny_t5(), batch()
    with pytest.raises(ValueError, match=r"layer-streamed calibration handles Linears inside 'decoder.block'; "
                                         r"\['encoder.block.0.layer.0.SelfAttention.q'.* exclude them"):
        quantize(model, PTQConfig(qformat="int4_awq", algorithm="awq_lite"), forward_loop=lambda m: m(**inputs))
