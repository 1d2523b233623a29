"""Host-side helpers the kernel launchers share: shape checks, tile sizes, the dot dtype.

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


def activation_2d(x: torch.Tensor, k: int, name: str = "x") -> torch.Tensor:
    """x (..., K) -> (M, K) view (or copy); checks K and the floating dtype."""
    require(x.shape[-1] == k, f"{name} has {x.shape[-1]} input features, the weight expects {k}")
    require(x.dtype in _TL_DTYPES, f"{name} dtype {x.dtype} is not one of {list(_TL_DTYPES)}")
    return x.reshape(-1, k)


def dot_dtype(x_dtype: torch.dtype, device: torch.device):
    """The dtype tl.dot runs in for activations of `x_dtype`.

    The activation dtype on a GPU (tensor cores); bf16 goes through fp32 under the interpreter,
    whose bf16 dot gives wrong results.
    """
    if x_dtype == torch.bfloat16 and device.type != "cuda":
        return tl.float32
    return _TL_DTYPES[x_dtype]


def gemm_blocks(m: int, n: int, k: int, device: torch.device, block_m=None, block_n=None, block_k=None):
    """(BLOCK_M, BLOCK_N, BLOCK_K): explicit values win, else a rule on M.

    On a GPU, decode-sized M gets the 16-row minimum of tl.dot and wide N tiles; the
    interpreter pays a large fixed cost per program instance, so there the tiles cover as much as
    they can.
    """
    if device.type == "cuda":
        default_m, default_n, default_k = (16, 64, 128) if m <= 16 else (64, 64, 64)
    else:
        default_m = min(max(triton.next_power_of_2(m), 16), 64)
        default_n = min(max(triton.next_power_of_2(n), 16), 128)
        default_k = min(max(triton.next_power_of_2(k), 16), 256)
    return block_m or default_m, block_n or default_n, block_k or default_k


def new_output(x2d: torch.Tensor, n: int, dtype: torch.dtype = None) -> torch.Tensor:
    """Uninitialized (M, N) output, x's dtype unless given; every element is written by a kernel."""
    return torch.empty((x2d.shape[0], n), device=x2d.device, dtype=dtype or x2d.dtype)
