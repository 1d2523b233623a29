"""The native dequantize-GEMV kernels (`backends/native.py`) against pure-torch decodes of the same codes.

Every e4m3 code (subnormals and signs included, not NaN), every e2m1 code under every finite e4m3 block
scale, every int8 code, every signed INT4 code (also times W4A8 ratios, rounded to e4m3 as torch casts), MXFP8 block
exponents and fp8_pb_wo tile scales; row counts on both sides of
NATIVE_GEMV_ROWS and weights of more rows than one decoded chunk; codes at odd byte offsets, as a
memory-mapped checkpoint holds them. W8A8's int8 x int8 kernel against torch._int_mm, bit for bit.
"""

import os
import subprocess
import sys

import pytest
import torch

from hf_ptq_plugin.backends import native
from hf_ptq_plugin.backends.cpu_linear import NATIVE_GEMV_ROWS
from hf_ptq_plugin.numerics import fp8_quantize
from hf_ptq_plugin.numerics.integer import pack_int4_rows, unpack_int4_rows
from hf_ptq_plugin.numerics.nvfp4 import e2m1_values, pack_nibbles

pytestmark = pytest.mark.skipif(native.library() is None,
                                reason="no C compiler, or neither AVX-512 nor AVX2 (+F16C, FMA) on this machine")

FINITE_E4M3 = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
N, K = 2 * native.CHUNK_ROWS + 48, 256  # three decoded chunks, the last one partial


def e4m3(codes):
    return codes.view(torch.float8_e4m3fn).float()


def random_codes(pool, shape, seed):
    index = torch.randint(0, len(pool), shape, generator=torch.Generator().manual_seed(seed))
    return pool[index]


def fp8_case(seed=0):
    codes = random_codes(FINITE_E4M3, (N, K), seed)
    codes[0, :len(FINITE_E4M3)] = FINITE_E4M3  # every code at least once
    return (codes, None, 0), e4m3(codes)


def int8_case(seed=0):
    codes = torch.randint(-128, 128, (N, K), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    return (codes.view(torch.uint8), None, 0), codes.float()


def nvfp4_case(seed=0, k=K):
    codes = torch.randint(0, 16, (N, k), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    block_scales = random_codes(FINITE_E4M3[FINITE_E4M3 < 0x80], (N, k // 16), seed + 1)  # scales are positive
    weight = e2m1_values(codes) * e4m3(block_scales).repeat_interleave(16, dim=1)
    return (pack_nibbles(codes), block_scales, 0), weight


def int4_case(seed=0, group=32, k=K):
    q = torch.randint(-8, 8, (N, k), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    scales = torch.rand(N, k // group, generator=torch.Generator().manual_seed(seed + 1)) + 1e-3
    return (pack_int4_rows(q), scales, group), q.float() * scales.repeat_interleave(group, dim=1)


def w4a8_case(seed=0, group=32, k=K):
    (codes, ratios, _), _ = int4_case(seed, group, k)
    ratios = ratios * torch.logspace(-4, 4, N)[:, None]  # products across e4m3's normal and subnormal ranges
    products = unpack_int4_rows(codes).float() * ratios.repeat_interleave(group, dim=1)
    return (codes, ratios, group), fp8_quantize(products, torch.ones(())).float()  # clamped to 448, then cast


def mxfp8_case(seed=0):
    (codes, _, _), weight = fp8_case(seed)
    exponents = torch.randint(100, 155, (N, K // 32), generator=torch.Generator().manual_seed(seed + 1),
                              dtype=torch.uint8)  # block scales 2**-27 .. 2**27
    return (codes, exponents, 0), weight * torch.exp2(exponents.float() - 127).repeat_interleave(32, dim=1)


def fp8_tiles_case(seed=0, tile=128):
    (codes, _, _), weight = fp8_case(seed)
    scales = torch.rand(-(-N // tile), K // tile, generator=torch.Generator().manual_seed(seed + 1)) + 1e-3
    return (codes, scales, tile), weight * scales.repeat_interleave(tile, 0)[:N].repeat_interleave(tile, 1)


CASES = {"fp8": fp8_case, "int8": int8_case, "nvfp4": nvfp4_case, "int4": int4_case, "w4a8": w4a8_case,
         "mxfp8": mxfp8_case, "fp8_tiles": fp8_tiles_case}


def fp32_sums_bound(x, weight):
    return (x.shape[1] + 1) * 2.0**-24 * (x.double().abs() @ weight.double().abs().t())  # fp32 sums, any order


def product(layout, x, args):
    codes, scales, group = args  # (codes, scales or None, INT4 group size or 0)
    multiply = native.gemv if x.shape[0] <= NATIVE_GEMV_ROWS else native.matmul_by_chunks
    return multiply(layout, x, codes, N, scales, group)


@pytest.mark.parametrize("rows", [1, 3, NATIVE_GEMV_ROWS, NATIVE_GEMV_ROWS + 1, 40])
@pytest.mark.parametrize("layout", list(CASES))
def test_products_equal_the_decoded_weights_within_fp32_summation(layout, rows):
    args, weight = CASES[layout]()
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(3))
    y = product(layout, x, args)
    exact = x.double() @ weight.double().t()
    assert y.dtype == torch.float32 and y.shape == (rows, N) and y.is_contiguous()
    assert ((y.double() - exact).abs() <= fp32_sums_bound(x, weight)).all()


@pytest.mark.parametrize("layout", list(CASES))
def test_many_rows_decode_wider_chunks_into_their_own_buffer(monkeypatch, layout):
    """From WIDE_CHUNK_MIN_ROWS rows on: chunks of as many CHUNK_ROWS as WIDE_CHUNK_ELEMENTS hold (here
    two, so N's rows are one wide chunk and a partial one), the same products, and no larger scratch buffer."""
    monkeypatch.setattr(native, "WIDE_CHUNK_MIN_ROWS", 40)
    monkeypatch.setattr(native, "WIDE_CHUNK_ELEMENTS", 2 * native.CHUNK_ROWS * K + 1)
    assert native._chunk_rows(40, N, K) == 2 * native.CHUNK_ROWS and native._chunk_rows(39, N, K) == native.CHUNK_ROWS
    args, weight = CASES[layout]()
    x = torch.randn(40, K, generator=torch.Generator().manual_seed(3))
    scratch = native.scratch_bytes()
    y = native.matmul_by_chunks(layout, x, args[0], N, args[1], args[2])
    assert ((y.double() - x.double() @ weight.double().t()).abs() <= fp32_sums_bound(x, weight)).all()
    assert native.scratch_bytes() == scratch


def test_wide_chunks_stop_at_the_weights_rows():
    assert native._chunk_rows(4096, 300, 64) == 2 * native.CHUNK_ROWS  # 300 rows: two CHUNK_ROWS cover them
    assert native._chunk_rows(4096, 14336, 14336) == 4 * native.CHUNK_ROWS  # 2**24 / 14336 = 1170 rows


def four_bit_case(layout, group, k):
    if layout == "nvfp4":
        return nvfp4_case(k=k)
    if layout == "w4a8":
        return w4a8_case(group=group, k=k)
    (codes, scales, _), _ = int4_case(group=group, k=k)
    scales[::5] *= 2.0**-110  # below 2**-98: the AVX2 one-row loop decodes these groups another way
    return (codes, scales, group), unpack_int4_rows(codes).float() * scales.repeat_interleave(group, dim=1)


@pytest.mark.parametrize("rows", [1, 3, NATIVE_GEMV_ROWS + 1])
@pytest.mark.parametrize("layout, group, k", [("int4", group, 576) for group in (16, 32, 48, 64, 192)]
                         + [("w4a8", 48, 576)] + [("nvfp4", 0, k) for k in (16, 48, 144)])
def test_4bit_group_sizes_and_odd_block_counts(layout, group, k, rows):
    """INT4 groups of 1 to 12 steps of 16 weights, NVFP4 rows of an odd number of 16-blocks: products and decodes."""
    (codes, scales, group), weight = four_bit_case(layout, group, k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(3))
    y = native.gemv(layout, x, codes, N, scales, group)
    assert ((y.double() - x.double() @ weight.double().t()).abs() <= fp32_sums_bound(x, weight)).all()
    assert torch.equal(native.decode(layout, codes, N, k, scales, group), weight)


@pytest.mark.parametrize("layout", list(CASES))
def test_decoding_gives_the_weight_exactly(layout):
    args, weight = CASES[layout]()
    codes, scales, group = args
    assert torch.equal(native.decode(layout, codes, N, K, scales, group), weight)  # code x scales in fp32


def at_odd_offset(t, offset=3):
    nbytes = t.numel() * t.element_size()
    raw = torch.empty(nbytes + 16, dtype=torch.uint8)[offset:offset + nbytes]
    return raw.view(t.dtype).view(t.shape).copy_(t)


def test_codes_at_odd_byte_offsets_give_the_same_products():
    args, _ = fp8_case()
    x = torch.randn(2, K)
    moved = at_odd_offset(args[0])
    assert moved.data_ptr() % 4
    assert torch.equal(native.gemv("fp8", x, moved, N), native.gemv("fp8", x, args[0], N))


def int8_codes(shape, seed):
    codes = torch.randint(-128, 128, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    codes.view(-1)[:2] = torch.tensor([-128, 127], dtype=torch.int8)  # both ends of the range at least once
    return codes


@pytest.mark.parametrize("k", [16, 48, 4096])
@pytest.mark.parametrize("rows", [1, 3, 9, 17])
def test_w8a8_equals_torch_int_mm_exactly(rows, k):
    x, w = int8_codes((rows, k), 1), int8_codes((37, k), 2)
    y = native.w8a8(x, w)
    assert y.dtype == torch.int32 and y.shape == (rows, 37)
    assert torch.equal(y, torch._int_mm(x, w.t()))


def test_w8a8_sums_are_exact_up_to_its_largest_k():
    k = native.W8A8_MAX_K
    assert k % native.BLOCK == 0 and k * 128 * 128 < 2**31 <= (k + native.BLOCK) * 128 * 128
    x = torch.full((2, k), -128, dtype=torch.int8)
    x[1, ::2] = 127
    w = torch.full((3, k), -128, dtype=torch.int8)
    w[1] = 127
    w[2, 1::2] = 127
    y = native.w8a8(x, w)
    assert y[0, 0] == k * 128 * 128  # the largest sum there is: 2**31 - 2**18
    assert torch.equal(y, torch._int_mm(x, w.t()))
    assert torch.equal(y.double(), x.double() @ w.double().t())


def test_w8a8_reads_codes_at_odd_byte_offsets():
    x, w = int8_codes((3, 96), 1), int8_codes((37, 96), 2)
    x_moved, w_moved = at_odd_offset(x), at_odd_offset(w, offset=5)
    assert x_moved.data_ptr() % 4 and w_moved.data_ptr() % 4
    assert torch.equal(native.w8a8(x_moved, w_moved), torch._int_mm(x, w.t()))


def test_the_switch_turns_the_kernels_off():
    code = "from hf_ptq_plugin.backends import native; print(native.library() is None)"
    env = dict(os.environ, HF_PTQ_PLUGIN_NATIVE="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_a_failed_build_falls_back_and_leaves_no_file(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    native.library.cache_clear()
    try:
        assert native.library() is None
    finally:
        monkeypatch.undo()
        native.library.cache_clear()
    assert "could not build the native CPU kernels" in caplog.text
    assert not any(p.is_file() for p in tmp_path.rglob("*"))
    assert native.library() is not None  # the real build is found again in the user's cache


def test_a_new_build_leaves_only_the_newest_builds(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = tmp_path / "hf_ptq_plugin" / "native"
    cache.mkdir(parents=True)
    for age in range(5):  # earlier builds, old0 the newest of them
        stale = cache / f"native_gemv-old{age}.so"
        stale.write_bytes(b"")
        os.utime(stale, (1000 - age, 1000 - age))
    native.library.cache_clear()
    try:
        assert native.library() is not None
    finally:
        monkeypatch.undo()
        native.library.cache_clear()
    kept = {path.name for path in cache.iterdir()}
    assert len(kept) == native.KEPT_BUILDS and {"native_gemv-old0.so", "native_gemv-old1.so"} < kept
