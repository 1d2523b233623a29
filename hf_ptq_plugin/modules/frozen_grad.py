"""Backward through a QuantLinear whose weight stays frozen: what adapter training (QLoRA) needs.

A LoRA adapter next to a QuantLinear, or any trainable parameter before one (an adapter in an
earlier layer, a norm, the embeddings), needs the gradient of the layer's output with respect
to its *input*; nothing needs one for the quantized weight, which is a set of buffers. This
autograd function computes the forward exactly as the reference does (the numbers a serving
engine computes) and, in backward, multiplies the output gradient with the dequantized weight
again, so no dequantized (N, K) copy lives between forward and backward, nor between steps:
memory stays the compressed model plus activations, as in QLoRA.

Activation quantization (FP8, INT8, NVFP4, MXFP8 inputs) rounds, and rounding has a zero
derivative almost everywhere; the backward treats it as the identity (the straight-through
estimator of quantization-aware training), so gradients reach earlier layers. `pre_quant_scale`
multiplies the input, so it multiplies the input gradient too. The bias is part of the frozen
base: it gets no gradient.

Only inputs that need a gradient come here. A layer whose input needs none (the layers before
the first adapter) has nothing to differentiate and runs the inference kernels as usual.
"""

import torch


class FrozenWeightLinear(torch.autograd.Function):
    """y = module(x) by the reference; dy/dx = W (dequantized again in backward) times pre_quant_scale."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module) -> torch.Tensor:
        ctx.module = module  # only a reference: its buffers are the compressed weight itself
        return module._reference_forward(x)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        module = ctx.module
        grad_x = grad_y.float() @ module.dequantized_weight()  # (..., N) @ (N, K): straight through x's rounding
        if module.pre_quant_scale is not None:
            grad_x = grad_x * module.pre_quant_scale.float()
        return grad_x.to(grad_y.dtype), None


def linear_with_input_grad(module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` by the reference, differentiable with respect to x only.

    Drops the CPU kernels' cached weight form (built by an evaluation before), so no derived
    weight copy stays in memory through training; the next inference call rebuilds it.
    """
    module.cpu_weight_cache = None
    return FrozenWeightLinear.apply(x, module)
