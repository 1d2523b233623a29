"""Weight quantization per format, producing exactly the unified checkpoint's tensors.

`quantize_weight` returns {"weight", "weight_scale"[, "weight_scale_2"]} with the names, dtypes
and shapes of `docs/modelopt-facts.md` §6.4; `dequantize_weight` inverts it to fp32 the way the
serving engine reconstructs the weight; `weight_buffer_specs` gives the same shapes without
data (for building empty modules).
"""

from typing import Optional

import torch

from .. import formats as F
from .fp8 import FP8_MAX, fp8_dequantize, fp8_quantize
from .integer import INT4_MAX, INT8_MAX, int_dequantize, int_quantize, pack_int4_rows, unpack_int4_rows
from .mx import MX_BLOCK, mxfp8_dequantize, mxfp8_quantize
from .nvfp4 import (
    NVFP4_BLOCK,
    e2m1_round,
    nvfp4_block_scales,
    nvfp4_dequantize,
    nvfp4_global_scale,
    nvfp4_quantize,
    pack_nibbles,
    unpack_nibbles,
)
from .scales import abs_amax, block_amax, scale_from_amax

WEIGHT_BUFFERS = ("weight", "weight_scale", "weight_scale_2")  # the names quantize_weight returns
# Elements quantized at a time by quantize_weight_in_row_blocks (2 MiB of fp32 per temporary); blocks
# are whole multiples of 128 rows (FP8 tiles are 128 rows, INT4 packs row pairs). Half a million keeps a
# weight's temporaries to 5-10 MiB (NVFP4 holds the most), which a small model's peak at load notices
# (hf.quantize_on_load), at the speed of larger blocks.
CHUNK_ELEMENTS = 1 << 19


def quantize_weight(w: torch.Tensor, fmt: F.Format, group_size: Optional[int] = None,
                    global_amax: Optional[torch.Tensor] = None, weight_scale: Optional[torch.Tensor] = None) -> dict:
    """Quantize a (N, K) weight into the format's checkpoint tensors.

    `global_amax` overrides max|w| for the per-tensor second-level scale (NVFP4 and W4A8
    `weight_scale_2`), so that layers an engine fuses (q/k/v, gate/up) can share one value.
    `weight_scale` (INT8, INT4, NVFP4 block scales, per-tensor or per-channel FP8) replaces the
    max-derived scale, e.g. GPTQ's fixed scales.
    """
    w = w.detach().float()
    group_size = group_size or fmt.group_size
    if global_amax is None and fmt.has_weight_scale_2:
        global_amax = abs_amax(w)
    if weight_scale is not None and not _takes_weight_scale(fmt):
        raise ValueError(f"a given weight_scale is supported for INT8, INT4, NVFP4 and per-tensor or per-channel FP8 "
                         f"weights, not qformat {fmt.name!r}")
    if fmt.weight == F.FP8:
        return _quantize_fp8(w, fmt, group_size, weight_scale)
    if fmt.weight == F.INT8:
        scale = scale_from_amax(abs_amax(w, dim=1), INT8_MAX) if weight_scale is None else weight_scale  # (N,)
        return {"weight": int_quantize(w, scale[:, None], 8), "weight_scale": scale}
    if fmt.weight == F.INT4:
        return _quantize_int4(w, fmt, group_size, global_amax, weight_scale)
    if fmt.weight == F.NVFP4:
        scale_2 = nvfp4_global_scale(global_amax)
        codes, block_scales = nvfp4_quantize(w, scale_2, weight_scale)
        return {"weight": pack_nibbles(codes), "weight_scale": block_scales, "weight_scale_2": scale_2}
    if fmt.weight == F.MXFP8:
        q, exponents = mxfp8_quantize(w)
        return {"weight": q, "weight_scale": exponents}
    raise ValueError(f"unknown weight encoding {fmt.weight!r} in format {fmt.name!r}")


def shared_sibling_scales(fmt: F.Format, group_amax: torch.Tensor) -> tuple:
    """(global_amax, weight_scale) arguments of `quantize_weight` that give every member of an
    engine-fused group (amax over the group: `group_amax`) the same per-tensor scale:
    `weight_scale_2` from it for NVFP4 and W4A8, the FP8 `weight_scale` itself for per-tensor FP8."""
    if fmt.has_weight_scale_2:
        return group_amax, None
    return None, scale_from_amax(group_amax, FP8_MAX)


def quantize_weight_in_row_blocks(w: torch.Tensor, fmt: F.Format, group_size: Optional[int] = None,
                                  global_amax: Optional[torch.Tensor] = None,
                                  weight_scale: Optional[torch.Tensor] = None) -> dict:
    """`quantize_weight`, bit for bit, computed a block of ~CHUNK_ELEMENTS at a time.

    A whole large weight's fp32 temporaries do not fit in the CPU caches, so each pass of the
    quantizer goes to memory; blocks of about half a million elements keep the passes in cache, which
    makes every format's quantization several times faster than on the whole tensor at once.
    Per-tensor quantities (FP8's scale, NVFP4 / W4A8's second-level scale) are taken over the whole
    weight first; a given `weight_scale` is sliced with its rows.
    """
    n, k = w.shape
    block = max(128, CHUNK_ELEMENTS // k // 128 * 128)
    if n <= block:
        return quantize_weight(w, fmt, group_size, global_amax, weight_scale)
    per_tensor_fp8 = fmt.weight == F.FP8 and fmt.weight_granularity == F.PER_TENSOR
    if per_tensor_fp8 and weight_scale is None:  # quantize_weight's per-tensor FP8 scale: the tensor's own amax
        weight_scale = scale_from_amax(_row_blocks_amax(w, block), FP8_MAX)
    if global_amax is None and fmt.has_weight_scale_2:
        global_amax = _row_blocks_amax(w, block)
    specs = weight_buffer_specs(fmt, n, k, group_size)
    out = {name: torch.empty(shape, dtype=dtype, device=w.device) for name, (shape, dtype) in specs.items()}
    # Each block goes through one reused fp32 buffer: a fresh `.float()` per block faults in new
    # pages every time, which makes the conversion several times slower than into a warm buffer.
    scratch = torch.empty(block, k, dtype=torch.float32, device=w.device)
    for start in range(0, n, block):
        stop = min(start + block, n)
        rows = scratch[:stop - start].copy_(w[start:stop])
        rows_scale = weight_scale if weight_scale is None or weight_scale.dim() == 0 else weight_scale[start:stop]
        for name, tensor in quantize_weight(rows, fmt, group_size, global_amax, rows_scale).items():
            if tensor.dim() == 0:  # a per-tensor scale, the same for every block
                out[name] = tensor
            else:  # INT4 packs 2 rows per byte row, FP8 tiles 128 rows per scale row
                per_row = specs[name][0][0] / n
                out[name][int(start * per_row):int(stop * per_row)] = tensor
    return out


def _row_blocks_amax(w: torch.Tensor, block: int) -> torch.Tensor:
    return torch.stack([abs_amax(w[i:i + block]) for i in range(0, w.shape[0], block)]).amax()


def _takes_weight_scale(fmt: F.Format) -> bool:
    if fmt.weight == F.FP8:
        return fmt.weight_granularity in (F.PER_TENSOR, F.PER_CHANNEL)
    return fmt.weight in (F.INT8, F.INT4, F.NVFP4)


def fp8_weight_scale(w: torch.Tensor, fmt: F.Format, tile: int) -> torch.Tensor:
    """FP8 `weight_scale` from max |w| of w (N, K): () per tensor, (N,) per channel, (N/t, 1, K/t, 1) per tile."""
    if fmt.weight_granularity == F.PER_TENSOR:
        return scale_from_amax(abs_amax(w), FP8_MAX)
    if fmt.weight_granularity == F.PER_CHANNEL:
        return scale_from_amax(abs_amax(w, dim=1), FP8_MAX)
    n, k = w.shape  # PER_TILE: one scale per (tile x tile) block
    return scale_from_amax(w.view(n // tile, tile, k // tile, tile).abs().amax(dim=(1, 3), keepdim=True), FP8_MAX)


def _quantize_fp8(w: torch.Tensor, fmt: F.Format, tile: int, scale: Optional[torch.Tensor]) -> dict:
    scale = fp8_weight_scale(w, fmt, tile) if scale is None else scale
    if fmt.weight_granularity != F.PER_TILE:
        return {"weight": fp8_quantize(w, scale if scale.dim() == 0 else scale[:, None]), "weight_scale": scale}
    n, k = w.shape
    return {"weight": fp8_quantize(w.view(n // tile, tile, k // tile, tile), scale).view(n, k), "weight_scale": scale}


def _quantize_int4(w: torch.Tensor, fmt: F.Format, group_size: int, global_amax, scale=None) -> dict:
    if scale is None:
        scale = scale_from_amax(block_amax(w, group_size), INT4_MAX)  # (N, K / g) fp32
    n, k = w.shape
    q = int_quantize(w.view(n, k // group_size, group_size), scale[:, :, None], 4).view(n, k)  # int8
    out = {"weight": pack_int4_rows(q), "weight_scale": scale}
    if fmt.fp8_weight_scale_2:
        out["weight_scale_2"] = scale_from_amax(global_amax, FP8_MAX)
    return out


def dequantize_weight(buffers: dict, fmt: F.Format, group_size: Optional[int] = None) -> torch.Tensor:
    """The fp32 (N, K) weight an engine multiplies with, from the checkpoint tensors."""
    q, scale = buffers["weight"], buffers["weight_scale"]
    group_size = group_size or fmt.group_size
    if fmt.weight == F.FP8 and fmt.weight_granularity == F.PER_TILE:
        n, k = q.shape
        return fp8_dequantize(q.view(n // group_size, group_size, k // group_size, group_size), scale).view(n, k)
    if fmt.weight in (F.FP8, F.INT8):
        return (fp8_dequantize if fmt.weight == F.FP8 else int_dequantize)(
            q, scale if scale.dim() == 0 else scale[:, None])
    if fmt.weight == F.INT4 and fmt.fp8_weight_scale_2:
        return int4_w4a8_weight(buffers, group_size)
    if fmt.weight == F.INT4:
        return int_dequantize(unpack_int4_rows(q), scale.repeat_interleave(group_size, dim=1))
    if fmt.weight == F.NVFP4:
        return nvfp4_dequantize(unpack_nibbles(q), scale, buffers["weight_scale_2"])
    if fmt.weight == F.MXFP8:
        return mxfp8_dequantize(q, scale)
    raise ValueError(f"unknown weight encoding {fmt.weight!r} in format {fmt.name!r}")


def fake_quantize_weight(w: torch.Tensor, fmt: F.Format, group_size: Optional[int] = None,
                         global_amax: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`dequantize_weight(quantize_weight(w, ...))` without packing: the same values, faster.

    Searches (AWQ, clipping) quantize a weight dozens of times and only need the values.
    """
    group_size = group_size or fmt.group_size
    if fmt.weight == F.NVFP4:
        fake = _fake_quantize_nvfp4(w.detach().float(), global_amax)
        if not fake.isnan().any():  # a NaN weight, or 0 / 0 under an underflowed step: the codes' own rule
            return fake
    if fmt.weight != F.INT4:
        return dequantize_weight(quantize_weight(w, fmt, group_size, global_amax), fmt, group_size)
    w = w.detach().float()
    if not fmt.fp8_weight_scale_2:
        return _fake_quantize_int4(w, group_size)
    step = scale_from_amax(block_amax(w, group_size), INT4_MAX).repeat_interleave(group_size, dim=1)
    q = int_quantize(w, step, 4).float()
    scale_2 = scale_from_amax(w.abs().amax() if global_amax is None else global_amax, FP8_MAX)
    ratio = w4a8_group_ratio(step, scale_2)
    return fp8_dequantize(fp8_quantize(q * ratio, torch.tensor(1.0)), scale_2)


def _fake_quantize_int4(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """INT4 group-wise `fake_quantize_weight` of fp32 w (N, K): the same divisions, roundings and products as
    `int_quantize` then `int_dequantize`, with each group's step broadcast instead of repeated and the codes
    kept in fp32 (integers in [-8, 7], exact), so four passes over the weight instead of about nine."""
    n, k = w.shape
    step = scale_from_amax(block_amax(w, group_size), INT4_MAX).unsqueeze(-1)  # (N, K / g, 1)
    q = (w.reshape(n, k // group_size, group_size) / step).round_().clamp_(-8, 7)  # a new tensor: w is untouched
    return q.mul_(step).view(n, k)


def _fake_quantize_nvfp4(w: torch.Tensor, global_amax: Optional[torch.Tensor]) -> torch.Tensor:
    """NVFP4 `fake_quantize_weight` of fp32 w (N, K): `nvfp4_quantize`'s quotients, rounded onto E2M1 by
    `e2m1_round` (the values of `e2m1_codes`, for every quotient but NaN) and times the same step, with no codes
    made, packed, unpacked and looked up: fewer passes over the weight. NaN quotients come out NaN here (the codes
    make them 0); the caller then takes the codes' path."""
    scale_2 = nvfp4_global_scale(abs_amax(w) if global_amax is None else global_amax)
    step = (nvfp4_block_scales(w, scale_2).float() * scale_2).unsqueeze(-1)  # (N, K / 16, 1)
    blocks = w.unflatten(-1, (-1, NVFP4_BLOCK))
    return e2m1_round(blocks / step).mul_(step).flatten(-2)


def w4a8_group_ratio(weight_scale: torch.Tensor, weight_scale_2: torch.Tensor) -> torch.Tensor:
    """The fp16 group scales TensorRT-LLM's W4A8 GEMM reads, as fp32: fp16(fp16(ws) * (1 / ws2)).

    TensorRT-LLM tensorrt_llm/_torch/modules/linear.py, W4A8_AWQ_LinearMethod: load_weight_scales_w4a8
    casts `weight_scale` to fp16, load_weights_vanilla then divides it by the fp32 scalar
    `weight_scale_2`; torch computes an fp16 tensor over a CPU scalar as a product with the fp32
    reciprocal, rounded to fp16 (aten/src/ATen/native/cuda/BinaryDivTrueKernel.cu). Two roundings of
    the group scale and a reciprocal: one ulp of fp16 away from fp16(ws / ws2) in about a quarter of groups.
    """
    return (weight_scale.half().float() * torch.reciprocal(weight_scale_2.float())).half().float()


def int4_w4a8_weight(buffers: dict, group_size: int) -> torch.Tensor:
    """W4A8 weight as the engine sees it: fp8(q * ratio) * ws2, fp32 (N, K), ratio `w4a8_group_ratio`.

    q times the ratio (at most 7 * 448 / 7 = 448 by construction) is rounded to FP8, the GEMM's
    operand, and the GEMM result is scaled by `weight_scale_2`.
    """
    q = unpack_int4_rows(buffers["weight"]).float()
    scale_2 = buffers["weight_scale_2"]
    ratio = w4a8_group_ratio(buffers["weight_scale"], scale_2).repeat_interleave(group_size, dim=1)
    return fp8_dequantize(fp8_quantize(q * ratio, torch.tensor(1.0)), scale_2)


def weight_buffer_specs(fmt: F.Format, out_features: int, in_features: int,
                        group_size: Optional[int] = None) -> dict:
    """{name: (shape, dtype)} of the weight tensors a layer of this format stores."""
    n, k, g = out_features, in_features, group_size or fmt.group_size
    scalar = ((), torch.float32)
    if fmt.weight == F.FP8:
        scale_shape = {F.PER_TENSOR: lambda: (), F.PER_CHANNEL: lambda: (n,),
                       F.PER_TILE: lambda: (n // g, 1, k // g, 1)}
        return {"weight": ((n, k), torch.float8_e4m3fn),
                "weight_scale": (scale_shape[fmt.weight_granularity](), torch.float32)}
    if fmt.weight == F.INT8:
        return {"weight": ((n, k), torch.int8), "weight_scale": ((n,), torch.float32)}
    if fmt.weight == F.INT4:
        specs = {"weight": ((n // 2, k), torch.uint8), "weight_scale": ((n, k // g), torch.float32)}
        return {**specs, "weight_scale_2": scalar} if fmt.fp8_weight_scale_2 else specs
    if fmt.weight == F.NVFP4:
        return {"weight": ((n, k // 2), torch.uint8), "weight_scale": ((n, k // g), torch.float8_e4m3fn),
                "weight_scale_2": scalar}
    if fmt.weight == F.MXFP8:
        return {"weight": ((n, k), torch.float8_e4m3fn), "weight_scale": ((n, k // MX_BLOCK), torch.uint8)}
    raise ValueError(f"unknown weight encoding {fmt.weight!r} in format {fmt.name!r}")
