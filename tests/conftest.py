"""Shared fixtures: tiny Llama, MoE and BART models built from a config (no hub access), a word-level tokenizer,
and an SQNR helper."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

WORDS = "the a of and to in is it that was he she you with for his her on at by not be had".split()


def tiny_bart():
    torch.manual_seed(0)
    config = BartConfig(vocab_size=320, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64)
    return BartForConditionalGeneration(config).eval()


def tiny_llama_config(hidden_size=128, intermediate_size=256, layers=2, heads=4, kv_heads=2, vocab=320):
    return LlamaConfig(hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                       max_position_embeddings=256, tie_word_embeddings=False)


def tiny_llama(seed=0, **overrides) -> LlamaForCausalLM:
    """A fresh fp32 Llama with its own config object (attention switches must not leak between tests)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def tiny_moe(family: str, seed: int = 0, layers: int = 2, experts: int = 4, top_k: int = 2):
    """hidden 64, top-2 of 4 experts; expert intermediate 64 (Qwen3-MoE) or 128 (Mixtral)."""
    torch.manual_seed(seed)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=top_k, vocab_size=320)
    if family == "qwen3_moe":
        return Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, moe_intermediate_size=64, num_experts=experts,
                                                  head_dim=16)).eval()
    return MixtralForCausalLM(MixtralConfig(**common, num_local_experts=experts)).eval()


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS (ids 2..), with <pad>=0 and <unk>=1: no files, no hub."""
    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    noise = (reference.float() - approx.float()).pow(2).mean()
    return (10 * torch.log10(reference.float().pow(2).mean() / noise)).item()


@pytest.fixture
def token_ids():
    torch.manual_seed(1)
    return torch.randint(0, 320, (2, 24))
