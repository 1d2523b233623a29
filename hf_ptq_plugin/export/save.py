"""`save_pretrained` for quantized models: the unified checkpoint, written atomically.

transformers' own `save_pretrained` writes the tensors (our QuantLinear buffers already are the
checkpoint's tensors), config.json, generation_config.json, shards and index. We plan the export
once before (`plan_export` refuses what cannot be written truthfully) and lend the plan to it: the
quantizer's safetensors metadata and config.json's `quantization_config` (ModelOpt's) come from it.
Then hf_quant_config.json, the tokenizer files and the model card (README.md, `model_card.py`), all
inside a temporary directory that replaces the destination only when everything succeeded. The model
is left as it was. `UnifiedSave` takes the place of a quantized model's `save_pretrained`.
"""

import contextlib
import fnmatch
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from torch import nn

from ..calibration.interrupted import refuse_if_interrupted
from .atomic import atomic_directory
from .unified import ExportPlan, plan_export, write_hf_quant_config

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


@dataclass(frozen=True)
class Sidecars:
    """What goes beside the tensors: the tokenizer's files (None: the source directory's) and the model card's
    inputs (None: the model's source, no evaluation, snippets loading the checkpoint's directory)."""

    tokenizer: Any = None
    base_model: Optional[str] = None
    evaluation: Any = None  # a model_card.EvaluationRecord that ran
    model_id: Optional[str] = None  # what the card's usage snippets load


def save_unified(model: nn.Module, save_directory, sidecars: Sidecars = Sidecars(), **save_kwargs) -> None:
    """Write `model` as a unified checkpoint into `save_directory` (kwargs: transformers' save_pretrained)."""
    if save_kwargs.get("push_to_hub"):
        raise ValueError("save_pretrained(push_to_hub=True) is not supported for hf_ptq_plugin models; save, then "
                         "call model.push_to_hub(repo_id) (or hf_ptq_plugin.push_to_hub)")
    plan = plan_export(model, ptq_config_of(model))  # refuses before anything is touched
    with atomic_directory(save_directory) as staging:
        with transformers_saving(model, plan):
            type(model).save_pretrained(model, staging, **save_kwargs)
        write_hf_quant_config(staging, plan)
        write_sidecars(model, staging, Path(save_directory), "modelopt", sidecars)
    logger.info("wrote a %s unified checkpoint to %s", plan.fmt.quant_algo, save_directory)


@contextlib.contextmanager
def transformers_saving(model: nn.Module, plan: ExportPlan):
    """While transformers' save_pretrained runs, its quantizer uses `plan` and config.json gets the checkpoint's
    quantization_config; the config is restored after (also the dtype and architectures transformers sets)."""
    config_fields = dict(vars(model.config))
    model.hf_quantizer.export_plan = plan
    model.config.quantization_config = plan.quantization_config()  # to_dict writes a dict as is
    try:
        yield
    finally:
        model.hf_quantizer.export_plan = None
        vars(model.config).clear()
        vars(model.config).update(config_fields)


def write_sidecars(model: nn.Module, staging: Path, destination: Path, dialect: str, sidecars: Sidecars) -> None:
    """The tokenizer files and the model card (`model_card.py`) of a checkpoint in `dialect`."""
    from .model_card import write_model_card  # the card sits above export (it reads engines, evaluation)

    if sidecars.tokenizer is not None:
        sidecars.tokenizer.save_pretrained(staging)
    copy_sidecars(model, staging, destination)
    write_model_card(model, staging, model_id=sidecars.model_id or str(destination), base_model=sidecars.base_model,
                     evaluation=sidecars.evaluation, dialect=dialect)


def copy_sidecars(model: nn.Module, staging: Path, destination: Path) -> None:
    """Copy tokenizer/processor files from a local source directory unless the destination has its own."""
    source = Path(str(getattr(model, "name_or_path", "") or ""))
    if not source.is_dir() or (destination.exists() and source.resolve() == destination.resolve()):
        return
    for entry in source.iterdir():
        if (entry.is_file() and any(fnmatch.fnmatch(entry.name, p) for p in SIDECAR_PATTERNS)
                and not (staging / entry.name).exists() and not (destination / entry.name).exists()):
            shutil.copy2(entry, staging / entry.name)


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
