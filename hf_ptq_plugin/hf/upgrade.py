"""Older ModelOpt exports whose config.json has no `quantization_config`: reading them, and upgrading them.

Such checkpoints carry the quantization only in `hf_quant_config.json`; transformers alone sees no
quantization and loads the FP8/INT4 codes as if they were weights. `legacy_quantization_config`
builds the missing entry (ModelOpt's keys: the `quantization` section of hf_quant_config.json with
quant_method "modelopt"), after checking that it converts to a valid PTQConfig.

Two uses. `upgrade_checkpoint` (`hf-ptq upgrade DIR`) writes it into config.json, atomically
(temporary file, then rename), so an interrupted upgrade leaves the old config.json.
`install_config_hook` (run at `import hf_ptq_plugin`) makes transformers see it without
writing anything: it wraps `PreTrainedConfig.get_config_dict`, through which every config load goes
(`AutoConfig`, `AutoModel*.from_pretrained`, a model class's own `from_pretrained`), and adds the entry
to the config dict of a local directory that needs it, with a warning suggesting the upgrade. The
config is the one place that decides whether transformers calls our quantizer, so the checkpoint then
loads quantized through the same path as an upgraded one; wrapping `from_pretrained` instead would
miss `AutoConfig` users and would have to re-implement how it splits config and model kwargs. A
local directory's config.json that has a quantization_config gets it checked there instead
(`config_checks.check_quantization_config`). Hub ids are left alone (hf_quant_config.json is not
downloaded with the config).
"""

import functools
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Optional

from transformers import PreTrainedConfig

from ..config import PTQConfig
from ..export.quant_config import ptq_fields_from_checkpoint_config
from .config_checks import CONFIG, HF_QUANT_CONFIG, check_quantization_config, quantization_section, read_json_object

logger = logging.getLogger(__name__)
_HOOK_MARK = "_hf_ptq_config_hook"
_warned = set()  # directories already warned about: one warning each, however often their config is read


def needs_upgrade(directory) -> bool:
    """True if `directory` holds hf_quant_config.json and a config.json without `quantization_config`."""
    directory = Path(directory)
    if not (directory / HF_QUANT_CONFIG).is_file() or not (directory / CONFIG).is_file():
        return False
    return "quantization_config" not in read_json_object(directory / CONFIG)


def upgrade_message(directory) -> str:
    return (f"{str(directory)!r} has {HF_QUANT_CONFIG} but its {CONFIG} has no quantization_config (an older "
            f"ModelOpt export): loaded as is, its quantized codes would be taken as weights. Run `hf-ptq upgrade "
            f"{directory}` once to write the quantization_config, then load it again")


def legacy_quantization_config(directory) -> dict:
    """config.json's `quantization_config` for an older export, from its hf_quant_config.json (a
    ValueError names the file when the section is missing or not a valid configuration)."""
    hf_path = Path(directory) / HF_QUANT_CONFIG
    section = quantization_section(hf_path)
    try:
        PTQConfig(**ptq_fields_from_checkpoint_config(section))
    except (TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"{str(hf_path)!r}: its 'quantization' section is not valid: {error}") from None
    return {**section, "quant_method": PTQConfig.quant_method}


def upgrade_checkpoint(directory) -> Optional[dict]:
    """Write config.json's missing `quantization_config` from hf_quant_config.json; returns it (None if
    config.json already has one). A ValueError names what is missing or invalid."""
    directory = Path(directory)
    config_path, hf_path = directory / CONFIG, directory / HF_QUANT_CONFIG
    for path in (config_path, hf_path):
        if not path.is_file():
            raise ValueError(f"{str(path)!r} not found: `upgrade` needs a checkpoint folder with {CONFIG} and "
                             f"{HF_QUANT_CONFIG}")
    config = read_json_object(config_path)
    if "quantization_config" in config:
        return None
    config["quantization_config"] = legacy_quantization_config(directory)
    _write_json_atomic(config_path, config)
    return config["quantization_config"]


def install_config_hook() -> None:
    """Wrap `PreTrainedConfig.get_config_dict` (once): a local directory's quantization_config is checked,
    and an older export's is taken from its hf_quant_config.json."""
    original = PreTrainedConfig.__dict__["get_config_dict"].__func__
    if getattr(original, _HOOK_MARK, False):
        return

    @functools.wraps(original)
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        config_dict, unused = original(cls, pretrained_model_name_or_path, **kwargs)
        return with_checked_quantization_config(config_dict, pretrained_model_name_or_path, **kwargs), unused

    setattr(get_config_dict, _HOOK_MARK, True)
    PreTrainedConfig.get_config_dict = classmethod(get_config_dict)


def with_checked_quantization_config(config_dict: dict, source, subfolder: str = "", **kwargs) -> dict:
    """`config_dict` read from `source`; from a local directory, its quantization_config checked, or the
    one of an older export's hf_quant_config.json added."""
    if kwargs.get("gguf_file") or kwargs.get("_configuration_file"):
        return config_dict
    directory = Path(os.fspath(source)) / (subfolder or "")
    if not directory.is_dir():
        return config_dict
    modelopt_checkpoint = (directory / HF_QUANT_CONFIG).is_file()
    if "quantization_config" in config_dict:
        check_quantization_config(directory / CONFIG, config_dict["quantization_config"], modelopt_checkpoint)
        return config_dict
    if not modelopt_checkpoint:
        return config_dict
    quantization_config = legacy_quantization_config(directory)
    _warn_once(directory)
    return {**config_dict, "quantization_config": quantization_config}


def _warn_once(directory: Path) -> None:
    if str(directory) in _warned:
        return
    _warned.add(str(directory))
    logger.warning("%s has no quantization_config in its %s (an older ModelOpt export): using the one of its %s. "
                   "Run `hf-ptq upgrade %s` once to write it into %s", directory, CONFIG, HF_QUANT_CONFIG, directory,
                   CONFIG)


def _write_json_atomic(path: Path, value: dict) -> None:
    mode = path.stat().st_mode & 0o777
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(value, file, indent=2, sort_keys=True)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
