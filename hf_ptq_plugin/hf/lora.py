"""PEFT LoRA on QuantLinear layers (QLoRA-style fine-tuning of a quantized model).

PEFT picks a LoRA layer class per target module through a list of dispatchers that knows only
its own quantized layer types; it has no public registry. `register_lora_layer` puts one
dispatcher in front of PEFT's, for QuantLinear only, so `get_peft_model(quantized, LoraConfig(
target_modules=[...]))`, `PeftModel.from_pretrained(quantized, adapter_dir)` and transformers'
`model.add_adapter(...)` wrap QuantLinears in `QuantLoraLinear` and leave every other module to
PEFT. A user's own `LoraConfig._register_custom_module` entry for QuantLinear still wins.

`QuantLoraLinear` is PEFT's plain LoRA Linear (its forward: base output + B A x * scaling) over
a frozen QuantLinear: the base gives input gradients only (`modules/frozen_grad.py`). Merging
rounds W + B A * scaling onto the layer's grid (`modules/weight_delta.py`, which states the
accuracy cost); unmerging restores the exact tensors from before the merge. Imported only once
PEFT itself is (`hf/peft_hook.py`).
"""

from typing import Optional

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.model import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from ..modules.quant_linear import QuantLinear
from ..modules.weight_delta import set_weight_buffers, weight_buffers_plus


class QuantLoraLinear(LoraLinear):
    """LoRA adapters over a QuantLinear; merge rounds onto its grid (see `modules/weight_delta.py`)."""

    def __init__(self, base_layer, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs):
        if config.lora_bias:
            raise ValueError("lora_bias=True is not supported on a QuantLinear base (its bias is frozen with the "
                             "quantized weight); use lora_bias=False")
        if config.fan_in_fan_out:
            raise ValueError("fan_in_fan_out=True does not fit a QuantLinear, which stores its weight as "
                             "(out_features, in_features); use fan_in_fan_out=False")
        super().__init__(base_layer, adapter_name, config=config, r=r, lora_alpha=lora_alpha, **kwargs)
        self.tensors_before_merge = []  # one dict of the base's weight tensors per merged adapter

    @property
    def lora_variants(self):
        return {(): None}  # plain LoRA only: DoRA and the others read a dense base weight

    def resolve_lora_variant(self, **kwargs):
        try:
            variant = super().resolve_lora_variant(**kwargs)
        except ValueError as error:
            raise ValueError(f"{error}: a QuantLinear base takes plain LoRA only (use_dora=False and no other "
                             "LoRA variant)") from error
        if variant is not None:  # a PEFT that picks variants without asking `lora_variants`
            raise ValueError(f"LoRA variant {type(variant).__name__} is not supported on a QuantLinear base; "
                             "use plain LoRA (use_dora=False and no other LoRA variant)")
        return None

    def _get_in_out_features(self, module):
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer):
        return base_layer.weight.device, base_layer.dtype  # the activation dtype, not the packed weight's

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add each adapter's B A * scaling to the base weight, re-quantized on the layer's grid.

        Lossy: updates smaller than half a quantization step vanish (see `modules/weight_delta.py`).
        `safe_merge` checks the merged tensors for NaN / inf before they replace the base's.
        """
        base = self.get_base_layer()
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            merged = weight_buffers_plus(base, self.get_delta_weight(adapter))
            if safe_merge and not all(torch.isfinite(t.float()).all() for t in merged.values()):
                raise ValueError(f"merging adapter {adapter!r} gives non-finite weights; the adapter is broken")
            self.tensors_before_merge.append(base.weight_buffers())
            set_weight_buffers(base, merged)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Restore the base's weight tensors from before the merges, exactly."""
        while self.merged_adapters:
            self.merged_adapters.pop()
            set_weight_buffers(self.get_base_layer(), self.tensors_before_merge.pop())


def dispatch_quant_linear(target, adapter_name: str, config, **kwargs) -> Optional[QuantLoraLinear]:
    """A QuantLoraLinear for a QuantLinear target; None (PEFT's dispatchers decide) for anything else."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not isinstance(base, QuantLinear):
        return None
    custom = getattr(config, "_custom_modules", None) or {}
    if any(isinstance(base, cls) for cls in custom):
        return None  # the user registered their own layer for it
    return QuantLoraLinear(target, adapter_name, config=config, **kwargs)


def register_lora_layer() -> None:
    """Put `dispatch_quant_linear` in front of PEFT's LoRA dispatchers, once."""
    peft_create = LoraModel._create_new_module
    if getattr(peft_create, "dispatches_quant_linear", False):
        return

    def create_new_module(lora_config, adapter_name, target, **kwargs):
        module = dispatch_quant_linear(target, adapter_name, lora_config, **kwargs)
        return module if module is not None else peft_create(lora_config, adapter_name, target, **kwargs)

    create_new_module.dispatches_quant_linear = True
    LoraModel._create_new_module = staticmethod(create_new_module)
