"""Public entry points that join the orchestration to the transformers edge.

`quantize` = the calibration pipeline on the model's own weights (which knows nothing of
transformers' quantizer machinery) plus, for a transformers model, the quantizer that makes `save_pretrained` write the
unified checkpoint and `from_pretrained` read it back.
"""

from typing import Callable, Optional

from torch import nn
from transformers import PreTrainedModel

from .calibration import pipeline
from .calibration.record import calibration_record
from .config import PTQConfig
from .hf.quantizer import attach_quantizer


def quantize(model: nn.Module, config: PTQConfig, forward_loop: Optional[Callable] = None) -> nn.Module:
    """Quantize `model` in place per `config` (see `calibration.pipeline.run`) and return it.

    A transformers model then saves with `model.save_pretrained(dir)` as a unified checkpoint.
    `model.calibration_record` tells what data calibrated it (for the model card).
    """
    pipeline.run(model, config, forward_loop)
    model.calibration_record = calibration_record(forward_loop)
    if isinstance(model, PreTrainedModel):
        attach_quantizer(model, model.ptq_config)
    return model
