"""Fused MoE experts in the three flows: the calibration pipeline, pre-quantized loading, quantize-on-load.

- `ExpertQuantization`: finds the fused-experts modules, observes them while the
  calibration data runs (per-expert tokens and input amax, expert_observer.py), then swaps each
  for a QuantExperts (modules/quant_experts.py) with one shared input scale per projection. With GPTQ
  each expert's gate/up (as one tensor) and down get GPTQ on the Hessian of the tokens routed to
  it; an expert no calibration token reached has no Hessian and is rounded to nearest. The AWQ
  algorithms and SmoothQuant give each layer's experts one shared pre_quant_scale per projection
  input, AWQ's clipping is per expert on its own tokens (expert_smoothing.py); `mse`
  searches each expert's weight scales; `max` rounds them to nearest. Under layer streaming
  each block's experts are quantized right after that block's pass, so the next block is fed by
  quantized experts. The tokens each expert saw are logged and kept on
  the model as `model.expert_token_counts` ({experts module: [tokens per expert]}); they sum to
  tokens x top_k per layer. Experts without tokens: see shared_inputs.py.
- `prepare_prequantized_experts`: meta QuantExperts whose buffers the
  checkpoint's per-expert tensors fill by name.
- `prepare_load_time_experts` / `quantize_experts_on_load` (quantize-on-load): transformers merges the
  source's per-expert tensors into `gate_up_proj` / `down_proj` (its conversion mapping); those
  names exist on the meta QuantExperts as placeholders, so each merged tensor reaches our quantize
  op, which returns the per-expert tensors; the placeholders are dropped after loading. Peak
  memory while loading: one MoE layer's merged experts in full precision.
"""

import contextlib
import logging
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from .. import formats as F
from ..modules.fused_experts import (
    DEFAULT_PROJECTION_NAMES,
    FUSED_PARAMS,
    checkpoint_namer,
    is_fused_experts,
    projection_names,
    projection_shapes,
    target_experts,
)
from ..modules.quant_experts import QuantExperts
from .algorithms import Algorithm
from .expert_observer import ExpertObserver
from .expert_smoothing import SAMPLE_TOKENS
from .offload import onloaded
from .shared_inputs import log_token_counts

logger = logging.getLogger(__name__)

class ExpertQuantization:
    """The fused experts of one calibration, from observation to QuantExperts.

    `experts` {name: fused-experts module}; more can join later with `add` (a block's experts restored
    from the source checkpoint join when the block is reached). `names`: the checkpoint names
    of an expert's (gate, up, down) projections.
    """

    def __init__(self, model: nn.Module, experts: Dict[str, nn.Module], fmt: F.Format, algorithm: Algorithm,
                 names: Optional[Tuple[str, str, str]] = None):
        self.model, self.fmt, self.algorithm = model, fmt, algorithm  # every algorithm has an expert variant
        self.experts, self.names = dict(experts), names
        self.stats, self.done, self.observer = {}, set(), None

    def add(self, name: str, fused: nn.Module) -> None:
        """A fused-experts module to quantize too, observed from now on when inside `observing`."""
        self.experts[name] = fused
        if self.observer is not None:
            self.observer.add(name, fused)

    def shapes(self) -> dict:
        """Expert projection shapes for the group-size and shape checks."""
        return projection_shapes(self.experts)

    @contextlib.contextmanager
    def observing(self, token_mask=None):
        """Record per-expert statistics while the calibration data runs inside the block."""
        sample_size = SAMPLE_TOKENS if self.algorithm.samples_expert_tokens else 0
        with ExpertObserver(token_mask, self.algorithm.observes_expert_hessians, sample_size) as observer:
            self.observer, self.stats = observer, observer.stats  # `add` joins modules to it meanwhile
            for name, module in self.experts.items():
                observer.add(name, module)
            try:
                yield
            finally:
                self.observer = None

    def quantize_observed(self, group_size: Optional[int]) -> None:
        """Quantize the experts that calibration has reached (a streamed block's, after its pass)."""
        for name, stat in self.stats.items():
            if name not in self.done and stat.total_tokens > 0:
                self._quantize(name, group_size)

    def finish(self, group_size: Optional[int]) -> None:
        """Quantize the remaining experts; log and record the tokens each expert saw."""
        for name in self.experts:
            if name not in self.done:
                self._quantize(name, group_size)
        if not self.experts:
            return
        counts = {name: stat.tokens.tolist() for name, stat in self.stats.items()}
        observed = any(sum(row) for row in counts.values())
        self.model.expert_token_counts = counts if observed else None
        if observed:
            log_token_counts(counts)
        logger.info("quantized the experts of %d MoE layer(s) to %s with %s (checkpoint names %s)",
                    len(self.experts), self.fmt.name, self.algorithm, "/".join(self.names))

    def _quantize(self, name: str, group_size: Optional[int]) -> None:
        with onloaded(self.experts[name]):  # an accelerate-offloaded module's weights, for this only
            self._quantize_onloaded(name, group_size)

    def _quantize_onloaded(self, name: str, group_size: Optional[int]) -> None:
        fused, stat = self.experts[name], self.stats.get(name)
        quantized = QuantExperts.like(fused, self.fmt, group_size, self.names)
        if stat is not None:
            stat.reduce_across_processes()
        observed = stat is not None and stat.total_tokens > 0
        if self.fmt.needs_calibration_data and not observed:
            raise ValueError(f"calibration never reached the experts of {name!r}; qformat {self.fmt.name!r} "
                             "needs their activation scales: run samples through every MoE layer")
        for param, kind in zip(FUSED_PARAMS, ("gate_up", "down")):
            w = getattr(fused, param)
            if observed:
                plan = self.algorithm.plan_experts(w, stat, kind, self.fmt, quantized.group_size)
            else:
                plan = self.algorithm.plan_unobserved_experts(w, self.fmt, quantized.group_size)
            quantized.load_fused(param, w, plan.chosen if plan else None)
            if plan is not None and plan.pre_quant_scale is not None:
                quantized.set_pre_quant_scale(kind, plan.pre_quant_scale)
            if self.fmt.needs_calibration_data:
                amax = plan.input_amax if plan is not None and plan.input_amax is not None else stat.shared_amax(kind)
                quantized.set_input_amax(kind, amax)
        if stat is not None:
            stat.release()
        self.model.set_submodule(name, quantized)
        self.done.add(name)


def prepare_prequantized_experts(model: nn.Module, fmt: F.Format, exclude_modules, group_size: Optional[int],
                                 header: dict, check: Callable) -> int:
    """Swap the fused experts the checkpoint holds quantized for meta QuantExperts; returns how many.

    `check(header_name, quant_linear)` validates one projection against the checkpoint header
    (hf/prequantized.py). A checkpoint quantizing some MoE layers' experts and not others is refused.
    """
    fused = {name: m for name, m in model.named_modules() if is_fused_experts(m)}
    if not fused:
        return 0
    names, header_name = _checkpoint_layout(model, next(iter(fused)), header)
    targets = set(target_experts(model, exclude_modules))
    quantized = {n: m for n, m in fused.items()
                 if n in targets or f"{header_name(f'{n}.0.{names[0]}')}.weight_scale" in header}
    if quantized and len(quantized) < len(fused):
        left = sorted(set(fused) - set(quantized))
        raise ValueError(f"the checkpoint quantizes the experts of {len(quantized)} MoE layer(s) but not of "
                         f"{left[:3]}; checkpoints with some MoE layers' experts quantized and others not are "
                         "not supported")
    for name, module in quantized.items():
        experts = QuantExperts.like(module, fmt, group_size, names, device="meta")
        for e in range(experts.num_experts):
            for proj in names:
                check(header_name(f"{name}.{e}.{proj}"), getattr(experts.expert(e), proj))
        model.set_submodule(name, experts)
    return len(quantized)


def _checkpoint_layout(model: nn.Module, first: str, header: dict) -> Tuple[Tuple[str, str, str], Callable]:
    """(projection names, model name -> header name) of the checkpoint's per-expert tensors.

    Names: the family's (Mixtral w1/w3/w2), or gate_proj/up_proj/down_proj when the checkpoint
    holds those instead (ModelOpt HEAD splits every family that way). Header names: the model's
    names with save_pretrained's renamings (Mixtral `.mlp.` -> `.block_sparse_moe.`), or as they
    are when the checkpoint was written without them.
    """
    to_checkpoint = checkpoint_namer(model)

    def header_name(key: str) -> str:
        renamed = to_checkpoint(key)
        return renamed if f"{renamed}.weight" in header or f"{key}.weight" not in header else key

    names = projection_names(model)
    if f"{header_name(f'{first}.0.{names[0]}')}.weight" not in header and \
            f"{header_name(f'{first}.0.{DEFAULT_PROJECTION_NAMES[0]}')}.weight" in header:
        names = DEFAULT_PROJECTION_NAMES
    return names, header_name


def prepare_load_time_experts(model: nn.Module, experts: Dict[str, nn.Module], fmt: F.Format,
                              group_size: Optional[int]) -> None:
    """Swap fused experts for meta QuantExperts with `gate_up_proj` / `down_proj` placeholders."""
    names = projection_names(model)
    for name, module in experts.items():
        quantized = QuantExperts.like(module, fmt, group_size, names, device="meta")
        quantized.add_fused_placeholders()
        model.set_submodule(name, quantized)


def quantize_experts_on_load(module: QuantExperts, name: str, param: str, w: torch.Tensor,
                             algorithm: Algorithm) -> dict:
    """The loader's quantize op for one merged fused tensor `w`, with a data-free `algorithm`:
    {full tensor name: tensor}."""
    plan = algorithm.plan_unobserved_experts(w, module.fmt, module.group_size)
    chosen = plan.chosen if plan is not None else None
    out = {f"{name}.{key}": tensor for key, tensor in module.quantize_fused(param, w, chosen).items()}
    if module.fmt.needs_calibration_data:  # placeholders, never saved: uncalibrated until calibrate()
        kind = "down" if param == "down_proj" else "gate_up"
        for e in range(module.num_experts):
            for proj in (module.names[2:] if kind == "down" else module.names[:2]):
                out[f"{name}.{e}.{proj}.input_scale"] = torch.ones((), dtype=torch.float32, device=w.device)
    out[f"{name}.{param}"] = torch.empty(0, dtype=w.dtype, device=w.device)  # replaces the placeholder's data
    module.consumed_placeholders.add(param)  # recorded here too: a disk-offloaded placeholder keeps its meta data
    return out


def drop_load_placeholders(model: nn.Module) -> None:
    """Remove the consumed placeholders; a placeholder never loaded means the source lacks the experts."""
    for name, module in model.named_modules():
        if not isinstance(module, QuantExperts):
            continue
        unloaded = [p for p in FUSED_PARAMS if p in module._parameters and p not in module.consumed_placeholders]
        if unloaded:
            raise ValueError(f"the source checkpoint has no weights for {name}.{unloaded[0]} (per-expert "
                             f"{', '.join(module.names)} tensors); cannot quantize those experts")
        module.drop_fused_placeholders()
