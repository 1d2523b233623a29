"""PTQHfQuantizer: the transformers 5.x quantizer for quant_method "modelopt", and its registration.

With a PTQConfig passed to `from_pretrained`, it swaps Linears for QuantLinears on the meta
device and quantizes each weight as the loader reads it (`quantize_on_load.py`). With a checkpoint whose
config.json says "modelopt" (ours or ModelOpt's own), it checks that hf_quant_config.json agrees
with it (`config_checks.py`), validates the tensors and builds modules whose buffers are the
checkpoint's tensors (`prequantized.py`, `prequantized_header.py`). Either way the model's
`save_pretrained` then writes the unified checkpoint (`export/save.py`). `register()` runs once,
at `import hf_ptq_plugin`; `attach_quantizer` gives a model quantized in memory the same
save/metadata behaviour.
"""

import dataclasses
import logging
from pathlib import Path

from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers import auto as transformers_auto

from ..calibration.algorithms import get_algorithm
from ..calibration.sources import CheckpointWeights
from ..config import PTQConfig
from ..export.save import install_unified_save, ptq_config_of
from ..export.unified import plan_export
from ..modules.fused_experts import FUSED_PARAMS, without_expert_converters
from ..modules.quant_experts import QuantExperts
from ..modules.quant_linear import QuantLinear
from .config_checks import check_checkpoint_configs
from .dequantize import dequantize_model
from .model_methods import install_model_methods
from .prequantized import finalize_prequantized, prepare_prequantized
from .prequantized_header import model_named, read_header
from .quantize_on_load import QuantizeOnLoad, calibrate_while_loading, finalize_load_time, prepare_load_time

logger = logging.getLogger(__name__)

QUANT_METHOD = PTQConfig.quant_method


class PTQHfQuantizer(HfQuantizer):
    """Load-time quantization and pre-quantized loading of unified ("modelopt") checkpoints."""

    requires_calibration = False  # weight-only formats quantize from weights alone
    export_plan = None  # set by `export.save` for the duration of a save, which has planned it already

    def __init__(self, quantization_config: PTQConfig, **kwargs):
        if not isinstance(quantization_config, PTQConfig):
            raise ValueError(f"PTQHfQuantizer needs a PTQConfig, got {type(quantization_config).__name__}")
        super().__init__(quantization_config, **kwargs)
        self.shared_weight_amax = {}

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        layer, _, leaf = param_name.rpartition(".")
        module = model.get_submodule(layer)
        # A QuantLinear's weight, or a merged fused-experts weight (a QuantExperts placeholder, quantize_on_load.py).
        return (isinstance(module, QuantLinear) and leaf == "weight") or (
            isinstance(module, QuantExperts) and leaf in FUSED_PARAMS)

    def update_weight_conversions(self, weight_conversions, model):
        # Pre-quantized experts load per expert, by name: no merge into fused params they no longer have.
        conversions = super().update_weight_conversions(weight_conversions, model)
        return without_expert_converters(conversions, model) if self.pre_quantized else conversions

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        config = self.quantization_config
        exclude = list(config.exclude_modules) + [f"*{name}*" for name in model._keep_in_fp32_modules or ()]
        if self.pre_quantized:
            if not checkpoint_files:
                raise ValueError("loading a pre-quantized checkpoint needs its safetensors files; "
                                 "from_pretrained(None, state_dict=...) is not supported for it")
            group_size = prepare_prequantized(model, config.format, exclude, config.group_size, config.kv_format,
                                              model_named(read_header(checkpoint_files), model),
                                              config.layer_qformats)
            # After the tensor checks, which name a damaged tensor more precisely; before any is loaded. Both
            # configs sit next to the weights (a Hub download has no hf_quant_config.json: nothing to compare).
            check_checkpoint_configs(Path(checkpoint_files[0]).parent)
            self.quantization_config = dataclasses.replace(config, group_size=group_size)
            return model
        if config.layer_qformats:
            raise ValueError("layer_qformats (per-layer formats) describe a MIXED_PRECISION checkpoint; quantizing "
                             "while loading takes one qformat (leave layer_qformats=None)")
        algorithm = get_algorithm(config.resolved_algorithm)
        if algorithm.streamed and config.calib_dataset is None:
            logger.warning("algorithm %r needs calibration data and none was given (PTQConfig.calib_dataset); weights "
                           "are quantized with 'max' (round to nearest). hf_ptq_plugin.calibrate(model, data) can "
                           "apply %r later, re-reading the weights from this checkpoint", config.resolved_algorithm,
                           config.resolved_algorithm)
        group_size, self.shared_weight_amax = prepare_load_time(model, config.format, exclude, config.group_size,
                                                                checkpoint_files)
        # Loading applies a data-free algorithm (max, mse) itself. One that reads activations runs
        # afterwards on the checkpoint's weights, block by block: with calibration data right after
        # loading, which then only allocates the tensors; without, loading rounds to nearest meanwhile.
        if not algorithm.streamed:
            self.load_algorithm = algorithm
        else:
            self.load_algorithm = None if config.calib_dataset is not None else get_algorithm("max")
        self.load_source = CheckpointWeights([str(f) for f in checkpoint_files or []], config.resolved_algorithm)
        loaded_with = algorithm if self.load_algorithm is None else self.load_algorithm
        self.quantization_config = dataclasses.replace(config, group_size=group_size, algorithm=loaded_with.name)
        return model

    def get_quantize_ops(self):
        return QuantizeOnLoad(self.shared_weight_amax, self.load_algorithm)

    def _process_model_after_weight_loading(self, model, **kwargs):
        config = self.quantization_config
        if self.pre_quantized:
            finalize_prequantized(model, config.kv_format)
        else:
            finalize_load_time(model, config.format, config.kv_format, calibrating=config.calib_dataset is not None)
            model.ptq_source = self.load_source
        self.shared_weight_amax = {}
        model.ptq_config = config
        install_unified_save(model)
        install_model_methods(model)
        if not self.pre_quantized and config.calib_dataset is not None:
            calibrate_while_loading(model, config)
        return model

    def get_state_dict_and_metadata(self, model):
        # Without a plan this is a direct PreTrainedModel.save_pretrained call: planning refuses uncalibrated models.
        plan = self.export_plan or plan_export(model, ptq_config_of(model))
        return None, plan.safetensors_metadata()

    def is_serializable(self, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        """True: adapters (PEFT LoRA, `hf/lora.py`) train on the quantized base. QuantLinear's backward
        gives input gradients only (`modules/frozen_grad.py`); its quantized weights never change."""
        return True

    @property
    def is_qat_trainable(self) -> bool:
        """True: Trainer may hold the model without adapters. Evaluation and prediction run the
        quantized forward; training updates only the floating-point parameters left unquantized
        (embeddings, norms, lm_head), with the loss computed through the quantized layers (which is
        what quantization-aware means here). The quantized weights are buffers: they train only
        through adapters."""
        return True

    def _dequantize(self, model, dtype=None):
        return dequantize_model(model, dtype)


def attach_quantizer(model: nn.Module, config: PTQConfig = None) -> nn.Module:
    """Make a model quantized in memory look like one loaded by from_pretrained (quantizer, config,
    `save_pretrained` writing the unified checkpoint). Idempotent."""
    config = config or model.ptq_config
    quantizer = getattr(model, "hf_quantizer", None)
    if not isinstance(quantizer, PTQHfQuantizer) or quantizer.quantization_config != config:
        model.hf_quantizer = PTQHfQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    model.config.quantization_config = config
    model.ptq_config = config
    install_unified_save(model)
    install_model_methods(model)
    return model


def register() -> bool:
    """Register PTQConfig / PTQHfQuantizer under "modelopt"; False (and a warning) if another owns it."""
    config_cls = transformers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD)
    quantizer_cls = transformers_auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD)
    if config_cls is PTQConfig and quantizer_cls is PTQHfQuantizer:
        return True
    if not (_ours_or_absent(config_cls) and _ours_or_absent(quantizer_cls)):
        logger.warning(
            "transformers already has quant_method %r registered (%s / %s); hf_ptq_plugin leaves it in place, so "
            "from_pretrained uses that one for ModelOpt checkpoints and does not accept PTQConfig. quantize(), "
            "calibrate() and export_checkpoint() still work.", QUANT_METHOD, _qualname(config_cls),
            _qualname(quantizer_cls))
        return False
    # Absent, or left by an earlier copy of this module (importlib.reload): ours replace it.
    transformers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
    transformers_auto.AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
    register_quantization_config(QUANT_METHOD)(PTQConfig)
    register_quantizer(QUANT_METHOD)(PTQHfQuantizer)
    return True


def _ours_or_absent(cls) -> bool:
    return cls is None or cls.__module__.split(".")[0] == __name__.split(".")[0]


def _qualname(cls) -> str:
    return "none" if cls is None else f"{cls.__module__}.{cls.__qualname__}"
