"""FP8 E4M3 quantization: q = fp8(clamp(x / scale, -448, 448)), ties to even.

Layout:
    x      (R, C)   fp32 / fp16 / bf16 (activations, or a weight on the CUDA load path)
    scale  static:  any tensor indexed as scale[(r // SCALE_ROWS) * stride_sr + (c // SCALE_COLS) * stride_sc]
                    — per tensor (strides 0), per row (SCALE_ROWS = 1), or per 128 x 128 tile
           dynamic: computed here per row, max(amax(|x[r]|) / 448, 1 / (448 * 512)) (1.0 for an
                    all-zero row), written to row_scale (R,) fp32 — the per-token scales of
                    FP8_PER_CHANNEL_PER_TOKEN (`numerics.fp8.fp8_token_scales`)
    pre_quant_scale (C,) optional, in x's dtype (W4A8 AWQ); applied and rounded as torch does
    q      (R, C)   float8_e4m3fn

Static activations (`activation=True`) are multiplied by the fp32 reciprocal of their scale
instead, q = fp8(x * (1 / scale)), as the serving engines do (`numerics.fp8.fp8_quantize_static_activation`);
weights keep the division, the checkpoint's rounding.

The cast is emulated with exact fp32 bit arithmetic (`rounding.fp8_e4m3_round`): the
interpreter's native fp32 -> fp8 cast drops the rounding carry in 2.5% of values and does not
saturate, and a GPU's native cast agrees with the emulation bit for bit. Each program handles
BLOCK_R rows and walks C in BLOCK_C steps (twice when the scale is dynamic: amax, then cast).
"""

import torch
import triton
import triton.language as tl

from .launch import require
from .rounding import fp8_e4m3_round
from .tiles import load_x_tile

FP8_MIN_SCALING_FACTOR = tl.constexpr(1.0 / (448.0 * 512.0))  # the floor of dynamic scales, as in numerics.fp8


@triton.jit
def fp8_quantize_kernel(
    x_ptr, scale_ptr, pqs_ptr, q_ptr, row_scale_ptr,
    R, C, SCALE_ROWS, SCALE_COLS, stride_sr, stride_sc,
    stride_xr, stride_xc, stride_qr, stride_qc,
    DYNAMIC_ROWS: tl.constexpr, RECIPROCAL: tl.constexpr, HAS_PQS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    if DYNAMIC_ROWS:
        amax = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            x = load_x_tile(x_ptr, pqs_ptr, offs_r, offs_c, R, C, stride_xr, stride_xc, HAS_PQS)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        row_scale = tl.where(amax > 0, tl.maximum(tl.math.div_rn(amax, 448.0), FP8_MIN_SCALING_FACTOR), 1.0)
        tl.store(row_scale_ptr + offs_r, row_scale, mask=offs_r < R)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = (offs_r[:, None] < R) & (offs_c[None, :] < C)
        x = load_x_tile(x_ptr, pqs_ptr, offs_r, offs_c, R, C, stride_xr, stride_xc, HAS_PQS)
        if DYNAMIC_ROWS:
            scale = row_scale[:, None]
        else:
            scale = tl.load(scale_ptr + (offs_r[:, None] // SCALE_ROWS) * stride_sr
                            + (offs_c[None, :] // SCALE_COLS) * stride_sc, mask=mask, other=1.0)
        if RECIPROCAL:
            # vLLM csrc/quantization/w8a8/fp8/common.cu, scaled_fp8_quant_kernel_strided: x * (1.0f / scale)
            q = fp8_e4m3_round(x * tl.math.div_rn(1.0, scale))
        else:
            q = fp8_e4m3_round(tl.math.div_rn(x, scale))
        tl.store(q_ptr + offs_r[:, None] * stride_qr + offs_c[None, :] * stride_qc,
                 q.to(q_ptr.dtype.element_ty), mask=mask)


def fp8_quantize(x: torch.Tensor, scale: torch.Tensor = None, tile: int = None, pre_quant_scale: torch.Tensor = None,
                 block_r: int = None, block_c: int = None, activation: bool = False):
    """Quantize x (R, C) to float8_e4m3fn.

    `scale`: a () tensor (per tensor), an (R,) tensor (per row), or, with `tile`, one scale per
    (tile x tile) block shaped (R // tile, 1, C // tile, 1) as `fp8_pb_wo` stores it.
    `scale=None`: dynamic per-row scales. Returns (q, scale used), the latter (R,) when dynamic.
    `activation=True`: a static scale is applied as x * (1 / scale), the engines' activation rounding.
    """
    require(x.dim() == 2, f"fp8_quantize takes a 2-D tensor, got shape {tuple(x.shape)}")
    r, c = x.shape
    q = torch.empty((r, c), device=x.device, dtype=torch.float8_e4m3fn)
    row_scale = torch.empty(r, device=x.device, dtype=torch.float32) if scale is None else None
    scale_rows, scale_cols, stride_sr, stride_sc = _scale_indexing(scale, tile, r, c)
    block_r = block_r or (16 if x.is_cuda else min(triton.next_power_of_2(r), 64))
    block_c = block_c or (256 if x.is_cuda else min(triton.next_power_of_2(c), 1024))
    fp8_quantize_kernel[(triton.cdiv(r, block_r),)](
        x, scale, pre_quant_scale, q, row_scale,
        r, c, scale_rows, scale_cols, stride_sr, stride_sc,
        x.stride(0), x.stride(1), q.stride(0), q.stride(1),
        DYNAMIC_ROWS=scale is None, RECIPROCAL=activation and scale is not None, HAS_PQS=pre_quant_scale is not None,
        BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return q, (row_scale if scale is None else scale)


def _scale_indexing(scale, tile, r, c):
    """(SCALE_ROWS, SCALE_COLS, stride_sr, stride_sc) addressing `scale` from element (row, col)."""
    if scale is None or scale.dim() == 0:
        return 1, 1, 0, 0
    if tile is None:
        require(scale.shape == (r,), f"per-row scale must have shape ({r},), got {tuple(scale.shape)}")
        return 1, 1, scale.stride(0), 0
    require(scale.shape == (r // tile, 1, c // tile, 1) and r % tile == 0 and c % tile == 0,
            f"tile scale {tuple(scale.shape)} does not tile ({r}, {c}) by {tile}")
    return tile, tile, scale.stride(0), scale.stride(2)
