"""Reference numerics: pure-torch quantize / dequantize / pack per format.

The single source of truth for the math (`x ~= q * scale` everywhere), the CPU path of
`QuantLinear`, and the oracle every kernel is tested against. Imports only torch.
"""

from .activations import input_scale_from_amax, quantize_activation
from .fp8 import FP8_MAX, fp8_dequantize, fp8_quantize
from .integer import INT4_MAX, INT8_MAX, int_dequantize, int_quantize, pack_int4_rows, unpack_int4_rows
from .nvfp4 import E2M1_MAX, e2m1_codes, e2m1_values, nvfp4_fake_quantize, pack_nibbles, unpack_nibbles
from .scales import scale_from_amax
from .weights import dequantize_weight, quantize_weight, weight_buffer_specs

__all__ = [
    "E2M1_MAX", "FP8_MAX", "INT4_MAX", "INT8_MAX", "dequantize_weight", "e2m1_codes", "e2m1_values",
    "fp8_dequantize", "fp8_quantize", "input_scale_from_amax", "int_dequantize", "int_quantize", "nvfp4_fake_quantize",
    "pack_int4_rows", "pack_nibbles", "quantize_activation", "quantize_weight", "scale_from_amax",
    "unpack_int4_rows", "unpack_nibbles", "weight_buffer_specs",
]
