"""Layer-streamed calibration (SmoothQuant, AWQ, GPTQ): one decoder block at a time.

For each block: the algorithm runs it in full precision on its inputs with hooks that collect
what it needs about every distinct Linear input (per-channel statistics and a token sample, or a
Hessian) and returns the block's plans; `quantize_block` swaps in the QuantLinears; then the
now-quantized block runs to produce the next block's inputs (bf16 on CPU: on the block's
dequantized weights, `bf16_dense_weights`, faster than the packed kernels at this many tokens).
On a CPU without native bf16 GEMMs these passes compute in fp32 (compute_dtype.py).
Memory holds one block's activations and statistics, never the whole model's; the token samples
exist only because one block at a time can hold them. A model without decoder blocks is one block.
"""

import contextlib
from typing import Callable, Dict

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import formats as F
from ..backends.cpu_weights import bf16_dense_weights
from ..hf.memory import release_freed_heap
from ..modules.quant_linear import QuantLinear
from .algorithms import Algorithm, BlockContext
from .blocks import block_lists, capture_block_inputs, run_block
from .compute_dtype import calibration_dtype, cast_inputs, computing_in
from .data import TokenMask

MAX_SEARCH_TOKENS = 2048  # tokens per input kept for the search: loss estimates, not statistics


def streamed_calibration(model: nn.Module, linears: Dict[str, nn.Module], fmt: F.Format, group_size: int,
                         algorithm: Algorithm, forward_loop: Callable, prepare_block: Callable,
                         quantize_block: Callable, sequential: bool = True, fold_scales: bool = False) -> None:
    """Run `algorithm` over every decoder block; `quantize_block(linears, plans)` swaps one block's Linears.

    `prepare_block(prefix, block_linears) -> {name: nn.Linear}` (the weight source) puts the
    full-precision modules of the block whose names start with `prefix` in place, in memory, right
    before the block is calibrated, and returns its Linears. `sequential`: each block is fed the
    outputs of the quantized blocks before it (a second pass per block, after quantizing it); False
    feeds the full-precision outputs that its statistics pass computes anyway, as ModelOpt's AWQ
    and SmoothQuant calibrate, in one pass per block. `fold_scales`: smoothing algorithms fold
    o_proj's and down_proj's scales into v_proj's and up_proj's rows (producer_folding.py).
    """
    lists = block_lists(model, linears)
    _refuse_outside(lists, linears)
    fold_verdicts = {}
    for blocks_name, blocks in lists:  # an encoder-decoder's encoder first: the decoder reads its outputs
        inputs, token_mask, stride = _first_block_inputs(model, blocks, forward_loop)
        dtype = calibration_dtype(blocks, inputs)
        inputs = cast_inputs(inputs, dtype)
        for index, block in enumerate(tqdm(blocks, desc=f"{algorithm.name} {fmt.name}", disable=None)):
            prefix = _prefix(blocks_name, index)
            block_linears = {n: m for n, m in linears.items() if n.startswith(prefix)}
            last = index == len(blocks) - 1
            if block_linears:
                block_linears = prepare_block(prefix, block_linears)
            with computing_in(block, dtype):
                if block_linears:
                    outputs = None if sequential or last else []
                    context = BlockContext(block, inputs, token_mask, fmt, group_size, stride, outputs, fold_scales,
                                           fold_verdicts)
                    quantize_block(block_linears, algorithm.plan_block(context, block_linears))
                    # The replaced full-precision Linears and the search's temporaries go before the feed
                    # pass, which adds the block's dense feeding weights and activations.
                    block_linears = context = None
                    release_freed_heap()
                    if outputs:
                        inputs = outputs
                        continue
                if not last:  # the last block's outputs feed nothing
                    with _feeding_weights(block, inputs):
                        inputs = run_block(block, inputs)


def _refuse_outside(lists, linears: Dict[str, nn.Module]) -> None:
    names = [name for name, _ in lists if name is not None]
    outside = [n for n in linears if names and not any(n.startswith(name + ".") for name in names)]
    if outside:
        held = " and ".join(repr(name) for name in names)
        raise ValueError(f"layer-streamed calibration handles Linears inside {held}; {outside[:3]} are "
                         "outside it: exclude them with exclude_modules or use algorithm='max'")


def _prefix(blocks_name, index: int) -> str:
    """Block `index`'s name prefix; "" without blocks: the whole model is one block, every name in it."""
    return "" if blocks_name is None else f"{blocks_name}.{index}."


def _first_block_inputs(model: nn.Module, blocks, forward_loop: Callable):
    """(the first block's captured inputs, the loop's token mask, the search's token stride)."""
    inputs = capture_block_inputs(model, blocks, forward_loop)
    token_mask = getattr(forward_loop, "token_mask", None) or TokenMask()
    total_tokens = sum(_batch_tokens(args, kwargs) for args, kwargs, _ in inputs)
    return inputs, token_mask, max(1, total_tokens // MAX_SEARCH_TOKENS)


def _batch_tokens(args: tuple, kwargs: dict) -> int:
    """Tokens in one captured batch: hidden states (..., H), or the token ids a whole model reads."""
    tensor = next(t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))
    return tensor.numel() if not tensor.is_floating_point() else tensor.shape[:-1].numel()


def _feeding_weights(block: nn.Module, inputs: list):
    """The weights a just-quantized block feeds the next one with: bf16 dense ones on CPU for bf16
    hidden states (`bf16_dense_weights`), else the layers' own forward."""
    hidden = inputs[0][0][0]
    if hidden.dtype != torch.bfloat16 or hidden.device.type != "cpu":
        return contextlib.nullcontext()
    return bf16_dense_weights(m for m in block.modules() if isinstance(m, QuantLinear))
