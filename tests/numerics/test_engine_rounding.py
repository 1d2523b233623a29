"""Activation quantization rounds the way the serving engines' kernels do, bit for bit.

Each expected value is recomputed here in numpy float32 from the engines' arithmetic, written
from their sources and not from the package:
  FP8 static (fp8, w4a8_awq): q = fp8(x * (1 / s)), the reciprocal rounded once (vLLM
      scaled_fp8_quant_kernel_strided, TensorRT-LLM scaleMatrixPerTensorVec, SGLang
      per_tensor_quant_fp8_kernel).
  FP8 per token (fp8_pc_pt): s = max(amax / 448, 1 / (448 * 512)), q = fp8(x / s) (vLLM
      dynamic_per_token_scaled_fp8_quant_kernel_strided, TensorRT-LLM dynamicQuantizeMatrixPerToken).
  NVFP4 (nvfp4, nvfp4_awq): G = 1 / input_scale, SF = e4m3(G * (amax * rcp(6))),
      codes = e2m1(x * rcp(SF * rcp(G))) (vLLM / TensorRT-LLM cvt_warp_fp16_to_fp4).
The inputs sit at ties where the previous arithmetic (x / s; NVFP4 with amax / (6 s) and x / (SF s))
rounds differently, and each test first checks that it does, so these tests fail on it.
The Triton kernels are held to the same values in `test_engine_rounding_kernels.py`.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_ptq_plugin import get_format
from hf_ptq_plugin.backends.cpu_activations import fast_quantize_activation
from hf_ptq_plugin.numerics import quantize_activation

F32 = np.float32
E2M1_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=F32)


def positive_bf16_values(low, high):
    """Every finite bf16 value in (low, high], as fp32."""
    values = torch.arange(0, 0x7F80, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    return values[(values > low) & (values <= high)]


def to_fp8(y: np.ndarray) -> np.ndarray:
    """Saturating round-to-nearest-even cast to e4m3 (cvt.rn.satfinite), back as float32."""
    return torch.from_numpy(np.clip(y, -448, 448).astype(F32)).to(torch.float8_e4m3fn).float().numpy()


def e2m1(y: np.ndarray) -> np.ndarray:
    """Nearest E2M1 value by brute force, ties to the even grid index, saturating at 6 (cvt.rn.satfinite)."""
    distance = np.abs(np.minimum(np.abs(y), 6)[..., None] - E2M1_GRID)
    nearest = distance == distance.min(axis=-1, keepdims=True)
    index = np.argmax(nearest * (1 + (np.arange(8) % 2 == 0)), axis=-1)
    return np.sign(y) * E2M1_GRID[index]


def fp8_static_engine(x: np.ndarray, s: F32) -> np.ndarray:
    inv = F32(1) / s
    return to_fp8(x * inv) * s


def fp8_static_previous(x: np.ndarray, s: F32) -> np.ndarray:
    return to_fp8(x / s) * s


def nvfp4_engine(x: np.ndarray, s: F32) -> np.ndarray:
    """x (..., K) fp32 -> the engine's dequantized activations e2m1 * (SF * input_scale)."""
    blocks = x.reshape(*x.shape[:-1], -1, 16)
    g = F32(1) / s
    sf = to_fp8(g * (np.abs(blocks).max(axis=-1, keepdims=True) * (F32(1) / F32(6))))
    with np.errstate(divide="ignore"):
        out_scale = np.where(sf > 0, F32(1) / (sf * (F32(1) / g)), F32(0)).astype(F32)
    return (e2m1(blocks * out_scale) * (sf * s)).reshape(x.shape)


def nvfp4_previous(x: np.ndarray, s: F32) -> np.ndarray:
    blocks = x.reshape(*x.shape[:-1], -1, 16)
    sf = np.abs(blocks).max(axis=-1, keepdims=True) / (F32(6) * s)
    sf = to_fp8(np.clip(np.where(sf == 0, F32(1), sf), 2.0**-9, 448))
    return (e2m1(blocks / (sf * s)) * (sf * s)).reshape(x.shape)


def quantized(name, x: np.ndarray, s) -> np.ndarray:
    scale = None if s is None else torch.tensor(s)
    return quantize_activation(torch.from_numpy(x).bfloat16(), get_format(name), scale).numpy()


@pytest.mark.parametrize("name", ["fp8", "w4a8_awq"])
def test_static_fp8_activations_multiply_by_the_rounded_reciprocal(name):
    amax = F32(0.5390625)  # a bf16 amax; input_scale = amax / 448 as calibration stores it
    s = amax / F32(448)
    x = positive_bf16_values(0, float(amax)).numpy()
    x = np.concatenate([x, -x])
    expected = fp8_static_engine(x, s)
    assert (expected != fp8_static_previous(x, s)).sum() >= 8  # ties where x / s rounds the other way
    assert np.array_equal(quantized(name, x, s), expected)


def test_static_fp8_matches_the_engine_under_every_bf16_amax_that_has_a_tie():
    x = positive_bf16_values(2.0**-9, 448).numpy()
    flipped = [a for a in positive_bf16_values(2.0**-4, 64).numpy()
               if (fp8_static_engine(x, a / F32(448)) != fp8_static_previous(x, a / F32(448))).any()]
    assert len(flipped) >= 40  # about one bf16 amax in twenty has a bf16 activation at such a tie
    for amax in flipped:
        s = amax / F32(448)
        assert np.array_equal(quantized("fp8", x, s), fp8_static_engine(x, s)), amax


def test_per_token_fp8_divides_by_the_floored_token_scale():
    amax = F32(0.5390625)
    tie = F32(0.0252685546875)  # x / s and x * (1 / s) round to different codes under amax / 448
    assert fp8_static_engine(np.array([tie]), amax / F32(448)) != fp8_static_previous(np.array([tie]), amax / F32(448))
    rows = np.zeros((3, 32), dtype=F32)
    rows[0, :2] = [amax, tie]  # an ordinary token: the engines divide, so the tie takes the x / s code
    rows[1, :4] = [1e-3, -7e-4, 3e-4, 2.5e-5]  # amax / 448 is below the floor 1 / (448 * 512)
    rows = torch.from_numpy(rows).bfloat16().float().numpy()
    token_amax = np.abs(rows).max(axis=1, keepdims=True)
    scale = np.maximum(token_amax / F32(448), F32(1) / (F32(448) * F32(512))).astype(F32)
    expected = to_fp8(rows / scale) * scale
    got = quantized("fp8_pc_pt", rows, None)
    assert np.array_equal(got, expected)
    assert not np.array_equal(got[1], to_fp8(rows[1] / (token_amax[1] / F32(448))) * (token_amax[1] / F32(448)))
    assert not np.any(got[2])  # an all-zero token stays zero


def test_nvfp4_activations_follow_the_engine_order_at_a_constructed_tie():
    """Block max 11.25 s gives SF = 1.875; x = 4.6875 s is the tie 2.5 under x / (1.875 s), but
    fp32(1 / (1.875 s)) is enough above 1 / (1.875 s) that x times it rounds to 3, not 2."""
    s = F32(2.0**-4)
    x = np.zeros((1, 32), dtype=F32)
    x[0, :2] = [11.25 * s, 4.6875 * s]
    x[0, 16] = 2.0**-12  # SF = e4m3(G * x / 6) rounds to 0: the engine zeroes the block, no 2**-9 floor
    expected = nvfp4_engine(x, s)
    assert expected[0, 1] == 3 * 1.875 * s and nvfp4_previous(x, s)[0, 1] == 2 * 1.875 * s
    assert expected[0, 16] == 0 and nvfp4_previous(x, s)[0, 16] != 0
    assert np.array_equal(quantized("nvfp4", x, s), expected)


@pytest.mark.parametrize("name", ["nvfp4", "nvfp4_awq"])
def test_nvfp4_activations_match_the_engine_on_bf16_data(name):
    torch.manual_seed(0)
    x = (torch.randn(64, 512) * torch.logspace(-2, 1, 64)[:, None]).bfloat16().float()
    s = F32(x.abs().max().bfloat16().float().item() / 2688)  # input_scale = amax / (6 * 448)
    x = x.numpy()
    expected = nvfp4_engine(x, s)
    assert (expected != nvfp4_previous(x, s)).sum() > 0
    assert np.array_equal(quantized(name, x, s), expected)


@pytest.mark.parametrize("name", ["fp8", "fp8_pc_pt", "nvfp4"])
def test_cpu_fast_path_gives_the_reference_bits_at_the_ties(name):
    torch.manual_seed(1)
    x = torch.randn(16, 256).bfloat16()
    x[0, :2] = torch.tensor([0.5390625, 0.0252685546875])
    x[1, :32] = torch.tensor([11.25, 4.6875] + [0] * 14 + [2.0**-8] + [0] * 15) / 16
    scale = {"fp8": torch.tensor(0.5390625 / 448), "fp8_pc_pt": None, "nvfp4": torch.tensor(2.0**-4)}[name]
    fmt = get_format(name)
    fast, ref = fast_quantize_activation(x, fmt, scale), quantize_activation(x, fmt, scale)
    assert torch.equal(fast.view(torch.int32), ref.view(torch.int32))


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernel cases run compiled, in this process")
def test_kernels_round_activations_like_the_reference_under_the_interpreter():
    pytest.importorskip("triton")
    cases = Path(__file__).with_name("test_engine_rounding_kernels.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(cases)],
                            cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True,
                            timeout=900)
    report = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed.group(1)) >= 5, report


def test_w4a8_group_ratio_is_the_engines_two_rounding_fp16_scale():
    """TensorRT-LLM's W4A8 loader: fp16(ws), then times the fp32 reciprocal of ws2, rounded to fp16."""
    from hf_ptq_plugin.numerics.weights import w4a8_group_ratio

    torch.manual_seed(0)
    weight_scale = torch.rand(64, 32) * 0.02 + 1e-4
    weight_scale_2 = weight_scale.amax() * 7 / 448
    ws16 = weight_scale.numpy().astype(np.float16).astype(F32)
    expected = (ws16 * (F32(1) / weight_scale_2.numpy().astype(F32))).astype(np.float16).astype(F32)
    assert torch.equal(w4a8_group_ratio(weight_scale, weight_scale_2), torch.from_numpy(expected))
    one_rounding = (weight_scale / weight_scale_2).half().float()  # what the package computed before
    assert not torch.equal(one_rounding, torch.from_numpy(expected))
