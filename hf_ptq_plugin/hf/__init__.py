"""The transformers edge: the quantizer registered for quant_method "modelopt", quantizing while
`from_pretrained` reads a full-precision checkpoint, loading pre-quantized checkpoints (ours or
ModelOpt's), and dequantizing back to a plain model."""
