"""One Linear's tensors in the legacy TensorRT-LLM checkpoint, as `trtllm-build`'s layer classes declare them.

`trtllm-build` loads `rank{N}.safetensors` through `PretrainedModel.from_checkpoint`: `preprocess_weights`
rewrites some tensors per quant_algo, then `load` demands every parameter of the layers that
`quantize()` swapped in, each with its exact shape (TensorRT-LLM tensorrt_llm/models/modeling_utils.py,
tensorrt_llm/quantization/quantize.py; tensorrt_llm/parameter.py asserts the shape, and a dtype mismatch
changes the engine's dtype with a warning). Per Linear, by `quant_algo` (classes in
tensorrt_llm/quantization/layers.py):

- FP8 (FP8Linear / FP8RowLinear): weight float8_e4m3fn [N, K]; weights_scaling_factor and
  activation_scaling_factor fp32 (1,).
- FP8_PER_CHANNEL_PER_TOKEN (Fp8RowwiseLinear / Fp8RowwiseRowLinear): weight float8_e4m3fn [N, K];
  per_channel_scale fp32 (N,); activations are scaled per token at run time. lm_head must stay
  unquantized (preprocess_perlayer_weights asserts it).
- W8A8_SQ_PER_CHANNEL (Int8SmoothQuantLinear / RowLinear: not in mode.py's W8A8_SQ_PLUGIN_LIST, so
  quantize.py takes smooth_quantize_ootb): weight int8 [N, K], weights_scaling_factor fp32 (N,),
  activation_scaling_factor fp32 (1,), prequant_scaling_factor (K,) in the model dtype on every Linear.
- W4A16_AWQ / W4A8_AWQ (WeightOnlyGroupwiseQuantLinear / RowLinear): in and out features padded up to a
  multiple of max(64, or 128 for W4A8, group_size) x tp_size before the split. The checkpoint holds
  weight int8 [N/2, K] (packed along N; preprocess transposes it for the mixed GEMM),
  weights_scaling_factor [N, K / group] (transposed and cast by preprocess), prequant_scaling_factor (K,)
  in the model dtype; W4A8 adds activation_scaling_factor and weights_scaling_factor_2 fp32 (1,), from
  which preprocess derives alpha. W4A8 takes group_size 128 only (quantization/functional.py,
  validate_group_size).
- NVFP4 (FP4Linear / FP4RowLinear): weight uint8 [N, K/2], weights_scaling_factor float8_e4m3fn
  [N, K/16], weights_scaling_factor_2 and activation_scaling_factor fp32 (1,); preprocess derives the
  interleaved block scales and alpha. K per rank must be a multiple of 16.
W8A16 has no entry: trtllm-build quantizes float weights itself (models/convert_utils.py,
weight_only_quantize_dict: scale amax / 128) and takes int8 weights as already laid out for the GEMM of
the GPU it runs on (cpp/tensorrt_llm/kernels/cutlass_kernels/cutlass_preprocessors.cpp,
preprocess_weights_for_mixed_gemm depends on the SM version); neither keeps our codes and scales.
In a MIXED_PRECISION checkpoint each Linear takes its own layer class the same way, except
FP8_PER_CHANNEL_PER_TOKEN: quantize.py's fp8_rowwise_quantize swaps whole attention / MLP / norm blocks,
so a per-Linear entry of quant_cfg.json leaves a plain Linear (and LayerQuantConfig's
_get_modelopt_qformat in models/modeling_utils.py knows the other five algorithms only).
"""

import math
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.nn import functional as F_nn

from .. import formats as F
from ..modules.quant_linear import QuantLinear
from ..numerics.fp8 import fp8_dequantize, fp8_quantize

LEGACY_QUANT_ALGO = {"fp8": "FP8", "fp8_pc_pt": "FP8_PER_CHANNEL_PER_TOKEN", "int8_sq": "W8A8_SQ_PER_CHANNEL",
                     "int4_awq": "W4A16_AWQ", "w4a8_awq": "W4A8_AWQ", "nvfp4": "NVFP4"}
SUFFIX = {"weight": "weight", "weight_scale": "weights_scaling_factor", "weight_scale_2": "weights_scaling_factor_2",
          "input_scale": "activation_scaling_factor", "pre_quant_scale": "prequant_scaling_factor", "bias": "bias"}
PADDED_FORMATS = ("int4_awq", "w4a8_awq")  # WeightOnlyGroupwiseQuantLinear pads its features
MIXED_FORMATS = ("fp8", "int8_sq", "int4_awq", "w4a8_awq", "nvfp4")  # per-Linear in MIXED_PRECISION (see above)
W4A8_GROUP_SIZE = 128


def check_legacy_format(fmt: F.Format) -> None:
    """ValueError unless trtllm-build can load `fmt` from a legacy checkpoint."""
    if fmt.name == "int8_wo":
        raise ValueError("qformat 'int8_wo' has no legacy TensorRT-LLM checkpoint: trtllm-build re-quantizes float "
                         "W8A16 weights with its own scales and takes int8 ones only as laid out for the GPU it runs "
                         "on; use target 'trtllm' (the unified checkpoint, TensorRT-LLM's PyTorch backend) or 'vllm'")
    if fmt.name not in LEGACY_QUANT_ALGO:
        raise ValueError(f"qformat {fmt.name!r} has no legacy TensorRT-LLM checkpoint; "
                         f"valid: {', '.join(LEGACY_QUANT_ALGO)}")


def check_mixed_legacy_format(fmt: F.Format) -> None:
    """ValueError unless `fmt` can be one Linear's format in a MIXED_PRECISION legacy checkpoint."""
    check_legacy_format(fmt)
    if fmt.name not in MIXED_FORMATS:
        raise ValueError(f"qformat {fmt.name!r} cannot be one layer's format in a MIXED_PRECISION legacy TensorRT-LLM "
                         f"checkpoint: TensorRT-LLM applies {fmt.quant_algo} to whole attention/MLP blocks, not per "
                         "Linear, and would build these layers unquantized; valid per layer: "
                         f"{', '.join(MIXED_FORMATS)}. Use target 'modelopt' (the unified checkpoint)")


def linear_tensors(module: nn.Module, fmt: F.Format) -> Dict[str, torch.Tensor]:
    """One Linear's legacy tensors, named and shaped as the layer class of `fmt` loads them."""
    if not isinstance(module, QuantLinear):
        return {"weight": module.weight.detach()} | ({"bias": module.bias.detach()} if module.bias is not None else {})
    out = {SUFFIX[name]: t.detach() for name, t in module.state_dict().items() if name in SUFFIX}
    if fmt.weight == F.INT4:
        out["weight"] = out["weight"].view(torch.int8)
    if fmt.name == "fp8_pc_pt":
        out["per_channel_scale"] = out.pop("weights_scaling_factor").float()
    if fmt.pre_quant_scale and "prequant_scaling_factor" not in out:
        out["prequant_scaling_factor"] = torch.ones(module.in_features, dtype=module.dtype)
    return {k: v.reshape(1) if v.dim() == 0 else v for k, v in out.items()}


def _unify_fp8(parts: List[dict]) -> List[torch.Tensor]:
    """Requantize per-tensor FP8 weights to the largest of their scales: fp8(q * s / s_max)."""
    scales = [p["weights_scaling_factor"] for p in parts]
    s_max = torch.stack(scales).amax(dim=0)
    return [p["weight"] if torch.equal(s, s_max) else fp8_quantize(fp8_dequantize(p["weight"], s), s_max)
            for p, s in zip(parts, scales)]


def merge_qkv(parts: List[dict], fmt: Optional[F.Format]) -> dict:
    """q, k, v legacy tensors (`fmt` None: unquantized) -> attention.qkv; ValueError when a shared factor differs."""
    per_tensor_fp8 = fmt is not None and fmt.weight == F.FP8 and fmt.weight_granularity == F.PER_TENSOR
    weights = _unify_fp8(parts) if per_tensor_fp8 else [p["weight"] for p in parts]
    merged = {"weight": torch.cat(weights, dim=0)}
    for key in [k for k in parts[0] if k != "weight"]:
        values = [p[key] for p in parts]
        if key in ("bias", "per_channel_scale") or (key == "weights_scaling_factor" and not per_tensor_fp8):
            merged[key] = torch.cat(values, dim=0)
        elif key in ("weights_scaling_factor", "activation_scaling_factor"):
            merged[key] = torch.stack(values).amax(dim=0)
        elif all(torch.equal(v, values[0]) for v in values):
            merged[key] = values[0]
        else:
            raise ValueError(f"q/k/v carry different {key}; one merged qkv GEMM needs one shared value")
    return merged


def padding_multiple(fmt: F.Format, group_size: Optional[int], tp_size: int) -> Optional[int]:
    """What WeightOnlyGroupwiseQuantLinear pads features to a multiple of; None for layers that do not pad."""
    if fmt.name not in PADDED_FORMATS:
        return None
    return max(128 if fmt.fp8_weight_scale_2 else 64, group_size) * tp_size


def padded(features: int, multiple: Optional[int]) -> int:
    return features if multiple is None else math.ceil(features / multiple) * multiple


def pad_tensor(leaf: str, value: torch.Tensor, features: tuple, multiple: Optional[int]) -> torch.Tensor:
    """Zero-pad one tensor of a Linear with `features` (N, K) at the end of each padded dim.

    Fill values follow TensorRT-LLM's own loader for padded layers (quantization/functional.py,
    postprocess_weight_only_groupwise: weights 0, scales 1, pre-quant scales 0). Padding the whole
    tensor first and splitting it evenly is how that loader cuts padded layers across ranks.
    """
    n, k = features
    n_pad, k_pad = padded(n, multiple), padded(k, multiple)
    if multiple is None or (n_pad, k_pad) == (n, k) or value.numel() == 1:
        return value
    if leaf in ("prequant_scaling_factor", "bias"):
        return F_nn.pad(value, (0, (k_pad - k) if leaf == "prequant_scaling_factor" else (n_pad - n)))
    rows, cols = value.shape  # weight [N/2, K] or weights_scaling_factor [N, K / group]
    target = (rows * n_pad // n, cols * k_pad // k)
    fill = 1.0 if leaf == "weights_scaling_factor" else 0
    return F_nn.pad(value, (0, target[1] - cols, 0, target[0] - rows), value=fill)


def check_buildable(model: nn.Module, fmt: F.Format, group_size: Optional[int], tp_size: int) -> None:
    """ValueError for a checkpoint trtllm-build refuses, or one whose padding would cross attention heads."""
    if fmt.fp8_weight_scale_2 and group_size != W4A8_GROUP_SIZE:
        raise ValueError(f"TensorRT-LLM builds W4A8_AWQ with group_size {W4A8_GROUP_SIZE} only, not {group_size}; "
                         f"quantize with PTQConfig(group_size={W4A8_GROUP_SIZE}) or use target 'trtllm'")
    if fmt.name == "fp8_pc_pt" and isinstance(model.lm_head, QuantLinear):
        raise ValueError("TensorRT-LLM's FP8_PER_CHANNEL_PER_TOKEN keeps lm_head unquantized; quantize with lm_head "
                         "excluded (the default) or use target 'trtllm'")
    config, head_dim = model.config, model.model.layers[0].self_attn.head_dim
    attention = {"q/k/v outputs": (config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim,
                 "o_proj inputs": config.num_attention_heads * head_dim}
    multiple = padding_multiple(fmt, group_size, tp_size)
    for what, features in attention.items():
        if multiple is not None and tp_size > 1 and features % multiple:
            raise ValueError(f"{fmt.quant_algo} at tp_size={tp_size} pads features to a multiple of {multiple}; "
                             f"the {features} {what} would be padded across the attention heads of the ranks. "
                             "Use tp_size=1 or target 'trtllm'")
    row_inputs = {"o_proj": attention["o_proj inputs"], "down_proj": config.intermediate_size}
    for name, features in row_inputs.items():
        if fmt.weight == F.NVFP4 and (features // tp_size) % 16:
            raise ValueError(f"NVFP4 needs in_features per rank divisible by 16; {name} has {features} / "
                             f"tp_size={tp_size}")
