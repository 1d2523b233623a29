"""NVFP4 weight fake quantization, the calibration searches' hot loop, bit for bit the codes' round trip:
the native kernel (`backends/native_fake_quantize.c`) and the lean torch path of `numerics.weights`, on
ordinary, zero, tiny, huge and signed-zero blocks, under max-derived, clipped and underflowing global scales."""

import pytest
import torch

from hf_ptq_plugin import formats as F
from hf_ptq_plugin.backends import native
from hf_ptq_plugin.backends.fake_quantize import fake_quantize_weight
from hf_ptq_plugin.numerics import weights as numerics_weights
from hf_ptq_plugin.numerics.weights import dequantize_weight, quantize_weight

NVFP4 = F.get_format("nvfp4")
# None: max|w|; a clip below it (saturated block scales); above it; underflowing steps (0 / 0 quotients); zero
GLOBAL_AMAXES = [None, 1e-3, 50.0, 1e-41, 0.0]


def weight(rows=96, cols=512):
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=generator) * 0.05
    w[0, :16] = 0  # an all-zero block: scale 1.0
    w[1, 16:32] = 1e-30  # a tiny block: the smallest scale, 2**-9
    w[2, :16] *= 1e4  # a huge block
    w[3, 0], w[3, 1] = -0.0, -1e-12  # signed zeros out
    w[4, :16] = torch.tensor([6, .25, .75, 1.25, 1.75, 2.5, 3.5, 5, -.25, -.75, -1.25, -1.75, -2.5, -3.5, -5, 0])
    return w


def codes_round_trip(w, global_amax):
    return dequantize_weight(quantize_weight(w, NVFP4, None, global_amax), NVFP4)


def assert_same_bits(got, expected):
    assert got.dtype == expected.dtype == torch.float32 and got.shape == expected.shape
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


@pytest.mark.skipif(native.library() is None, reason="the native kernels cannot be built here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("global_amax", GLOBAL_AMAXES)
def test_the_native_nvfp4_weight_fake_quantizer_gives_the_codes_values(global_amax, dtype, monkeypatch):
    calls = []
    kernel = native.nvfp4_fake_quantize_weight
    monkeypatch.setattr(native, "nvfp4_fake_quantize_weight", lambda *args: calls.append(1) or kernel(*args))
    w = weight().to(dtype)
    amax = None if global_amax is None else torch.tensor(global_amax)
    assert_same_bits(fake_quantize_weight(w, NVFP4, None, amax), codes_round_trip(w, amax))
    assert calls == [1]


@pytest.mark.parametrize("global_amax", GLOBAL_AMAXES)
def test_the_torch_nvfp4_weight_fake_quantizer_gives_the_codes_values(global_amax, monkeypatch):
    monkeypatch.setattr(native, "library", lambda: None)
    amax = None if global_amax is None else torch.tensor(global_amax)
    expected = codes_round_trip(weight(), amax)
    assert_same_bits(fake_quantize_weight(weight(), NVFP4, None, amax), expected)
    assert_same_bits(numerics_weights.fake_quantize_weight(weight(), NVFP4, None, amax), expected)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_take_the_codes_path(bad):
    w = weight()
    w[5, 40] = bad
    got, expected = fake_quantize_weight(w, NVFP4), codes_round_trip(w, None)
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num().view(torch.int32), expected.nan_to_num().view(torch.int32))


def test_other_formats_are_the_reference():
    w = weight()
    for name in ("int4_awq", "fp8", "w4a8_awq"):
        fmt = F.get_format(name)
        assert_same_bits(fake_quantize_weight(w, fmt, 128), numerics_weights.fake_quantize_weight(w, fmt, 128))
