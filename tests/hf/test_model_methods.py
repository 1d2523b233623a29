"""num_parameters() of a quantized model counts the weights it stands for, quantized in memory or loaded."""

import torch
from conftest import tiny_llama
from transformers import AutoModelForCausalLM

from hf_ptq_plugin import PTQConfig, quantize


def test_num_parameters_counts_each_quantized_weight_once_in_memory_and_after_loading(tmp_path):
    expected = tiny_llama().num_parameters()
    ids = torch.randint(0, 320, (2, 16))
    model = quantize(tiny_llama(), PTQConfig(qformat="int4_awq", algorithm="max"), forward_loop=lambda m: m(ids))
    assert model.num_parameters() == expected
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.num_parameters() == expected
    # Only what trains: embeddings, norms, lm_head (excluded by default); the quantized weights are frozen codes.
    trainable = sum(p.numel() for p in loaded.parameters() if p.requires_grad)
    assert loaded.num_parameters(only_trainable=True) == trainable < expected
    embeddings = loaded.model.embed_tokens.weight.numel()
    assert loaded.num_parameters(exclude_embeddings=True) == expected - embeddings
