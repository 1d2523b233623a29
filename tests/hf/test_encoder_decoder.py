"""Encoder-decoder models (T5): the modules the class keeps in fp32 stay unquantized, and the checkpoint reloads."""

import pytest
import torch
from conftest import sqnr_db
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


@pytest.mark.parametrize("qformat, algorithm, sequential", [("int4_awq", "awq_lite", True), ("int4_awq", "gptq", False),
                                                            ("int8_sq", "smoothquant", True)])
def test_layer_streamed_algorithms_calibrate_the_encoder_then_the_decoder(qformat, algorithm, sequential, tmp_path):
    model, inputs = tiny_t5(), batch()
    with torch.no_grad():
        reference = model(**inputs).logits
    rounded = tiny_t5()
    quantize(rounded, PTQConfig(qformat=qformat, algorithm="max"), forward_loop=lambda m: m(**inputs))
    config = PTQConfig(qformat=qformat, algorithm=algorithm, sequential=sequential)
    quantize(model, config, forward_loop=lambda m: m(**inputs))
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 28 and {n.split(".")[0] for n in quantized} == {"encoder", "decoder"}
    with torch.no_grad():
        logits, rounded_logits = model(**inputs).logits, rounded(**inputs).logits
    assert sqnr_db(reference, logits) > sqnr_db(reference, rounded_logits)  # calibrated beats round-to-nearest
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(T5ForConditionalGeneration.from_pretrained(tmp_path)(**inputs).logits, logits)
