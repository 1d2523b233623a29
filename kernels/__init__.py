"""Triton kernels, installed and imported as `hf_ptq_plugin.kernels` (never as a top-level
`kernels`: Hugging Face's own `kernels` package owns that name).

One kernel and its launcher per module, the layout in its header: GEMMs `int4_gemm` (W4A16),
`int8_gemm` (W8A8 / W8A16), `fp8_gemm` (W8A8, per tensor / channel / token), `fp8_block_gemm`
(128-tile weight-only), `w4a8_gemm`, `nvfp4_gemm`, `mxfp8_gemm`; quantizers `fp8_quantize`,
`int4_quantize`, `nvfp4_quantize`; shared device code in `rounding` and `tiles`, host helpers in
`launch`. Each module imports only torch and triton; `hf_ptq_plugin.backends.triton_linear`
imports them on first use, so the package imports on machines without triton or CUDA.
"""
