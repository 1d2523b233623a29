"""Per-Linear input statistics gathered while the user's forward loop runs.

Forward pre-hooks record, for every target Linear, the running per-input-channel max |x|
(what `max` calibration needs; SmoothQuant and AWQ need it per channel). The hooks are removed
when collection ends, also if the forward loop raises.

Layers that share one input scale (the experts of a MoE layer) follow ModelOpt's rule
(`docs/modelopt-facts.md` §3.1, §10.1): every expert of a layer gets the same input amax per
projection, the max over the layer's experts; an expert no calibration token reached gets the max
over the other experts of its layer and projection (`pool_shared_inputs`, `log_token_counts`).
"""

import contextlib
import logging
from collections import defaultdict
from typing import Callable, Dict, List

import torch
from torch import nn

from .distributed import all_reduce, all_reduce_number

logger = logging.getLogger(__name__)


class InputStats:
    """Running statistics of one Linear's input.

    Always: per-channel max |x|. With `sample_stride`: also per-channel sum |x| (for the mean
    AWQ needs) and every `sample_stride`-th token, kept for searches that replay the inputs.
    """

    def __init__(self, sample_stride: int = 0):
        self.channel_amax = None  # (K,) fp32, max |x| per input channel
        # (K,) sum |x| per input channel (only when sampling). fp64: the batches' fp32 sums add up
        # exactly, so the mean is the same whatever order they arrive in or process they ran in.
        self.abs_sum = None
        self.samples = []  # [(T_i, K)] fp32 token samples
        self.num_tokens = 0
        self.sample_stride = sample_stride

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])  # (tokens, K), in the model's dtype
        magnitude = x.abs()
        amax = magnitude.amax(dim=0).float()  # exact in any dtype
        self.channel_amax = amax if self.channel_amax is None else torch.maximum(self.channel_amax, amax)
        self.num_tokens += x.shape[0]
        if self.sample_stride:
            abs_sum = magnitude.sum(dim=0, dtype=torch.float32).double()
            self.abs_sum = abs_sum if self.abs_sum is None else self.abs_sum + abs_sum
            self.samples.append(x[:: self.sample_stride].to(torch.float32, copy=True))  # never a view of x

    def reduce_across_processes(self) -> None:
        """Make every process hold the statistics of all processes' tokens (no-op when alone).

        Token samples stay local: they only estimate losses, which are reduced where used.
        """
        self.num_tokens = int(all_reduce_number(self.num_tokens, "sum"))
        if self.channel_amax is not None:
            self.channel_amax = all_reduce(self.channel_amax, "max")
        if self.abs_sum is not None:
            self.abs_sum = all_reduce(self.abs_sum, "sum")

    @property
    def channel_mean(self) -> torch.Tensor:
        """Per-channel mean |x| over every token seen (K,)."""
        return (self.abs_sum / self.num_tokens).float()

    @property
    def sample(self) -> torch.Tensor:
        """The kept tokens (T, K)."""
        return torch.cat(self.samples)

    @property
    def amax(self) -> torch.Tensor:
        """Per-tensor max |x| (a 0-d fp32 tensor)."""
        return self.channel_amax.amax()


def finite_values(x: torch.Tensor, where: str, warned: set) -> torch.Tensor:
    """x with NaN/Inf set to 0: the rule is that non-finite activations are left out of statistics
    (a 0 never raises a max and adds nothing to a sum or a Hessian), with one warning per layer;
    an x with no finite value at all is a ValueError."""
    if bool(torch.isfinite(x.sum())):  # a NaN or Inf anywhere makes the sum NaN or Inf: one cheap pass
        return x
    finite = torch.isfinite(x)
    if bool(finite.all()):  # the sum overflowed; every value is finite
        return x
    if not bool(finite.any()):  # nothing to measure: a scale from it would be made up
        raise ValueError(f"{where}: every one of {x.numel()} calibration activation values is NaN or Inf; check "
                         "the model's dtype for overflow, or the data")
    if where not in warned:
        warned.add(where)
        logger.warning("%s: %d of %d calibration activation values are NaN or Inf; they are left out of the "
                       "statistics (check the model's dtype for overflow, or the data)", where,
                       int((~finite).sum()), x.numel())
    return torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))


@contextlib.contextmanager
def input_hooks(linears: Dict[str, nn.Module], stats: Dict[str, "InputStats"], token_mask=None):
    """Feed every Linear's input to its stats object; `token_mask` (a TokenMask) drops padding."""
    warned = set()

    def observe(name, x):
        x = x if token_mask is None else token_mask.real_tokens(x)
        stats[name].update(finite_values(x, name, warned))

    with contextlib.ExitStack() as hooks:
        for name, module in linears.items():
            hooks.enter_context(module.register_forward_pre_hook(lambda mod, args, n=name: observe(n, args[0])))
        yield


def collect_input_stats(model: nn.Module, linears: Dict[str, nn.Module],
                        forward_loop: Callable) -> Dict[str, InputStats]:
    """Run `forward_loop(model)` under no_grad and return {linear_name: InputStats}.

    A loop from `calibration_forward_loop` publishes which tokens are padding; those are skipped.
    Layers sharing one input scale (the experts of a MoE layer) get their group's statistics
    (`pool_shared_inputs`). Raises ValueError naming the layers that saw no tokens (their scales
    would be invented).
    """
    stats = {name: InputStats() for name in linears}
    with input_hooks(linears, stats, getattr(forward_loop, "token_mask", None)), torch.no_grad():
        forward_loop(model)
    for s in stats.values():
        s.reduce_across_processes()
    pool_shared_inputs(linears, stats)
    unseen = [name for name, s in stats.items() if s.channel_amax is None]
    if unseen:
        raise ValueError(f"forward_loop never reached {len(unseen)} layer(s), e.g. {unseen[:3]}; "
                         "they would get made-up activation scales")
    return stats


def pool_shared_inputs(modules: Dict[str, object], stats: Dict[str, object]) -> None:
    """Give every member of a `shared_input` group the group's per-channel amax (in place).

    A group none of whose members saw a token is left alone (its members stay unseen).
    """
    groups = defaultdict(list)
    for name, module in modules.items():
        tag = getattr(module, "shared_input", None)
        if tag is not None:
            groups[id(tag)].append(name)
    counts = {}
    for names in groups.values():
        seen = [stats[n].channel_amax for n in names if stats[n].channel_amax is not None]
        if not seen:
            continue
        pooled = torch.stack(seen).amax(dim=0)
        for n in names:
            stats[n].channel_amax = pooled
        layer = names[0].rsplit(".", 2)[0]  # "<experts>.{e}.{proj}" -> "<experts>"
        counts.setdefault(layer, {}).update({int(n.rsplit(".", 2)[1]): stats[n].num_tokens for n in names})
    if counts:
        log_token_counts({layer: [c[e] for e in sorted(c)] for layer, c in counts.items()})


def log_token_counts(counts: Dict[str, List[int]]) -> None:
    """Tokens per expert per MoE layer (logger.info), and the no-token rule for experts that got none."""
    width = max(len(layer) for layer in counts)
    lines = [f"{layer:<{width}}  " + " ".join(f"{c:>6d}" for c in row) for layer, row in counts.items()]
    logger.info("calibration tokens per expert (rows: MoE layers, columns: experts 0..):\n%s", "\n".join(lines))
    unseen = {layer: [e for e, c in enumerate(row) if c == 0] for layer, row in counts.items()}
    unseen = {layer: experts for layer, experts in unseen.items() if experts}
    if unseen:
        layer, experts = next(iter(unseen.items()))
        logger.warning("%d expert(s) in %d MoE layer(s) received no calibration token (e.g. %s experts %s); "
                       "their input scales are the max over the other experts of their layer and projection, "
                       "their weight scales come from their weights alone", sum(map(len, unseen.values())),
                       len(unseen), layer, experts)
