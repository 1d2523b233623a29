"""Fused MoE experts in the calibration pipeline: from observation to QuantExperts.

`ExpertQuantization` finds the fused-experts modules, observes them while the calibration data
runs (per-expert tokens and input amax, expert_observer.py), then swaps each for a QuantExperts
(modules/quant_experts.py) with one shared input scale per projection. With GPTQ each expert's
gate/up (as one tensor) and down get GPTQ on the Hessian of the tokens routed to it; an expert no
calibration token reached has no Hessian and is rounded to nearest. The AWQ algorithms and
SmoothQuant give each layer's experts one shared pre_quant_scale per projection input, AWQ's
clipping is per expert on its own tokens (expert_smoothing.py); `mse` searches each expert's
weight scales; `max` rounds them to nearest. Under layer streaming each block's experts are
quantized right after that block's pass, so the next block is fed by quantized experts. The
tokens each expert saw are logged and kept on the model as `model.expert_token_counts`
({experts module: [tokens per expert]}); they sum to tokens x top_k per layer. Experts without
tokens: `stats.pool_shared_inputs`.
"""

import contextlib
import logging
from typing import Dict, Optional, Tuple

from torch import nn

from .. import formats as F
from ..modules.fused_experts import FUSED_PARAMS
from ..modules.quant_experts import QuantExperts
from .algorithms import Algorithm
from .expert_observer import ExpertObserver
from .expert_smoothing import SAMPLE_TOKENS
from .offload import onloaded
from .stats import log_token_counts

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
