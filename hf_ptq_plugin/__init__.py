"""hf-ptq-plugin: post-training quantization for Hugging Face Transformers models.

`import hf_ptq_plugin` registers, once, the attention functions that quantize the KV cache and the
transformers quantizer for quant_method "modelopt" (`from_pretrained` then loads unified
checkpoints and accepts `quantization_config=PTQConfig(...)`), the config hook through which an older
ModelOpt export (hf_quant_config.json only) loads quantized (`hf/upgrade.py`), and, once PEFT is
imported, the LoRA layer for QuantLinear (LoRA fine-tuning of a quantized model).
"""

import transformers

from .api import quantize
from .autoquant import AutoQuantizeResult, apply_choice, auto_quantize
from .calibration.calibrate import calibrate
from .compat import transformers_tested_range, warn_if_untested
from .config import PTQConfig
from .export import export_checkpoint
from .export.hub import push_to_hub
from .formats import FORMATS, KV_FORMATS, Format, KVFormat, get_format, get_kv_format
from .hf.peft_hook import register_with_peft
from .hf.quantizer import PTQHfQuantizer, attach_quantizer
from .hf.quantizer import register as register_hf_quantizer
from .hf.upgrade import install_config_hook
from .modules.kv_cache import register_kv_attention_functions
from .modules.quant_linear import QuantLinear

__version__ = "0.1.0"

warn_if_untested(transformers.__version__, transformers_tested_range())
register_kv_attention_functions()
register_hf_quantizer()
install_config_hook()
register_with_peft()

__all__ = ["FORMATS", "KV_FORMATS", "AutoQuantizeResult", "Format", "KVFormat", "PTQConfig", "PTQHfQuantizer",
           "QuantLinear", "apply_choice", "attach_quantizer", "auto_quantize", "calibrate", "export_checkpoint",
           "get_format", "get_kv_format", "push_to_hub", "quantize", "__version__"]
