"""The modules a quantized model is made of: `QuantLinear` (its buffers are the checkpoint's tensors),
`QuantExperts` (fused MoE experts), and the attention functions that quantize the KV cache."""
