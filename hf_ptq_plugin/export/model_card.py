"""The model card (README.md) of a quantized checkpoint, built from facts the model carries.

`write_model_card(model, directory)` renders `model_cards/quantized_model.md` through
huggingface_hub's `ModelCard` / `ModelCardData`. The facts: the model's PTQConfig, its
QuantLinears (layer count, exclusions, bytes), `model.calibration_record` (set by `quantize()` /
`calibrate()`), and an evaluation only when the caller passes one that actually ran. Metadata:
`base_model` (the source's `_name_or_path`, or the caller's), `base_model_relation: quantized`,
`license` only when the source directory's card states one. A model reloaded from one of our
checkpoints inherits base_model, license, calibration and evaluation from the card found there
(they are kept in the card's metadata under `hf_ptq_plugin`).
"""

import dataclasses
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn

from .. import formats as F
from ..calibration.selection import DEFAULT_EXCLUDE_PATTERNS, is_excluded
from ..evaluation import model_bytes
from ..modules.quant_linear import QuantLinear
from . import card_sections as sections
from .exclude import summarize_exclude_modules
from .quant_config import MIXED_PRECISION
from .save import ptq_config_of

logger = logging.getLogger(__name__)

FACTS_KEY = "hf_ptq_plugin"  # card metadata holding the facts config.json does not (calibration, evaluation)
BASE_TAGS = ("hf-ptq-plugin", "modelopt", "quantized")
_INHERITED_LICENSE_KEYS = ("license", "license_name", "license_link")
_UNKNOWN = object()  # "no record on the model", as opposed to a record of None (no data used)


@dataclass
class EvaluationRecord:
    """A perplexity measurement that actually ran; `before` is None when only the quantized model was measured.

    `tasks`: benchmark results of the quantized model that ran with it, {task: {"acc", "acc_stderr", "n"}}
    (e.g. "mmlu" from `multiple_choice.mmlu_accuracy`).
    """

    data: str  # what the text was, e.g. "pride.txt (local file)"
    windows: int
    seq_len: int
    after: float
    before: Optional[float] = None
    tasks: Dict[str, dict] = dataclasses.field(default_factory=dict)


@dataclass
class CardFacts:
    qformat: str
    quant_algo: str
    algorithm: Optional[str]  # None: not recorded
    group_size: Optional[str]  # "128"; per-layer formats: "int4_awq 128, nvfp4 16"; None: no groups
    kv_cache_qformat: str
    layers: int
    excluded: List[str]
    bytes_before: int
    bytes_after: int
    calibration: Optional[dict]  # calibration_record(); None = no data used
    calibration_known: bool  # False: the model carries no record of its calibration
    evaluation: Optional[EvaluationRecord]
    base_model: Optional[str]
    license: dict  # {"license": ..., maybe "license_name", "license_link"}; {} = unknown
    pipeline_tag: Optional[str]
    qformats: List[str]  # every format the layers hold (several: per-layer formats, MIXED_PRECISION)
    layer_formats: Dict[str, Dict[str, int]]  # per-layer formats only: {layer type: {qformat: count}}
    effective_bits: Optional[float]  # per-layer formats only: nominal bits per weight of the searchable layers


def unquantized_bytes(model: nn.Module) -> int:
    """Bytes of the same model with every QuantLinear back to a full-precision Linear of its dtype."""
    total, seen = model_bytes(model), set()
    for module in model.modules():
        if not isinstance(module, QuantLinear):
            continue
        for buffer in module.buffers(recurse=False):
            key = (buffer.device, buffer.data_ptr())
            if key not in seen:
                seen.add(key)
                total -= buffer.numel() * buffer.element_size()
        total += module.in_features * module.out_features * module.dtype.itemsize
    return total


def source_card(model: nn.Module) -> dict:
    """Metadata of the card (README.md) in the directory the model was loaded from; {} if none."""
    source = str(getattr(model, "name_or_path", "") or "")
    readme = Path(source) / "README.md"
    if not source or not readme.is_file():
        return {}
    try:
        return ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict()
    except (OSError, ValueError) as error:
        logger.warning("could not read the source model card %s (%s); license and base_model not inherited",
                       readme, error)
        return {}


def card_facts(model: nn.Module, base_model: Optional[str] = None,
               evaluation: Optional[EvaluationRecord] = None) -> CardFacts:
    """Everything the card states about `model` (a model quantized by hf_ptq_plugin)."""
    config = ptq_config_of(model)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    unquantized = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    source = source_card(model)
    ours = isinstance(source.get(FACTS_KEY), dict)  # the card of one of our checkpoints: this model's own facts
    inherited = source.get(FACTS_KEY, {}) if ours else {}
    calibration = _calibration(model, inherited)
    if evaluation is None and ours and not hasattr(model, "calibration_record"):
        # Loaded from our checkpoint and not recalibrated since: the evaluation recorded there still holds.
        evaluation = _evaluation_from(inherited.get("evaluation"))
    qformats = sorted(set((config.layer_qformats or {}).values())) or [config.qformat]
    layer_formats, effective_bits = per_layer_formats(model, config) if len(qformats) > 1 else ({}, None)
    return CardFacts(
        # A ModelOpt-made checkpoint does not say which algorithm calibrated it: None, never the format's default.
        qformat=config.qformat, quant_algo=MIXED_PRECISION if len(qformats) > 1 else config.format.quant_algo,
        algorithm=config.algorithm,
        group_size=_group_sizes(layers, config),
        kv_cache_qformat=config.kv_cache_qformat, layers=len(layers),
        excluded=summarize_exclude_modules(unquantized, layers), bytes_before=unquantized_bytes(model),
        bytes_after=model_bytes(model), calibration=None if calibration is _UNKNOWN else calibration,
        calibration_known=calibration is not _UNKNOWN, evaluation=evaluation,
        # Reloaded from our checkpoint: its source is the one that card names (if any), never itself.
        base_model=base_model or (source.get("base_model") if ours else _name_or_path(model)),
        license={k: source[k] for k in _INHERITED_LICENSE_KEYS if source.get(k)},
        pipeline_tag="text-generation" if _is_causal_lm(model) else None,
        qformats=qformats, layer_formats=layer_formats, effective_bits=effective_bits)


def _group_sizes(layers: Dict[str, QuantLinear], config) -> Optional[str]:
    if not layers:
        return None if config.group_size is None else str(config.group_size)
    sizes = {m.fmt.name: m.group_size for m in layers.values() if m.group_size}
    if len({m.fmt.name for m in layers.values()}) == 1:
        return next((str(size) for size in sizes.values()), None)
    return ", ".join(f"{q} {size}" for q, size in sorted(sizes.items())) or None


def per_layer_formats(model: nn.Module, config) -> Tuple[Dict[str, Dict[str, int]], float]:
    """({layer type: {qformat or "none": count}}, nominal bits per weight) over the Linears a search
    could quantize (not the default exclusions such as lm_head, nor `exclude_modules`). A layer type
    is the name past its last number, e.g. "self_attn.q_proj"."""
    patterns = tuple(DEFAULT_EXCLUDE_PATTERNS) + tuple(config.exclude_modules or ())
    table, bits, elements = {}, 0.0, 0
    for name, module in model.named_modules():
        if not isinstance(module, (QuantLinear, nn.Linear)) or is_excluded(name, patterns):
            continue
        qformat = module.fmt.name if isinstance(module, QuantLinear) else F.UNQUANTIZED
        parts = name.split(".")
        numbers = [i for i, part in enumerate(parts) if part.isdigit()]
        kind = ".".join(parts[numbers[-1] + 1:]) if numbers else name
        counts = table.setdefault(kind, {})
        counts[qformat] = counts.get(qformat, 0) + 1
        size = module.in_features * module.out_features
        bits, elements = bits + F.nominal_bits(qformat) * size, elements + size
    return table, bits / max(elements, 1)


def _calibration(model: nn.Module, inherited: dict):
    if hasattr(model, "calibration_record"):
        return model.calibration_record
    if "calibration" in inherited:
        return inherited["calibration"]
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and quantizer.pre_quantized is False:
        return None  # quantized while loading, never calibrated: no data was used
    return _UNKNOWN


def _evaluation_from(values) -> Optional[EvaluationRecord]:
    if not isinstance(values, dict):
        return None
    fields = {f.name for f in dataclasses.fields(EvaluationRecord)}
    try:
        return EvaluationRecord(**{k: v for k, v in values.items() if k in fields})
    except TypeError:
        return None  # an incomplete record is not a measurement


def warn_if_local_base_model(model: nn.Module, base_model: Optional[str] = None) -> None:
    """Warn when the card would name a local path as base_model: the Hub cannot link that to a source."""
    card_base_model = card_facts(model, base_model).base_model
    if card_base_model and Path(card_base_model).exists():
        logger.warning("the model card's base_model is the local path %r; pass base_model=<hub id> (CLI: "
                       "--base_model) so the Hub links the repo to its source", card_base_model)


def _name_or_path(model: nn.Module) -> Optional[str]:
    return str(getattr(model, "name_or_path", "") or "") or None


def _is_causal_lm(model: nn.Module) -> bool:
    architectures = getattr(getattr(model, "config", None), "architectures", None) or [type(model).__name__]
    return any(a.endswith("ForCausalLM") for a in architectures)


def card_data(facts: CardFacts, dialect: str = "modelopt", model_name: str = "quantized model") -> ModelCardData:
    """The card's YAML metadata."""
    tags = list(BASE_TAGS) + facts.qformats + (["mixed-precision"] if len(facts.qformats) > 1 else [])
    if facts.kv_cache_qformat != "none":
        tags.append(f"kv-cache-{facts.kv_cache_qformat}")
    if dialect != "modelopt":
        tags.append(dialect)
    facts_metadata = {"qformat": facts.qformat if len(facts.qformats) == 1 else facts.qformats,
                      "algorithm": facts.algorithm, "calibration": facts.calibration,
                      "evaluation": dataclasses.asdict(facts.evaluation) if facts.evaluation else None}
    if not facts.calibration_known:
        facts_metadata.pop("calibration")
    return ModelCardData(base_model=facts.base_model, base_model_relation="quantized" if facts.base_model else None,
                         library_name="transformers", pipeline_tag=facts.pipeline_tag, tags=tags,
                         **_model_index(facts.evaluation, model_name), **facts.license, **{FACTS_KEY: facts_metadata})


def _model_index(evaluation: Optional[EvaluationRecord], model_name: str) -> dict:
    """The Hub's `model-index` metadata: the quantized model's measured results, nothing when none ran."""
    if evaluation is None:
        return {}
    results = [EvalResult(task_type="text-generation", dataset_type=evaluation.data, dataset_name=evaluation.data,
                          metric_type="perplexity", metric_value=round(evaluation.after, 4),
                          metric_name=f"perplexity ({evaluation.windows} x {evaluation.seq_len} tokens)")]
    results += [EvalResult(task_type="multiple-choice", dataset_type=task, dataset_name=task, metric_type="accuracy",
                           metric_value=round(result["acc"], 4),
                           metric_name=f"accuracy, zero-shot ({result['n']} questions, "
                                       f"standard error {result['acc_stderr']:.4f})")
                for task, result in evaluation.tasks.items()]
    return {"model_name": model_name, "eval_results": results}


def render_model_card(model: nn.Module, model_id: Optional[str] = None, base_model: Optional[str] = None,
                      evaluation: Optional[EvaluationRecord] = None, dialect: str = "modelopt") -> ModelCard:
    """The card of `model`; `model_id` (repo id or path) is what the usage snippets load."""
    from .. import __version__

    facts = card_facts(model, base_model, evaluation)
    model_id = model_id or "path/to/this/checkpoint"
    name = Path(model_id).name or Path(model_id).resolve().name  # saved to ".": the folder's own name
    template = resources.files("hf_ptq_plugin.model_cards").joinpath("quantized_model.md")
    with resources.as_file(template) as template_path:
        return ModelCard.from_template(
            card_data(facts, dialect, name), template_path=str(template_path), version=__version__,
            title=f"{name} ({', '.join(facts.qformats)})", summary=sections.summary(facts, dialect),
            qformat=sections.qformats(facts.qformats), quant_algo=facts.quant_algo,
            algorithm=sections.code_or(facts.algorithm),
            group_size=facts.group_size or "-", kv_cache=sections.kv_cache(facts.kv_cache_qformat),
            layers=facts.layers, excluded=sections.excluded(facts.excluded),
            size=sections.size(facts.bytes_before, facts.bytes_after), calibration=sections.calibration(facts),
            evaluation=sections.evaluation(facts.evaluation),
            layer_formats=sections.layer_formats(facts.layer_formats, facts.effective_bits),
            transformers_usage=sections.transformers_usage(model_id, dialect),
            serving=sections.serving(facts.qformats, facts.kv_cache_qformat, model_id, dialect))


def write_model_card(model: nn.Module, directory, model_id: Optional[str] = None, **card_kwargs) -> Path:
    """Write the card as `directory/README.md` and return its path (kwargs: `render_model_card`'s)."""
    path = Path(directory) / "README.md"
    card = render_model_card(model, model_id=model_id or str(directory), **card_kwargs)
    path.write_text(str(card).rstrip("\n") + "\n", encoding="utf-8")
    return path
