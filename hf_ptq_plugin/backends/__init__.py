"""Compute backends behind `QuantLinear.forward`'s one choice: Triton kernels on CUDA
(`triton_linear`), torch's fast CPU kernels on CPU (`cpu_linear`, with the cached weight forms
of `cpu_weights`), and `triton_quantize` for quantizing weights with the kernels on CUDA.
The reference (`QuantLinear._reference_forward`) defines the numbers every backend reproduces.
"""
