"""A calibration that fails after changing weights leaves a model that refuses to be used.

Layer-streamed algorithms rescale a block's weights in place and swap blocks into QuantLinears one
after the other, so an exception (Ctrl-C, out of memory, a bad batch) part-way leaves a model that
is neither the original nor the quantized one. Rather than let it compute, save or be quantized
again with no warning, such a model raises a `CalibrationInterrupted` error naming what happened
on every forward, save and quantization, until it is loaded again.
"""

import contextlib

from torch import nn


class CalibrationInterrupted(RuntimeError):
    """The model's calibration stopped after changing weights."""


def refuse_if_interrupted(model: nn.Module) -> None:
    """Raise the interruption's error when `model` holds a half-done calibration."""
    message = getattr(model, "ptq_interrupted", None)
    if message is not None:
        raise CalibrationInterrupted(message)


class WeightGuard:
    """Marks, from `changing()` on, that an exception leaves the model half calibrated."""

    def __init__(self, model: nn.Module):
        self.model, self.changed = model, False

    def changing(self) -> None:
        self.changed = True

    @contextlib.contextmanager
    def watching(self):
        try:
            yield self
        except BaseException as error:
            if self.changed:
                _mark_interrupted(self.model, error)
            raise


def _mark_interrupted(model: nn.Module, error: BaseException) -> None:
    model.ptq_interrupted = (
        f"calibration of this {type(model).__name__} stopped with {type(error).__name__}: {error} after some of "
        "its weights had been rescaled or quantized, so it is neither the original model nor a quantized one. "
        "Load it again (from_pretrained) and quantize it again; nothing of it was saved")

    def refuse(*args, **kwargs):
        refuse_if_interrupted(model)

    model.register_forward_pre_hook(lambda module, args: refuse_if_interrupted(module))
    model.save_pretrained = refuse  # an instance attribute: transformers' save never runs on it
