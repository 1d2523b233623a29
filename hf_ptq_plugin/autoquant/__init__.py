"""AutoQuantize: a format per layer group, chosen by measured sensitivity under an effective-bits budget."""

from .result import AutoQuantizeResult, GroupCandidates
from .scores import causal_lm_loss, sampled_label_loss
from .search import apply_choice, auto_quantize

__all__ = ["AutoQuantizeResult", "GroupCandidates", "apply_choice", "auto_quantize", "causal_lm_loss",
           "sampled_label_loss"]
