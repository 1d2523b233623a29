"""`get_memory_footprint()` that counts what a quantized model really holds.

transformers sums parameters and buffers. On CPU each QuantLinear also keeps a derived weight
(`backends/cpu_weights.py`: a packed or dense copy built on its first forward, or nothing for the
native kernels), which is not a buffer, and the native kernels keep one decode buffer per thread for
many-row calls (`backends/native.py`); counting them makes the footprint the memory the model takes
once it has run.
"""

from torch import nn

from ..backends import native
from ..modules.quant_linear import QuantLinear


def derived_weight_bytes(model: nn.Module) -> int:
    """Bytes of the CPU compute forms the model's QuantLinears hold now (0 before any forward)."""
    return sum(getattr(m.cpu_weight_cache, "nbytes", 0) for m in model.modules()
               if isinstance(m, QuantLinear) and m.cpu_weight_cache is not None)


class MemoryFootprint:
    """Bound to one model as its `get_memory_footprint`; a class (not a bound function) so the model
    still pickles and deep-copies."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, return_buffers: bool = True) -> int:
        stored = type(self.model).get_memory_footprint(self.model, return_buffers=return_buffers)
        uses_native = any(getattr(m.cpu_weight_cache, "kind", None) == "native" for m in self.model.modules()
                          if isinstance(m, QuantLinear))
        return stored + derived_weight_bytes(self.model) + (native.scratch_bytes() if uses_native else 0)
