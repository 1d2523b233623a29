"""Quantize a small Llama in memory with FP8 weights, activations and KV cache, then generate.

    python examples/quantize_tiny_llama.py
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_ptq_plugin import PTQConfig, QuantLinear, quantize


def main():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000)
    model = LlamaForCausalLM(config).eval()
    calibration = torch.randint(0, 1000, (8, 64))

    def forward_loop(m):
        with torch.no_grad():
            for batch in calibration.split(2):
                m(input_ids=batch)

    quantize(model, PTQConfig(qformat="fp8", kv_cache_qformat="fp8"), forward_loop=forward_loop)
    swapped = sum(isinstance(m, QuantLinear) for m in model.modules())
    print(f"{swapped} Linear layers quantized; lm_head kept as {type(model.lm_head).__name__}")
    print("k_scale of layer 0:", model.model.layers[0].self_attn.k_proj.k_scale.item())
    print("generated:", model.generate(calibration[:1, :8], max_new_tokens=8, do_sample=False).tolist())


if __name__ == "__main__":
    main()
