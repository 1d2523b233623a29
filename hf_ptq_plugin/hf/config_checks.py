"""Agreement of a checkpoint's two quantization configs, checked before any tensor is read.

A unified checkpoint states its quantization twice: `hf_quant_config.json` (what TensorRT-LLM and
ModelOpt's tools read) and config.json's `quantization_config` (what transformers, vLLM and SGLang
read; ours also keeps our PTQConfig fields under `ptq_config`, which is what loading here uses).
Our exporter writes both from one plan and ModelOpt's copies one into the other
(`export/quant_config.py`, `docs/modelopt-facts.md` §6.2-6.3), so a disagreement means a file was
edited or damaged after export: the checkpoint would load here as one thing and be served
elsewhere as another. `check_checkpoint_configs(directory)` compares what both files write alike:
`quant_algo`; the KV-cache algorithm (`kv_cache_quant_algo` / `kv_cache_scheme`, absent = none);
the group size where both state one; the exclude list (`exclude_modules` / `ignore`, as sets) where
both have one; for MIXED_PRECISION each listed layer's `quant_algo` and group size. Within
config.json, `ptq_config`'s qformat and kv_cache_qformat must be what its own `quant_algo` and
`kv_cache_scheme` say. Keys only one writer adds (`producer`, `config_groups`' schemes,
`has_zero_point`, the `pre_quant_scale` flag) are not compared. A ValueError names the field, both
values and both files.

`check_quantization_config` runs earlier, as transformers reads a local directory's config.json
(`hf/upgrade.py`'s config hook): where transformers would fail on a malformed "modelopt"
quantization_config without naming the file (an AttributeError), or, for a quant_method other than
"modelopt" in a directory holding hf_quant_config.json, would skip the quantization (an unknown
method) or read the tensors as another method's, it raises a ValueError naming the file.
"""

import json
from pathlib import Path
from typing import Optional

from transformers.quantizers import auto as transformers_auto

from .. import formats as F
from ..config import PTQConfig
from ..export.quant_config import MIXED_PRECISION, PTQ_CONFIG_KEY, kv_format_for_checkpoint, written_quant_algo

HF_QUANT_CONFIG = "hf_quant_config.json"
CONFIG = "config.json"
NO_KV = "none"
COMPARED_FIELDS = ("quant_algo", "kv_cache_quant_algo", "group_size", "exclude_modules", "quantized_layers")


def read_json_object(path: Path) -> dict:
    """The JSON object in `path`; a ValueError names the file and what is wrong with it."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{str(path)!r}: expected a JSON object; found {type(value).__name__}")
    return value


def quantization_section(hf_path: Path) -> dict:
    """hf_quant_config.json's `quantization` object (a ValueError if there is none with a quant_algo)."""
    section = read_json_object(hf_path).get("quantization")
    if not isinstance(section, dict) or "quant_algo" not in section:
        raise ValueError(f"{str(hf_path)!r}: expected a 'quantization' object with 'quant_algo'; found {section!r}")
    return section


def check_quantization_config(config_path: Path, value, modelopt_checkpoint: bool) -> None:
    """config.json's `quantization_config` as transformers will take it; `modelopt_checkpoint`: the
    directory holds hf_quant_config.json. A ValueError names the file."""
    if not isinstance(value, dict):
        raise ValueError(f"{str(config_path)!r}: quantization_config must be a JSON object; found {value!r}")
    method = value.get("quant_method")
    known = transformers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING
    if method == PTQConfig.quant_method and known.get(method) is PTQConfig:
        try:
            PTQConfig.from_dict(value)
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{str(config_path)!r}: quantization_config is not valid: {error}") from None
    elif modelopt_checkpoint and method != PTQConfig.quant_method:
        # transformers only warns about an unknown method and loads the codes as weights; a known other
        # method reads ModelOpt's tensors as its own layout. Either way the load would be silently wrong.
        raise ValueError(f"{str(config_path)!r}: quantization_config.quant_method is {method!r}, but the directory "
                         f"holds {HF_QUANT_CONFIG}: a ModelOpt checkpoint says {PTQConfig.quant_method!r}")


def check_checkpoint_configs(directory) -> None:
    """ValueError if `directory`'s hf_quant_config.json and config.json `quantization_config` disagree.

    Nothing to compare when either file is absent, or config.json has no quantization_config (an
    older export, whose quantization_config is then taken from hf_quant_config.json itself).
    """
    hf_path, config_path = Path(directory) / HF_QUANT_CONFIG, Path(directory) / CONFIG
    if not hf_path.is_file() or not config_path.is_file():
        return
    written = read_json_object(config_path).get("quantization_config")
    if written is None:
        return
    if not isinstance(written, dict):
        raise ValueError(f"{str(config_path)!r}: quantization_config must be a JSON object; found {written!r}")
    _check_ptq_fields_match(written, config_path)
    section = quantization_section(hf_path)
    hf_fields = _summary(section, hf_path, section.get("exclude_modules"))
    # config.json's exclude list is `ignore`; a copy of hf_quant_config.json's section keeps `exclude_modules`
    # (a bare PTQConfig dict's exclude_modules are patterns, not the written list: not compared).
    exclude = written.get("ignore", written.get("exclude_modules") if "quant_algo" in written else None)
    config_fields = _summary(written, config_path, exclude)
    for field in COMPARED_FIELDS:
        _check_field(field, (hf_path, hf_fields[field]), (config_path, config_fields[field]))


def _summary(section: dict, path: Path, exclude) -> dict:
    """The compared fields of one file, normalized (None: the file does not state it)."""
    quant_algo = _quant_algo(section, path).upper()
    return {"quant_algo": quant_algo, "kv_cache_quant_algo": _kv_algo(section, path),
            "group_size": _group_size(section), "exclude_modules": _exclude_set(exclude, path),
            "quantized_layers": _layers(section, path) if quant_algo == MIXED_PRECISION else None}


def _ptq_fields(section: dict) -> Optional[dict]:
    """PTQConfig fields of a quantization_config: under `ptq_config` (ours), or the dict itself when it
    is one (no ModelOpt `quant_algo`); None for ModelOpt's."""
    fields = section.get(PTQ_CONFIG_KEY, None if "quant_algo" in section else section)
    return fields if isinstance(fields, dict) else None


def _quant_algo(section: dict, path: Path) -> str:
    if "quant_algo" not in section and _ptq_fields(section) is not None:
        return _algo_of_ptq_fields(_ptq_fields(section), path)
    value = section.get("quant_algo")
    if not isinstance(value, str):
        raise ValueError(f"{str(path)!r}: quant_algo must be a string; found {value!r}")
    return value


def _kv_algo(section: dict, path: Path) -> str:
    """"FP8", "NVFP4" or "none": ModelOpt's key (absent or null: an unquantized KV cache), else our field."""
    if "quant_algo" not in section and _ptq_fields(section) is not None:
        return _kv_of_name(_ptq_fields(section).get("kv_cache_qformat", "none"), path)
    try:
        name = kv_format_for_checkpoint(section.get("kv_cache_quant_algo", section.get("kv_cache_scheme")))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{str(path)!r}: {error}") from None
    return _kv_of_name(name, path)


def _group_size(section: dict):
    """`group_size`, else the weights' group size of a single `config_groups` entry, else `ptq_config`'s."""
    if section.get("group_size") is not None:
        return section["group_size"]
    groups = section.get("config_groups")
    if isinstance(groups, dict) and len(groups) == 1:
        group = next(iter(groups.values()))
        weights = group.get("weights") if isinstance(group, dict) else None
        if isinstance(weights, dict) and weights.get("group_size") is not None:
            return weights["group_size"]
    fields = section.get(PTQ_CONFIG_KEY)
    return fields.get("group_size") if isinstance(fields, dict) else None


def _exclude_set(value, path: Path) -> Optional[frozenset]:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise ValueError(f"{str(path)!r}: the exclude list must be a list of module names; found {value!r}")
    return frozenset(value)


def _layers(section: dict, path: Path) -> Optional[dict]:
    """{layer: (QUANT_ALGO, group size)} of a MIXED_PRECISION `quantized_layers` (None: not listed here)."""
    layers = section.get("quantized_layers")
    if layers is None and _ptq_fields(section) is not None:
        return None  # ours: the layers are listed under ptq_config, by module name
    if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
        raise ValueError(f"{str(path)!r}: quant_algo {MIXED_PRECISION} needs a quantized_layers object of "
                         f"per-layer objects; found {layers!r}")
    return {name: (str(layer.get("quant_algo")).upper(), layer.get("group_size")) for name, layer in layers.items()}


def _check_field(field: str, first: tuple, second: tuple) -> None:
    (first_path, first_value), (second_path, second_value) = first, second
    if first_value is None or second_value is None or first_value == second_value:
        return
    if field == "quantized_layers":
        first_value, second_value = _first_difference(first_value, second_value)
    elif field == "exclude_modules":
        first_value, second_value = sorted(first_value), sorted(second_value)
    raise ValueError(f"the checkpoint's two quantization configs disagree on {field}: {str(first_path)!r} says "
                     f"{first_value!r}, {str(second_path)!r} says {second_value!r}; one of them was changed after "
                     "export (export the checkpoint again, or correct the wrong file)")


def _first_difference(first: dict, second: dict):
    """The first layer whose entry differs, as ({layer: entry}, {layer: entry}) (None: not listed)."""
    name = next(n for n in sorted(set(first) | set(second)) if first.get(n) != second.get(n))
    return {name: first.get(name)}, {name: second.get(name)}


def _check_ptq_fields_match(written: dict, config_path: Path) -> None:
    """Our `ptq_config` (what loading uses) says what config.json's own ModelOpt keys say (what engines use)."""
    if PTQ_CONFIG_KEY not in written or "quant_algo" not in written:
        return
    fields = written[PTQ_CONFIG_KEY]
    if not isinstance(fields, dict):
        raise ValueError(f"{str(config_path)!r}: quantization_config.{PTQ_CONFIG_KEY} must be a JSON object; "
                         f"found {fields!r}")
    ours, theirs = _algo_of_ptq_fields(fields, config_path), _quant_algo(written, config_path)
    if ours.upper() != theirs.upper():
        raise ValueError(f"{str(config_path)!r} disagrees with itself: quantization_config.quant_algo is "
                         f"{theirs!r} but its {PTQ_CONFIG_KEY} says qformat {fields.get('qformat')!r} ({ours})")
    ours_kv = _kv_of_name(fields.get("kv_cache_qformat", "none"), config_path)
    theirs_kv = _kv_algo(written, config_path)
    if ours_kv != theirs_kv:
        raise ValueError(f"{str(config_path)!r} disagrees with itself: its KV-cache algorithm is {theirs_kv!r} "
                         f"(kv_cache_scheme) but its {PTQ_CONFIG_KEY} says kv_cache_qformat "
                         f"{fields.get('kv_cache_qformat', 'none')!r}")


def _algo_of_ptq_fields(fields: dict, path: Path) -> str:
    if fields.get("layer_qformats"):
        return MIXED_PRECISION
    try:
        return written_quant_algo(F.get_format(fields.get("qformat", "fp8")))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{str(path)!r}: {PTQ_CONFIG_KEY}: {error}") from None


def _kv_of_name(name, path: Path) -> str:
    try:
        kv_format = F.get_kv_format(name)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{str(path)!r}: {PTQ_CONFIG_KEY}: {error}") from None
    return NO_KV if kv_format is None else kv_format.kv_cache_quant_algo
