"""Modules that accelerate offloads (`device_map` with CPU or disk offload), seen by calibration.

With offload, accelerate hooks each leaf module (a Linear, a norm, a fused-experts module) with an
`AlignDevicesHook`: its tensors sit on the meta device and are loaded onto the execution device
for the duration of each forward, then dropped. Calibration's forward passes work through the
hooks as they are; what reads or changes weights outside a forward goes through these helpers:

- `onloaded(module)`: the module's real tensors for the duration of a block (reading a weight's
  amax, searching weight scales), offloaded again after.
- `execution_device(module)` / `input_device(model)`: where a module computes and where inputs go
  (not the meta device of an offloaded weight).
- `materialize(module)`: the module's tensors loaded for good and its offload hook removed, for
  a module calibration is about to replace (a Linear becoming a QuantLinear, one block at a time,
  so memory holds the quantized model plus one block in full precision) or to change (a norm
  that an AWQ scale is folded into at export).

Modules without offloaded tensors pass through unchanged.
"""

import itertools

import torch
from accelerate.hooks import remove_hook_from_module
from accelerate.utils import align_module_device, has_offloaded_params
from torch import nn


def execution_device(module: nn.Module) -> torch.device:
    """Where the module computes: its offload hook's execution device when it is offloaded (its
    tensors then sit on meta), else the device of its first tensor."""
    hook = getattr(module, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return next(itertools.chain(module.parameters(), module.buffers())).device


def input_device(model: nn.Module) -> torch.device:
    """Where the model's input ids go: the device its input embeddings compute on."""
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # not a transformers model, or one without embeddings
        embeddings = None
    return execution_device(embeddings if embeddings is not None else model)


def onloaded(module: nn.Module):
    """Context in which an offloaded module's tensors are real (on its execution device)."""
    return align_module_device(module)  # a no-op for a module that is not offloaded


def materialize(module: nn.Module) -> nn.Module:
    """Load an offloaded module's tensors onto its execution device for good and remove its hook."""
    if has_offloaded_params(module):
        module._hf_hook.pre_forward(module)
        remove_hook_from_module(module)
    return module
