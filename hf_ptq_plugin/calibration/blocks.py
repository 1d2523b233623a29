"""Layer streaming: run calibration one decoder block at a time.

`capture_block_inputs` runs the user's forward loop once with the decoder blocks replaced by a
catcher that records the first block's inputs (hidden states plus keyword arguments such as
position embeddings and the attention mask) and skips the blocks themselves; the output head is
skipped too (`_skipping_output_head`), since logits of bypassed blocks are meaningless. `run_block` then
feeds those inputs through one block, producing the next block's inputs. Algorithms that need
a layer's inputs (AWQ, GPTQ) quantize block i before computing block i+1's inputs, so every
block is calibrated on the activations the quantized model will really produce (unless
`PTQConfig(sequential=False)`, streamed.py). A progress bar per block's batches shows each pass.

An encoder-decoder model has two lists of blocks (`block_lists`): the encoder's are streamed
first, then the decoder's, whose inputs are captured with the quantized encoder in place. T5's
blocks hand the next block the attention biases the first one computes (`RELAYED`): the catcher
returns placeholders where a block returns them, and `run_block` passes them on as the model does.
"""

import contextlib
import inspect
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ..modules.fused_experts import is_fused_experts

# Keyword arguments that must not be replayed: a KV cache would grow at every replay.
NOT_REPLAYED = ("cache", "past_key_values", "past_key_value", "use_cache")
# What a T5 block returns after its hidden states, in order, and the next block takes by these names.
RELAYED = ("position_bias", "encoder_decoder_position_bias")

BlockList = Tuple[Optional[str], Sequence[nn.Module]]


def block_lists(model: nn.Module, linear_names) -> List[BlockList]:
    """[(name, ModuleList)] of the blocks to stream, in the model's order: the ModuleList that holds
    the most target Linears; for an encoder-decoder model, the encoder's and the decoder's. [(None,
    [model])] for a model without one, which is then calibrated as a single block."""
    lists, remaining = [], set(linear_names)
    wanted = 2 if getattr(getattr(model, "config", None), "is_encoder_decoder", False) else 1
    while remaining and len(lists) < wanted:
        best = _fullest_list(model, remaining, [name for name, _ in lists])
        if best is None:
            break
        lists.append(best)
        remaining = {linear for linear in remaining if not linear.startswith(best[0] + ".")}
    if not lists:
        return [(None, [model])]
    order = {name: index for index, (name, _) in enumerate(model.named_modules())}
    return sorted(lists, key=lambda item: order[item[0]])


def _fullest_list(model: nn.Module, linear_names, taken: List[str]) -> Optional[BlockList]:
    """The ModuleList, not inside or around one `taken`, that holds the most of `linear_names`."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name == t or name.startswith(t + ".") or t.startswith(name + ".") for t in taken):
            continue
        count = sum(1 for linear in linear_names if linear.startswith(name + "."))
        if count > best_count:
            best, best_count = (name, module), count
    return best


def relayed_positions(block: nn.Module) -> Dict[str, int]:
    """{RELAYED argument `block` takes: its position in the block's signature} (T5's blocks: both;
    other families: none)."""
    parameters = list(inspect.signature(block.forward).parameters)
    return {name: parameters.index(name) for name in RELAYED if name in parameters}


class _Catcher(nn.Module):
    """Stands in for a decoder block: records the inputs of block 0, passes hidden states through."""

    def __init__(self, block: nn.Module, record: list = None, token_mask=None):
        super().__init__()
        self.block, self.record, self.token_mask = block, record, token_mask
        self.relayed = len(relayed_positions(block))

    def forward(self, hidden_states, *args, **kwargs):
        if self.record is not None:
            self.record.append(_replayable((hidden_states.detach(),) + args, kwargs, self.token_mask))
        # A T5 block's callers unpack (hidden states, biases...): None leaves the biases to the next real block.
        return (hidden_states,) + (None,) * self.relayed if self.relayed else hidden_states

    def __getattr__(self, name):  # attributes the model reads from its blocks (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.block, name)


def _replayable(args: tuple, kwargs: dict, token_mask) -> tuple:
    """One recorded block input: (args, kwargs but NOT_REPLAYED, the running batch's token mask)."""
    kept = {k: v for k, v in kwargs.items() if k not in NOT_REPLAYED}
    return args, kept, None if token_mask is None else token_mask.mask


def capture_block_inputs(model: nn.Module, blocks: Sequence[nn.Module], forward_loop: Callable) -> List[tuple]:
    """Run `forward_loop(model)` with the blocks bypassed; return [(args, kwargs, token mask)] of block 0."""
    record, token_mask = [], getattr(forward_loop, "token_mask", None)
    with torch.no_grad(), _recording_inputs(model, blocks, record, token_mask):
        forward_loop(model)
    if not record:
        raise ValueError("forward_loop never ran the model: no calibration inputs were captured")
    return record


@contextlib.contextmanager
def _recording_inputs(model: nn.Module, blocks: Sequence[nn.Module], record: list, token_mask) -> Iterator[None]:
    """Catchers in place of the blocks; or, when the model is the one block, a hook that records the
    model's own inputs (its forward runs, its outputs unused)."""
    if len(blocks) == 1 and blocks[0] is model:
        def keep(module, args, kwargs):
            record.append(_replayable(tuple(args), kwargs, token_mask))

        with model.register_forward_pre_hook(keep, with_kwargs=True):
            yield
        return
    originals = list(blocks)
    try:
        for i, block in enumerate(originals):
            blocks[i] = _Catcher(block, record if i == 0 else None, token_mask)
        with _skipping_output_head(model):
            yield
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block


@contextlib.contextmanager
def _skipping_output_head(model: nn.Module) -> Iterator[None]:
    """The output head returns zeros of its logits' shape without computing them: with the blocks
    bypassed they are meaningless, and at a 128k vocabulary (Llama 3) the head's GEMM over every
    calibration token costs as much as a few blocks. A zero-stride tensor takes no memory."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    out_features = getattr(head, "out_features", None)
    if not isinstance(head, nn.Module) or not isinstance(out_features, int) or "forward" in vars(head):
        yield
        return
    head.forward = lambda x, *args, **kwargs: x.new_zeros(()).expand(*x.shape[:-1], out_features)
    try:
        yield
    finally:
        del head.forward


@torch.no_grad()
def run_block(block: nn.Module, inputs: List[tuple], token_mask=None) -> List[tuple]:
    """Feed every recorded input through `block`; return the same structure for the next block.

    `token_mask` (a TokenMask) is set to each batch's real tokens while that batch runs.
    """
    outputs, relayed = [], relayed_positions(block)
    try:
        for args, kwargs, mask in tqdm(inputs, desc="block batches", leave=False, disable=None):
            if token_mask is not None:
                token_mask.mask = mask
            result = block(*args, **kwargs)
            hidden, extra = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
            args, kwargs = _relay(relayed, (hidden,) + tuple(args[1:]), kwargs, extra)
            outputs.append((args, kwargs, mask))
    finally:
        if token_mask is not None:
            token_mask.mask = None
    return outputs


def _relay(relayed: Dict[str, int], args: tuple, kwargs: dict, extra: tuple) -> Tuple[tuple, dict]:
    """The next block's (args, kwargs): the RELAYED values a block returned after its hidden states put
    where the model passes them (positionally, as T5's stack does, or by keyword)."""
    if not relayed or not extra:
        return args, kwargs
    args, kwargs = list(args), dict(kwargs)
    for (name, index), value in zip(relayed.items(), extra):
        if value is None:
            continue
        if index < len(args):
            args[index] = value
        else:
            kwargs[name] = value
    return tuple(args), kwargs


class _AllInputsSeen(Exception):
    """Ends a block's forward early: every observed module has had its input."""


@torch.no_grad()
def observe_block(block: nn.Module, inputs: List[tuple], stop_after: Iterable[nn.Module], token_mask=None) -> None:
    """Feed every recorded input through `block` for the statistics hooks registered before this call.

    The block's output is not needed, so each batch stops as soon as every module of `stop_after`
    has received its input (their pre-hooks registered earlier have run): for a Llama block that
    skips down_proj's GEMM and what follows, ~20% of the block. A module that a batch never
    reaches (an unrouted expert Linear) lets that batch run to the end, as does an empty `stop_after`.
    """
    stop_after = list(stop_after)
    seen = set()

    def mark(module, args):
        seen.add(id(module))
        if len(seen) == len(stop_after):
            raise _AllInputsSeen

    handles = [module.register_forward_pre_hook(mark) for module in stop_after]
    try:
        for args, kwargs, mask in tqdm(inputs, desc="block statistics", leave=False, disable=None):
            seen.clear()
            if token_mask is not None:
                token_mask.mask = mask
            try:
                block(*args, **kwargs)
            except _AllInputsSeen:
                pass
    finally:
        for handle in handles:
            handle.remove()
        if token_mask is not None:
            token_mask.mask = None


def statistics_pass(block: nn.Module, inputs: List[tuple], leaders: dict, token_mask,
                    outputs: Optional[list] = None) -> None:
    """Run `block` for the statistics hooks on its Linears `leaders` ({name: module}).

    `outputs` (not sequential): the whole full-precision block runs and its outputs, appended
    there, feed the next block. Otherwise each batch stops once every leader had its input, unless
    the block holds fused experts: they are observed inside the block's forward, possibly after its
    last Linear, so such a block runs to its end.
    """
    if outputs is not None:
        outputs.extend(run_block(block, inputs, token_mask))
        return
    has_fused_experts = any(is_fused_experts(m) for m in block.modules())
    observe_block(block, inputs, () if has_fused_experts else leaders.values(), token_mask)
