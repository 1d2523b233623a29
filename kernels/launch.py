"""Host-side helpers the kernel launchers share: shape checks, tile sizes, the (M, K) / (M, N)
activation and output tensors, the dot dtype.

Pure Python over torch and triton, run on the host before each launch.
"""

import torch
import triton
import triton.language as tl

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def require(condition: bool, message: str) -> None:
    """Raise ValueError(message) unless `condition`: launchers name the bad shape or dtype."""
    if not condition:
        raise ValueError(message)


def dot_dtype(x_dtype: torch.dtype, device: torch.device):
    """The dtype tl.dot runs in for activations of `x_dtype`.

    The activation dtype on a GPU (tensor cores); bf16 goes through fp32 under the interpreter,
    whose bf16 dot gives wrong results.
    """
    if x_dtype == torch.bfloat16 and device.type != "cuda":
        return tl.float32
    return _TL_DTYPES[x_dtype]


def gemm_blocks(m: int, n: int, k: int, device: torch.device, block_m=None, block_n=None, block_k=None,
                n_multiple: int = 1, k_multiple: int = 1):
    """(BLOCK_M, BLOCK_N, BLOCK_K): explicit values win, else a rule on M.

    On a GPU, decode-sized M gets the 16-row minimum of tl.dot and wide N tiles; the
    interpreter pays a large fixed cost per program instance, so there the tiles cover as much as
    they can. A kernel that needs BLOCK_N or BLOCK_K to be a multiple of something (whole packed
    rows, whole scale blocks) names it, and a value that is not raises ValueError.
    """
    if device.type == "cuda":
        default_m, default_n, default_k = (16, 64, 128) if m <= 16 else (64, 64, 64)
    else:
        default_m = min(max(triton.next_power_of_2(m), 16), 64)
        default_n = min(max(triton.next_power_of_2(n), 16), 128)
        default_k = min(max(triton.next_power_of_2(k), 16), 256)
    bm, bn, bk = block_m or default_m, block_n or default_n, block_k or default_k
    require(bn % n_multiple == 0, f"BLOCK_N must be a multiple of {n_multiple}, got {bn}")
    require(bk % k_multiple == 0, f"BLOCK_K must be a multiple of {k_multiple}, got {bk}")
    return bm, bn, bk


def gemm_setup(x: torch.Tensor, n: int, k: int, block_m=None, block_n=None, block_k=None,
               n_multiple: int = 1, k_multiple: int = 1):
    """(x2d, out, (BLOCK_M, BLOCK_N, BLOCK_K)) for activations x (..., K) times an (N, K) weight.

    Checks x's K and floating dtype. x2d is x as an (M, K) view (or copy), out the uninitialized (M, N)
    output in x's dtype (every element is written by the kernel), the tile sizes those of `gemm_blocks`.
    """
    require(x.shape[-1] == k, f"x has {x.shape[-1]} input features, the weight expects {k}")
    require(x.dtype in _TL_DTYPES, f"x dtype {x.dtype} is not one of {list(_TL_DTYPES)}")
    x2d = x.reshape(-1, k)
    blocks = gemm_blocks(x2d.shape[0], n, k, x.device, block_m, block_n, block_k, n_multiple, k_multiple)
    return x2d, torch.empty((x2d.shape[0], n), device=x.device, dtype=x.dtype), blocks
