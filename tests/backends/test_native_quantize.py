"""The native weight quantizers (`backends/native_quantize.py`) bit for bit against the torch path.

Per format (int4_awq, w4a8_awq, int8_wo, per-tensor fp8, nvfp4) and weight dtype (bf16, fp16): odd
shapes, weights of more rows than one torch row block, ties, zeros (signed), all-equal groups,
subnormal and huge values, every finite 16-bit value; the FP8 conversion of every 16-bit input under
several scales; E2M1 ties; given per-tensor scales (fused siblings); thread counts; weights at
unaligned addresses. Non-finite weights and unsupported inputs go back to the torch path (None).
Quantizing while loading a bf16 checkpoint stores the torch path's tensors, the fused siblings' shared
per-tensor scales included.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_llama
from transformers import AutoModelForCausalLM

import hf_ptq_plugin.hf.quantize_on_load as load_time
from hf_ptq_plugin import PTQConfig
from hf_ptq_plugin import formats as F
from hf_ptq_plugin.backends import native
from hf_ptq_plugin.backends.native_quantize import abs_amax_native, quantize_weight_native
from hf_ptq_plugin.numerics.scales import abs_amax
from hf_ptq_plugin.numerics.weights import CHUNK_ELEMENTS, quantize_weight, quantize_weight_in_row_blocks

pytestmark = pytest.mark.skipif(
    native.quantize_library() is None,
    reason="no C compiler, or neither AVX-512 (BW, VL, F16C) nor AVX2 (F16C, FMA) on this machine")

FORMATS = ["int4_awq", "w4a8_awq", "int8_wo", "fp8", "nvfp4"]
DTYPES = [torch.bfloat16, torch.float16]


def bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def assert_same(native_out, reference):
    assert native_out is not None
    assert native_out.keys() == reference.keys()
    for name, expected in reference.items():
        got = native_out[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        assert torch.equal(bits(got), bits(expected)), name


def check(w, qformat, group_size=None, **kwargs):
    fmt = F.get_format(qformat)
    group_size = group_size if fmt.weight == F.INT4 else None  # the other formats' blocks are fixed
    assert_same(quantize_weight_native(w, fmt, group_size, **kwargs), quantize_weight(w, fmt, group_size, **kwargs))


def random_weight(n, k, dtype, seed=0, std=0.02):
    return (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * std).to(dtype)


def group_for(k):
    return 128 if k % 128 == 0 else 64


def all_finite_values(dtype):
    """Every finite value of the 16-bit dtype, both zeros included."""
    values = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    return values[values.float().isfinite()]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qformat", FORMATS)
@pytest.mark.parametrize("shape", [(2, 64), (34, 192), (256, 512), (6, 1024)])
def test_random_weights_match_the_torch_path(qformat, dtype, shape):
    check(random_weight(*shape, dtype), qformat, group_for(shape[1]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qformat", ["int8_wo", "fp8"])
@pytest.mark.parametrize("shape", [(1, 1), (37, 100), (5, 15), (3, 17), (1, 70000)])
def test_rows_of_any_length_match(qformat, dtype, shape):
    check(random_weight(*shape, dtype, std=1.0), qformat)


@pytest.mark.parametrize("qformat", FORMATS)
def test_a_weight_of_many_row_blocks_matches_the_load_path(qformat):
    fmt = F.get_format(qformat)
    w = random_weight(CHUNK_ELEMENTS // 512 * 3 + 2, 512, torch.bfloat16)  # more rows than one torch block
    assert_same(quantize_weight_native(w, fmt), quantize_weight_in_row_blocks(w, fmt))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qformat", FORMATS)
def test_every_finite_value_matches(qformat, dtype):
    values = all_finite_values(dtype)
    k = 128
    values = values[:len(values) // (2 * k) * 2 * k]
    by_magnitude = values[values.float().abs().argsort()].view(-1, k)  # groups of like magnitudes: many codes
    shuffled = values[torch.randperm(len(values), generator=torch.Generator().manual_seed(0))].view(-1, k)
    check(by_magnitude.contiguous(), qformat, k)
    check(shuffled.contiguous(), qformat, k)


def tie_rows(bound):
    """Two rows whose amax is `bound`, so the scale is 1.0 and every other value lies halfway between codes."""
    halves = torch.arange(-bound, bound) + 0.5
    row = torch.cat([torch.tensor([bound]), halves, torch.zeros(128 - 1 - len(halves) % 128)])[:128]
    return torch.stack([row, -row.flip(0)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qformat,bound", [("int4_awq", 7), ("w4a8_awq", 7), ("int8_wo", 127)])
def test_ties_round_half_to_even(qformat, bound, dtype):
    rows = tie_rows(bound)
    for width in (128, 64):  # int8_wo's row is its "group"
        w = rows[:, :width].to(dtype)
        if qformat == "int8_wo" or float(w.float().abs().amax(dim=1).min()) == bound:
            check(w.contiguous(), qformat, 64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_ties_between_codes_round_to_even(dtype):
    e4m3 = torch.arange(0, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # non-negative codes
    midpoints = (e4m3[:-1] + e4m3[1:]) / 2
    w = torch.cat([midpoints, -midpoints, torch.tensor([448.0])]).to(dtype)
    w = w[w.float().isfinite()]
    check(w[None].contiguous(), "fp8")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qformat", FORMATS)
def test_zeros_equal_groups_subnormals_and_huge_values(qformat, dtype):
    tiny = torch.finfo(dtype).tiny
    huge = torch.finfo(dtype).max
    rows = [torch.zeros(256), -torch.zeros(256), torch.full((256,), 0.3), torch.full((256,), -5.0),
            torch.linspace(-3, 3, 256) * tiny / 4,  # subnormals only: subnormal fp32 scales
            torch.linspace(-1, 1, 256) * huge, torch.linspace(-1, 1, 256) * tiny * 100,
            torch.cat([torch.zeros(128), torch.full((128,), tiny / 8)])]
    w = torch.stack(rows).to(dtype)
    check(w, qformat, 128)


def many_fp8_scales(count=200):
    """Ordinary and extreme scales (powers of two far out, just past them, fp32's ends, a subnormal) and
    random fp32 values log-uniform in 2**-64 to 2**64."""
    generator = torch.Generator().manual_seed(0)
    exponents = torch.empty(count, dtype=torch.float64).uniform_(-64, 64, generator=generator)
    ends = [2.0**-60, 2.0**60, math.nextafter(2.0**-60, 0), math.nextafter(2.0**60, math.inf)]
    return [*ends, 1.0, 0.5, 3.0, 1e-3, 7.1e-5, 1e30, 1e-30, 2.0**-140, *torch.exp2(exponents).float().tolist()]


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_fp8_conversion_of_every_input_under_many_given_scales(dtype):
    """Every finite input at each scale: the kernels' e4m3 rounding (one fp32 add on the AVX2 path) meets quotients
    in every binade, on the ties between codes, in the subnormal band and past 448."""
    w = all_finite_values(dtype)[None].contiguous()
    for scale in many_fp8_scales():
        check(w, "fp8", weight_scale=torch.tensor(scale))


@pytest.mark.parametrize("qformat", ["fp8", "w4a8_awq", "nvfp4"])
def test_given_per_tensor_scales_are_the_fused_groups(qformat):
    w = random_weight(64, 256, torch.bfloat16)
    fmt = F.get_format(qformat)
    if fmt.has_weight_scale_2:
        check(w, qformat, global_amax=torch.tensor(0.5))
        check(w, qformat, global_amax=torch.tensor(0.01))  # below the weight's own: saturating block scales
        check(w, qformat, global_amax=torch.tensor(1e-41))  # scale * scale_2 underflows to 0: inf and NaN quotients
    else:
        check(w, qformat, weight_scale=torch.tensor(0.5 / 448))
        check(w, qformat, weight_scale=torch.tensor(1e-6))  # most codes saturate at 448


@pytest.mark.parametrize("dtype", DTYPES)
def test_nvfp4_ties_between_e2m1_values_round_to_even(dtype):
    block = torch.tensor([6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5, -0.0])
    w = torch.stack([block, block.flip(0)]).to(dtype)
    check(w, "nvfp4", global_amax=torch.tensor(6 * 448.0))  # scale_2 1, block scales 1: every quotient as written
    check(w, "nvfp4")


@pytest.mark.parametrize("qformat", FORMATS)
def test_thread_counts_and_unaligned_weights_give_the_same_bits(qformat):
    w = random_weight(130, 384, torch.bfloat16)
    fmt = F.get_format(qformat)
    raw = torch.empty(w.numel() + 7, dtype=torch.bfloat16)
    moved = raw[3:3 + w.numel()].view(w.shape).copy_(w)  # 6 bytes past an allocation
    reference = quantize_weight(w, fmt, 128)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            assert_same(quantize_weight_native(w, fmt, 128), reference)
            assert_same(quantize_weight_native(moved, fmt, 128), reference)
    finally:
        torch.set_num_threads(threads)


def test_the_fp8_kernel_writes_only_its_codes_around_prefaulted_pages():
    """The kernels map their output's whole pages before writing: around an output that starts and ends mid-page,
    the neighbouring bytes keep their values, and the codes are the torch path's."""
    lib = native.quantize_library()
    w = random_weight(3, 4096 + 5, torch.bfloat16)
    buffer = torch.full((w.numel() + 3 * 4096,), 0xA5, dtype=torch.uint8)
    start = 4096 - 7  # the codes begin 7 bytes before a page boundary and end mid-page
    reference = quantize_weight(w, F.get_format("fp8"))
    lib.hfptq_quantize_fp8(w.data_ptr(), w.numel(), reference["weight_scale"].item(), 0, buffer.data_ptr() + start, 2)
    assert torch.equal(buffer[start:start + w.numel()].view(w.shape), reference["weight"].view(torch.uint8))
    assert bool((buffer[:start] == 0xA5).all()) and bool((buffer[start + w.numel():] == 0xA5).all())


@pytest.mark.parametrize("qformat", FORMATS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_go_to_the_torch_path(qformat, bad):
    w = random_weight(4, 256, torch.bfloat16)
    w[3, 200] = bad
    assert quantize_weight_native(w, F.get_format(qformat), 128) is None


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_unusable_given_fp8_scales_go_to_the_torch_path(scale):
    w = random_weight(4, 256, torch.bfloat16)
    assert quantize_weight_native(w, F.get_format("fp8"), weight_scale=torch.tensor(scale)) is None


def test_inputs_the_kernels_do_not_cover_go_to_the_torch_path():
    w = random_weight(8, 256, torch.bfloat16)
    int4 = F.get_format("int4_awq")
    assert quantize_weight_native(w.float(), int4) is None  # fp32 weights
    assert quantize_weight_native(w.t(), int4) is None  # not contiguous
    assert quantize_weight_native(w[:7], int4) is None  # an odd row count: the torch path decides
    assert quantize_weight_native(w, int4, weight_scale=torch.ones(8, 2)) is None  # searched scales
    assert quantize_weight_native(w, F.get_format("nvfp4"), weight_scale=torch.ones(8, 16)) is None
    assert quantize_weight_native(w[:, :24], F.get_format("nvfp4")) is None  # not whole 16-blocks
    assert quantize_weight_native(w, F.get_format("mxfp8")) is None
    assert quantize_weight_native(w, F.get_format("fp8_pc_pt")) is None
    assert quantize_weight_native(w[None], F.get_format("fp8")) is None  # not 2-D


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_amax_pass_matches_torch(dtype):
    values = all_finite_values(dtype)
    for w in (values[None], values[:-5].view(-1, 1), random_weight(300, 77, dtype), -torch.zeros(3, 5, dtype=dtype)):
        assert torch.equal(abs_amax_native(w.contiguous()), abs_amax(w))
    w = random_weight(4, 8, dtype)
    w[1, 2] = float("nan")
    assert abs_amax_native(w) is None


def test_a_default_meta_device_does_not_reach_the_kernels():
    w = random_weight(64, 256, torch.bfloat16)
    with torch.device("meta"):
        for qformat in FORMATS:
            out = quantize_weight_native(w, F.get_format(qformat))
            assert all(t.device.type == "cpu" for t in out.values())
        assert abs_amax_native(w).device.type == "cpu"
    for qformat in FORMATS:
        check(w, qformat)


def test_the_switch_turns_the_quantizers_off():
    code = "from hf_ptq_plugin.backends import native; print(native.quantize_library() is None)"
    env = dict(os.environ, HF_PTQ_PLUGIN_NATIVE="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize("qformat", FORMATS)
def test_loading_with_the_kernels_stores_the_torch_paths_tensors(qformat, tmp_path, monkeypatch):
    source = tmp_path / "src"
    tiny_llama().to(torch.bfloat16).save_pretrained(source)
    calls = []

    def counted(*args):
        out = quantize_weight_native(*args)
        calls.append(out is not None)
        return out

    def load():
        config = PTQConfig(qformat=qformat)
        return AutoModelForCausalLM.from_pretrained(source, quantization_config=config).state_dict()

    monkeypatch.setattr(load_time, "quantize_weight_native", counted)
    with_kernels = load()
    assert len(calls) == 14 and all(calls)  # every Linear of the 2 layers
    monkeypatch.setattr(native, "quantize_library", lambda: None)
    reference = load()
    assert with_kernels.keys() == reference.keys()
    for name, expected in reference.items():
        assert with_kernels[name].dtype == expected.dtype, name
        assert torch.equal(bits(with_kernels[name]), bits(expected)), name
