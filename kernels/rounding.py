"""Triton device functions shared by the kernels: exact rounding onto the low-precision grids.

Every function here is written with fp32 integer/bit arithmetic only, so it gives the same bits
as the pure-torch reference (`hf_ptq_plugin.numerics`) on a GPU *and* under Triton's
interpreter, which gets several native casts wrong (measured: fp32 -> float8_e4m3fn loses the
rounding carry in 2.5% of values and does not saturate; fp32 -> bf16 truncates instead of
rounding to nearest even). Values come back as fp32 that lie exactly on the target grid, so the
final `.to(fp8/bf16)` cast in a kernel is exact on every backend.

Imports only triton.
"""

import triton
import triton.language as tl

# 1.5 * 2**23: adding and subtracting it rounds an fp32 |y| < 2**22 to an integer, ties to even,
# using the FPU's own round-to-nearest-even (no libdevice.rint, which the interpreter lacks).
# Globals read by jit code must be tl.constexpr instances: the compiler rejects plain (even
# `: tl.constexpr`-annotated) floats, which only the interpreter accepts.
RNE_MAGIC = tl.constexpr(12582912.0)
FP8_E4M3_MAX = tl.constexpr(448.0)


@triton.jit
def round_half_even(y):
    """fp32 -> nearest integer (ties to even) as fp32; valid for |y| < 2**22 (callers clamp first)."""
    return (y + RNE_MAGIC) - RNE_MAGIC


@triton.jit
def pow2(e):
    """2**e as fp32 for int32 e in [-126, 127], built from the exponent bits (exact)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def fp8_e4m3_round(v):
    """Nearest float8_e4m3fn value of fp32 `v` (ties to even, saturating at +-448), as fp32.

    The grid step of e4m3 at |v| in [2**e, 2**(e+1)) is 2**(e-3) (3 mantissa bits), and 2**-9
    below the smallest normal 2**-6. Dividing by a power of two is exact, so rounding v / step
    to an integer and scaling back rounds v exactly as an IEEE cast would.
    """
    sign = v.to(tl.uint32, bitcast=True) & 0x80000000
    magnitude = tl.minimum(tl.abs(v), FP8_E4M3_MAX)
    exponent = tl.maximum(((magnitude.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    rounded = round_half_even(magnitude * pow2(3 - exponent)) * pow2(exponent - 3)
    # Put the sign back as a bit: tiny negatives round to -0, as torch's cast gives them.
    return (rounded.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def bf16_round(v):
    """Nearest bfloat16 value of fp32 `v` (ties to even), as fp32 (finite inputs).

    Keep the top 16 bits after adding 0x7FFF plus the lowest kept bit: the classic RNE on bits.
    """
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def round_to_dtype(v, dtype: tl.constexpr):
    """Round fp32 `v` to `dtype` (float32, float16 or bfloat16) and return it as fp32.

    Used where the reference computes in the activation dtype (x * pre_quant_scale) and on the
    final store; fp16 casts are correct in the interpreter, bf16 ones are emulated.
    """
    if dtype == tl.bfloat16:
        return bf16_round(v)
    elif dtype == tl.float16:
        return v.to(tl.float16).to(tl.float32)
    else:
        return v


@triton.jit
def e2m1_index(m):
    """Magnitude index 0..7 on the E2M1 grid {0, .5, 1, 1.5, 2, 3, 4, 6} of |y| = m (fp32).

    Thresholds of the reference (`numerics.nvfp4.e2m1_codes`): ties go to the even mantissa,
    so the comparisons alternate between > and >=; saturates at 6.
    """
    return ((m > 0.25).to(tl.int32) + (m >= 0.75).to(tl.int32) + (m > 1.25).to(tl.int32)
            + (m >= 1.75).to(tl.int32) + (m > 2.5).to(tl.int32) + (m >= 3.5).to(tl.int32)
            + (m > 5.0).to(tl.int32))


@triton.jit
def e2m1_magnitude(index):
    """E2M1 grid value of magnitude index 0..7 as fp32: 0, .5, 1, 1.5, 2, 3, 4, 6."""
    low = index.to(tl.float32) * 0.5  # indices 0-3 are evenly spaced by 0.5
    high = (2 + (index & 1)).to(tl.float32) * pow2((index >> 1) - 2)  # 4->2, 5->3, 6->4, 7->6
    return tl.where(index < 4, low, high)


@triton.jit
def e2m1_decode(code):
    """4-bit code (bit 3 sign, bits 0-2 magnitude index) -> signed fp32 value."""
    magnitude = e2m1_magnitude(code & 0x7)
    return tl.where((code & 0x8) != 0, -magnitude, magnitude)


@triton.jit
def int4_decode(nibble):
    """Unsigned nibble 0..15 holding a two's complement int4 -> signed int32 in [-8, 7]."""
    return (nibble ^ 8) - 8
