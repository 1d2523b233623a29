"""Encoder-decoder models (T5, BART, Whisper): the modules the class keeps in fp32 stay unquantized, the
layer-streamed algorithms calibrate the encoder then the decoder, and the checkpoint reloads."""

import pytest
import torch
from conftest import sqnr_db, tiny_bart
from transformers import (
    T5Config,
    T5ForConditionalGeneration,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

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


def block_inputs_seen_by_the_model(model, blocks, inputs):
    """The hidden states each block receives in an ordinary forward pass."""
    seen = []
    handles = [block.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone())) for block in blocks]
    with torch.no_grad():
        model(**inputs)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
def test_replaying_t5_blocks_one_at_a_time_reproduces_the_models_block_inputs(stack):
    """T5's first block computes the attention biases and hands them on; the replay must too."""
    from hf_ptq_plugin.calibration.blocks import block_lists, capture_block_inputs, run_block

    model, inputs = tiny_t5(), batch()
    lists = block_lists(model, [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)])
    assert [name for name, _ in lists] == ["encoder.block", "decoder.block"]
    blocks = dict(lists)[f"{stack}.block"]
    expected = block_inputs_seen_by_the_model(model, blocks, inputs)
    replayed = capture_block_inputs(model, blocks, lambda m: m(**inputs))
    for index, block in enumerate(blocks):
        torch.testing.assert_close(replayed[0][0][0], expected[index], rtol=0, atol=0)
        replayed = run_block(block, replayed)


def tiny_whisper():
    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=320, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
                           max_source_positions=32, max_target_positions=32, decoder_start_token_id=1, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2)
    return WhisperForConditionalGeneration(config).eval()


FAMILIES = {"t5": (tiny_t5, 28), "bart": (tiny_bart, 32), "whisper": (tiny_whisper, 32)}  # quantized Linears


def family_batch(family: str) -> dict:
    if family != "whisper":
        return batch()
    torch.manual_seed(1)  # log-mel frames: twice the encoder's positions
    return {"input_features": torch.randn(2, 16, 64), "decoder_input_ids": torch.randint(3, 320, (2, 8))}


@pytest.mark.parametrize("qformat, algorithm, sequential", [("int4_awq", "awq_lite", True), ("int4_awq", "gptq", False),
                                                            ("int8_sq", "smoothquant", True)])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_layer_streamed_algorithms_calibrate_the_encoder_then_the_decoder(family, qformat, algorithm, sequential,
                                                                         tmp_path, caplog):
    make, expected_count = FAMILIES[family]
    model, inputs = make(), family_batch(family)
    with torch.no_grad():
        reference = model(**inputs).logits
    rounded = make()
    quantize(rounded, PTQConfig(qformat=qformat, algorithm="max"), forward_loop=lambda m: m(**inputs))
    config = PTQConfig(qformat=qformat, algorithm=algorithm, sequential=sequential)
    quantize(model, config, forward_loop=lambda m: m(**inputs))
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == expected_count and any(".encoder." in f".{n}" for n in quantized)
    # BART is post-norm: a norm's output is also the residual, so the smoothing scales cannot go into it.
    refused = "changed the model's outputs" in caplog.text
    assert refused == (family == "bart" and algorithm != "gptq")
    with torch.no_grad():
        logits, rounded_logits = model(**inputs).logits, rounded(**inputs).logits
    # Calibrated is at least as close as round-to-nearest: GPTQ strictly; AWQ and SmoothQuant, which
    # have no outlier channels to fix in random weights, within 1 dB (a misplaced scale costs tens of dB).
    assert sqnr_db(reference, logits) > sqnr_db(reference, rounded_logits) - (0 if algorithm == "gptq" else 1)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(type(model).from_pretrained(tmp_path)(**inputs).logits, logits)
