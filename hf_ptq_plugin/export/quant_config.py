"""ModelOpt's quantization-config vocabulary, both ways (`docs/modelopt-facts.md` §6.2, §6.3).

Writing: `hf_quant_config(...)` builds `hf_quant_config.json` and `checkpoint_quantization_config(...)`
the `quantization_config` entry of `config.json`, from a Format, its group size, the KV format and
the summarized exclude list. Reading: `ptq_fields_from_checkpoint_config` turns the
`quantization_config` of a checkpoint (ours, which carries our PTQConfig fields under
`ptq_config`, or one ModelOpt wrote) into PTQConfig fields. Imports only `formats`.
"""

from pathlib import Path
from typing import List, Optional

from .. import formats as F

PRODUCER_NAME = "hf_ptq_plugin"
# Bumped when the meaning of a tensor or a key we write changes; stamped into config.json,
# hf_quant_config.json and every safetensors header.
FORMAT_VERSION = "1"
PTQ_CONFIG_KEY = "ptq_config"  # where config.json keeps our own PTQConfig fields

# ModelOpt writes the 2-D block FP8 algorithm under its lowercase internal name (TensorRT-LLM maps
# exactly "fp8_pb_wo"); every other algorithm is written as Format.quant_algo.
_WRITTEN_ALGO = {"fp8_pb_wo": "fp8_pb_wo"}
# Algorithms whose layer config carries a group size (§6.2 table); the others write group_size null.
_GROUPED_WEIGHTS = (F.INT4, F.NVFP4, F.MXFP8)
MIXED_PRECISION = "MIXED_PRECISION"  # per-layer formats, listed under `quantized_layers`


def written_quant_algo(fmt: F.Format) -> str:
    return _WRITTEN_ALGO.get(fmt.name, fmt.quant_algo)


def format_for_quant_algo(quant_algo: str) -> F.Format:
    """The Format a checkpoint's `quant_algo` names (case-insensitive, as vLLM reads it)."""
    for fmt in F.FORMATS.values():
        if fmt.quant_algo.upper() == str(quant_algo).upper():
            return fmt
    valid = ", ".join(written_quant_algo(f) for f in F.FORMATS.values())
    raise ValueError(f"unknown quant_algo {quant_algo!r}; valid: {valid}, or {MIXED_PRECISION} with quantized_layers")


def kv_format_for_checkpoint(value) -> str:
    """kv_cache_qformat name from `kv_cache_quant_algo` ("FP8", "NVFP4", null) or config.json's
    `kv_cache_scheme` (a {"num_bits", "type"} dict, or the algorithm as a string)."""
    if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
        return "none"
    if isinstance(value, dict):
        bits, kind = value.get("num_bits"), value.get("type")
        value = {(8, "float"): "FP8", (4, "float"): "NVFP4"}.get((bits, kind), f"{kind}{bits}")
    for kv in F.KV_FORMATS.values():
        if kv.kv_cache_quant_algo == str(value).upper():
            return kv.name
    valid = ", ".join(kv.kv_cache_quant_algo for kv in F.KV_FORMATS.values())
    raise ValueError(f"unknown KV-cache algorithm {value!r} in the checkpoint; valid: {valid} or null")


def layer_config(fmt: F.Format, group_size: Optional[int]) -> dict:
    """One format's fields of hf_quant_config.json; group_size is always present (null if none)."""
    fields = {"quant_algo": written_quant_algo(fmt),
              "group_size": group_size if fmt.weight in _GROUPED_WEIGHTS else None}
    if fmt.is_awq:
        fields.update(has_zero_point=False, pre_quant_scale=True)
    return fields


def producer() -> dict:
    from .. import __version__

    return {"name": PRODUCER_NAME, "version": __version__, "format_version": FORMAT_VERSION}


def hf_quant_config(fmt: F.Format, group_size: Optional[int], kv_format: Optional[F.KVFormat],
                    exclude_modules: List[str]) -> dict:
    """The content of hf_quant_config.json, keys in ModelOpt's order."""
    fields = layer_config(fmt, group_size)
    quantization = {"quant_algo": fields.pop("quant_algo"),
                    "kv_cache_quant_algo": kv_format.kv_cache_quant_algo if kv_format else None,
                    **fields, "exclude_modules": list(exclude_modules)}
    return {"producer": producer(), "quantization": quantization}


def _config_groups(fmt: F.Format, group_size: Optional[int]) -> Optional[dict]:
    """config.json `config_groups`, written by ModelOpt for FP8, NVFP4 and W4A16_NVFP4 only."""
    if fmt.name == "fp8":
        return {"group_0": {"input_activations": _scheme(8, "float"), "weights": _scheme(8, "float"),
                            "targets": ["Linear"]}}
    if fmt.name not in ("nvfp4", "w4a16_nvfp4"):
        return None
    fp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": group_size}
    group = {"weights": dict(fp4), "targets": ["Linear"]}
    if fmt.act is not None:
        group = {"input_activations": dict(fp4), **group}
    return {"group_0": group}


def checkpoint_quantization_config(fmt: F.Format, group_size: Optional[int], kv_format: Optional[F.KVFormat],
                                   exclude_modules: List[str], ptq_fields: dict) -> dict:
    """config.json's `quantization_config`: ModelOpt's keys, then our own PTQConfig fields."""
    groups = _config_groups(fmt, group_size)
    out = {} if groups is None else {"config_groups": groups}
    out.update(ignore=list(exclude_modules), quant_algo=written_quant_algo(fmt))
    return _with_common_fields(out, kv_format, ptq_fields)


def _with_common_fields(out: dict, kv_format: Optional[F.KVFormat], ptq_fields: dict, **modelopt_fields) -> dict:
    """`out` (ModelOpt's leading keys) + kv_cache_scheme, producer, quant_method, `modelopt_fields`, our fields."""
    if kv_format is not None:
        out["kv_cache_scheme"] = _scheme(8, "float") if kv_format.values == F.FP8 else kv_format.kv_cache_quant_algo
    out.update(producer=producer(), quant_method="modelopt", **modelopt_fields)
    out[PTQ_CONFIG_KEY] = {k: v for k, v in ptq_fields.items() if k != "quant_method"}
    if isinstance(ptq_fields.get("calib_dataset"), str) and Path(ptq_fields["calib_dataset"]).exists():
        # A local path would publish the machine's directories; its name says which data it was.
        out[PTQ_CONFIG_KEY]["calib_dataset"] = Path(ptq_fields["calib_dataset"]).name
    return out


def ptq_fields_from_checkpoint_config(values: dict) -> dict:
    """PTQConfig fields from a `quantization_config` dict (without its quant_method).

    Our checkpoints carry the fields under `ptq_config`; a dict with `quant_algo` but no such key
    was written by ModelOpt and is translated; anything else is taken as PTQConfig fields as is.
    """
    if PTQ_CONFIG_KEY in values:
        return {k: v for k, v in values[PTQ_CONFIG_KEY].items() if k != "quant_method"}
    if "quant_algo" not in values:
        return values
    if str(values["quant_algo"]).upper() == MIXED_PRECISION:
        return _mixed_precision_fields(values)
    fmt = format_for_quant_algo(values["quant_algo"])
    kv = values.get("kv_cache_quant_algo", values.get("kv_cache_scheme"))
    exclude = values.get("ignore", values.get("exclude_modules")) or []
    fields = {"qformat": fmt.name, "kv_cache_qformat": kv_format_for_checkpoint(kv), "exclude_modules": list(exclude)}
    group_size = values.get("group_size") or _group_size_from_groups(values.get("config_groups"))
    if group_size is not None and (fmt.group_size_choices or fmt.group_size):
        fields["group_size"] = int(group_size)
    return fields


def _mixed_precision_fields(values: dict) -> dict:
    """PTQConfig fields of a MIXED_PRECISION checkpoint: one qformat per listed layer."""
    layers = values.get("quantized_layers")
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"quant_algo {MIXED_PRECISION} needs a non-empty quantized_layers mapping; found {layers!r}")
    layer_qformats, group_sizes = {}, set()
    for name, layer in layers.items():
        fmt = format_for_quant_algo((layer or {}).get("quant_algo"))
        layer_qformats[name] = fmt.name
        if fmt.group_size_choices and layer.get("group_size"):
            group_sizes.add(int(layer["group_size"]))
    if len(group_sizes) > 1:
        raise ValueError(f"the checkpoint's INT4 layers use group sizes {sorted(group_sizes)}; one per model is "
                         "supported")
    names = list(layer_qformats.values())
    kv = values.get("kv_cache_quant_algo", values.get("kv_cache_scheme"))
    fields = {"qformat": max(set(names), key=names.count), "layer_qformats": layer_qformats,
              "kv_cache_qformat": kv_format_for_checkpoint(kv)}
    if group_sizes:
        fields["group_size"] = group_sizes.pop()
    return fields


def mixed_quantized_layers(layer_formats: dict) -> dict:
    """`quantized_layers` of a MIXED_PRECISION checkpoint from {name: (Format, group size)} (§6.2's
    per-layer configs: a group size only where the format has one)."""
    return {name: {k: v for k, v in layer_config(fmt, group_size).items() if v is not None}
            for name, (fmt, group_size) in sorted(layer_formats.items())}


def mixed_hf_quant_config(layer_formats: dict, kv_format: Optional[F.KVFormat]) -> dict:
    """hf_quant_config.json of a MIXED_PRECISION checkpoint (no exclude_modules: unlisted = unquantized)."""
    return {"producer": producer(), "quantization": {
        "quant_algo": MIXED_PRECISION, "kv_cache_quant_algo": kv_format.kv_cache_quant_algo if kv_format else None,
        "quantized_layers": mixed_quantized_layers(layer_formats)}}


def _scheme(num_bits: int, kind: str, group_size: Optional[int] = None, strategy: Optional[str] = None) -> dict:
    scheme = {"dynamic": False, "num_bits": num_bits, "type": kind}
    if group_size is not None:
        scheme["group_size"] = group_size
    if strategy is not None:
        scheme["strategy"] = strategy
    return scheme


# config_groups of a MIXED_PRECISION config.json, per layer quant_algo: quant_algo -> group size -> (input
# activations or None, weights), the fields ModelOpt's export writes (its group size defaults where a layer
# has none). NVFP4_AWQ / W4A8_AWQ groups say float4 weights and float8 activations, as ModelOpt writes them.
_MIXED_GROUP_SCHEMES = {
    "FP8": lambda gs: (_scheme(8, "float"), _scheme(8, "float")),
    "FP8_PER_CHANNEL_PER_TOKEN": lambda gs: (_scheme(8, "float"), _scheme(8, "float", strategy="channel")),
    "NVFP4": lambda gs: (_scheme(4, "float", gs or 16), _scheme(4, "float", gs or 16)),
    "W4A16_AWQ": lambda gs: (None, _scheme(4, "int", gs or 128)),
    "W4A16_NVFP4": lambda gs: (None, _scheme(4, "float", gs or 16)),
    "NVFP4_AWQ": lambda gs: (_scheme(8, "float", gs or 128), _scheme(4, "float", gs or 128)),
    "W4A8_AWQ": lambda gs: (_scheme(8, "float", gs or 128), _scheme(4, "float", gs or 128)),
    "W8A16": lambda gs: (None, _scheme(8, "int")),
    "W8A8_SQ_PER_CHANNEL": lambda gs: (_scheme(8, "int"), _scheme(8, "int", strategy="channel")),
    "MXFP8": lambda gs: (_scheme(8, "float", gs or 32), _scheme(8, "float", gs or 32)),
}


def mixed_config_groups(quantized_layers: dict) -> dict:
    """config.json `config_groups` of a MIXED_PRECISION checkpoint: one `group_i` per distinct layer
    config (in the order they first appear), its `targets` the sorted names of its layers."""
    layers_by_config = {}
    for name, layer in quantized_layers.items():
        layers_by_config.setdefault(tuple(sorted(layer.items())), []).append(name)
    groups = {}
    for index, (key, names) in enumerate(layers_by_config.items()):
        layer = dict(key)
        scheme = _MIXED_GROUP_SCHEMES.get(layer["quant_algo"])
        if scheme is None:  # ModelOpt's fallback: the bare quant_algo
            group = {"quant_algo": layer["quant_algo"]}
        else:
            activations, weights = scheme(layer.get("group_size"))
            group = {"input_activations": activations} if activations is not None else {}
            group["weights"] = weights
        groups[f"group_{index}"] = {**group, "targets": sorted(names)}
    return groups


def mixed_checkpoint_quantization_config(layer_formats: dict, kv_format: Optional[F.KVFormat],
                                         ptq_fields: dict) -> dict:
    """config.json's `quantization_config` of a MIXED_PRECISION checkpoint, ModelOpt's keys in its order."""
    quantized_layers = mixed_quantized_layers(layer_formats)
    out = {"config_groups": mixed_config_groups(quantized_layers), "ignore": [], "quant_algo": MIXED_PRECISION}
    return _with_common_fields(out, kv_format, ptq_fields, quantized_layers=quantized_layers)


def _group_size_from_groups(groups: Optional[dict]) -> Optional[int]:
    for group in (groups or {}).values():
        size = (group.get("weights") or {}).get("group_size")
        if size is not None:
            return size
    return None
