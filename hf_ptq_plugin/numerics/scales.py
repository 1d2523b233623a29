"""Scale helpers shared by every format: amax -> scale, and block-wise amax along the last axis."""

import torch


def scale_from_amax(amax: torch.Tensor, maxbound: float) -> torch.Tensor:
    """`amax / maxbound` in fp32; an all-zero tensor or block gets scale 1.0.

    Why 1.0: a zero amax means every value is 0, so any finite scale encodes it exactly,
    and 1.0 keeps `x / scale` free of 0/0 NaNs.
    """
    amax = amax.float()
    return torch.where(amax > 0, amax / maxbound, torch.ones_like(amax))


def block_amax(x: torch.Tensor, block: int) -> torch.Tensor:
    """max |x| over consecutive blocks of `block` elements of the last axis, fp32.

    (..., K) -> (..., K // block); K must be a multiple of `block` (callers check and name the layer).
    """
    return abs_amax(x.unflatten(-1, (x.shape[-1] // block, block)), dim=-1)


def abs_amax(x: torch.Tensor, dim=None) -> torch.Tensor:
    """max |x| (over `dim`, or all of x), fp32: exact, from one min/max pass with no |x| temporary."""
    low, high = torch.aminmax(x) if dim is None else torch.aminmax(x, dim=dim)
    return torch.maximum(high, -low).float()
