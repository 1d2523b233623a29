"""Triton kernels, installed and imported as `hf_ptq_plugin.kernels` (never as a top-level
`kernels`: Hugging Face's own `kernels` package owns that name).

Each kernel module imports only torch and triton, and is loaded lazily by QuantLinear so that
the package imports on machines without triton or CUDA.
"""
