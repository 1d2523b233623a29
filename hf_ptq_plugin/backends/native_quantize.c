/* Round-to-nearest weight quantizers that read a bf16 or fp16 weight and write its checkpoint tensors.

   Built with `native_gemv.c` into one library by `native.py`, called through `native_quantize.py`. Each
   kernel computes exactly what the torch reference (`numerics.weights.quantize_weight`) computes, in the
   same fp32 operations, so the tensors are bit-identical: the weight widened to fp32 (exact), divided by
   its fp32 scale (a true division, as torch divides; never a multiply by the reciprocal), rounded half
   to even (`_mm512_roundscale_ps`, as `torch.round`), clamped, converted. Scales are amax / bound in fp32,
   1.0 for an all-zero group, row or tensor (`numerics.scales.scale_from_amax`).

   max |w| is taken on the 16-bit patterns: with the sign bit cleared, bf16 and fp16 patterns of finite
   values order as their magnitudes, so an integer max over 32 lanes at a time gives the amax without a
   conversion, and NaN and infinity order above every finite value. Every kernel returns that maximum
   pattern over what it read, so the caller sees a non-finite weight (and then takes the torch path,
   whose NaN handling it does not reproduce) and, for free, the tensor amax.

   Each kernel reads the weight once; a per-tensor scale from the weight's own amax (FP8's scale, NVFP4's
   second-level scale) needs one more pass before, `hfptq_amax16`. Work is split across `threads` OpenMP
   threads: row pairs for INT4 (two output rows share a byte row), rows for INT8 and NVFP4, blocks of
   elements for per-tensor FP8.

   Two paths with the same functions and bits: AVX-512 (BW, VL) with F16C, and AVX2 with F16C and FMA on
   8-lane vectors (`_mm256_round_ps` rounds half to even as well); `hfptq_quantize_simd_width` says which
   was built (16, 8; 0 for neither, then the library holds no quantizers).
*/
#include <stdint.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#if (defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__)) || \
    (defined(__AVX2__) && defined(__F16C__) && defined(__FMA__))
#include <immintrin.h>

#define FP8_BLOCK 65536 /* elements per OpenMP work item of the per-tensor passes */

/* Scalar helpers of both paths. */
static inline float value_of_bits(uint32_t bits, const int fp16) {
    if (fp16) return _cvtsh_ss((unsigned short)bits);
    union { uint32_t u; float f; } v;
    v.u = bits << 16;
    return v.f;
}

/* `scale_from_amax`: amax / bound in fp32, 1.0 for a zero amax. */
static inline float scale_of_bits(uint32_t bits, float bound, const int fp16) {
    float amax = value_of_bits(bits, fp16);
    return amax > 0.0f ? amax / bound : 1.0f;
}

/* `e4m3_codes` (below) for one finite value in [2**-9, 448] (an NVFP4 block scale, already clamped). */
static inline uint8_t e4m3_code(float v) {
    union { float f; uint32_t u; } x = {v};
    if (x.u < (121u << 23)) {
        union { float f; uint32_t u; } shifted = {v + 16384.0f};
        return (uint8_t)(shifted.u - (141u << 23));
    }
    return (uint8_t)((x.u + ((uint32_t)(7 - 127) << 23) + 0x7FFFFu + ((x.u >> 20) & 1u)) >> 20);
}

/* An NVFP4 block's e4m3 scale code from its amax pattern: e4m3(clamp(amax / (6 * scale_2) or 1 when 0, 2**-9, 448)),
   `denominator` being the fp32 6 * scale_2. */
static inline uint8_t nvfp4_block_code(uint32_t amax_bits, float denominator, const int fp16) {
    float block = value_of_bits(amax_bits, fp16) / denominator;
    block = block == 0.0f ? 1.0f : block;
    block = block < 1.0f / 512.0f ? 1.0f / 512.0f : (block > 448.0f ? 448.0f : block);
    return e4m3_code(block);
}

/* The value of a non-negative e4m3 code: (8 + m) * 2**(e - 10), or m * 2**-9 for e = 0; exact in fp32. */
static inline float e4m3_value_of(uint8_t c) {
    int e = (c >> 3) & 15, m = c & 7;
    if (e == 0) return (float)m * (1.0f / 512.0f);
    union { uint32_t u; float f; } power = {(uint32_t)(e - 10 + 127) << 23};
    return (float)(8 + m) * power.f;
}

#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__)
#define HFPTQ_QUANTIZE_SIMD_WIDTH 16

static inline __m512 widen16(__m256i h, const int fp16) {
    if (fp16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); /* bf16: an fp32's high half */
}

static inline __m512 load16(const uint16_t *p, const int fp16) {
    return widen16(_mm256_loadu_si256((const __m256i *)p), fp16);
}

/* The first n (< 16) weights of p, zeros after: a row or tensor whose length is not a multiple of 16. */
static inline __m512 load16_tail(const uint16_t *p, int64_t n, const int fp16) {
    return widen16(_mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), p), fp16);
}

static inline uint32_t reduce_max_u16_256(__m256i a) {
    __m128i b = _mm_max_epu16(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    __m128i smallest_complement = _mm_minpos_epu16(_mm_xor_si128(b, _mm_set1_epi16(-1)));
    return 0xFFFFu ^ ((uint32_t)_mm_cvtsi128_si32(smallest_complement) & 0xFFFFu);
}

static inline uint32_t reduce_max_u16(__m512i m) {
    return reduce_max_u16_256(_mm256_max_epu16(_mm512_castsi512_si256(m), _mm512_extracti64x4_epi64(m, 1)));
}

/* max over n 16-bit weights of their pattern without the sign bit (see the top). */
static inline uint32_t amax_bits(const uint16_t *p, int64_t n) {
    const __m512i magnitude = _mm512_set1_epi16(0x7FFF);
    __m512i m = _mm512_setzero_si512();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) m = _mm512_max_epu16(m, _mm512_and_si512(_mm512_loadu_si512(p + i), magnitude));
    if (i < n) {
        __mmask32 tail = (__mmask32)((1ull << (n - i)) - 1);
        m = _mm512_max_epu16(m, _mm512_and_si512(_mm512_maskz_loadu_epi16(tail, p + i), magnitude));
    }
    return reduce_max_u16(m);
}

/* round-half-even(x / scale) clamped to [low, high], as int32 lanes (`numerics.integer.int_quantize`). */
static inline __m512i int_codes(__m512 x, __m512 scale, float low, float high) {
    __m512 r = _mm512_roundscale_ps(_mm512_div_ps(x, scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r, _mm512_set1_ps(low)), _mm512_set1_ps(high)));
}

/* INT4, one pair of rows: byte k of the output row holds row 0's code in its low nibble and row 1's in its
   high nibble (`numerics.integer.pack_int4_rows`); each group's scale goes to s0 / s1. */
static inline __attribute__((always_inline)) uint32_t int4_row_pair(const uint16_t *r0, const uint16_t *r1,
                                                                    int64_t K, int64_t group, uint8_t *out,
                                                                    float *s0, float *s1, const int fp16) {
    uint32_t seen = 0;
    for (int64_t g = 0; g < K; g += group) {
        uint32_t a0 = amax_bits(r0 + g, group), a1 = amax_bits(r1 + g, group);
        seen = a0 > seen ? a0 : seen;
        seen = a1 > seen ? a1 : seen;
        float scale0 = scale_of_bits(a0, 7.0f, fp16), scale1 = scale_of_bits(a1, 7.0f, fp16);
        s0[g / group] = scale0;
        s1[g / group] = scale1;
        const __m512 v0 = _mm512_set1_ps(scale0), v1 = _mm512_set1_ps(scale1);
        const __m512i nibble = _mm512_set1_epi32(0xF);
        for (int64_t k = g; k < g + group; k += 16) {
            __m512i low = _mm512_and_si512(int_codes(load16(r0 + k, fp16), v0, -8.0f, 7.0f), nibble);
            __m512i high = _mm512_slli_epi32(int_codes(load16(r1 + k, fp16), v1, -8.0f, 7.0f), 4);
            _mm_storeu_si128((__m128i *)(out + k), _mm512_cvtepi32_epi8(_mm512_or_si512(low, high)));
        }
    }
    return seen;
}

static inline __attribute__((always_inline)) uint32_t int8_row(const uint16_t *row, int64_t K, int8_t *out,
                                                               float *scale, const int fp16) {
    uint32_t a = amax_bits(row, K);
    *scale = scale_of_bits(a, 127.0f, fp16);
    const __m512 s = _mm512_set1_ps(*scale);
    int64_t k = 0;
    for (; k + 16 <= K; k += 16)
        _mm_storeu_si128((__m128i *)(out + k), _mm512_cvtepi32_epi8(int_codes(load16(row + k, fp16), s, -128.0f,
                                                                              127.0f)));
    if (k < K) {
        __m512i q = int_codes(load16_tail(row + k, K - k, fp16), s, -128.0f, 127.0f);
        _mm_mask_storeu_epi8(out + k, (__mmask16)((1u << (K - k)) - 1), _mm512_cvtepi32_epi8(q));
    }
    return a;
}

/* e4m3 codes of finite fp32 lanes already clamped to +-448, rounded to nearest even like torch's cast to
   float8_e4m3fn (c10's fp8e4m3fn_from_fp32_value): normal results keep 3 mantissa bits by an integer add
   of half an ulp (plus one when the kept mantissa is odd) and a shift that also rebiases the exponent;
   below 2**-6 an fp32 add of 2**14 rounds |v| to a multiple of 2**-9, whose count is the subnormal code. */
static inline __m128i e4m3_codes(__m512 v) {
    __m512i bits = _mm512_castps_si512(v);
    __m512i sign = _mm512_and_si512(bits, _mm512_set1_epi32((int)0x80000000u));
    __m512i magnitude = _mm512_xor_si512(bits, sign);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(magnitude, 20), _mm512_set1_epi32(1));
    __m512i rebias = _mm512_set1_epi32((int)(((uint32_t)(7 - 127) << 23) + 0x7FFFFu));
    __m512i normal = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(magnitude, rebias), odd), 20);
    __m512 shifted = _mm512_add_ps(_mm512_castsi512_ps(magnitude), _mm512_set1_ps(16384.0f));
    __m512i subnormal = _mm512_sub_epi32(_mm512_castps_si512(shifted), _mm512_set1_epi32(141 << 23));
    __mmask16 small = _mm512_cmplt_epu32_mask(magnitude, _mm512_set1_epi32(121 << 23));
    __m512i code = _mm512_or_si512(_mm512_mask_blend_epi32(small, normal, subnormal), _mm512_srli_epi32(sign, 24));
    return _mm512_cvtepi32_epi8(code);
}

/* `numerics.fp8.fp8_quantize`: x / scale clamped to +-448, to e4m3. */
static inline __m128i fp8_codes(__m512 x, __m512 scale) {
    __m512 y = _mm512_div_ps(x, scale);
    return e4m3_codes(_mm512_min_ps(_mm512_max_ps(y, _mm512_set1_ps(-448.0f)), _mm512_set1_ps(448.0f)));
}

/* One block of per-tensor FP8, with the block's largest magnitude pattern taken from the same loads. */
static inline __attribute__((always_inline)) uint32_t fp8_block(const uint16_t *w, int64_t n, float scale,
                                                                uint8_t *out, const int fp16) {
    const __m512 s = _mm512_set1_ps(scale);
    const __m256i magnitude = _mm256_set1_epi16(0x7FFF);
    __m256i m = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)(w + i));
        m = _mm256_max_epu16(m, _mm256_and_si256(h, magnitude));
        _mm_storeu_si128((__m128i *)(out + i), fp8_codes(widen16(h, fp16), s));
    }
    if (i < n) {
        __mmask16 tail = (__mmask16)((1u << (n - i)) - 1);
        __m256i h = _mm256_maskz_loadu_epi16(tail, w + i);
        m = _mm256_max_epu16(m, _mm256_and_si256(h, magnitude));
        _mm_mask_storeu_epi8(out + i, tail, fp8_codes(widen16(h, fp16), s));
    }
    return reduce_max_u16_256(m);
}

/* E2M1 codes (sign in bit 3) of 16 fp32 lanes, as `numerics.nvfp4.e2m1_codes`: the index counts the grid
   midpoints |y| passes, ties going to the even grid point (> then >= in turn); NaN gives 0 as there. */
static inline __m512i e2m1_codes16(__m512 y) {
    static const float midpoints[7] = {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f};
    const __m512i one = _mm512_set1_epi32(1);
    __m512 m = _mm512_abs_ps(y);
    __m512i index = _mm512_setzero_si512();
    for (int i = 0; i < 7; i++) {
        __mmask16 past = (i % 2) ? _mm512_cmp_ps_mask(m, _mm512_set1_ps(midpoints[i]), _CMP_GE_OQ)
                                 : _mm512_cmp_ps_mask(m, _mm512_set1_ps(midpoints[i]), _CMP_GT_OQ);
        index = _mm512_mask_add_epi32(index, past, index, one);
    }
    __mmask16 negative = _mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_LT_OQ);
    return _mm512_mask_or_epi32(index, negative, index, _mm512_set1_epi32(8));
}

/* 16 codes (one per int32 lane) to 8 bytes, element 2j in the low nibble of byte j (`pack_nibbles`): each
   64-bit lane holds an even element in its low half and the next odd one in its high half. */
static inline void store_nibbles16(uint8_t *out, __m512i codes) {
    __m512i pairs = _mm512_or_si512(codes, _mm512_srli_epi64(codes, 28));
    _mm_storel_epi64((__m128i *)out, _mm512_cvtepi64_epi8(pairs));
}

/* One NVFP4 row: per 16-weight block, scale = e4m3(clamp(amax / (6 * scale_2) or 1 when 0, 2**-9, 448)),
   codes = e2m1(x / (scale * scale_2)) (`numerics.nvfp4.nvfp4_quantize`). `denominator` is the fp32 6 * scale_2. */
static inline __attribute__((always_inline)) uint32_t nvfp4_row(const uint16_t *row, int64_t K, float scale_2,
                                                                float denominator, uint8_t *codes,
                                                                uint8_t *scales, const int fp16) {
    const __m256i magnitude = _mm256_set1_epi16(0x7FFF);
    uint32_t seen = 0;
    for (int64_t k = 0; k < K; k += 16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)(row + k));
        uint32_t a = reduce_max_u16_256(_mm256_and_si256(h, magnitude));
        seen = a > seen ? a : seen;
        uint8_t code = nvfp4_block_code(a, denominator, fp16);
        scales[k / 16] = code;
        __m512 step = _mm512_set1_ps(e4m3_value_of(code) * scale_2);
        store_nibbles16(codes + k / 2, e2m1_codes16(_mm512_div_ps(widen16(h, fp16), step)));
    }
    return seen;
}

#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
/* The same kernels on 8-lane AVX2 vectors, each lane computing what an AVX-512 lane computes (so the same
   bits as the torch reference). AVX2 has no masked 16-bit loads or stores: a row or tensor tail shorter
   than 16 weights goes through a zero-padded copy on the stack. */
#include <string.h>

#define HFPTQ_QUANTIZE_SIMD_WIDTH 8

/* The 16 weights held in h as two fp32 vectors in the order of AVX2's in-lane unpacking: elements 0-3 and 8-11
   in *a, 4-7 and 12-15 in *b. bf16 then widens in one instruction per vector (the pattern into an fp32's high
   half), and `pack16` and `store_nibbles16` put that order back for free (their packs work per 128-bit lane too). */
static inline void widen16(__m256i h, const int fp16, __m256 *a, __m256 *b) {
    if (fp16) {
        __m256i quads = _mm256_permute4x64_epi64(h, 0xD8); /* 0-3, 8-11, 4-7, 12-15 */
        *a = _mm256_cvtph_ps(_mm256_castsi256_si128(quads));
        *b = _mm256_cvtph_ps(_mm256_extracti128_si256(quads, 1));
        return;
    }
    *a = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), h));
    *b = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), h));
}

static inline uint32_t reduce_max_u16_256(__m256i a) {
    __m128i b = _mm_max_epu16(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    __m128i smallest_complement = _mm_minpos_epu16(_mm_xor_si128(b, _mm_set1_epi16(-1)));
    return 0xFFFFu ^ ((uint32_t)_mm_cvtsi128_si32(smallest_complement) & 0xFFFFu);
}

/* max over n 16-bit weights of their pattern without the sign bit (see the top). */
static inline uint32_t amax_bits(const uint16_t *p, int64_t n) {
    const __m256i magnitude = _mm256_set1_epi16(0x7FFF);
    __m256i m0 = _mm256_setzero_si256(), m1 = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        m0 = _mm256_max_epu16(m0, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(p + i)), magnitude));
        m1 = _mm256_max_epu16(m1, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(p + i + 16)), magnitude));
    }
    for (; i + 16 <= n; i += 16)
        m0 = _mm256_max_epu16(m0, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(p + i)), magnitude));
    uint32_t seen = reduce_max_u16_256(_mm256_max_epu16(m0, m1));
    for (; i < n; i++) {
        uint32_t a = p[i] & 0x7FFFu;
        seen = a > seen ? a : seen;
    }
    return seen;
}

/* The int32 lanes of a and b, each in [0, 255], in `widen16`'s order, as 16 bytes in the weights' order. */
static inline __m128i pack16(__m256i a, __m256i b) {
    __m256i words = _mm256_packus_epi32(a, b); /* per 128-bit lane: elements 0-7, then 8-15 */
    return _mm_packus_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
}

/* The low byte of each int32 lane of a and b, in order: the truncation `_mm512_cvtepi32_epi8` makes, here of
   values in [-128, 255] masked to their low byte and packed. */
static inline __m128i narrow16(__m256i a, __m256i b) {
    const __m256i byte = _mm256_set1_epi32(0xFF);
    return pack16(_mm256_and_si256(a, byte), _mm256_and_si256(b, byte));
}

/* round-half-even(x / scale) clamped to [low, high], as int32 lanes (`numerics.integer.int_quantize`). */
static inline __m256i int_codes(__m256 x, __m256 scale, float low, float high) {
    __m256 r = _mm256_round_ps(_mm256_div_ps(x, scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(low)), _mm256_set1_ps(high)));
}

/* INT4, one pair of rows, as the AVX-512 path: row 0's code in the low nibble, row 1's in the high one. */
static inline __attribute__((always_inline)) uint32_t int4_row_pair(const uint16_t *r0, const uint16_t *r1,
                                                                    int64_t K, int64_t group, uint8_t *out,
                                                                    float *s0, float *s1, const int fp16) {
    uint32_t seen = 0;
    for (int64_t g = 0; g < K; g += group) {
        uint32_t a0 = amax_bits(r0 + g, group), a1 = amax_bits(r1 + g, group);
        seen = a0 > seen ? a0 : seen;
        seen = a1 > seen ? a1 : seen;
        float scale0 = scale_of_bits(a0, 7.0f, fp16), scale1 = scale_of_bits(a1, 7.0f, fp16);
        s0[g / group] = scale0;
        s1[g / group] = scale1;
        const __m256 v0 = _mm256_set1_ps(scale0), v1 = _mm256_set1_ps(scale1);
        const __m256i nibble = _mm256_set1_epi32(0xF);
        for (int64_t k = g; k < g + group; k += 16) {
            __m256i h0 = _mm256_loadu_si256((const __m256i *)(r0 + k));
            __m256i h1 = _mm256_loadu_si256((const __m256i *)(r1 + k));
            __m256 a0, b0, a1, b1;
            widen16(h0, fp16, &a0, &b0);
            widen16(h1, fp16, &a1, &b1);
            __m256i lo0 = _mm256_and_si256(int_codes(a0, v0, -8.0f, 7.0f), nibble);
            __m256i lo1 = _mm256_and_si256(int_codes(b0, v0, -8.0f, 7.0f), nibble);
            __m256i hi0 = _mm256_slli_epi32(int_codes(a1, v1, -8.0f, 7.0f), 4);
            __m256i hi1 = _mm256_slli_epi32(int_codes(b1, v1, -8.0f, 7.0f), 4);
            _mm_storeu_si128((__m128i *)(out + k), narrow16(_mm256_or_si256(lo0, hi0), _mm256_or_si256(lo1, hi1)));
        }
    }
    return seen;
}

static inline __m128i int8_codes16(__m256i h, __m256 s, const int fp16) {
    __m256 a, b;
    widen16(h, fp16, &a, &b);
    return narrow16(int_codes(a, s, -128.0f, 127.0f), int_codes(b, s, -128.0f, 127.0f));
}

static inline __attribute__((always_inline)) uint32_t int8_row(const uint16_t *row, int64_t K, int8_t *out,
                                                               float *scale, const int fp16) {
    uint32_t a = amax_bits(row, K);
    *scale = scale_of_bits(a, 127.0f, fp16);
    const __m256 s = _mm256_set1_ps(*scale);
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)(row + k));
        _mm_storeu_si128((__m128i *)(out + k), int8_codes16(h, s, fp16));
    }
    if (k < K) {
        uint16_t in[16] = {0};
        uint8_t q[16];
        memcpy(in, row + k, (size_t)(K - k) * sizeof(uint16_t));
        _mm_storeu_si128((__m128i *)q, int8_codes16(_mm256_loadu_si256((const __m256i *)in), s, fp16));
        memcpy(out + k, q, (size_t)(K - k));
    }
    return a;
}

/* e4m3 codes (without sign) of fp32 magnitudes y in [0, 448], rounded to nearest even like the AVX-512 path's
   `e4m3_codes`, by one fp32 add: for y in [2**e, 2**(e+1)), e >= -6, the add of c = 2**(e+20) rounds y to a
   multiple of c's ulp, 2**(e-3), i.e. to 3 mantissa bits; t = y + c then lies j steps of 2**(e-3) above c, j in
   [8, 16], and the code is (e + 6) * 8 + j (j = 16, a round up to 2**(e+1), is the next binade's first code).
   Below 2**-6, c stays 2**14, its ulp 2**-9 is the subnormal step, and the same sum gives the subnormal code j. */
static inline __m256 e4m3_rounder(__m256 y) {
    __m256i binade = _mm256_and_si256(_mm256_castps_si256(y), _mm256_set1_epi32(0x7F800000)); /* 2**e's pattern */
    binade = _mm256_max_epi32(binade, _mm256_set1_epi32(121 << 23));                         /* e >= -6 */
    return _mm256_castsi256_ps(_mm256_add_epi32(binade, _mm256_set1_epi32(20 << 23)));         /* c */
}

static inline __m256i e4m3_magnitude_codes(__m256 y) {
    __m256 c = e4m3_rounder(y);
    __m256i j = _mm256_sub_epi32(_mm256_castps_si256(_mm256_add_ps(y, c)), _mm256_castps_si256(c));
    __m256i binade_code = _mm256_srli_epi32(_mm256_sub_epi32(_mm256_castps_si256(c), _mm256_set1_epi32(141 << 23)), 20);
    return _mm256_add_epi32(j, binade_code); /* (e + 6) * 8 + j */
}

/* y in [0, 448] rounded to e4m3 (the value of `e4m3_magnitude_codes(y)`), exactly: t - c has both in one binade. */
static inline __m256 e4m3_rounded(__m256 y) {
    __m256 c = e4m3_rounder(y);
    return _mm256_sub_ps(_mm256_add_ps(y, c), c);
}

/* `numerics.fp8.fp8_quantize` of 16 weights: x / scale clamped to +-448, to e4m3, as |x| / scale clamped to 448
   (division and clamping are symmetric in the sign) with x's sign bit put back in bit 7 from the 16-bit
   patterns. */
static inline __m128i fp8_codes16(__m256i h, __m256 s, const int fp16) {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f), bound = _mm256_set1_ps(448.0f);
    __m256 a, b;
    widen16(h, fp16, &a, &b);
    __m256 y_a = _mm256_min_ps(_mm256_div_ps(_mm256_andnot_ps(sign_bit, a), s), bound);
    __m256 y_b = _mm256_min_ps(_mm256_div_ps(_mm256_andnot_ps(sign_bit, b), s), bound);
    __m128i codes = pack16(e4m3_magnitude_codes(y_a), e4m3_magnitude_codes(y_b)); /* 0 to 126 */
    __m256i signs = _mm256_srli_epi16(_mm256_and_si256(h, _mm256_set1_epi16((short)0x8000)), 8); /* 0x80 or 0 */
    return _mm_or_si128(codes, _mm_packus_epi16(_mm256_castsi256_si128(signs), _mm256_extracti128_si256(signs, 1)));
}

/* One block of per-tensor FP8, with the block's largest magnitude pattern taken from the same loads. */
static inline __attribute__((always_inline)) uint32_t fp8_block(const uint16_t *w, int64_t n, float scale,
                                                                uint8_t *out, const int fp16) {
    const __m256 s = _mm256_set1_ps(scale);
    const __m256i magnitude = _mm256_set1_epi16(0x7FFF);
    __m256i m = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)(w + i));
        m = _mm256_max_epu16(m, _mm256_and_si256(h, magnitude));
        _mm_storeu_si128((__m128i *)(out + i), fp8_codes16(h, s, fp16));
    }
    if (i < n) {
        uint16_t in[16] = {0};
        uint8_t q[16];
        memcpy(in, w + i, (size_t)(n - i) * sizeof(uint16_t));
        __m256i h = _mm256_loadu_si256((const __m256i *)in);
        m = _mm256_max_epu16(m, _mm256_and_si256(h, magnitude));
        _mm_storeu_si128((__m128i *)q, fp8_codes16(h, s, fp16));
        memcpy(out + i, q, (size_t)(n - i));
    }
    return reduce_max_u16_256(m);
}

/* E2M1 codes (sign in bit 3) of 8 fp32 lanes, as the AVX-512 path's `e2m1_codes16`: the index counts the
   grid midpoints |y| passes (> then >= in turn, ties to the even grid point); NaN gives 0. */
static inline __m256i e2m1_codes8(__m256 y) {
    static const float midpoints[7] = {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f};
    __m256 m = _mm256_and_ps(y, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)));
    __m256i index = _mm256_setzero_si256();
    for (int i = 0; i < 7; i++) {
        __m256 past = (i % 2) ? _mm256_cmp_ps(m, _mm256_set1_ps(midpoints[i]), _CMP_GE_OQ)
                              : _mm256_cmp_ps(m, _mm256_set1_ps(midpoints[i]), _CMP_GT_OQ);
        index = _mm256_sub_epi32(index, _mm256_castps_si256(past)); /* an all-ones lane is -1 */
    }
    __m256 negative = _mm256_cmp_ps(y, _mm256_setzero_ps(), _CMP_LT_OQ);
    return _mm256_or_si256(index, _mm256_and_si256(_mm256_castps_si256(negative), _mm256_set1_epi32(8)));
}

/* 16 codes (in `widen16`'s order, one per int32 lane of a and b) to 8 bytes, element 2j in the low nibble of
   byte j (`pack_nibbles`): each 64-bit lane's low half becomes its even element | the odd one << 4. */
static inline void store_nibbles16(uint8_t *out, __m256i a, __m256i b) {
    __m256 pa = _mm256_castsi256_ps(_mm256_or_si256(a, _mm256_srli_epi64(a, 28)));
    __m256 pb = _mm256_castsi256_ps(_mm256_or_si256(b, _mm256_srli_epi64(b, 28)));
    /* the even int32 lanes: bytes 0 1 2 3 in the low 128 bits, 4 5 6 7 in the high */
    __m256i bytes = _mm256_castps_si256(_mm256_shuffle_ps(pa, pb, _MM_SHUFFLE(2, 0, 2, 0)));
    __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(bytes), _mm256_extracti128_si256(bytes, 1));
    _mm_storel_epi64((__m128i *)out, _mm_packus_epi16(words, words));
}

static inline __m256i max_epi32_ps(__m256 a, __m256 b) {
    return _mm256_max_epi32(_mm256_castps_si256(a), _mm256_castps_si256(b));
}

/* The largest magnitude pattern of each of 8 blocks of 16 weights (block b at row + 16 b), as int32 lanes in block
   order: each block's 16 patterns folded to 8 int32 lanes, then the 8 vectors reduced together in three rounds of
   in-lane shuffles (a transpose that keeps only the maxima). Patterns of positive values order as integers. */
static inline __m256i block_amax_bits8(const uint16_t *row) {
    const __m256i magnitude = _mm256_set1_epi16(0x7FFF), zero = _mm256_setzero_si256();
    __m256 m[8], pairs[4], quads[2];
    for (int b = 0; b < 8; b++) {
        __m256i h = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(row + 16 * b)), magnitude);
        m[b] = _mm256_castsi256_ps(_mm256_max_epi32(_mm256_unpacklo_epi16(h, zero), _mm256_unpackhi_epi16(h, zero)));
    }
    for (int i = 0; i < 4; i++) /* lanes: blocks 2i, 2i+1, 2i, 2i+1 in each 128-bit half */
        pairs[i] = _mm256_castsi256_ps(max_epi32_ps(_mm256_unpacklo_ps(m[2 * i], m[2 * i + 1]),
                                                    _mm256_unpackhi_ps(m[2 * i], m[2 * i + 1])));
    for (int i = 0; i < 2; i++) /* lanes: blocks 4i to 4i+3 in each 128-bit half */
        quads[i] = _mm256_castsi256_ps(max_epi32_ps(_mm256_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], 0x44),
                                                    _mm256_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], 0xEE)));
    return max_epi32_ps(_mm256_permute2f128_ps(quads[0], quads[1], 0x20),
                        _mm256_permute2f128_ps(quads[0], quads[1], 0x31));
}

/* `nvfp4_block_code` of 8 blocks at once: their e4m3 scale codes as 8 bytes at `out`; returns the scales' values
   times `scale_2`, each block's step. */
static inline __m256 nvfp4_block_scales8(__m256i amax_bits, float scale_2, float denominator, uint8_t *out,
                                         const int fp16) {
    __m256 amax = fp16 ? _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(amax_bits),
                                                           _mm256_extracti128_si256(amax_bits, 1)))
                       : _mm256_castsi256_ps(_mm256_slli_epi32(amax_bits, 16));
    __m256 block = _mm256_div_ps(amax, _mm256_set1_ps(denominator));
    block = _mm256_blendv_ps(block, _mm256_set1_ps(1.0f), _mm256_cmp_ps(block, _mm256_setzero_ps(), _CMP_EQ_OQ));
    block = _mm256_max_ps(_mm256_min_ps(block, _mm256_set1_ps(448.0f)), _mm256_set1_ps(1.0f / 512.0f));
    __m256i codes = e4m3_magnitude_codes(block);
    __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(codes), _mm256_extracti128_si256(codes, 1));
    _mm_storel_epi64((__m128i *)out, _mm_packus_epi16(words, words));
    return _mm256_mul_ps(e4m3_rounded(block), _mm256_set1_ps(scale_2));
}

/* 16 weights' E2M1 codes under their block's step, as 8 bytes at `out`. */
static inline void nvfp4_codes16(__m256i h, __m256 step, uint8_t *out, const int fp16) {
    __m256 x_a, x_b;
    widen16(h, fp16, &x_a, &x_b);
    store_nibbles16(out, e2m1_codes8(_mm256_div_ps(x_a, step)), e2m1_codes8(_mm256_div_ps(x_b, step)));
}

/* One NVFP4 row, as the AVX-512 path's `nvfp4_row`: 8 blocks at a time (their scales in one vector), then the
   remaining blocks one by one. */
static inline __attribute__((always_inline)) uint32_t nvfp4_row(const uint16_t *row, int64_t K, float scale_2,
                                                                float denominator, uint8_t *codes,
                                                                uint8_t *scales, const int fp16) {
    const __m256i magnitude = _mm256_set1_epi16(0x7FFF);
    __m256i seen8 = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 128 <= K; k += 128) {
        __m256i amax_bits = block_amax_bits8(row + k);
        seen8 = _mm256_max_epi32(seen8, amax_bits);
        float steps[8];
        _mm256_storeu_ps(steps, nvfp4_block_scales8(amax_bits, scale_2, denominator, scales + k / 16, fp16));
        for (int b = 0; b < 8; b++)
            nvfp4_codes16(_mm256_loadu_si256((const __m256i *)(row + k + 16 * b)), _mm256_set1_ps(steps[b]),
                          codes + (k + 16 * b) / 2, fp16);
    }
    __m128i seen4 = _mm_max_epi32(_mm256_castsi256_si128(seen8), _mm256_extracti128_si256(seen8, 1));
    seen4 = _mm_max_epi32(seen4, _mm_shuffle_epi32(seen4, 0x4E));
    seen4 = _mm_max_epi32(seen4, _mm_shuffle_epi32(seen4, 0xB1));
    uint32_t seen = (uint32_t)_mm_cvtsi128_si32(seen4);
    for (; k < K; k += 16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)(row + k));
        uint32_t a = reduce_max_u16_256(_mm256_and_si256(h, magnitude));
        seen = a > seen ? a : seen;
        uint8_t code = nvfp4_block_code(a, denominator, fp16);
        scales[k / 16] = code;
        nvfp4_codes16(h, _mm256_set1_ps(e4m3_value_of(code) * scale_2), codes + k / 2, fp16);
    }
    return seen;
}

#else
/* Without AVX-512 (BW, VL) and F16C, or AVX2 with F16C and FMA, the Python side keeps torch's quantizers
   (native_quantize.py checks this). */
#define HFPTQ_QUANTIZE_SIMD_WIDTH 0
#endif

int hfptq_quantize_simd_width(void) { return HFPTQ_QUANTIZE_SIMD_WIDTH; }

#if HFPTQ_QUANTIZE_SIMD_WIDTH
/* The exported quantizers, one text for both paths: OpenMP over the rows (or blocks) that the path's own kernels
   above quantize. */

/* The output tensors are fresh memory (the loader gives freed pages back to the OS before each weight), so every
   4 KiB page of codes would cost a page fault on its first write, about as long as quantizing the page's
   weights. Linux's MADV_POPULATE_WRITE maps a whole range in one call instead, each thread a share of it:
   the same pages, zero-filled, without a trap per page. Elsewhere, or on kernels before 5.14, the call fails
   and the writes fault the pages in as before. Only pages wholly inside the tensor are touched. */
#if defined(__linux__)
#define POPULATE_WRITE 23 /* MADV_POPULATE_WRITE, which older C library headers lack */
#define PAGE 4096
#define PREFAULT_CHUNK (256 << 10)
static void prefault(void *p, int64_t bytes, int threads) {
    uintptr_t first = ((uintptr_t)p + PAGE - 1) & ~(uintptr_t)(PAGE - 1);
    uintptr_t end = ((uintptr_t)p + (uintptr_t)bytes) & ~(uintptr_t)(PAGE - 1);
    if (end <= first) return;
    int64_t size = (int64_t)(end - first);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t at = 0; at < size; at += PREFAULT_CHUNK) {
        int64_t chunk = size - at < PREFAULT_CHUNK ? size - at : PREFAULT_CHUNK;
        madvise((void *)(first + at), (size_t)chunk, POPULATE_WRITE);
    }
}
#else
static void prefault(void *p, int64_t bytes, int threads) { (void)p, (void)bytes, (void)threads; }
#endif

/* INT4 group-wise: w (N, K) -> codes uint8 (N / 2, K), scales fp32 (N, K / group). N even, group a multiple
   of 32 dividing K. Returns the largest magnitude pattern read (top). */
uint32_t hfptq_quantize_int4(const uint16_t *w, int64_t N, int64_t K, int64_t group, int fp16, uint8_t *codes,
                             float *scales, int threads) {
    prefault(codes, N / 2 * K, threads);
    uint32_t seen = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(max : seen)
    for (int64_t pair = 0; pair < N / 2; pair++) {
        const uint16_t *r0 = w + 2 * pair * K;
        float *s0 = scales + 2 * pair * (K / group);
        uint32_t a = fp16 ? int4_row_pair(r0, r0 + K, K, group, codes + pair * K, s0, s0 + K / group, 1)
                          : int4_row_pair(r0, r0 + K, K, group, codes + pair * K, s0, s0 + K / group, 0);
        seen = a > seen ? a : seen;
    }
    return seen;
}

/* INT8 per output channel: w (N, K) -> codes int8 (N, K), scales fp32 (N,). */
uint32_t hfptq_quantize_int8(const uint16_t *w, int64_t N, int64_t K, int fp16, int8_t *codes, float *scales,
                             int threads) {
    prefault(codes, N * K, threads);
    uint32_t seen = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(max : seen)
    for (int64_t n = 0; n < N; n++) {
        uint32_t a = fp16 ? int8_row(w + n * K, K, codes + n * K, scales + n, 1)
                          : int8_row(w + n * K, K, codes + n * K, scales + n, 0);
        seen = a > seen ? a : seen;
    }
    return seen;
}

/* The largest magnitude pattern of `count` 16-bit weights: the per-tensor amax (top). */
uint32_t hfptq_amax16(const uint16_t *w, int64_t count, int threads) {
    uint32_t seen = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(max : seen)
    for (int64_t start = 0; start < count; start += FP8_BLOCK) {
        uint32_t a = amax_bits(w + start, count - start < FP8_BLOCK ? count - start : FP8_BLOCK);
        seen = a > seen ? a : seen;
    }
    return seen;
}

/* Per-tensor FP8: `count` weights -> e4m3 codes under one fp32 scale (finite, positive; the caller checks). */
uint32_t hfptq_quantize_fp8(const uint16_t *w, int64_t count, float scale, int fp16, uint8_t *codes, int threads) {
    prefault(codes, count, threads);
    uint32_t seen = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(max : seen)
    for (int64_t start = 0; start < count; start += FP8_BLOCK) {
        int64_t n = count - start < FP8_BLOCK ? count - start : FP8_BLOCK;
        uint32_t a = fp16 ? fp8_block(w + start, n, scale, codes + start, 1)
                          : fp8_block(w + start, n, scale, codes + start, 0);
        seen = a > seen ? a : seen;
    }
    return seen;
}

/* NVFP4: w (N, K) -> codes uint8 (N, K / 2), e4m3 block scales (N, K / 16), under the fp32 global scale
   `scale_2` (finite, positive; the caller's). K a multiple of 16. */
uint32_t hfptq_quantize_nvfp4(const uint16_t *w, int64_t N, int64_t K, float scale_2, float denominator, int fp16,
                              uint8_t *codes, uint8_t *scales, int threads) {
    prefault(codes, N * K / 2, threads);
    uint32_t seen = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(max : seen)
    for (int64_t n = 0; n < N; n++) {
        const uint16_t *row = w + n * K;
        uint32_t a = fp16 ? nvfp4_row(row, K, scale_2, denominator, codes + n * (K / 2), scales + n * (K / 16), 1)
                          : nvfp4_row(row, K, scale_2, denominator, codes + n * (K / 2), scales + n * (K / 16), 0);
        seen = a > seen ? a : seen;
    }
    return seen;
}
#endif
