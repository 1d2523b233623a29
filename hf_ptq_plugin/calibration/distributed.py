"""Reductions across processes, so several processes calibrating shares of the data agree.

When `torch.distributed` is initialized with more than one process (`torchrun`, `accelerate
launch`), every statistic is reduced before it is used: maxima with MAX, sums and token counts
with SUM. The result is the statistic one process would compute on all the data. With one
process these are no-ops.
"""

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
    """A reduced copy of `tensor` ("max" or "sum") across processes; the tensor itself when alone."""
    if not is_distributed():
        return tensor
    reduced = tensor.detach().clone()
    dist.all_reduce(reduced, op={"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}[op])
    return reduced


def all_reduce_number(value: float, op: str) -> float:
    return float(all_reduce(torch.tensor(value, dtype=torch.float64), op))
