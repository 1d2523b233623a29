"""The Triton kernels quantize activations exactly as the reference does at the engine ties.

Compiled on a CUDA GPU, else under Triton's interpreter: on a CPU-only machine this module runs
only in the fresh interpreter that `test_engine_rounding.py` starts with TRITON_INTERPRET=1 (see
`tests/backends/test_kernels.py` for why), and skips itself in the main run.
"""

import os

import pytest
import torch

from hf_ptq_plugin import get_format
from hf_ptq_plugin.backends.triton_linear import load_kernels
from hf_ptq_plugin.numerics import pack_nibbles, quantize_activation
from hf_ptq_plugin.numerics.fp8 import fp8_quantize, fp8_quantize_static_activation, fp8_token_scales

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("CPU only: test_engine_rounding.py runs this module with TRITON_INTERPRET=1", allow_module_level=True)

AMAX = 0.5390625  # a bf16 amax under which some bf16 activations sit at FP8 ties (test_engine_rounding.py)


def bf16_activations():
    """(64, 256) fp32: every bf16 value in (2**-12, AMAX] and its negation, then random ones."""
    values = torch.arange(0, 0x7F80, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    values = values[(values > 2.0**-12) & (values <= AMAX)]
    torch.manual_seed(0)
    x = torch.randn(64 * 256).bfloat16().float() * AMAX / 4
    x[: 2 * values.numel()] = torch.cat([values, -values])
    return x.reshape(64, 256).to(DEVICE)


def same_bits(a, b):
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_static_activation_scales_multiply_by_the_reciprocal():
    x, scale = bf16_activations(), torch.tensor(AMAX / 448, device=DEVICE)
    q, _ = load_kernels().fp8_quantize(x, scale, activation=True)
    assert same_bits(q, fp8_quantize_static_activation(x, scale))
    assert not same_bits(q, fp8_quantize(x, scale))  # the inputs do reach ties


def test_weights_keep_the_division():
    x, scale = bf16_activations(), torch.tensor(AMAX / 448, device=DEVICE)
    q, _ = load_kernels().fp8_quantize(x, scale)
    assert same_bits(q, fp8_quantize(x, scale))


def test_dynamic_token_scales_have_the_engine_floor():
    x = bf16_activations()
    x[1] *= 2.0**-12  # amax / 448 below 1 / (448 * 512)
    x[2] = 0
    q, scale = load_kernels().fp8_quantize(x)
    expected_scale = fp8_token_scales(x)
    assert torch.equal(scale, expected_scale[:, 0])
    assert same_bits(q, fp8_quantize(x, expected_scale))


@pytest.mark.parametrize("pqs", [False, True], ids=["plain", "pre_quant_scale"])
def test_w4a8_activation_path_rounds_like_the_reference(pqs):
    x = bf16_activations().bfloat16()
    pre_quant_scale = (torch.rand(256, device=DEVICE) + 0.5).bfloat16() if pqs else None
    scale = torch.tensor(AMAX / 448, device=DEVICE)
    q, _ = load_kernels().fp8_quantize(x, scale, pre_quant_scale=pre_quant_scale, activation=True)
    x_in = x if pre_quant_scale is None else x * pre_quant_scale
    assert torch.equal(q.float() * scale, quantize_activation(x_in, get_format("w4a8_awq"), scale))


def identity_nvfp4(k):
    """An NVFP4 weight equal to the (k, k) identity: code 2 (1.0) on the diagonal, block scales 1."""
    codes = torch.eye(k, dtype=torch.uint8) * 2
    scale = torch.ones(k, k // 16).to(torch.float8_e4m3fn)
    return pack_nibbles(codes).to(DEVICE), scale.to(DEVICE), torch.ones((), device=DEVICE)


@pytest.mark.parametrize("name", ["nvfp4", "nvfp4_awq"])
def test_nvfp4_gemm_quantizes_activations_like_the_reference(name):
    """Times an identity weight, the GEMM returns its quantized activations: with a power-of-two
    input_scale every product is exact, so they must equal the reference bit for bit."""
    torch.manual_seed(1)
    k = 256
    x = (torch.randn(24, k) * torch.logspace(-3, 1, 24)[:, None]).bfloat16().float()
    x[0, :2] = torch.tensor([11.25, 4.6875]) / 16  # the tie of test_engine_rounding.py
    x[1, 16:32] = 2.0**-12  # a block whose scale rounds to 0
    x = x.to(DEVICE)
    input_scale = torch.tensor(2.0**-4, device=DEVICE)
    weight, weight_scale, weight_scale_2 = identity_nvfp4(k)
    out = load_kernels().nvfp4_gemm(x, weight, weight_scale, weight_scale_2, input_scale)
    assert torch.equal(out, quantize_activation(x, get_format(name), input_scale))
