"""Measurements a user trusts: perplexity on token windows, and the bytes a model holds."""

import math
from typing import Optional

import torch
import torch.nn.functional as F_nn
from torch import nn
from tqdm.auto import tqdm

from .calibration.offload import input_device


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: str = "") -> float:
    """exp(mean next-token NLL) over every predicted position of (n, seq_len) windows."""
    device = input_device(model)
    total_nll, total_tokens = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc=progress or "perplexity", leave=False, disable=None):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()  # (B, S-1, V)
        targets = batch[:, 1:]
        total_nll += F_nn.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                        reduction="sum").item()
        total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens)


def model_bytes(model: nn.Module, float_params_as: Optional[torch.dtype] = None) -> int:
    """Bytes of every parameter and buffer, counting shared (tied) tensors once.

    `float_params_as` counts floating-point parameters (the unquantized weights) at that dtype's
    size, e.g. bf16 for a checkpoint stored in bf16 but computed in fp32; buffers (quantized
    weights and their scales) always count at their own dtype.
    """
    seen, total = set(), 0
    tensors = [(t, True) for t in model.parameters()] + [(t, False) for t in model.buffers()]
    for tensor, is_param in tensors:
        key = (tensor.device, tensor.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        itemsize = tensor.element_size()
        if is_param and float_params_as is not None and tensor.is_floating_point():
            itemsize = torch.finfo(float_params_as).bits // 8
        total += tensor.numel() * itemsize
    return total
