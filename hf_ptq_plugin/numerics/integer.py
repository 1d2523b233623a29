"""Symmetric integer quantization (INT8, INT4) and the unified checkpoint's INT4 packing.

INT4 weights are packed along the OUTPUT dim, as ModelOpt exports and TensorRT-LLM reads them:
row 2j goes to the low nibble and row 2j+1 to the high nibble of byte [j, k], each nibble a
signed 4-bit two's complement value.
"""

import torch

INT8_MAX = 127.0
INT4_MAX = 7.0


def int_quantize(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """round-half-even(x / scale) clamped to the signed range, as int8 (also for 4 bits)."""
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    y = x.float() / scale  # a new tensor: round and clamp it in place (whole weights are large)
    return y.round_().clamp_(low, high).to(torch.int8)


def int_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q * scale in fp32."""
    return q.float() * scale


def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], (N, K) with N even -> uint8 (N // 2, K)."""
    nibbles = q.contiguous().view(torch.uint8)  # two's complement bytes; the shift drops the high bits
    return (nibbles[0::2] & 0xF) | (nibbles[1::2] << 4)


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (N // 2, K) -> int8 (N, K) in [-8, 7]; exact inverse of `pack_int4_rows`."""
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    rows = torch.stack((low, high), dim=1).flatten(0, 1)  # (N, K), rows interleaved back
    return torch.where(rows >= 8, rows - 16, rows)
