"""Scale helpers shared by every format: amax -> scale, and block-wise amax along the last axis."""

import torch
import torch.nn.functional as F_nn


def scale_from_amax(amax: torch.Tensor, maxbound: float) -> torch.Tensor:
    """`amax / maxbound` in fp32; an all-zero tensor or block gets scale 1.0.

    Why 1.0: a zero amax means every value is 0, so any finite scale encodes it exactly,
    and 1.0 keeps `x / scale` free of 0/0 NaNs.
    """
    amax = amax.float()
    return torch.where(amax > 0, amax / maxbound, torch.ones_like(amax))


# torch's CPU reductions over a short innermost axis are slow: over 16-element blocks, max_pool1d on
# |x| is several times faster than abs().amax(-1); from 32 elements on, amax wins.
MAX_POOL_BLOCK = 16


def block_amax(x: torch.Tensor, block: int) -> torch.Tensor:
    """max |x| over consecutive blocks of `block` elements of the last axis, fp32.

    (..., K) -> (..., K // block); K must be a multiple of `block` (callers check and name the layer).
    """
    k = x.shape[-1]
    if block <= MAX_POOL_BLOCK:
        pooled = F_nn.max_pool1d(x.abs().reshape(-1, 1, k), block)  # (rows, 1, K // block)
        return pooled.reshape(*x.shape[:-1], k // block).float()
    return x.unflatten(-1, (k // block, block)).abs().amax(dim=-1).float()


def abs_amax(x: torch.Tensor, dim=None) -> torch.Tensor:
    """max |x| (over `dim`, or all of x), fp32, exact, with no |x| temporary.

    All of x: one `aminmax` pass. Over a dim: `amax` and `amin`, which torch 2.13's CPU kernels run
    an order of magnitude faster than `aminmax` with a dim.
    """
    if dim is None:
        low, high = torch.aminmax(x)
        return torch.maximum(high, -low).float()
    return torch.maximum(x.amax(dim=dim), -x.amin(dim=dim)).float()
