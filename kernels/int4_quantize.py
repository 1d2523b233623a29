"""INT4 group quantize + pack: the weight tensors of `int4_awq` / `w4a8_awq` on the CUDA load path.

Layout produced (the unified checkpoint's):
    w      (N, K)       fp32 / fp16 / bf16 weight, N even, K % G == 0, G a power of two (64, 128)
    scale  (N, K // G)  fp32 group scales amax / 7 (1.0 for an all-zero group)
    packed (N // 2, K)  uint8: row 2j in the low nibble, row 2j + 1 in the high nibble, each
                        q = clamp(round_half_even(w / scale), -8, 7) in two's complement

Same math as `numerics.weights` (`int_quantize` + `pack_int4_rows`), bit for bit: division with
div_rn and rounding by the fp32 magic-number trick (the interpreter has no rint). Each program
quantizes BLOCK_N rows (even) of one group.
"""

import torch
import triton
import triton.language as tl

from .launch import require
from .rounding import round_half_even
from .tiles import load_tile


@triton.jit
def int4_quantize_kernel(
    w_ptr, packed_ptr, scale_ptr,
    N, K,
    stride_wn, stride_wk, stride_pn, stride_pk, stride_sn, stride_sg,
    GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    group = tl.program_id(1)
    offs_k = group * GROUP_SIZE + tl.arange(0, GROUP_SIZE)
    w = load_tile(w_ptr, offs_n, offs_k, N, K, stride_wn, stride_wk, 0.0).to(tl.float32)
    amax = tl.max(tl.abs(w), axis=1)
    scale = tl.where(amax > 0, tl.math.div_rn(amax, 7.0), 1.0)
    tl.store(scale_ptr + offs_n * stride_sn + group * stride_sg, scale, mask=offs_n < N)
    q = round_half_even(tl.minimum(tl.maximum(tl.math.div_rn(w, scale[:, None]), -8.0), 7.0)).to(tl.int32)
    # (BLOCK_N, G) -> (BLOCK_N // 2, G, 2) -> even rows, odd rows
    even, odd = tl.split(tl.permute(tl.reshape(q & 0xF, (BLOCK_N // 2, 2, GROUP_SIZE)), (0, 2, 1)))
    offs_p = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    tl.store(packed_ptr + offs_p[:, None] * stride_pn + offs_k[None, :] * stride_pk, (even | (odd << 4)).to(tl.uint8),
             mask=(offs_p[:, None] < N // 2) & (offs_k[None, :] < K))


def int4_quantize(w: torch.Tensor, group_size: int, block_n: int = None):
    """w (N, K) -> (packed uint8 (N // 2, K), scale fp32 (N, K // group_size))."""
    require(w.dim() == 2 and w.shape[0] % 2 == 0 and w.shape[1] % group_size == 0,
            f"INT4 packs (N, K) with N even and K a multiple of {group_size}, got {tuple(w.shape)}")
    require(group_size & (group_size - 1) == 0, f"group size must be a power of two, got {group_size}")
    n, k = w.shape
    block_n = block_n or (32 if w.is_cuda else min(triton.next_power_of_2(n), 128))
    require(block_n % 2 == 0, f"block_n must be even, got {block_n}")
    packed = torch.empty((n // 2, k), device=w.device, dtype=torch.uint8)
    scale = torch.empty((n, k // group_size), device=w.device, dtype=torch.float32)
    int4_quantize_kernel[(triton.cdiv(n, block_n), k // group_size)](
        w, packed, scale,
        n, k,
        w.stride(0), w.stride(1), packed.stride(0), packed.stride(1), scale.stride(0), scale.stride(1),
        GROUP_SIZE=group_size, BLOCK_N=block_n,
    )
    return packed, scale
