"""Folding a smoothing scale into the Linear whose output rows make its input: o_proj's into
v_proj, down_proj's into up_proj.

AWQ and SmoothQuant multiply a Linear's input by a per-channel `pre_quant_scale`. Norm-fed
layers keep it in the norm (folding.py). o_proj and down_proj read a linear function of another
Linear's rows instead: o_proj's input channel (head h, d) mixes, over tokens, v_proj's row
(kv group of h, d); down_proj's channel n is act(gate)[n] times up_proj's row n. Scaling the
producer's rows by the scale before it is quantized puts the scale in its weights, so no
engine has to apply it: compressed-tensors cannot express it at all, and AutoAWQ and
llm-compressor fold these pairs the same way.

Under grouped-query attention several query heads read one v_proj row, so o_proj's scale must
be equal across the query heads of a KV group to fold: `FoldPair.tie` makes it so (geometric
mean over those heads), and the scale searches evaluate the tied scale.

Pairs are found by name, under one parent module, and each is checked on a calibration batch
before it is used: a model that transforms v or up non-linearly before the consumer (a norm
on v) keeps the scale on the consumer, which is ModelOpt's layout.
"""

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

from .blocks import observe_block

logger = logging.getLogger(__name__)

PRODUCERS = {"o_proj": "v_proj", "down_proj": "up_proj"}  # consumer leaf name -> producer leaf name
FOLD_TOLERANCE = 0.05  # relative error of a folded test scale: bf16 rounding passes, a v norm does not


@dataclass
class FoldPair:
    producer: str
    consumer: str
    query_heads_per_kv: int = 1  # > 1: grouped-query attention, o_proj's scale tied per KV group
    head_dim: int = 0

    def tie(self, scale: torch.Tensor) -> torch.Tensor:
        """The consumer's per-channel scale made foldable: equal over the query heads of a KV group."""
        if self.query_heads_per_kv == 1:
            return scale
        heads = scale.float().view(-1, self.query_heads_per_kv, self.head_dim)
        tied = heads.log().mean(dim=1, keepdim=True).exp().expand_as(heads)
        return tied.reshape(-1).to(scale.dtype)

    def producer_rows(self, scale: torch.Tensor) -> torch.Tensor:
        """A tied consumer scale (K,) as the factor of each producer output row."""
        if self.query_heads_per_kv == 1:
            return scale
        return scale.view(-1, self.query_heads_per_kv, self.head_dim)[:, 0].reshape(-1)


def find_fold_pairs(block: nn.Module, linears: Dict[str, nn.Linear], inputs: List[tuple],
                    verdicts: Optional[dict] = None) -> Dict[str, FoldPair]:
    """{consumer name: its FoldPair} for the block's consumer/producer pairs that fold exactly.

    `verdicts` ({(block class, consumer, producer within the block, heads tied): bool}), shared by
    the blocks of one model, keeps each test's result: blocks of one class compute the same function
    of their weights, so the first block's test holds for the rest. That saves the test's passes
    (up to three forward passes of a batch, more than the block's statistics pass) on every later block.
    """
    verdicts = {} if verdicts is None else verdicts
    names_in_block = {id(module): name for name, module in block.named_modules()}
    candidates = {}
    for name in linears:
        parent, _, leaf = name.rpartition(".")
        producer = f"{parent}.{PRODUCERS[leaf]}" if leaf in PRODUCERS else None
        if producer in linears:
            pair = _shaped_pair(block, linears, producer, name)
            key = (type(block), names_in_block.get(id(linears[name])), names_in_block.get(id(linears[producer])),
                   None if pair is None else pair.query_heads_per_kv)
            candidates[name] = (producer, pair, key)
    untested = [name for name, (_, pair, key) in candidates.items() if pair is not None and key not in verdicts]
    # One pass records every consumer's input as it is; each test scale then needs one pass of its own.
    consumers = [linears[name] for name in untested]
    before = dict(zip(untested, _consumer_inputs(block, inputs, consumers))) if untested else {}
    pairs = {}
    for name, (producer, pair, key) in candidates.items():
        if pair is not None and key not in verdicts:
            verdicts[key] = _folds_exactly(block, inputs, linears, pair, before[name])
        if pair is not None and verdicts[key]:
            pairs[name] = pair
        else:
            logger.warning("%s's smoothing scale cannot fold into %s; it stays on %s as pre_quant_scale "
                           "(served by the unified checkpoint and TensorRT-LLM)", name, producer, name)
    return pairs


def fold_into_producer(pair: FoldPair, producer: nn.Linear, scale: torch.Tensor) -> None:
    """Scale the producer's output rows (and bias) by the consumer's tied input scale, in place."""
    rows = pair.producer_rows(scale).float()
    with torch.no_grad():
        producer.weight.copy_((producer.weight.float() * rows[:, None]).to(producer.weight.dtype))
        if producer.bias is not None:
            producer.bias.copy_((producer.bias.float() * rows).to(producer.bias.dtype))


def _shaped_pair(block: nn.Module, linears, producer: str, consumer: str) -> Optional[FoldPair]:
    """The pair, with the heads it ties under grouped-query attention; None if the shapes do not fold."""
    rows, channels = linears[producer].out_features, linears[consumer].in_features
    if rows == channels:
        return FoldPair(producer, consumer)
    head_dim = _head_dim(block, linears[consumer])
    if not head_dim or channels % rows or rows % head_dim:
        return None
    return FoldPair(producer, consumer, channels // rows, head_dim)


def _head_dim(block: nn.Module, consumer: nn.Module) -> Optional[int]:
    """head_dim of the attention module holding `consumer` (transformers' attention modules carry it)."""
    for module in block.modules():
        if any(child is consumer for child in module.children()):
            return getattr(module, "head_dim", None)
    return None


def _folds_exactly(block: nn.Module, inputs: List[tuple], linears, pair: FoldPair, before: torch.Tensor) -> bool:
    """Whether scaling the producer's rows by a test scale scales the consumer's input (`before`, on the
    first batch) by it."""
    generator = torch.Generator().manual_seed(0)
    consumer, producer = linears[pair.consumer], linears[pair.producer]
    # Factors from 1/4 to 4: a norm or other non-linear step on the way changes the result by far more than rounding.
    test_scale = pair.tie(torch.exp2(4 * torch.rand(consumer.in_features, generator=generator) - 2))
    original = producer.weight.detach().clone(), None if producer.bias is None else producer.bias.detach().clone()
    try:
        fold_into_producer(pair, producer, test_scale.to(producer.weight.device))
        after = _consumer_inputs(block, inputs, [consumer])[0]
    finally:
        with torch.no_grad():
            producer.weight.copy_(original[0])
            if original[1] is not None:
                producer.bias.copy_(original[1])
    expected = before * test_scale.to(before.device)
    return bool((after - expected).norm() <= FOLD_TOLERANCE * expected.norm())


def _consumer_inputs(block: nn.Module, inputs: List[tuple], consumers: List[nn.Module]) -> List[torch.Tensor]:
    """The input each of `consumers` receives from the block's first batch, in one pass."""
    seen = {}

    def record(module, args) -> None:  # returns None: a pre-hook's return value would replace the input
        seen.setdefault(id(module), args[0].detach().float())

    handles = [c.register_forward_pre_hook(record) for c in consumers]
    try:
        observe_block(block, inputs[:1], consumers)
    finally:
        for handle in handles:
            handle.remove()
    return [seen[id(c)] for c in consumers]
