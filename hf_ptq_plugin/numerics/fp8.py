"""FP8 E4M3 (float8_e4m3fn): saturating round-to-nearest-even cast, quantize, dequantize."""

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn magnitude


def fp8_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`x / scale` cast to float8_e4m3fn, saturating at +-448.

    torch's cast rounds to nearest even but turns out-of-range values into NaN, so clamp first
    (ModelOpt's eager path does the same). `scale` broadcasts against `x`.
    """
    y = x.float() / scale  # a new tensor: clamp it in place
    return y.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn values times `scale`, in fp32."""
    return q.float() * scale


def fp8_fake_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quantize then dequantize: what a tensor looks like after an FP8 round trip (fp32)."""
    return fp8_dequantize(fp8_quantize(x, scale), scale)
