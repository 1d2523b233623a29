"""Per-expert input statistics of fused-experts modules, collected while calibration data runs.

`ExpertObserver` replaces, while it is open, each fused-experts module's forward given to `add` by
the eager experts forward (experts.route_tokens) in full precision that also records, per expert,
the tokens routed to it (padding excluded when the forward loop publishes a token mask) and the
max |x| of the inputs of its gate/up and of its down projection; for GPTQ also each expert's
sum of x x^T per projection input, from which its Hessian follows; for AWQ and SmoothQuant also
the per-channel sum and max of |x| and an evenly strided sample of each expert's inputs
(`ExpertSample`). Active around the calibration passes (expert_quantization.py); the rule for
experts that get no token is in `stats.pool_shared_inputs` and `ExpertStats.shared_amax`.
"""

from typing import Dict, Optional

import torch
import torch.nn.functional as F_nn
from torch import nn

from ..modules.fused_experts import route_tokens
from .distributed import all_reduce
from .hessian_algebra import add_upper_gram_, mirror_upper_
from .offload import execution_device, onloaded
from .stats import finite_values

KINDS = ("gate_up", "down")


class ExpertStats:
    """One fused-experts module's statistics: tokens and input amax per expert.

    `input_dims` ({kind: K}), when given, also accumulates per expert the fp32 sum of x x^T of
    each projection's inputs (E, K, K). These are allocated when the module first runs (every
    process runs every block, so each holds them to reduce, tokens or not) and freed by the
    quantizer once used: one MoE layer's at a time under layer streaming.
    """

    def __init__(self, num_experts: int, device=None, input_dims: Optional[Dict[str, int]] = None,
                 sample_size: int = 0):
        self.tokens = torch.zeros(num_experts, dtype=torch.int64, device=device)
        self.amax = {kind: torch.zeros(num_experts, device=device) for kind in KINDS}  # fp32 max |x|, per expert
        self.input_dims, self.outer = input_dims or {}, {}
        # AWQ / SmoothQuant (sample_size > 0): {kind: (E, K) sum |x|}, {kind: (K,) max |x| over
        # experts}, {kind: [ExpertSample per expert]}
        self.abs_sum, self.channel_amax, self.samples = {}, {}, {}
        if sample_size:
            self.samples = {kind: [ExpertSample(sample_size) for _ in range(num_experts)] for kind in KINDS}
        self.reduced = False

    def allocate_hessians(self) -> None:
        if self.input_dims and not self.outer:
            device, experts = self.tokens.device, self.tokens.shape[0]
            self.outer = {kind: torch.zeros(experts, k, k, device=device) for kind, k in self.input_dims.items()}

    def release(self) -> None:
        """Free the Hessian sums and token samples once the experts are quantized."""
        self.input_dims, self.outer, self.samples = {}, {}, {}

    def observe(self, e: int, kind: str, x: torch.Tensor) -> None:
        if x.numel():
            self.amax[kind][e] = torch.maximum(self.amax[kind][e],
                                               x.detach().abs().amax().float().to(self.amax[kind].device))
            if kind in self.outer:
                x = x.detach().float().to(self.outer[kind].device)
                add_upper_gram_(self.outer[kind][e], x)  # the upper triangle; `hessian` mirrors it
        if self.samples:
            self._observe_for_smoothing(e, kind, x.detach())

    def _observe_for_smoothing(self, e: int, kind: str, x: torch.Tensor) -> None:
        if kind not in self.abs_sum:  # (E, K) and (K,) once the input width is known
            experts, k = self.tokens.shape[0], x.shape[-1]
            # fp64, as InputStats.abs_sum: the same mean whatever the order of the batches' sums
            self.abs_sum[kind] = torch.zeros(experts, k, dtype=torch.float64, device=self.tokens.device)
            self.channel_amax[kind] = torch.zeros(k, device=self.tokens.device)
        if x.numel():
            magnitude = x.abs()
            self.abs_sum[kind][e] += magnitude.sum(dim=0, dtype=torch.float32).to(self.tokens.device).double()
            self.channel_amax[kind] = torch.maximum(self.channel_amax[kind],
                                                    magnitude.amax(dim=0).float().to(self.tokens.device))
        self.samples[kind][e].add(x)

    def channel_mean(self, kind: str) -> torch.Tensor:
        """Per-channel mean |x| over every token routed to any expert of the layer (K,)."""
        return (self.abs_sum[kind].sum(dim=0) / max(self.total_tokens, 1)).float()

    def hessian(self, kind: str, e: int) -> torch.Tensor:
        """GPTQ's H = (2 / n) sum x x^T over the n tokens expert e saw (reduced across processes)."""
        return mirror_upper_(self.outer[kind][e] * (2.0 / max(int(self.tokens[e]), 1)))

    def reduce_across_processes(self) -> None:
        """Sum tokens and x x^T and max the amax over calibrating processes (no-op when alone); once."""
        if not self.reduced:
            self.tokens = all_reduce(self.tokens, "sum")
            self.amax = {kind: all_reduce(a, "max") for kind, a in self.amax.items()}
            self.outer = {kind: all_reduce(s, "sum") for kind, s in self.outer.items()}
            self.abs_sum = {kind: all_reduce(s, "sum") for kind, s in self.abs_sum.items()}
            self.channel_amax = {kind: all_reduce(a, "max") for kind, a in self.channel_amax.items()}
            self.reduced = True

    @property
    def total_tokens(self) -> int:
        return int(self.tokens.sum())

    def shared_amax(self, kind: str) -> torch.Tensor:
        """The layer's input amax for `kind`: the max over its experts (0-d fp32).

        Experts without tokens hold 0 here, so the max is the one over the experts that saw tokens.
        """
        return self.amax[kind].amax()


class ExpertSample:
    """Every `stride`-th input token one expert receives, the stride doubling (and every other kept
    token dropped) whenever more than 2 x `size` are kept: an evenly spaced sample of all its tokens,
    between `size` and 2 x `size` long once the expert has seen that many, the same on every run."""

    def __init__(self, size: int):
        self.size, self.stride, self.seen = size, 1, 0
        self.tokens: Optional[torch.Tensor] = None  # (n, K) fp32, None until the expert receives a token

    def add(self, x: torch.Tensor) -> None:
        if not x.shape[0]:
            return
        start = -self.seen % self.stride  # the first of these tokens whose overall index the stride divides
        new = x[start::self.stride].float()
        self.tokens = new.clone() if self.tokens is None else torch.cat([self.tokens, new])
        self.seen += x.shape[0]
        while self.tokens.shape[0] > 2 * self.size:  # kept token i has overall index i * stride
            self.tokens, self.stride = self.tokens[::2].clone(), self.stride * 2


class ExpertObserver:
    """Makes fused-experts modules record ExpertStats (in `stats`) until `close()` (or the end of a
    `with` block).

    `hessians`: also accumulate each expert's x x^T (GPTQ). `sample_size`: also the AWQ and
    SmoothQuant statistics, with samples of `sample_size` to twice that many tokens per expert and
    projection input.
    """

    def __init__(self, token_mask=None, hessians: bool = False, sample_size: int = 0):
        self.token_mask, self.hessians, self.sample_size = token_mask, hessians, sample_size
        self.stats: Dict[str, ExpertStats] = {}
        self._replaced, self._warned = [], set()  # [(module, the instance forward it had or None)]

    def add(self, name: str, module: nn.Module) -> None:
        # gate_up_proj (E, 2I, H) takes H inputs, down_proj (E, H, I) takes I
        dims = {"gate_up": module.gate_up_proj.shape[2], "down": module.down_proj.shape[2]} if self.hessians else None
        self.stats[name] = ExpertStats(module.num_experts, execution_device(module), dims, self.sample_size)
        # An accelerate hook's wrapper may be the instance's forward already: kept, and put back on close.
        self._replaced.append((module, vars(module).get("forward")))
        module.forward = _observed_forward(name, module, self.stats[name], self.token_mask, self._warned)

    def close(self) -> None:
        for module, previous in self._replaced:
            if previous is None:
                vars(module).pop("forward", None)
            else:
                module.forward = previous
        self._replaced = []

    def __enter__(self) -> "ExpertObserver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _observed_forward(name: str, module: nn.Module, stat: ExpertStats, token_mask, warned: set):
    def forward(hidden_states, top_k_index, top_k_weights):
        stat.allocate_hessians()
        real = _real_token_flags(hidden_states, token_mask)  # (T,) bool or None

        def run_expert(e, x, token_idx):
            keep = slice(None) if real is None else real[token_idx]
            stat.tokens[e] += int(x[keep].shape[0])
            stat.observe(e, "gate_up", finite_values(x[keep], f"{name}.{e}", warned))
            gate, up = F_nn.linear(x, module.gate_up_proj[e]).chunk(2, dim=-1)
            h = module.act_fn(gate) * up  # (n, I)
            stat.observe(e, "down", finite_values(h[keep], f"{name}.{e}", warned))
            return F_nn.linear(h, module.down_proj[e])

        with torch.no_grad(), onloaded(module):  # accelerate-offloaded experts: their weights for this forward
            return route_tokens(hidden_states, top_k_index, top_k_weights, module.num_experts, run_expert)

    return forward


def _real_token_flags(hidden: torch.Tensor, token_mask):
    """(T,) flags of the real (non-padding) tokens of the flattened batch, None when all are real."""
    mask = None if token_mask is None else token_mask.mask
    if mask is None or mask.numel() != hidden.shape[0]:
        return None
    return mask.reshape(-1).to(hidden.device)
