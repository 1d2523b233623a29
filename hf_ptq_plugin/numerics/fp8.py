"""FP8 E4M3 (float8_e4m3fn): saturating round-to-nearest-even cast, quantize, dequantize.

Weights divide by their scale (`fp8_quantize`): the checkpoint stores their codes and engines load
them as they are. Activations are rounded the way the serving engines' kernels round them
(`fp8_quantize_static_activation`, `fp8_token_scales`), since those kernels quantize them at inference.
"""

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn magnitude
# The floor vLLM and TensorRT-LLM put under dynamic FP8 scales: 1 / (448 * 512).
FP8_MIN_SCALING_FACTOR = 1.0 / (FP8_MAX * 512.0)


def fp8_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`x / scale` cast to float8_e4m3fn, saturating at +-448.

    torch's cast rounds to nearest even but turns out-of-range values into NaN, so clamp first
    (ModelOpt's eager path does the same). `scale` broadcasts against `x`.
    """
    y = x.float() / scale  # a new tensor: clamp it in place
    return y.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def fp8_quantize_static_activation(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """Activations under a static `input_scale`: `x * (1 / input_scale)` in fp32, to float8_e4m3fn.

    The engines round the reciprocal once and multiply; that is not always `x / input_scale`, and
    the one-ulp difference flips the FP8 code when the quotient lies at a tie, which bf16
    activations under a bf16-derived amax / 448 reach. vLLM csrc/quantization/w8a8/fp8/common.cu,
    scaled_fp8_quant_kernel_strided (inv_scale = 1.0f / *scale, then scaled_fp8_conversion<true>);
    TensorRT-LLM cpp/tensorrt_llm/common/cudaFp8Utils.cu, scaleMatrixPerTensorVec (factor =
    1.0f / s); SGLang sgl-kernel/csrc/gemm/per_tensor_quant_fp8.cu, per_tensor_quant_fp8_kernel.
    """
    y = x.float() * torch.reciprocal(input_scale.float())
    return y.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def fp8_token_scales(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token scales (..., 1) of x (..., K): max(amax / 448, 1 / (448 * 512)), fp32.

    The floor is vLLM's and TensorRT-LLM's: csrc/quantization/w8a8/fp8/common.cu,
    dynamic_per_token_scaled_fp8_quant_kernel_strided, and cudaFp8Utils.cu,
    dynamicQuantizeMatrixPerToken. Both then divide, `x / scale` (`fp8_quantize`); SGLang's
    per_token_quant_fp8 and vLLM's torch-native QuantFP8 instead multiply by the reciprocal,
    without (SGLang) or with the floor. An all-zero token keeps scale 1.0, the package's convention
    for a zero amax (`scale_from_amax`): its codes are 0 under any scale.
    """
    amax = x.float().abs().amax(dim=-1, keepdim=True)
    scale = (amax / FP8_MAX).clamp_(min=FP8_MIN_SCALING_FACTOR)
    return scale.masked_fill_(amax == 0, 1.0)


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn values times `scale`, in fp32."""
    return q.float() * scale


def fp8_fake_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quantize then dequantize: what a tensor looks like after an FP8 round trip (fp32)."""
    return fp8_dequantize(fp8_quantize(x, scale), scale)
