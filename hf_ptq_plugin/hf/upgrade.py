"""Upgrading an older ModelOpt export whose config.json has no `quantization_config`.

Such checkpoints carry the quantization only in `hf_quant_config.json`; transformers then sees no
quantization and loads the FP8/INT4 codes as if they were weights. `upgrade_checkpoint` writes the
missing `quantization_config` into config.json (ModelOpt's keys: the `quantization` section of
hf_quant_config.json with quant_method "modelopt"), after checking that the section converts to a
valid PTQConfig. The write is atomic (temporary file, then rename), so an interrupted upgrade leaves
the old config.json.
"""

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

from ..config import PTQConfig
from ..export.quant_config import ptq_fields_from_checkpoint_config

HF_QUANT_CONFIG = "hf_quant_config.json"
CONFIG = "config.json"


def needs_upgrade(directory) -> bool:
    """True if `directory` holds hf_quant_config.json and a config.json without `quantization_config`."""
    directory = Path(directory)
    if not (directory / HF_QUANT_CONFIG).is_file() or not (directory / CONFIG).is_file():
        return False
    return "quantization_config" not in _read_json(directory / CONFIG)


def upgrade_message(directory) -> str:
    return (f"{str(directory)!r} has {HF_QUANT_CONFIG} but its {CONFIG} has no quantization_config (an older "
            f"ModelOpt export): loaded as is, its quantized codes would be taken as weights. Run `hf-ptq upgrade "
            f"{directory}` once to write the quantization_config, then load it again")


def upgrade_checkpoint(directory) -> Optional[dict]:
    """Write config.json's missing `quantization_config` from hf_quant_config.json; returns it (None if
    config.json already has one). A ValueError names what is missing or invalid."""
    directory = Path(directory)
    config_path, hf_path = directory / CONFIG, directory / HF_QUANT_CONFIG
    for path in (config_path, hf_path):
        if not path.is_file():
            raise ValueError(f"{str(path)!r} not found: `upgrade` needs a checkpoint folder with {CONFIG} and "
                             f"{HF_QUANT_CONFIG}")
    config = _read_json(config_path)
    if "quantization_config" in config:
        return None
    section = _read_json(hf_path).get("quantization")
    if not isinstance(section, dict) or "quant_algo" not in section:
        raise ValueError(f"{str(hf_path)!r}: expected a 'quantization' object with 'quant_algo'; found {section!r}")
    quantization_config = {**section, "quant_method": PTQConfig.quant_method}
    try:
        PTQConfig(**ptq_fields_from_checkpoint_config(section))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{str(hf_path)!r}: its 'quantization' section is not valid: {error}") from None
    config["quantization_config"] = quantization_config
    _write_json_atomic(config_path, config)
    return quantization_config


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{str(path)!r}: expected a JSON object; found {type(value).__name__}")
    return value


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
