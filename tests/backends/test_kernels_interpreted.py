"""Triton kernels against the reference numerics: compiled on a CUDA GPU, else under Triton's interpreter.

Triton's own library functions (tl.zeros, tl.max, ...) are decorated when triton is first
imported, and they run under the interpreter only if TRITON_INTERPRET=1 was set by then. In the
main test run transformers has imported triton long before this module, so on a CPU-only machine
this module skips itself there, and `test_kernels.py` runs it again in a fresh interpreter with
the variable set (`test_kernels_are_interpreted_on_cpu` checks that it took effect).

Tolerances: the kernels reproduce every rounding of the reference exactly (codes, scales,
pre_quant_scale products, output rounding), so what remains is (a) fp32 accumulation order,
bounded by K * 2**-24 * sum_k |x_q w| (the classic gamma_K bound), (b) for the two kernels that
dequantize the weight into the dot dtype (int4_awq, fp8_pb_wo), that dtype's rounding of the
weight, 2**-11 (fp16) or 2**-8 (bf16, GPU only) of the same sum, and (c) one rounding of the
output to its dtype on each side: 2**-7 (bf16), 2**-10 (fp16) of |reference|.
"""

import os

import pytest
import torch
from torch import nn

from hf_ptq_plugin import FORMATS, QuantLinear, get_format
from hf_ptq_plugin.backends.triton_linear import load_kernels, triton_linear
from hf_ptq_plugin.backends.triton_quantize import quantize_weight_triton
from hf_ptq_plugin.modules.layer_plan import LayerPlan
from hf_ptq_plugin.numerics import quantize_activation, quantize_weight

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("CPU only: test_kernels.py runs this module in a subprocess with TRITON_INTERPRET=1",
                allow_module_level=True)

import triton  # noqa: E402  (after the skip: decorating below needs the interpreter on CPU)
import triton.language as tl  # noqa: E402

from hf_ptq_plugin.kernels.rounding import round_to_dtype  # noqa: E402

OUTPUT_ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
# N = 136 and these K overrun the default tiles (128 x 256 under the interpreter): two N tiles,
# two K steps, the last of each masked. Each K honours the format's block (INT4 group 64,
# NVFP4 16, MXFP8 32, fp8_pb_wo 128 x 128 tiles).
SHAPES = {"int4_awq": (136, 320), "w4a8_awq": (136, 320), "fp8_pb_wo": (256, 384), "nvfp4": (136, 336),
          "nvfp4_awq": (136, 336), "w4a16_nvfp4": (136, 336), "mxfp8": (136, 288)}
DEFAULT_SHAPE = (136, 328)
CASES = [(1, torch.float32), (3, torch.float16), (17, torch.bfloat16)]


def quant_linear(name, n, k, dtype, seed=0, calibrated=True):
    """A QuantLinear of format `name` in `dtype` (bias, pre_quant_scale where the format has one)."""
    torch.manual_seed(seed)
    linear = nn.Linear(k, n).to(dtype)
    linear.weight.data.normal_(0, 0.05)
    fmt = get_format(name)
    pqs = (torch.rand(k) + 0.5).to(dtype) if fmt.pre_quant_scale else None
    group = 64 if fmt.group_size_choices else None
    amax = torch.tensor(2.5) if calibrated else None  # below max|x * pqs|: some activations saturate
    module = QuantLinear.from_linear(linear, fmt, group, plan=LayerPlan(input_amax=amax, pre_quant_scale=pqs))
    return module.to(DEVICE)


def reference_and_magnitude(module, x):
    """(reference output, sum_k |x_q[m, k] * w[n, k]| + |bias|) in fp32."""
    x_in = x if module.pre_quant_scale is None else x * module.pre_quant_scale
    x_q = quantize_activation(x_in, module.fmt, module._activation_scale(x_in))
    magnitude = x_q.abs() @ module.dequantized_weight().abs().t()
    if module.bias is not None:
        magnitude = magnitude + module.bias.float().abs()
    return module._reference_forward(x), magnitude


def assert_within_bound(out, ref, magnitude, k, weight_rounding=0.0):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    bound = (k * 2.0**-24 + weight_rounding) * magnitude + OUTPUT_ULP[ref.dtype] * ref.float().abs()
    excess = (out.float() - ref.float()).abs() - bound
    assert excess.max() <= 0, f"exceeds the bound by {excess.max().item():.3g}"


def dot_weight_rounding(name, dtype):
    """Rounding of the dequantized weight in the dot dtype, for the kernels that do that."""
    if name not in ("int4_awq", "fp8_pb_wo") or dtype == torch.float32:
        return 0.0
    if dtype == torch.float16:
        return 2.0**-11
    return 2.0**-8 if DEVICE == "cuda" else 0.0  # bf16 runs an fp32 dot in the interpreter


def test_kernels_are_interpreted_on_cpu():
    from hf_ptq_plugin.kernels.int4_gemm import int4_gemm_kernel

    expected = "JITFunction" if DEVICE == "cuda" else "InterpretedFunction"
    assert type(int4_gemm_kernel).__name__ == expected


@pytest.mark.parametrize("m, dtype", CASES, ids=[f"M{m}-{str(d)[6:]}" for m, d in CASES])
@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_matches_the_reference(name, m, dtype):
    n, k = SHAPES.get(name, DEFAULT_SHAPE)
    module = quant_linear(name, n, k, dtype)
    torch.manual_seed(1)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    ref, magnitude = reference_and_magnitude(module, x)
    assert_within_bound(triton_linear(module, x), ref, magnitude, k, dot_weight_rounding(name, dtype))


@pytest.mark.parametrize("name", ["int8_sq", "w4a8_awq", "nvfp4_awq"])
def test_uncalibrated_static_formats_use_the_live_scale(name):
    n, k = SHAPES.get(name, DEFAULT_SHAPE)
    module = quant_linear(name, n, k, torch.float32, calibrated=False)
    x = torch.randn(2, 3, k, device=DEVICE)  # leading batch dims are flattened and restored
    ref, magnitude = reference_and_magnitude(module, x)
    assert_within_bound(triton_linear(module, x), ref, magnitude, k)


def test_small_tiles_accumulate_across_m_n_and_k_tiles():
    kernels = load_kernels()
    module = quant_linear("int4_awq", 72, 192, torch.float32)
    x = torch.randn(17, 192, device=DEVICE)  # 2 M tiles of 16, 3 N tiles of 32, 3 K steps of 64
    ref, magnitude = reference_and_magnitude(module, x)
    out = kernels.int4_gemm(x, module.weight, module.weight_scale, 64, module.pre_quant_scale, module.bias,
                            block_m=16, block_n=32, block_k=64)
    assert_within_bound(out, ref, magnitude, 192)
    module = quant_linear("nvfp4", 40, 208, torch.float32)
    x = torch.randn(17, 208, device=DEVICE)
    ref, magnitude = reference_and_magnitude(module, x)
    out = kernels.nvfp4_gemm(x, module.weight, module.weight_scale, module.weight_scale_2, module.input_scale,
                             bias=module.bias, block_m=16, block_n=16, block_k=32)
    assert_within_bound(out, ref, magnitude, 208)


@pytest.mark.parametrize("fp8_dot", [True, False], ids=["fp8-dot", "fp16-dot"])
def test_fp8_gemm_dot_variants_agree(fp8_dot):
    if fp8_dot and DEVICE == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 tl.dot needs sm_89 or newer")
    module = quant_linear("fp8_pc_pt", 40, 200, torch.float32)
    x = torch.randn(5, 200, device=DEVICE)
    ref, magnitude = reference_and_magnitude(module, x)
    kernels = load_kernels()
    a, a_scale = kernels.fp8_quantize(x)
    out = kernels.fp8_gemm(a, a_scale, module.weight, module.weight_scale, torch.float32, module.bias, fp8_dot=fp8_dot)
    assert_within_bound(out, ref, magnitude, 200)


QUANTIZE_CASES = [("fp8", None, (40, 200)), ("fp8_pc_pt", None, (40, 200)), ("fp8_pb_wo", None, (256, 384)),
                  ("int4_awq", 64, (40, 192)), ("int4_awq", 128, (40, 384)), ("w4a8_awq", 128, (136, 256)),
                  ("nvfp4", None, (40, 208)), ("int8_wo", None, (40, 200)), ("mxfp8", None, (40, 224))]


@pytest.mark.parametrize("name, group, shape", QUANTIZE_CASES, ids=[f"{c[0]}-g{c[1]}" for c in QUANTIZE_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_weight_quantization_is_bit_identical(name, group, shape, dtype):
    torch.manual_seed(2)
    w = (torch.randn(shape) * 0.05).to(dtype).to(DEVICE)
    w[3] = 0  # an all-zero row: scale 1.0 in every format
    fmt = get_format(name)
    expected = quantize_weight(w, fmt, group)
    got = quantize_weight_triton(w, fmt, group)
    assert set(got) == set(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype and got[key].shape == expected[key].shape, key
        assert torch.equal(got[key].view(torch.uint8) if got[key].dtype == torch.float8_e4m3fn else got[key],
                           expected[key].view(torch.uint8) if got[key].dtype == torch.float8_e4m3fn
                           else expected[key]), key


def test_fp8_cast_rounds_every_bf16_value_like_torch():
    """All 65,280 finite bf16 values: ties, subnormals, the 448 saturation, and far beyond it."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    values = bits[torch.isfinite(bits)].float()
    values = values[: values.numel() // 256 * 256].reshape(256, -1).to(DEVICE)
    q, _ = load_kernels().fp8_quantize(values, torch.ones((), device=DEVICE))
    expected = values.clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(q.view(torch.uint8), expected.view(torch.uint8))


@triton.jit
def _round_to_dtype_kernel(x_ptr, out_ptr, n, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(out_ptr + offs, round_to_dtype(x, DTYPE), mask=offs < n)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # numpy, for values beyond fp16: inf, as torch
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_output_rounding_is_torchs_round_to_nearest_even(dtype):
    """Random fp32 bit patterns, plus exact ties between two bf16 values (low 16 bits 0x8000)."""
    torch.manual_seed(3)
    bits = torch.randint(-2**31, 2**31 - 1, (1 << 15,), dtype=torch.int64).to(torch.int32)
    ties = (bits & ~0xFFFF) | 0x8000
    x = torch.cat([bits, ties]).view(torch.float32)
    x = x[torch.isfinite(x)].to(DEVICE)
    out = torch.empty_like(x)
    _round_to_dtype_kernel[(triton.cdiv(x.numel(), 8192),)](x, out, x.numel(),
                                                            DTYPE=tl.bfloat16 if dtype == torch.bfloat16
                                                            else tl.float16, BLOCK=8192)
    assert torch.equal(out.view(torch.int32), x.to(dtype).float().view(torch.int32))


def test_dynamic_per_token_scales_match_the_reference():
    x = torch.randn(7, 200, device=DEVICE) * torch.logspace(-3, 3, 7, device=DEVICE)[:, None]
    x[2] = 0
    q, scale = load_kernels().fp8_quantize(x)
    expected_scale = torch.where(x.abs().amax(1) > 0, x.abs().amax(1) / 448, torch.ones(7, device=DEVICE))
    assert torch.equal(scale, expected_scale)
    expected = (x / expected_scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(q.view(torch.uint8), expected.view(torch.uint8))


def test_launchers_name_bad_shapes():
    kernels = load_kernels()
    module = quant_linear("int4_awq", 40, 192, torch.float32)
    with pytest.raises(ValueError, match="192"):
        kernels.int4_gemm(torch.randn(2, 100, device=DEVICE), module.weight, module.weight_scale, 64)
    with pytest.raises(ValueError, match="per channel"):
        kernels.int8_gemm(torch.randn(2, 8, device=DEVICE), torch.zeros(4, 8, dtype=torch.int8, device=DEVICE),
                          torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="BLOCK_K"):
        kernels.nvfp4_gemm(torch.randn(2, 32, device=DEVICE), torch.zeros(4, 16, dtype=torch.uint8, device=DEVICE),
                           torch.ones(4, 2, device=DEVICE).to(torch.float8_e4m3fn), torch.ones((), device=DEVICE),
                           block_k=24)
    with pytest.raises(ValueError, match="multiple of 16, got 40"):  # 2.5 blocks of 16
        kernels.nvfp4_gemm(torch.randn(2, 40, device=DEVICE), torch.zeros(4, 20, dtype=torch.uint8, device=DEVICE),
                           torch.ones(4, 2, device=DEVICE).to(torch.float8_e4m3fn), torch.ones((), device=DEVICE))


@pytest.mark.skipif(DEVICE != "cuda", reason="QuantLinear.forward takes the Triton path only for CUDA inputs")
@pytest.mark.parametrize("name", list(FORMATS))
def test_forward_on_cuda_runs_the_kernels(name):
    n, k = SHAPES.get(name, DEFAULT_SHAPE)
    module = quant_linear(name, n, k, torch.bfloat16)
    x = torch.randn(9, k, device=DEVICE, dtype=torch.bfloat16)
    ref, magnitude = reference_and_magnitude(module, x)
    assert_within_bound(module(x), ref, magnitude, k, dot_weight_rounding(name, torch.bfloat16))
