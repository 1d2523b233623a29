"""Reference numerics: exact round trips, known values, the checkpoint layout, SQNR floors."""

import pytest
import torch
from conftest import sqnr_db

from hf_ptq_plugin import FORMATS, get_format
from hf_ptq_plugin.numerics import (
    dequantize_weight,
    e2m1_codes,
    e2m1_values,
    fp8_quantize,
    int_quantize,
    pack_int4_rows,
    pack_nibbles,
    quantize_weight,
    unpack_int4_rows,
    unpack_nibbles,
    weight_buffer_specs,
)
from hf_ptq_plugin.numerics.mx import mxfp8_dequantize, mxfp8_quantize
from hf_ptq_plugin.numerics.nvfp4 import E2M1_GRID, e2m1_round
from hf_ptq_plugin.numerics.weights import fake_quantize_weight

# Floors for Gaussian weights, a few dB under what each format reaches (measured: fp8 ~31 dB,
# int8 per-channel ~42, int4 group ~20, nvfp4 ~20, mxfp8 ~31), so a broken scale or rounding fails.
SQNR_FLOOR_DB = {"fp8": 28, "fp8_pc_pt": 28, "fp8_pb_wo": 28, "int8_sq": 39, "int8_wo": 39, "int4_awq": 17,
                 "w4a8_awq": 17, "nvfp4": 17, "nvfp4_awq": 17, "w4a16_nvfp4": 17, "mxfp8": 28}


@pytest.mark.parametrize("shape", [(2, 1), (6, 7), (16, 33)])
def test_int4_row_packing_round_trip_is_exact(shape):
    q = torch.randint(-8, 8, shape, dtype=torch.int8)
    packed = pack_int4_rows(q)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0] // 2, shape[1])
    assert torch.equal(unpack_int4_rows(packed), q)


def test_int4_row_packing_matches_the_checkpoint_rule():
    """byte[j, k] = (q[2j, k] & 0xF) | ((q[2j+1, k] & 0xF) << 4), written out element by element."""
    q = torch.randint(-8, 8, (4, 5), dtype=torch.int8)
    packed = pack_int4_rows(q)
    for j in range(2):
        for k in range(5):
            expected = (int(q[2 * j, k]) & 0xF) | ((int(q[2 * j + 1, k]) & 0xF) << 4)
            assert int(packed[j, k]) == expected


@pytest.mark.parametrize("shape", [(1, 2), (3, 34), (5, 4, 16)])
def test_nibble_packing_round_trip_is_exact(shape):
    codes = torch.randint(0, 16, shape, dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (*shape[:-1], shape[-1] // 2)
    assert torch.equal(unpack_nibbles(packed), codes)
    assert int(packed.flatten()[0]) == int(codes.flatten()[0]) | (int(codes.flatten()[1]) << 4)  # even -> low nibble


def test_e2m1_known_values_ties_to_even_and_saturates():
    x = torch.tensor([0.0, 0.24, 0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, 6.0, 7.0, 100.0, -0.75, -5.5])
    expected = torch.tensor([0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, 6.0, -1.0, -6.0])
    assert torch.equal(e2m1_values(e2m1_codes(x)), expected)


def test_e2m1_rounds_to_the_nearest_grid_point():
    """Brute force: every value lands on a nearest grid point (ties checked above)."""
    x = torch.linspace(-7, 7, 2801)
    got = e2m1_values(e2m1_codes(x))
    grid = torch.tensor(E2M1_GRID)
    nearest_distance = (x.abs()[:, None].clamp(max=6) - grid[None]).abs().amin(dim=1)
    assert torch.allclose((got.abs() - x.abs().clamp(max=6)).abs(), nearest_distance, atol=1e-6)
    assert torch.all((got == 0) | (torch.sign(got) == torch.sign(x)))


def test_e2m1_codes_round_trip_every_positive_code():
    codes = torch.arange(16, dtype=torch.uint8)
    codes = codes[codes != 8]  # 8 is -0, which encodes back as +0
    assert torch.equal(e2m1_codes(e2m1_values(codes)), codes)


def test_fp8_saturates_at_448_instead_of_nan():
    q = fp8_quantize(torch.tensor([1000.0, -1e6, 448.0, 447.0]), torch.tensor(1.0))
    assert torch.equal(q.float(), torch.tensor([448.0, -448.0, 448.0, 448.0]))  # 447 rounds to 448 (RNE)


def test_integer_rounding_is_half_to_even_and_clamped():
    q = int_quantize(torch.tensor([2.5, 3.5, -2.5, 200.0, -200.0]), torch.tensor(1.0), 8)
    assert q.tolist() == [2, 4, -2, 127, -128]
    assert int_quantize(torch.tensor([9.0, -9.0]), torch.tensor(1.0), 4).tolist() == [7, -8]


@pytest.mark.parametrize("name", list(FORMATS))
def test_quantized_tensors_have_the_checkpoint_names_dtypes_and_shapes(name):
    fmt = get_format(name)
    w = torch.randn(256, 384)
    tensors = quantize_weight(w, fmt)
    specs = weight_buffer_specs(fmt, 256, 384)
    assert set(tensors) == set(specs)
    for key, (shape, dtype) in specs.items():
        assert tensors[key].shape == shape and tensors[key].dtype == dtype, key


@pytest.mark.parametrize("name", list(FORMATS))
def test_quantize_dequantize_clears_the_sqnr_floor(name):
    torch.manual_seed(0)
    w = torch.randn(256, 512) * 0.02
    fmt = get_format(name)
    assert sqnr_db(w, dequantize_weight(quantize_weight(w, fmt), fmt)) > SQNR_FLOOR_DB[name]


@pytest.mark.parametrize("name", list(FORMATS))
def test_all_zero_weight_quantizes_to_exact_zero_with_finite_scales(name):
    fmt = get_format(name)
    tensors = quantize_weight(torch.zeros(256, 256), fmt)
    assert all(torch.isfinite(t.float()).all() for t in tensors.values())
    assert torch.equal(dequantize_weight(tensors, fmt), torch.zeros(256, 256))


def test_int4_scales_are_block_amax_over_7():
    w = torch.randn(4, 256)
    tensors = quantize_weight(w, get_format("int4_awq"), group_size=64)
    expected = w.abs().view(4, 4, 64).amax(dim=-1) / 7
    assert torch.equal(tensors["weight_scale"], expected)


def test_nvfp4_scales_follow_the_two_level_rule():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    tensors = quantize_weight(w, get_format("nvfp4"))
    scale_2 = w.abs().amax() / (6 * 448)
    assert torch.equal(tensors["weight_scale_2"], scale_2)
    block_scale = (w.abs().view(8, 4, 16).amax(dim=-1) / (6 * scale_2)).clamp(2**-9, 448).to(torch.float8_e4m3fn)
    assert torch.equal(tensors["weight_scale"].float(), block_scale.float())


def test_nvfp4_global_amax_override_sets_the_shared_scale():
    w = torch.randn(8, 64)
    tensors = quantize_weight(w, get_format("nvfp4"), global_amax=torch.tensor(100.0))
    assert torch.equal(tensors["weight_scale_2"], torch.tensor(100.0) / 2688)


def test_fp8_tile_scales_are_per_128x128_tile():
    w = torch.randn(256, 384)
    w[:128, 128:256] *= 10
    scale = quantize_weight(w, get_format("fp8_pb_wo"))["weight_scale"]
    assert scale.shape == (2, 1, 3, 1)
    assert torch.equal(scale[0, 0, 1, 0], w[:128, 128:256].abs().amax() / 448)


def test_mxfp8_scales_are_powers_of_two_that_fit_the_block():
    w = torch.randn(4, 64) * 3
    q, exponents = mxfp8_quantize(w)
    step = torch.exp2(exponents.float() - 127)
    block_amax = w.abs().view(4, 2, 32).amax(dim=-1)
    assert torch.all(block_amax / step <= 448) and torch.all(block_amax / step > 224)
    assert sqnr_db(w, mxfp8_dequantize(q, exponents)) > 28


def test_w4a8_weight_is_the_int4_weight_through_fp8():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    w4a8, w4a16 = get_format("w4a8_awq"), get_format("int4_awq")
    tensors = quantize_weight(w, w4a8)
    assert torch.equal(tensors["weight_scale_2"], w.abs().amax() / 448)
    int4_only = dequantize_weight({k: v for k, v in tensors.items() if k != "weight_scale_2"}, w4a16)
    assert sqnr_db(int4_only, dequantize_weight(tensors, w4a8)) > 25  # FP8 rounding of q * scale only


@pytest.mark.parametrize("name", list(FORMATS))
def test_fake_quantize_equals_dequantize_of_quantize(name):
    torch.manual_seed(0)
    fmt = get_format(name)
    w = torch.randn(256, 384) * 0.05
    assert torch.equal(fake_quantize_weight(w, fmt), dequantize_weight(quantize_weight(w, fmt), fmt))
    amax = w.abs().amax() * 0.7
    assert torch.equal(fake_quantize_weight(w, fmt, global_amax=amax),
                       dequantize_weight(quantize_weight(w, fmt, global_amax=amax), fmt))


def test_e2m1_round_equals_the_code_round_trip_on_every_boundary():
    """GPTQ's one-column E2M1 rounding must give exactly the codes' values, ties and signed zeros too."""
    torch.manual_seed(0)
    edges = torch.tensor([0.0, 0.25, 0.75, 1.25, 1.75, 2.0, 2.5, 3.5, 4.0, 5.0, 6.0, 7.0, 1e-30, 1e30])
    near = torch.cat([edges, torch.nextafter(edges, torch.tensor(100.0)), torch.nextafter(edges, torch.tensor(-100.0))])
    y = torch.cat([near, -near, torch.arange(-80000, 80001) / 10000, torch.randn(100000) * 3])
    rounded, reference = e2m1_round(y), e2m1_values(e2m1_codes(y))
    assert torch.equal(rounded, reference)
    assert torch.equal(torch.signbit(rounded), torch.signbit(reference))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [16, 32, 64, 128])
def test_block_amax_and_abs_amax_are_the_plain_max_of_magnitudes(block, dtype):
    """The fast reductions (max_pool1d for short blocks, amax/amin over a dim) change no value."""
    from hf_ptq_plugin.numerics.scales import abs_amax, block_amax

    torch.manual_seed(0)
    x = (torch.randn(3, 40, 256) * torch.rand(256) * 5).to(dtype)
    assert torch.equal(block_amax(x, block), x.float().abs().unflatten(-1, (-1, block)).amax(dim=-1))
    for dim in (None, 1, -1):
        expected = x.float().abs().amax() if dim is None else x.float().abs().amax(dim=dim)
        assert torch.equal(abs_amax(x, dim), expected)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_fake_quantize_equals_the_round_trip_on_strided_rows_and_zero_groups(group):
    """The searches' fast INT4 path: every other row (a strided view), groups of zeros and of one value."""
    torch.manual_seed(1)
    fmt = get_format("int4_awq")
    w = torch.randn(96, 4 * group) * torch.logspace(-4, 2, 96)[:, None]
    w[3, :group] = 0
    w[5, group:2 * group] = -0.37
    rows = w[::2]
    before = rows.clone()
    expected = dequantize_weight(quantize_weight(rows.contiguous(), fmt, group), fmt, group)
    assert torch.equal(fake_quantize_weight(rows, fmt, group), expected)
    assert torch.equal(rows, before)  # the input is not rounded in place
