"""`save_pretrained` for quantized models: the unified checkpoint, written atomically.

transformers' own `save_pretrained` writes the tensors (our QuantLinear buffers already are the
checkpoint's tensors), config.json, generation_config.json, shards and index; around it we check
the model can be written truthfully, fold AWQ scales into norms, put ModelOpt's
`quantization_config` into config.json, add hf_quant_config.json, the source's tokenizer files and
the model card (README.md, `model_card.py`), all inside a temporary directory that replaces the
destination only when everything succeeded.
`UnifiedSave` takes the place of a quantized model's `save_pretrained`.
"""

import fnmatch
import logging
import shutil
from pathlib import Path

from torch import nn

from ..calibration.folding import fold_pre_quant_scales
from ..calibration.interrupted import refuse_if_interrupted
from .atomic import atomic_directory
from .unified import plan_export, write_quant_configs

logger = logging.getLogger(__name__)

# Files next to the source weights that belong with the model (ModelOpt copies the same kind).
SIDECAR_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                    "*.tiktoken", "spiece.model", "chat_template*", "preprocessor_config.json",
                    "processor_config.json")


def ptq_config_of(model: nn.Module):
    """The PTQConfig the model was quantized with (from its quantizer, or set by quantize())."""
    refuse_if_interrupted(model)
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(quantizer, "quantization_config", None) or getattr(model, "ptq_config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} was not quantized by hf_ptq_plugin (no PTQConfig on it); "
                         "quantize it with hf_ptq_plugin.quantize or from_pretrained(..., quantization_config=...)")
    return config


def save_unified(model: nn.Module, save_directory, **save_kwargs) -> None:
    """Write `model` as a unified checkpoint into `save_directory` (kwargs: transformers' save_pretrained)."""
    if save_kwargs.get("push_to_hub"):
        raise ValueError("save_pretrained(push_to_hub=True) is not supported for hf_ptq_plugin models; save, then "
                         "call model.push_to_hub(repo_id) (or hf_ptq_plugin.push_to_hub)")
    plan = plan_export(model, ptq_config_of(model))  # refuses before anything is touched
    fold_pre_quant_scales(model)
    with atomic_directory(save_directory) as staging:
        type(model).save_pretrained(model, staging, **save_kwargs)
        write_quant_configs(staging, plan)
        copy_sidecars(model, staging, Path(save_directory))
        write_card_into(model, staging, Path(save_directory))
    logger.info("wrote a %s unified checkpoint to %s", plan.fmt.quant_algo, save_directory)


def copy_sidecars(model: nn.Module, staging: Path, destination: Path) -> None:
    """Copy tokenizer/processor files from a local source directory unless the destination has its own."""
    source = Path(str(getattr(model, "name_or_path", "") or ""))
    if not source.is_dir() or (destination.exists() and source.resolve() == destination.resolve()):
        return
    for entry in source.iterdir():
        if (entry.is_file() and any(fnmatch.fnmatch(entry.name, p) for p in SIDECAR_PATTERNS)
                and not (staging / entry.name).exists() and not (destination / entry.name).exists()):
            shutil.copy2(entry, staging / entry.name)


def write_card_into(model: nn.Module, staging: Path, destination: Path, dialect: str = "modelopt") -> None:
    """README.md: the model card (`model_card.py`) of a checkpoint in `dialect`, its snippets pointing at
    the final directory."""
    from .model_card import write_model_card  # the card sits above export (it reads engines, evaluation)

    write_model_card(model, staging, model_id=str(destination), dialect=dialect)


class UnifiedSave:
    """Bound to one model as its `save_pretrained`; a class (not a bound function) so the model
    still pickles and deep-copies."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, save_directory, **save_kwargs) -> None:
        save_unified(self.model, save_directory, **save_kwargs)


def install_unified_save(model: nn.Module) -> None:
    if not isinstance(vars(model).get("save_pretrained"), UnifiedSave):
        model.save_pretrained = UnifiedSave(model)
