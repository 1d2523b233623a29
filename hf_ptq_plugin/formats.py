"""Quantization formats as data: one frozen `Format` per ModelOpt qformat, one per KV-cache format.

Strings (qformat names, checkpoint `quant_algo` names) live only here and at the edges
(config, CLI); the rest of the package passes `Format` objects around. The fields say how
weights are stored, how activations are quantized at run time, and which calibration
algorithm the format uses by default (ModelOpt's defaults, `docs/modelopt-facts.md` §1.4).
"""

from dataclasses import dataclass
from typing import Optional

# Weight encodings (how `QuantLinear.weight` is stored).
FP8 = "fp8"  # float8_e4m3fn values
INT8 = "int8"  # int8 values
INT4 = "int4"  # signed nibbles packed along the output dim, uint8 [out/2, in]
NVFP4 = "nvfp4"  # E2M1 nibbles packed along the input dim, uint8 [out, in/2]
MXFP8 = "mxfp8"  # float8_e4m3fn values with E8M0 (power of two) block scales

# Weight scale granularities.
PER_TENSOR = "tensor"
PER_CHANNEL = "channel"  # one scale per output row
PER_GROUP = "group"  # one scale per `group_size` inputs of a row
PER_TILE = "tile"  # one scale per (group_size x group_size) tile

# Activation scaling modes.
STATIC = "static"  # one calibrated per-tensor scale (`input_scale`)
DYNAMIC_TOKEN = "dynamic_token"  # one scale per token, computed at run time
DYNAMIC_BLOCK = "dynamic_block"  # block scales at run time (MX: nothing stored)
STATIC_GLOBAL_DYNAMIC_BLOCK = "static_global_dynamic_block"  # NVFP4: calibrated global scale

# Group sizes the serving engines' INT4 group-wise GEMMs accept (TensorRT-LLM's W4A16/W4A8).
INT4_GROUP_SIZES = (128, 64)


@dataclass(frozen=True)
class Format:
    """One quantization format. `act_*` is None for weight-only formats."""

    name: str  # ModelOpt qformat name, e.g. "int4_awq"
    quant_algo: str  # unified-checkpoint `quant_algo`, e.g. "W4A16_AWQ"
    weight: str  # weight encoding: FP8, INT8, INT4, NVFP4, MXFP8
    weight_granularity: str  # PER_TENSOR, PER_CHANNEL, PER_GROUP, PER_TILE
    group_size: Optional[int]  # default block/group size along the input dim
    act: Optional[str]  # activation encoding: FP8, INT8, NVFP4, MXFP8 or None
    act_scaling: Optional[str]  # STATIC, DYNAMIC_TOKEN, DYNAMIC_BLOCK, STATIC_GLOBAL_DYNAMIC_BLOCK
    # calibration algorithm used when the config leaves it None: the most accurate one that calibrates
    # SmolLM2-135M on 64 x 512 tokens within a minute on a 2-core CPU (README, "Defaults")
    default_algorithm: str
    pre_quant_scale: bool = False  # may carry a per-input-channel `pre_quant_scale`
    fp8_weight_scale_2: bool = False  # W4A8: per-tensor FP8 `weight_scale_2` over INT4 groups
    group_size_choices: tuple = ()  # allowed group sizes; () = fixed at `group_size`
    default_sequential: bool = True  # PTQConfig.sequential when the config leaves it None

    @property
    def needs_calibration_data(self) -> bool:
        """True when a scale can only come from running data through the model."""
        return self.act_scaling in (STATIC, STATIC_GLOBAL_DYNAMIC_BLOCK)

    @property
    def has_weight_scale_2(self) -> bool:
        """A per-tensor second-level `weight_scale_2`, which engine-fused siblings must share."""
        return self.weight == NVFP4 or self.fp8_weight_scale_2

    @property
    def fused_siblings_share_weight_scale(self) -> bool:
        """Engine-fused siblings (q/k/v, gate/up) must share a per-tensor weight scale: NVFP4 and
        W4A8's `weight_scale_2`, or per-tensor FP8's `weight_scale` (vLLM and TensorRT-LLM
        requantize a fused weight to its siblings' largest scale otherwise, computing other weights)."""
        return self.has_weight_scale_2 or (self.weight == FP8 and self.weight_granularity == PER_TENSOR)

    @property
    def is_awq(self) -> bool:
        """The checkpoint's `quant_algo` is an AWQ one (its layers may carry `pre_quant_scale`)."""
        return "AWQ" in self.quant_algo


FORMATS = {
    f.name: f
    for f in (
        Format("fp8", "FP8", FP8, PER_TENSOR, None, FP8, STATIC, "gptq", default_sequential=False),
        Format("fp8_pc_pt", "FP8_PER_CHANNEL_PER_TOKEN", FP8, PER_CHANNEL, None, FP8, DYNAMIC_TOKEN, "gptq",
               default_sequential=False),
        Format("fp8_pb_wo", "FP8_PB_WO", FP8, PER_TILE, 128, None, None, "max"),
        Format("int8_sq", "W8A8_SQ_PER_CHANNEL", INT8, PER_CHANNEL, None, INT8, STATIC, "smoothquant",
               pre_quant_scale=True, default_sequential=False),
        Format("int8_wo", "W8A16", INT8, PER_CHANNEL, None, None, None, "gptq"),
        Format("int4_awq", "W4A16_AWQ", INT4, PER_GROUP, 128, None, None, "gptq",
               pre_quant_scale=True, group_size_choices=INT4_GROUP_SIZES),
        Format("w4a8_awq", "W4A8_AWQ", INT4, PER_GROUP, 128, FP8, STATIC, "awq_full",
               pre_quant_scale=True, fp8_weight_scale_2=True, group_size_choices=INT4_GROUP_SIZES,
               default_sequential=False),
        Format("nvfp4", "NVFP4", NVFP4, PER_GROUP, 16, NVFP4, STATIC_GLOBAL_DYNAMIC_BLOCK, "max"),
        Format("nvfp4_awq", "NVFP4_AWQ", NVFP4, PER_GROUP, 16, NVFP4, STATIC_GLOBAL_DYNAMIC_BLOCK,
               "awq_clip", pre_quant_scale=True, default_sequential=False),
        Format("w4a16_nvfp4", "W4A16_NVFP4", NVFP4, PER_GROUP, 16, None, None, "max"),
        Format("mxfp8", "MXFP8", MXFP8, PER_GROUP, 32, MXFP8, DYNAMIC_BLOCK, "max"),
    )
}


@dataclass(frozen=True)
class KVFormat:
    """How attention keys and values are quantized before the attention kernel."""

    name: str  # "fp8" or "nvfp4"
    kv_cache_quant_algo: str  # "FP8" or "NVFP4"
    values: str  # FP8 or NVFP4


KV_FORMATS = {
    "fp8": KVFormat("fp8", "FP8", FP8),
    "nvfp4": KVFormat("nvfp4", "NVFP4", NVFP4),
}
KV_FORMAT_NAMES = ("none",) + tuple(KV_FORMATS)

def get_format(name: str) -> Format:
    """The Format for a qformat name; a ValueError lists the valid names."""
    if name not in FORMATS:
        raise ValueError(f"unknown qformat {name!r}; valid: {', '.join(FORMATS)}")
    return FORMATS[name]


def get_kv_format(name: str) -> Optional[KVFormat]:
    """The KVFormat for a kv_cache_qformat name, None for "none"."""
    if name not in KV_FORMAT_NAMES:
        raise ValueError(f"unknown kv_cache_qformat {name!r}; valid: {', '.join(KV_FORMAT_NAMES)}")
    return KV_FORMATS.get(name)


UNQUANTIZED = "none"  # AutoQuantize's implicit option, and a layer's format in a per-layer table
UNQUANTIZED_BITS = 16.0
# Bits per weight a format counts for in an effective-bits budget, by weight encoding (ModelOpt's
# AutoQuantize costs: scales not counted).
NOMINAL_BITS = {INT4: 4.0, NVFP4: 4.5, FP8: 8.0, INT8: 8.0, MXFP8: 8.0}


def nominal_bits(qformat: str) -> float:
    """Bits per weight `qformat` (or "none", full precision) counts for in an effective-bits budget."""
    if qformat == UNQUANTIZED:
        return UNQUANTIZED_BITS
    return NOMINAL_BITS[get_format(qformat).weight]
