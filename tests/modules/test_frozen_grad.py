"""QuantLinear under autograd: the reference's output, input gradients through the frozen weight."""

import pytest
import torch
from torch import nn

from hf_ptq_plugin import FORMATS, QuantLinear, get_format
from hf_ptq_plugin.modules.layer_plan import LayerPlan

N, K = 256, 384


def layer(name, dtype=torch.float32, pre_quant_scale=False) -> QuantLinear:
    torch.manual_seed(0)
    linear = nn.Linear(K, N).to(dtype)
    scale = torch.rand(K) + 0.5 if pre_quant_scale else None
    return QuantLinear.from_linear(linear, get_format(name), plan=LayerPlan(input_amax=torch.tensor(3.0),
                                                                            pre_quant_scale=scale))


@pytest.mark.parametrize("name", list(FORMATS))
def test_input_gradient_is_the_output_gradient_times_the_dequantized_weight(name):
    module = layer(name, pre_quant_scale=True)
    x = torch.randn(2, 5, K, requires_grad=True)
    y = module(x)
    assert torch.equal(y, module._reference_forward(x.detach()))
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    # Straight through the activation rounding; pre_quant_scale multiplies the input, so its gradient too.
    expected = (grad_y @ module.dequantized_weight()) * module.pre_quant_scale
    torch.testing.assert_close(x.grad, expected, rtol=1e-6, atol=1e-6)
    assert module.bias.grad is None and all(b.grad is None for b in module.buffers())


def test_bf16_inputs_get_bf16_gradients():
    module = layer("int4_awq", torch.bfloat16)
    x = torch.randn(3, K, dtype=torch.bfloat16, requires_grad=True)
    module(x).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    expected = torch.ones(3, N) @ module.dequantized_weight()
    torch.testing.assert_close(x.grad.float(), expected, rtol=2**-7, atol=1e-3)


def test_training_after_inference_mode_evaluation_keeps_no_kernel_weight_form():
    # An evaluation under inference_mode caches inference tensors, which autograd cannot save;
    # the training path neither uses them nor keeps them.
    module = layer("int8_wo", torch.bfloat16)
    x = torch.randn(4, K, dtype=torch.bfloat16)
    with torch.inference_mode():
        module(x)
    assert module.cpu_weight_cache is not None
    x.requires_grad_(True)
    module(x).sum().backward()
    assert x.grad is not None and module.cpu_weight_cache is None
