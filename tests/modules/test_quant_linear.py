"""QuantLinear: buffers are the checkpoint tensors; forward is what the engine computes."""

import pytest
import torch
import torch.nn.functional as F_nn
from conftest import sqnr_db
from torch import nn

from hf_ptq_plugin import FORMATS, QuantLinear, get_format
from hf_ptq_plugin.modules.layer_plan import LayerPlan
from hf_ptq_plugin.modules.quant_linear import reference_forward
from hf_ptq_plugin.numerics import quantize_activation

F32, FP8, U8, I8 = torch.float32, torch.float8_e4m3fn, torch.uint8, torch.int8
N, K = 256, 384  # group 128 for INT4, 16 for NVFP4, 32 for MXFP8, 128x128 tiles for fp8_pb_wo

# Written from the reference table (docs/modelopt-facts.md §6.4), independently of the code's specs.
EXPECTED_BUFFERS = {
    "fp8": {"weight": ((N, K), FP8), "weight_scale": ((), F32), "input_scale": ((), F32)},
    "fp8_pc_pt": {"weight": ((N, K), FP8), "weight_scale": ((N,), F32)},
    "fp8_pb_wo": {"weight": ((N, K), FP8), "weight_scale": ((N // 128, 1, K // 128, 1), F32)},
    "int8_sq": {"weight": ((N, K), I8), "weight_scale": ((N,), F32), "input_scale": ((), F32)},
    "int8_wo": {"weight": ((N, K), I8), "weight_scale": ((N,), F32)},
    "int4_awq": {"weight": ((N // 2, K), U8), "weight_scale": ((N, K // 128), F32)},
    "w4a8_awq": {"weight": ((N // 2, K), U8), "weight_scale": ((N, K // 128), F32), "weight_scale_2": ((), F32),
                 "input_scale": ((), F32)},
    "nvfp4": {"weight": ((N, K // 2), U8), "weight_scale": ((N, K // 16), FP8), "weight_scale_2": ((), F32),
              "input_scale": ((), F32)},
    "nvfp4_awq": {"weight": ((N, K // 2), U8), "weight_scale": ((N, K // 16), FP8), "weight_scale_2": ((), F32),
                  "input_scale": ((), F32)},
    "w4a16_nvfp4": {"weight": ((N, K // 2), U8), "weight_scale": ((N, K // 16), FP8), "weight_scale_2": ((), F32)},
    "mxfp8": {"weight": ((N, K), FP8), "weight_scale": ((N, K // 32), U8)},
}


def make_linear(bias=True, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(K, N, bias=bias)
    linear.weight.data.normal_(0, 0.02)
    return linear


def test_expected_table_covers_every_format():
    assert set(EXPECTED_BUFFERS) == set(FORMATS)


@pytest.mark.parametrize("name", list(FORMATS))
def test_buffers_are_exactly_the_checkpoint_tensors(name):
    module = QuantLinear.from_linear(make_linear(bias=False), get_format(name),
                                     plan=LayerPlan(input_amax=torch.tensor(3.0)))
    state = module.state_dict()
    assert {k: (tuple(v.shape), v.dtype) for k, v in state.items()} == EXPECTED_BUFFERS[name]


def test_bias_is_kept_in_the_model_dtype():
    linear = make_linear().to(torch.bfloat16)
    module = QuantLinear.from_linear(linear, get_format("int8_wo"))
    assert module.state_dict()["bias"].dtype == torch.bfloat16
    assert torch.equal(module.bias, linear.bias)


def _fp8(x, scale):
    return (x / scale).clamp(-448, 448).to(FP8).float() * scale


def _oracle_forward(name, linear, x, x_amax):
    """The engine's computation for four formats, written from the reference math alone."""
    w, b = linear.weight.detach().float(), linear.bias.detach().float()
    if name == "fp8":
        return F_nn.linear(_fp8(x, x_amax / 448), _fp8(w, w.abs().max() / 448), b)
    if name == "int8_sq":
        ws = w.abs().amax(dim=1, keepdim=True) / 127
        xs = x_amax / 127
        return F_nn.linear(torch.round(x / xs).clamp(-128, 127) * xs, torch.round(w / ws).clamp(-128, 127) * ws, b)
    if name == "int4_awq":
        ws = w.view(N, K // 128, 128).abs().amax(dim=-1, keepdim=True) / 7
        wq = (torch.round(w.view(N, K // 128, 128) / ws).clamp(-8, 7) * ws).view(N, K)
        return F_nn.linear(x, wq, b)
    if name == "nvfp4":
        return F_nn.linear(_nvfp4(x, x_amax / 2688), _nvfp4(w, w.abs().max() / 2688), b)
    raise AssertionError(name)


def _nvfp4(t, global_scale):
    """Brute-force NVFP4: nearest E2M1 grid point per element, ties to the even grid index."""
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    blocks = t.reshape(*t.shape[:-1], -1, 16)
    block_scale = (blocks.abs().amax(dim=-1, keepdim=True) / (6 * global_scale)).clamp(2**-9, 448).to(FP8).float()
    y = (blocks / (block_scale * global_scale)).abs().clamp(max=6)
    distance = (y[..., None] - grid).abs()
    nearest = distance == distance.amin(dim=-1, keepdim=True)
    index = (nearest * (1.0 + (torch.arange(8) % 2 == 0))).argmax(dim=-1)  # exact ties: the even index
    return (torch.sign(blocks) * grid[index] * block_scale * global_scale).reshape(t.shape)


@pytest.mark.parametrize("name", ["fp8", "int8_sq", "int4_awq", "nvfp4"])
def test_forward_equals_the_independent_oracle(name):
    linear = make_linear()
    torch.manual_seed(1)
    x = torch.randn(3, 5, K)
    x_amax = x.abs().max()
    module = QuantLinear.from_linear(linear, get_format(name), plan=LayerPlan(input_amax=x_amax))
    expected = _oracle_forward(name, linear, x, x_amax)
    torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(FORMATS))
def test_forward_is_quantized_activation_times_dequantized_weight(name):
    linear = make_linear()
    x = torch.randn(17, K)
    module = QuantLinear.from_linear(linear, get_format(name), plan=LayerPlan(input_amax=x.abs().max()))
    scale = getattr(module, "input_scale", None)
    expected = F_nn.linear(quantize_activation(x, module.fmt, scale), module.dequantized_weight(), linear.bias.float())
    with reference_forward(module):  # the reference itself; the fast backends are held to it in test_cpu_paths
        assert torch.equal(module(x), expected)
    assert sqnr_db(linear(x), module(x)) > 14


def test_output_dtype_follows_the_input():
    module = QuantLinear.from_linear(make_linear().to(torch.bfloat16), get_format("fp8_pc_pt"))
    assert module(torch.randn(2, K, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_uncalibrated_static_format_uses_the_live_activation_scale():
    linear = make_linear()
    x = torch.randn(4, K)
    uncalibrated = QuantLinear.from_linear(linear, get_format("fp8"))
    calibrated = QuantLinear.from_linear(linear, get_format("fp8"), plan=LayerPlan(input_amax=x.abs().max()))
    assert not uncalibrated.input_calibrated and calibrated.input_calibrated
    assert torch.equal(uncalibrated(x), calibrated(x))
    assert not torch.equal(uncalibrated(x * 2), calibrated(x * 2))  # static scale saturates, dynamic does not


def test_pre_quant_scale_multiplies_the_input():
    linear = make_linear()
    scale = torch.rand(K) + 0.5
    smoothed = nn.Linear(K, N)
    smoothed.weight.data = linear.weight.data / scale  # W / s applied to x * s is the same product
    smoothed.bias.data = linear.bias.data
    module = QuantLinear.from_linear(smoothed, get_format("int8_wo"), plan=LayerPlan(pre_quant_scale=scale))
    assert "pre_quant_scale" in module.state_dict()
    x = torch.randn(6, K)
    assert sqnr_db(linear(x), module(x)) > 35
