"""Perplexity equals transformers' own loss; model bytes count tied tensors once."""

import math

import torch
from conftest import tiny_llama, tiny_llama_config
from transformers import LlamaForCausalLM

from hf_ptq_plugin import PTQConfig, quantize
from hf_ptq_plugin.evaluation import model_bytes, perplexity


def test_perplexity_is_exp_of_the_models_own_mean_loss():
    model = tiny_llama()
    windows = torch.randint(0, 320, (3, 16))
    with torch.no_grad():
        loss = model(input_ids=windows, labels=windows).loss
    assert math.isclose(perplexity(model, windows, batch_size=2), math.exp(loss.item()), rel_tol=1e-5)


def test_model_bytes_counts_tied_weights_once_and_shrinks_when_quantized():
    config = tiny_llama_config()
    config.tie_word_embeddings = True
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())  # parameters() already yields tied ones once
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # rotary frequencies
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model_bytes(model) == 4 * params + buffers
    assert model_bytes(model, torch.bfloat16) == 2 * params + buffers
    before = model_bytes(model)
    quantize(model, PTQConfig(qformat="int4_awq", algorithm="max"))
    assert model_bytes(model) < before
