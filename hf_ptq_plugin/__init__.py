"""hf-ptq-plugin: post-training quantization for Hugging Face Transformers models.

`import hf_ptq_plugin` registers, once, the attention functions that quantize the KV cache.
"""

from .config import PTQConfig
from .formats import FORMATS, KV_FORMATS, Format, KVFormat, get_format, get_kv_format
from .kv_cache import register_kv_attention_functions
from .quant_linear import QuantLinear
from .quantize import quantize

__version__ = "0.1.0"

register_kv_attention_functions()

__all__ = ["FORMATS", "KV_FORMATS", "Format", "KVFormat", "PTQConfig", "QuantLinear", "get_format",
           "get_kv_format", "quantize", "__version__"]
