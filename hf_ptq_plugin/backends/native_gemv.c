/* Dequantize-and-multiply kernels that read a QuantLinear's checkpoint codes directly.

   Built on the user's machine by `native.py` (cc -O3 -march=native -fopenmp), loaded with ctypes.
   They exist for memory: torch's CPU kernels need a second copy of each weight in their own layout
   (2 bytes per weight for FP8 and NVFP4, a repacked copy for INT4), these decode the 1 or 0.5
   bytes per weight the checkpoint holds inside the dot product: 16 weights per AVX-512 vector or, on
   CPUs with AVX2, F16C and FMA but no AVX-512, per two 8-lane AVX2 vectors. `hfptq_simd_width()`
   says which path was built (16, 8, or 0 for neither: native.py then keeps torch's kernels). Both
   paths decode to the same fp32 values (but for AVX2's NVFP4 gemv, see nvfp4x16); only the order of the
   fp32 sums differs.

   Decoding without a table: an e4m3 code c (s eeee mmm) reinterpreted as the fp16 bit pattern
   (s << 15) | ((c & 0x7f) << 7) is its value times 2**-8, subnormals included (fp16 has 5 exponent
   bits to e4m3's 4), so one fp16 -> fp32 conversion decodes a vector of codes. An e2m1 code (s ee m) as
   (s << 15) | ((c & 7) << 9) is its value times 2**-14. The callers multiply the sums back. e4m3's
   NaN code (0x7f / 0xff) decodes as 480: our quantizers never write it. 4-bit codes instead index a
   16-entry table of their values already times their scale, rebuilt per NVFP4 block or INT4 group
   (AVX-512: one vector, `_mm512_permutexvar_ps` reads each lane's entry): a table lookup replaces the
   conversion and the scale multiply, and W4A8's e4m3 rounding is paid 16 times per group, not per weight.
   AVX2 has no one-instruction lookup in 16 fp32 entries (two 8-entry halves cost two
   `_mm256_permutevar8x32_ps` and a blend per 8 weights), so it keeps the tables for W4A8 only and turns
   other 4-bit codes into small integers, converted exactly and times the scale (nvfp4x16, int4x16):
   `_mm256_shuffle_epi8` maps NVFP4 codes to bytes of twice their value, and sign extension splits an
   INT4 byte into its two codes.

   gemv_*: y (M, N) = x (M, K) fp32 times the decoded weight (N, K) transposed, fp32 sums; rows of
   the weight are split across `threads` OpenMP threads; M is taken 8 rows at a time, so a weight
   vector is decoded once per 8 activation rows. decode_*: rows of the decoded weight in fp32, for
   many-row calls, which hand a few hundred rows at a time to torch's fp32 GEMM. Products of a
   code and its scales are exact in fp32 (INT4's code x fp32 group scale rounds once). K and INT4
   group sizes must be multiples of 16. gemv_w8a8 (W8A8): int8 activation codes times int8 weight codes with
   exact int32 sums, one AVX2 version for both builds (see there).
*/
#include <stdint.h>
#include <stdlib.h>

#if defined(__AVX512F__) && defined(__AVX2__)
#define HFPTQ_SIMD_WIDTH 16
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define HFPTQ_SIMD_WIDTH 8
#else
#define HFPTQ_SIMD_WIDTH 0 /* neither: the Python side keeps torch's kernels (native.py checks this) */
#endif

int hfptq_simd_width(void) { return HFPTQ_SIMD_WIDTH; }

#if HFPTQ_SIMD_WIDTH
/* Shared by both paths: scalar decodes and the 4-bit value tables. */
#include <immintrin.h>

#define MAX_ROWS 8
#define E4M3_UNIT 256.0f      /* decoded e4m3 value = vector value * 2**8 */

static float e4m3_value(uint8_t c) {
    int e = (c >> 3) & 15, m = c & 7;
    float v = e ? (float)(8 + m) * (float)(1 << e) / 1024.0f : (float)m / 512.0f;
    return (c & 0x80) ? -v : v;
}

/* 2**(e - 127), E8M0's value; e = 0 gives 2**-127, an fp32 subnormal (exact). */
static float e8m0_value(uint8_t e) {
    union { uint32_t u; float f; } v;
    v.u = e ? (uint32_t)e << 23 : 0x00400000u;
    return v.f;
}

/* Value of each 4-bit code: E2M1 (s ee m), and signed INT4 (two's complement). */
static const float E2M1_VALUES[16] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6, -0.0f, -0.5f, -1, -1.5f, -2, -3, -4, -6};
static const float INT4_VALUES[16] = {0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1};
static float E4M3_VALUES[256];

__attribute__((constructor)) static void fill_e4m3_values(void) {
    for (int c = 0; c < 256; c++) E4M3_VALUES[c] = e4m3_value((uint8_t)c);
}

/* fp8_tiles: a row's tile scales, one per 16 weights (`per16[k / 16]` is the scale of weight k), so the loops over
   k index by a shift instead of dividing by the run-time tile size every 16 weights. */
static inline void tile_scales_per16(const float *tile_scales, int64_t K, int64_t tile, float *per16) {
    for (int64_t t = 0, j = 0; t < K / tile; t++)
        for (int64_t i = 0; i < tile / 16; i++) per16[j++] = tile_scales[t];
}

/* W8A8: y (M, N) int32 = x (M, K) int8 activation codes times w (N, K) int8 weight codes transposed, summed exactly
   in int32, so the result is torch._int_mm(x, w.t()) bit for bit whatever the order of the sums. Shared by both
   builds (AVX2 instructions; the AVX-512 build's CPU has them too). 16 codes sign-extended to int16
   (`_mm256_cvtepi8_epi16`), `_mm256_madd_epi16` gives 8 int32 sums of two products, added into int32 accumulators.
   Exact while no sum, partial or whole, overflows int32: |product| <= 128 x 128 = 2**14, so K x 2**14 < 2**31, i.e.
   K < 2**17 (K <= 131056 as a multiple of 16, HFPTQ_W8A8_MAX_K; native.py's caller keeps torch._int_mm above it).
   The activation rows are sign-extended to int16 once (M x K x 2 bytes, malloc'd; widened per use if that fails);
   each weight vector, widened once, serves up to MAX_ROWS activation rows. K must be a multiple of 16. */
#define HFPTQ_W8A8_MAX_K 131056

static inline int32_t hsum8_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1))));
}

static inline __m256i widen16(const int8_t *p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p)); }

/* The 16 activation codes at k of row `xr` as int16: from the widened copy, or widened here without one. */
static inline __attribute__((always_inline)) __m256i w8a8_x16(const int16_t *xw, const int8_t *xr, int64_t k) {
    return xw ? _mm256_loadu_si256((const __m256i *)(xw + k)) : widen16(xr + k);
}

/* Weight row `row` times one activation row: four accumulators, so consecutive adds do not wait for each other. */
static inline __attribute__((always_inline)) int32_t w8a8_one(const int16_t *xw, const int8_t *x, const int8_t *row,
                                                               int64_t K) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(w8a8_x16(xw, x, k), widen16(row + k)));
        a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(w8a8_x16(xw, x, k + 16), widen16(row + k + 16)));
        a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(w8a8_x16(xw, x, k + 32), widen16(row + k + 32)));
        a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(w8a8_x16(xw, x, k + 48), widen16(row + k + 48)));
    }
    for (; k < K; k += 16) a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(w8a8_x16(xw, x, k), widen16(row + k)));
    return hsum8_epi32(_mm256_add_epi32(_mm256_add_epi32(a0, a1), _mm256_add_epi32(a2, a3)));
}

/* Weight row n times `rows` (<= MAX_ROWS) activation rows from m0, each widened weight vector used for all of them;
   inlined with rows = MAX_ROWS, a constant, the accumulators stay in registers. */
static inline __attribute__((always_inline)) void w8a8_rows(const int16_t *xw, const int8_t *x, int64_t m0,
                                                             int64_t rows, int64_t K, const int8_t *row, int64_t n,
                                                             int64_t N, int32_t *y) {
    __m256i acc[MAX_ROWS];
    for (int64_t r = 0; r < rows; r++) acc[r] = _mm256_setzero_si256();
    for (int64_t k = 0; k < K; k += 16) {
        __m256i wv = widen16(row + k);
        for (int64_t r = 0; r < rows; r++)
            acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(
                w8a8_x16(xw ? xw + (m0 + r) * K : 0, x + (m0 + r) * K, k), wv));
    }
    for (int64_t r = 0; r < rows; r++) y[(m0 + r) * N + n] = hsum8_epi32(acc[r]);
}

/* Weight row n times every activation row. */
static inline __attribute__((always_inline)) void w8a8_row(const int16_t *xw, const int8_t *x, int64_t M, int64_t K,
                                                            const int8_t *row, int64_t n, int64_t N, int32_t *y) {
    if (M == 1) {
        y[n] = w8a8_one(xw, x, row, K);
        return;
    }
    int64_t m0 = 0;
    for (; m0 + MAX_ROWS <= M; m0 += MAX_ROWS) w8a8_rows(xw, x, m0, MAX_ROWS, K, row, n, N, y);
    if (m0 < M) w8a8_rows(xw, x, m0, M - m0, K, row, n, N, y);
}

/* OpenMP over weight rows; the test of xw outside the inlined loops, which then know which load they make. */
static void w8a8_all(const int16_t *xw, const int8_t *x, int64_t M, int64_t K, const int8_t *w, int64_t N, int32_t *y,
                     int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        if (xw) w8a8_row(xw, x, M, K, w + n * K, n, N, y);
        else w8a8_row(NULL, x, M, K, w + n * K, n, N, y);
    }
}

void hfptq_gemv_w8a8(const int8_t *x, int64_t M, int64_t K, const int8_t *w, int64_t N, int32_t *y, int threads) {
    int16_t *xw = (int16_t *)malloc((size_t)(M * K) * sizeof(int16_t));
    if (xw == NULL) {  /* widen the activations per use instead */
        w8a8_all(NULL, x, M, K, w, N, y, threads);
        return;
    }
    for (int64_t i = 0; i < M * K; i += 16) _mm256_storeu_si256((__m256i *)(xw + i), widen16(x + i));
    w8a8_all(xw, x, M, K, w, N, y, threads);
    free(xw);
}
#endif

#if HFPTQ_SIMD_WIDTH == 16
/* AVX-512: 16 weights per vector. */
static inline __m512 e4m3x16(const uint8_t *p) {
    __m256i c = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
    __m256i sign = _mm256_slli_epi16(_mm256_and_si256(c, _mm256_set1_epi16(0x80)), 8);
    __m256i rest = _mm256_slli_epi16(_mm256_and_si256(c, _mm256_set1_epi16(0x7f)), 7);
    return _mm512_cvtph_ps(_mm256_or_si256(sign, rest));
}

/* The 16 codes of 8 bytes as lane indices for a 16-entry table (element 2j in the low nibble of byte j,
   numerics.nvfp4.pack_nibbles); `_mm512_permutexvar_ps` reads only an index's low 4 bits. */
static inline __m512i nibbles16(const uint8_t *p) {
    __m128i b = _mm_loadl_epi64((const __m128i *)p);
    __m512i twice = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b));  /* byte j in lanes 2j and 2j + 1 */
    return _mm512_srlv_epi32(twice, _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0));
}

static inline __m512 table16(const float *values, float scale) {
    return _mm512_mul_ps(_mm512_loadu_ps(values), _mm512_set1_ps(scale));
}

static inline __m512 int8x16(const uint8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

/* v clamped to +-448 and rounded to e4m3 (nearest, ties to even), as `numerics.fp8_quantize` clamps and torch
   casts to float8_e4m3fn. Normal range: keep 3 mantissa bits; below 2**-6 the step is 2**-9. */
static inline __m512 e4m3_round(__m512 v) {
    __m512i bits = _mm512_castps_si512(v), sign = _mm512_and_si512(bits, _mm512_set1_epi32((int)0x80000000u));
    __m512 a = _mm512_min_ps(_mm512_abs_ps(v), _mm512_set1_ps(448.0f));
    __m512i magnitude = _mm512_castps_si512(a);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(magnitude, 20), _mm512_set1_epi32(1));
    __m512i normal = _mm512_and_si512(_mm512_add_epi32(magnitude, _mm512_add_epi32(_mm512_set1_epi32(0x7FFFF), odd)),
                                      _mm512_set1_epi32((int)0xFFF00000u));
    __m512 steps = _mm512_roundscale_ps(_mm512_mul_ps(a, _mm512_set1_ps(512.0f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 subnormal = _mm512_mul_ps(steps, _mm512_set1_ps(1.0f / 512.0f));
    __mmask16 small = _mm512_cmp_ps_mask(a, _mm512_set1_ps(1.0f / 64.0f), _CMP_LT_OQ);
    __m512 rounded = _mm512_mask_blend_ps(small, _mm512_castsi512_ps(normal), subnormal);
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(rounded), sign));
}

/* One weight row's dot product with one activation row (decode): four accumulators in registers, so
   consecutive FMAs do not wait for each other. */
#define ROW_DOT_ONE(DECODE, SCALE_OUT)                                                 \
    {                                                                                  \
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                    \
        int64_t k0 = 0;                                                                \
        for (; k0 + 64 <= K; k0 += 64) {                                               \
            { const int64_t k = k0; a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), DECODE, a0); }      \
            { const int64_t k = k0 + 16; a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), DECODE, a1); } \
            { const int64_t k = k0 + 32; a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), DECODE, a2); } \
            { const int64_t k = k0 + 48; a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), DECODE, a3); } \
        }                                                                              \
        for (; k0 < K; k0 += 16) {                                                     \
            const int64_t k = k0;                                                      \
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), DECODE, a0);                  \
        }                                                                              \
        y[n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))) * (SCALE_OUT); \
    }

/* ... with up to MAX_ROWS activation rows at a time, the weight vector decoded once for them. */
#define ROW_DOTS(DECODE, SCALE_OUT)                                                    \
    if (M == 1) ROW_DOT_ONE(DECODE, SCALE_OUT) else                                    \
    for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {                                     \
        int64_t rows = M - m0 < MAX_ROWS ? M - m0 : MAX_ROWS;                          \
        __m512 acc[MAX_ROWS];                                                          \
        for (int64_t r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps();               \
        for (int64_t k = 0; k < K; k += 16) {                                          \
            __m512 w = DECODE;                                                         \
            for (int64_t r = 0; r < rows; r++)                                         \
                acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(x + (m0 + r) * K + k), w, acc[r]); \
        }                                                                              \
        for (int64_t r = 0; r < rows; r++) y[(m0 + r) * N + n] = _mm512_reduce_add_ps(acc[r]) * (SCALE_OUT); \
    }

/* MXFP8: codes e4m3 (N, K), E8M0 exponents (N, K / 32). Exact for ordinary exponents (block scales above
   2**-100; far smaller ones round as fp32 subnormals). */
void hfptq_gemv_mxfp8(const float *x, int64_t M, int64_t K, const uint8_t *w, const uint8_t *exponents, int64_t N,
                      float *y, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = w + n * K, *e = exponents + n * (K / 32);
        ROW_DOTS(_mm512_mul_ps(e4m3x16(row + k), _mm512_set1_ps(e8m0_value(e[k / 32]))), E4M3_UNIT)
    }
}

/* FP8 with fp32 scales per (tile x tile) block (fp8_pb_wo): codes e4m3 (N, K), scales (N / tile, K / tile). */
void hfptq_gemv_fp8_tiles(const float *x, int64_t M, int64_t K, const uint8_t *w, const float *scales, int64_t tile,
                          int64_t N, float *y, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = w + n * K;
        float s[K / 16];
        tile_scales_per16(scales + (n / tile) * (K / tile), K, tile, s);
        ROW_DOTS(_mm512_mul_ps(e4m3x16(row + k), _mm512_set1_ps(s[k / 16])), E4M3_UNIT)
    }
}

/* NVFP4: codes uint8 (N, K / 2), block scales e4m3 (N, K / 16); the global scale is the caller's. */
void hfptq_gemv_nvfp4(const float *x, int64_t M, int64_t K, const uint8_t *w, const uint8_t *block_scales,
                      int64_t N, float *y, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = w + n * (K / 2), *scales = block_scales + n * (K / 16);
        ROW_DOTS(_mm512_permutexvar_ps(nibbles16(row + k / 2), table16(E2M1_VALUES, E4M3_VALUES[scales[k / 16]])),
                 1.0f)
    }
}

/* The INT4 value tables of rows 2i and 2i + 1 in one group: code x scale, rounded to e4m3 for W4A8. */
static inline void int4_tables(float scale0, float scale1, int fp8_round, __m512 *table0, __m512 *table1) {
    *table0 = table16(INT4_VALUES, scale0);
    *table1 = table16(INT4_VALUES, scale1);
    if (fp8_round) {
        *table0 = e4m3_round(*table0);
        *table1 = e4m3_round(*table1);
    }
}

/* Rows 2i and 2i + 1 (byte row `row`) times one activation row: two accumulators per weight row, in registers. */
static inline void int4_pair_one(const float *x, const uint8_t *row, const float *s0, const float *s1, int64_t K,
                                 int64_t group, int fp8_round, float *y0, float *y1) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0, table0, table1;
    for (int64_t g = 0; g < K; g += group) {
        int4_tables(s0[g / group], s1[g / group], fp8_round, &table0, &table1);
        for (int64_t k = g; k < g + group; k += 32) {
            __m512i c0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + k)));
            __m512i c1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + k + 16)));
            __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
            a0 = _mm512_fmadd_ps(x0, _mm512_permutexvar_ps(c0, table0), a0);
            b0 = _mm512_fmadd_ps(x0, _mm512_permutexvar_ps(_mm512_srli_epi32(c0, 4), table1), b0);
            a1 = _mm512_fmadd_ps(x1, _mm512_permutexvar_ps(c1, table0), a1);
            b1 = _mm512_fmadd_ps(x1, _mm512_permutexvar_ps(_mm512_srli_epi32(c1, 4), table1), b1);
        }
    }
    *y0 = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    *y1 = _mm512_reduce_add_ps(_mm512_add_ps(b0, b1));
}

/* INT4: codes uint8 (N / 2, K), two rows per byte; scales fp32 (N, K / group). With `fp8_round`, W4A8: each
   code x scale is rounded to e4m3 (numerics.weights: the weight is fp8(q * ratio) * weight_scale_2). */
void hfptq_gemv_int4(const float *x, int64_t M, int64_t K, const uint8_t *w, const float *scales, int64_t group,
                     int fp8_round, int64_t N, float *y, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t pair = 0; pair < N / 2; pair++) {
        const uint8_t *row = w + pair * K;
        const float *s0 = scales + 2 * pair * (K / group), *s1 = s0 + K / group;
        if (M == 1 && group % 32 == 0) {
            int4_pair_one(x, row, s0, s1, K, group, fp8_round, y + 2 * pair, y + 2 * pair + 1);
            continue;
        }
        for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {
            int64_t rows = M - m0 < MAX_ROWS ? M - m0 : MAX_ROWS;
            __m512 acc0[MAX_ROWS], acc1[MAX_ROWS];
            __m512 table0 = _mm512_setzero_ps(), table1 = table0;
            for (int64_t r = 0; r < rows; r++) acc0[r] = acc1[r] = _mm512_setzero_ps();
            for (int64_t k = 0; k < K; k += 16) {
                if (k % group == 0) int4_tables(s0[k / group], s1[k / group], fp8_round, &table0, &table1);
                __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + k)));
                __m512 low = _mm512_permutexvar_ps(codes, table0);
                __m512 high = _mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), table1);
                for (int64_t r = 0; r < rows; r++) {
                    __m512 xv = _mm512_loadu_ps(x + (m0 + r) * K + k);
                    acc0[r] = _mm512_fmadd_ps(xv, low, acc0[r]);
                    acc1[r] = _mm512_fmadd_ps(xv, high, acc1[r]);
                }
            }
            for (int64_t r = 0; r < rows; r++) {
                y[(m0 + r) * N + 2 * pair] = _mm512_reduce_add_ps(acc0[r]);
                y[(m0 + r) * N + 2 * pair + 1] = _mm512_reduce_add_ps(acc1[r]);
            }
        }
    }
}

void hfptq_decode_fp8(const uint8_t *w, int64_t N, int64_t K, float *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k += 16)
            _mm512_storeu_ps(out + n * K + k, _mm512_mul_ps(e4m3x16(w + n * K + k), _mm512_set1_ps(E4M3_UNIT)));
}

void hfptq_decode_int8(const uint8_t *w, int64_t N, int64_t K, float *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k += 16)
            _mm512_storeu_ps(out + n * K + k, int8x16(w + n * K + k));
}

void hfptq_decode_mxfp8(const uint8_t *w, const uint8_t *exponents, int64_t N, int64_t K, float *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k += 16) {
            float scale = e8m0_value(exponents[n * (K / 32) + k / 32]) * E4M3_UNIT;
            _mm512_storeu_ps(out + n * K + k, _mm512_mul_ps(e4m3x16(w + n * K + k), _mm512_set1_ps(scale)));
        }
}

/* `row0`: the first row's index in the whole weight, which picks its tile row of `scales`. */
void hfptq_decode_fp8_tiles(const uint8_t *w, const float *scales, int64_t tile, int64_t N, int64_t K, int64_t row0,
                            float *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        float s[K / 16];
        tile_scales_per16(scales + ((row0 + n) / tile) * (K / tile), K, tile, s);
        for (int64_t k = 0; k < K; k += 16) {
            __m512 v = _mm512_mul_ps(e4m3x16(w + n * K + k), _mm512_set1_ps(E4M3_UNIT));
            _mm512_storeu_ps(out + n * K + k, _mm512_mul_ps(v, _mm512_set1_ps(s[k / 16])));
        }
    }
}

void hfptq_decode_nvfp4(const uint8_t *w, const uint8_t *block_scales, int64_t N, int64_t K, float *out,
                        int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k += 16) {
            __m512 table = table16(E2M1_VALUES, E4M3_VALUES[block_scales[n * (K / 16) + k / 16]]);
            _mm512_storeu_ps(out + n * K + k, _mm512_permutexvar_ps(nibbles16(w + n * (K / 2) + k / 2), table));
        }
}

void hfptq_decode_int4(const uint8_t *w, const float *scales, int64_t group, int fp8_round, int64_t N, int64_t K,
                       float *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t pair = 0; pair < N / 2; pair++)
        for (int64_t k = 0; k < K; k += 16) {
            const float *s0 = scales + 2 * pair * (K / group) + k / group;
            __m512 table0, table1;
            int4_tables(s0[0], s0[K / group], fp8_round, &table0, &table1);
            __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w + pair * K + k)));
            _mm512_storeu_ps(out + 2 * pair * K + k, _mm512_permutexvar_ps(codes, table0));
            _mm512_storeu_ps(out + (2 * pair + 1) * K + k, _mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), table1));
        }
}

#elif HFPTQ_SIMD_WIDTH == 8
/* AVX2 (with F16C and FMA): the AVX-512 path's steps of 16 weights, each held in two 8-lane vectors. */

typedef struct { __m256 lo, hi; } f32x16;     /* 16 weights, or a 16-entry table: entries 0-7 and 8-15 */

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline f32x16 scaled16(f32x16 v, float scale) {
    __m256 s = _mm256_set1_ps(scale);
    return (f32x16){_mm256_mul_ps(v.lo, s), _mm256_mul_ps(v.hi, s)};
}

static inline void store16(float *p, f32x16 v) {
    _mm256_storeu_ps(p, v.lo);
    _mm256_storeu_ps(p + 8, v.hi);
}

/* 8 e4m3 codes, each the high byte of a 16-bit lane (c << 8): an arithmetic shift by one and clearing bit 14
   give (s << 15) | ((c & 0x7f) << 7), the fp16 pattern of the header comment. */
static inline __m256 e4m3x8(__m128i high_bytes) {
    return _mm256_cvtph_ps(_mm_and_si128(_mm_srai_epi16(high_bytes, 1), _mm_set1_epi16((short)0xBFFF)));
}

static inline f32x16 e4m3x16(const uint8_t *p) {
    __m128i c = _mm_loadu_si128((const __m128i *)p), zero = _mm_setzero_si128();
    return (f32x16){e4m3x8(_mm_unpacklo_epi8(zero, c)), e4m3x8(_mm_unpackhi_epi8(zero, c))};
}

static inline f32x16 int8x16(const uint8_t *p) {
    return (f32x16){_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))),
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8))))};
}

/* nvfp4x16's tables: e4m3 values times 2**-25, exact (the smallest scale, 2**-9, gives 2**-34, an fp32 normal); per
   e2m1 code, the byte 2v (two's complement) and the byte sign << 7 | 2|v|, both in each 128-bit lane's 16 bytes. */
static float E4M3_SCALED[256];
static int8_t E2M1_TWICE[32], E2M1_SIGN_TWICE[32];

__attribute__((constructor)) static void fill_nvfp4_tables(void) {
    for (int c = 0; c < 256; c++) E4M3_SCALED[c] = e4m3_value((uint8_t)c) * 0x1p-25f;
    for (int c = 0; c < 32; c++) {
        float v = E2M1_VALUES[c & 15];
        E2M1_TWICE[c] = (int8_t)(2 * v);
        E2M1_SIGN_TWICE[c] = (int8_t)((__builtin_signbit(v) ? 0x80 : 0) | (int)(2 * __builtin_fabsf(v)));
    }
}

/* NVFP4 values v times an e4m3 scale s (s x 2**-25 given) of the 16 codes of 8 bytes (element 2j in the low nibble of
   byte j, numerics.nvfp4.pack_nibbles), without a float table. In each 128-bit lane, a copy of the bytes and a copy
   shifted right by 4 (one 64-bit shift), masked, hold the codes as bytes: elements 0, 2, .., 14 in bytes 0-7 and
   1, 3, .., 15 in bytes 8-15. `_mm256_shuffle_epi8` maps each code to a byte of a table, then moves element e's byte
   to the top byte of lane e (zeros below): an int32 of byte x 2**24, exact in fp32, times s x 2**-25. gemv: the bytes
   E2M1_TWICE give v x s, exact (a product of 2 and 4 significant bits) as E2M1_VALUES[c] x s, but +0.0 for code 8
   (-0.0), which can change a sum only in the sign of a zero result. `signed_zeros` (decode): E2M1_SIGN_TWICE, its
   magnitude converted and its sign xor-ed into the product as a multiply would: v x s bit for bit. */
static inline __attribute__((always_inline)) f32x16 nvfp4x16(const uint8_t *p, float scale, int signed_zeros) {
    __m256i copies = _mm256_broadcastq_epi64(_mm_loadl_epi64((const __m128i *)p));
    __m256i codes = _mm256_and_si256(_mm256_srlv_epi64(copies, _mm256_setr_epi64x(0, 4, 0, 4)), _mm256_set1_epi8(15));
    __m256i table = _mm256_loadu_si256((const __m256i *)(signed_zeros ? E2M1_SIGN_TWICE : E2M1_TWICE));
    __m256i bytes = _mm256_shuffle_epi8(table, codes);
    __m256i first = _mm256_shuffle_epi8(bytes, _mm256_setr_epi8(-1, -1, -1, 0, -1, -1, -1, 8, -1, -1, -1, 1,
                                                                -1, -1, -1, 9, -1, -1, -1, 2, -1, -1, -1, 10,
                                                                -1, -1, -1, 3, -1, -1, -1, 11));
    __m256i second = _mm256_shuffle_epi8(bytes, _mm256_setr_epi8(-1, -1, -1, 4, -1, -1, -1, 12, -1, -1, -1, 5,
                                                                 -1, -1, -1, 13, -1, -1, -1, 6, -1, -1, -1, 14,
                                                                 -1, -1, -1, 7, -1, -1, -1, 15));
    __m256 s = _mm256_set1_ps(scale);
    if (!signed_zeros)
        return (f32x16){_mm256_mul_ps(_mm256_cvtepi32_ps(first), s), _mm256_mul_ps(_mm256_cvtepi32_ps(second), s)};
    __m256i sign_bit = _mm256_set1_epi32((int)0x80000000u);
    __m256i sign0 = _mm256_and_si256(first, sign_bit), sign1 = _mm256_and_si256(second, sign_bit);
    __m256 v0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_xor_si256(first, sign0)), s);
    __m256 v1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_xor_si256(second, sign1)), s);
    return (f32x16){_mm256_xor_ps(v0, _mm256_castsi256_ps(sign0)), _mm256_xor_ps(v1, _mm256_castsi256_ps(sign1))};
}

/* Entry (index & 15) of a 16-entry table: `_mm256_permutevar8x32_ps` reads an index's low 3 bits in both
   halves, bit 3 (shifted to the sign bit, which `_mm256_blendv_ps` reads) picks the half. */
static inline __m256 lookup16(__m256i index, f32x16 table) {
    __m256 low = _mm256_permutevar8x32_ps(table.lo, index), high = _mm256_permutevar8x32_ps(table.hi, index);
    return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(index, 28)));
}

static inline f32x16 table16(const float *values, float scale) {
    __m256 s = _mm256_set1_ps(scale);
    return (f32x16){_mm256_mul_ps(_mm256_loadu_ps(values), s), _mm256_mul_ps(_mm256_loadu_ps(values + 8), s)};
}

/* v clamped to +-448 and rounded to e4m3 (nearest, ties to even), as the AVX-512 path's e4m3_round. */
static inline __m256 e4m3_round(__m256 v) {
    __m256 sign = _mm256_and_ps(v, _mm256_set1_ps(-0.0f));
    __m256 a = _mm256_min_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), v), _mm256_set1_ps(448.0f));
    __m256i magnitude = _mm256_castps_si256(a);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(magnitude, 20), _mm256_set1_epi32(1));
    __m256i normal = _mm256_and_si256(_mm256_add_epi32(magnitude, _mm256_add_epi32(_mm256_set1_epi32(0x7FFFF), odd)),
                                      _mm256_set1_epi32((int)0xFFF00000u));
    __m256 steps = _mm256_round_ps(_mm256_mul_ps(a, _mm256_set1_ps(512.0f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 subnormal = _mm256_mul_ps(steps, _mm256_set1_ps(1.0f / 512.0f));
    __m256 small = _mm256_cmp_ps(a, _mm256_set1_ps(1.0f / 64.0f), _CMP_LT_OQ);
    return _mm256_or_ps(_mm256_blendv_ps(_mm256_castsi256_ps(normal), subnormal, small), sign);
}

/* One weight row's dot product with one activation row (DECODE: the f32x16 of weights k .. k + 15): four
   accumulators in registers, so consecutive FMAs do not wait for each other. */
#define ROW_DOT_ONE(DECODE, SCALE_OUT)                                                 \
    {                                                                                  \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                    \
        int64_t k0 = 0;                                                                \
        for (; k0 + 32 <= K; k0 += 32) {                                               \
            { const int64_t k = k0; f32x16 w = DECODE;                                 \
              a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), w.lo, a0);                  \
              a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), w.hi, a1); }            \
            { const int64_t k = k0 + 16; f32x16 w = DECODE;                            \
              a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), w.lo, a2);                  \
              a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), w.hi, a3); }            \
        }                                                                              \
        for (; k0 < K; k0 += 16) {                                                     \
            const int64_t k = k0;                                                      \
            f32x16 w = DECODE;                                                         \
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), w.lo, a0);                    \
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), w.hi, a1);                \
        }                                                                              \
        y[n] = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))) * (SCALE_OUT); \
    }

/* acc + x[0:16] . w, the two halves' products summed off acc's dependency chain (one add on it per step). */
static inline __m256 dot16_add(__m256 acc, const float *x, f32x16 w) {
    return _mm256_add_ps(acc, _mm256_fmadd_ps(_mm256_loadu_ps(x), w.lo, _mm256_mul_ps(_mm256_loadu_ps(x + 8), w.hi)));
}

/* ... with up to MAX_ROWS activation rows at a time, the weight vector decoded once for them. */
#define ROW_DOTS(DECODE, SCALE_OUT)                                                    \
    if (M == 1) ROW_DOT_ONE(DECODE, SCALE_OUT) else                                    \
    for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {                                     \
        int64_t rows = M - m0 < MAX_ROWS ? M - m0 : MAX_ROWS;                          \
        __m256 acc[MAX_ROWS];                                                          \
        for (int64_t r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();               \
        for (int64_t k = 0; k < K; k += 16) {                                          \
            f32x16 w = DECODE;                                                         \
            for (int64_t r = 0; r < rows; r++) acc[r] = dot16_add(acc[r], x + (m0 + r) * K + k, w); \
        }                                                                              \
        for (int64_t r = 0; r < rows; r++) y[(m0 + r) * N + n] = hsum8(acc[r]) * (SCALE_OUT); \
    }

void hfptq_gemv_mxfp8(const float *x, int64_t M, int64_t K, const uint8_t *w, const uint8_t *exponents, int64_t N,
                      float *y, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = w + n * K, *e = exponents + n * (K / 32);
        ROW_DOTS(scaled16(e4m3x16(row + k), e8m0_value(e[k / 32])), E4M3_UNIT)
    }
}

void hfptq_gemv_fp8_tiles(const float *x, int64_t M, int64_t K, const uint8_t *w, const float *scales, int64_t tile,
                          int64_t N, float *y, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = w + n * K;
        float s[K / 16];
        tile_scales_per16(scales + (n / tile) * (K / tile), K, tile, s);
        ROW_DOTS(scaled16(e4m3x16(row + k), s[k / 16]), E4M3_UNIT)
    }
}

void hfptq_gemv_nvfp4(const float *x, int64_t M, int64_t K, const uint8_t *w, const uint8_t *block_scales,
                      int64_t N, float *y, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = w + n * (K / 2), *scales = block_scales + n * (K / 16);
        ROW_DOTS(nvfp4x16(row + k / 2, E4M3_SCALED[scales[k / 16]], 0), 1.0f)
    }
}

/* W4A8's value tables of rows 2i and 2i + 1 in one group: code x scale, rounded to e4m3. */
static inline void w4a8_tables(float scale0, float scale1, f32x16 *table0, f32x16 *table1) {
    f32x16 t0 = table16(INT4_VALUES, scale0), t1 = table16(INT4_VALUES, scale1);
    *table0 = (f32x16){e4m3_round(t0.lo), e4m3_round(t0.hi)};
    *table1 = (f32x16){e4m3_round(t1.lo), e4m3_round(t1.hi)};
}

/* W4A8: the 16 bytes of codes at p as indices, the low nibbles row 2i's (lookup16 reads only those), a shift by 4 gives
   row 2i + 1's. */
static inline void w4a8x16(const uint8_t *p, f32x16 table0, f32x16 table1, f32x16 *low, f32x16 *high) {
    __m256i c0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    __m256i c1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)));
    *low = (f32x16){lookup16(c0, table0), lookup16(c1, table0)};
    *high = (f32x16){lookup16(_mm256_srli_epi32(c0, 4), table1), lookup16(_mm256_srli_epi32(c1, 4), table1)};
}

/* INT4 without a table: the 16 bytes of codes at p sign-extended to int32 are c = 16 x (row 2i + 1's code) + row 2i's
   code read unsigned (two's complement nibbles, numerics.integer.pack_int4_rows). c >> 4 (arithmetic) is row 2i + 1's
   code and (c << 28) >> 28 row 2i's, exact in fp32; one multiply by the fp32 group scale rounds code x scale once:
   INT4_VALUES[c] x scale. */
static inline void int4x16(const uint8_t *p, __m256 scale0, __m256 scale1, f32x16 *low, f32x16 *high) {
    __m256i c0 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p));
    __m256i c1 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)));
    *low = (f32x16){_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(c0, 28), 28)), scale0),
                    _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(c1, 28), 28)), scale0)};
    *high = (f32x16){_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(c0, 4)), scale1),
                     _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(c1, 4)), scale1)};
}

/* The same products in fewer operations, for the one-row loop: c << 28 is row 2i's code x 2**28 and c & -16 row
   2i + 1's x 16, exact in fp32; times scale x 2**-28 and scale x 2**-4 they are code x scale rounded once, where those
   factors are exact (int4_factors). */
static inline void int4x16_scaled(const uint8_t *p, __m256 factor0, __m256 factor1, f32x16 *low, f32x16 *high) {
    __m256i c0 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p));
    __m256i c1 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)));
    __m256i high_bits = _mm256_set1_epi32(-16);
    *low = (f32x16){_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_slli_epi32(c0, 28)), factor0),
                    _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_slli_epi32(c1, 28)), factor0)};
    *high = (f32x16){_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(c0, high_bits)), factor1),
                     _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(c1, high_bits)), factor1)};
}

/* int4x16_scaled's factors for two group scales, and whether both are exact (any scale but one below 2**-98 in
   magnitude, or NaN): an inexact factor does not scale back to the scale. */
static inline int int4_factors(float scale0, float scale1, __m256 *factor0, __m256 *factor1) {
    float f0 = scale0 * 0x1p-28f, f1 = scale1 * 0x1p-4f;
    *factor0 = _mm256_set1_ps(f0);
    *factor1 = _mm256_set1_ps(f1);
    return f0 * 0x1p28f == scale0 && f1 * 0x1p4f == scale1;
}

/* One group (k = g .. g + group) of rows 2i and 2i + 1 times one activation row; DECODE sets `low` and `high`, the 16
   weights at k of each row. */
#define INT4_GROUP_ONE(DECODE)                                                         \
    for (int64_t k = g; k < g + group; k += 16) {                                      \
        f32x16 low, high;                                                              \
        DECODE;                                                                        \
        __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);           \
        a0 = _mm256_fmadd_ps(x0, low.lo, a0);                                          \
        a1 = _mm256_fmadd_ps(x1, low.hi, a1);                                          \
        b0 = _mm256_fmadd_ps(x0, high.lo, b0);                                         \
        b1 = _mm256_fmadd_ps(x1, high.hi, b1);                                         \
    }

/* Rows 2i and 2i + 1 (byte row `row`) times one activation row: two accumulators per weight row, in registers. */
static inline void int4_pair_one(const float *x, const uint8_t *row, const float *s0, const float *s1, int64_t K,
                                 int64_t group, int fp8_round, float *y0, float *y1) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
    for (int64_t g = 0; g < K; g += group) {
        float scale0 = s0[g / group], scale1 = s1[g / group];
        __m256 factor0, factor1;
        if (fp8_round) {
            f32x16 table0, table1;
            w4a8_tables(scale0, scale1, &table0, &table1);
            INT4_GROUP_ONE(w4a8x16(row + k, table0, table1, &low, &high))
        } else if (int4_factors(scale0, scale1, &factor0, &factor1)) {
            INT4_GROUP_ONE(int4x16_scaled(row + k, factor0, factor1, &low, &high))
        } else {
            __m256 v0 = _mm256_set1_ps(scale0), v1 = _mm256_set1_ps(scale1);
            INT4_GROUP_ONE(int4x16(row + k, v0, v1, &low, &high))
        }
    }
    *y0 = hsum8(_mm256_add_ps(a0, a1));
    *y1 = hsum8(_mm256_add_ps(b0, b1));
}

/* ... and times `rows` activation rows from m0, each decoded vector used for all of them. */
#define INT4_GROUP_ROWS(DECODE)                                                        \
    for (int64_t k = g; k < g + group; k += 16) {                                      \
        f32x16 low, high;                                                              \
        DECODE;                                                                        \
        for (int64_t r = 0; r < rows; r++) {                                           \
            const float *xr = x + (m0 + r) * K + k;                                    \
            acc0[r] = dot16_add(acc0[r], xr, low);                                     \
            acc1[r] = dot16_add(acc1[r], xr, high);                                    \
        }                                                                              \
    }

void hfptq_gemv_int4(const float *x, int64_t M, int64_t K, const uint8_t *w, const float *scales, int64_t group,
                     int fp8_round, int64_t N, float *y, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t pair = 0; pair < N / 2; pair++) {
        const uint8_t *row = w + pair * K;
        const float *s0 = scales + 2 * pair * (K / group), *s1 = s0 + K / group;
        if (M == 1) {
            int4_pair_one(x, row, s0, s1, K, group, fp8_round, y + 2 * pair, y + 2 * pair + 1);
            continue;
        }
        for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {
            int64_t rows = M - m0 < MAX_ROWS ? M - m0 : MAX_ROWS;
            __m256 acc0[MAX_ROWS], acc1[MAX_ROWS];
            for (int64_t r = 0; r < rows; r++) acc0[r] = acc1[r] = _mm256_setzero_ps();
            for (int64_t g = 0; g < K; g += group) {
                if (fp8_round) {
                    f32x16 table0, table1;
                    w4a8_tables(s0[g / group], s1[g / group], &table0, &table1);
                    INT4_GROUP_ROWS(w4a8x16(row + k, table0, table1, &low, &high))
                } else {
                    __m256 scale0 = _mm256_set1_ps(s0[g / group]), scale1 = _mm256_set1_ps(s1[g / group]);
                    INT4_GROUP_ROWS(int4x16(row + k, scale0, scale1, &low, &high))
                }
            }
            for (int64_t r = 0; r < rows; r++) {
                y[(m0 + r) * N + 2 * pair] = hsum8(acc0[r]);
                y[(m0 + r) * N + 2 * pair + 1] = hsum8(acc1[r]);
            }
        }
    }
}

void hfptq_decode_fp8(const uint8_t *w, int64_t N, int64_t K, float *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k += 16)
            store16(out + n * K + k, scaled16(e4m3x16(w + n * K + k), E4M3_UNIT));
}

void hfptq_decode_int8(const uint8_t *w, int64_t N, int64_t K, float *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k += 16)
            store16(out + n * K + k, int8x16(w + n * K + k));
}

void hfptq_decode_mxfp8(const uint8_t *w, const uint8_t *exponents, int64_t N, int64_t K, float *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k += 16) {
            float scale = e8m0_value(exponents[n * (K / 32) + k / 32]) * E4M3_UNIT;
            store16(out + n * K + k, scaled16(e4m3x16(w + n * K + k), scale));
        }
}

void hfptq_decode_fp8_tiles(const uint8_t *w, const float *scales, int64_t tile, int64_t N, int64_t K, int64_t row0,
                            float *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        float s[K / 16];
        tile_scales_per16(scales + ((row0 + n) / tile) * (K / tile), K, tile, s);
        for (int64_t k = 0; k < K; k += 16)
            store16(out + n * K + k, scaled16(scaled16(e4m3x16(w + n * K + k), E4M3_UNIT), s[k / 16]));
    }
}

void hfptq_decode_nvfp4(const uint8_t *w, const uint8_t *block_scales, int64_t N, int64_t K, float *out,
                        int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k += 16) {
            float scale = E4M3_SCALED[block_scales[n * (K / 16) + k / 16]];
            store16(out + n * K + k, nvfp4x16(w + n * (K / 2) + k / 2, scale, 1));
        }
}

void hfptq_decode_int4(const uint8_t *w, const float *scales, int64_t group, int fp8_round, int64_t N, int64_t K,
                       float *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t pair = 0; pair < N / 2; pair++)
        for (int64_t g = 0; g < K; g += group) {
            const uint8_t *row = w + pair * K;
            const float *s0 = scales + 2 * pair * (K / group) + g / group, *s1 = s0 + K / group;
            float *out0 = out + 2 * pair * K, *out1 = out0 + K;
            f32x16 low, high;
            if (fp8_round) {
                f32x16 table0, table1;
                w4a8_tables(*s0, *s1, &table0, &table1);
                for (int64_t k = g; k < g + group; k += 16) {
                    w4a8x16(row + k, table0, table1, &low, &high);
                    store16(out0 + k, low);
                    store16(out1 + k, high);
                }
            } else {
                __m256 scale0 = _mm256_set1_ps(*s0), scale1 = _mm256_set1_ps(*s1);
                for (int64_t k = g; k < g + group; k += 16) {
                    int4x16(row + k, scale0, scale1, &low, &high);
                    store16(out0 + k, low);
                    store16(out1 + k, high);
                }
            }
        }
}
#endif

#if HFPTQ_SIMD_WIDTH
/* One text for both paths: ROW_DOTS and the decoders are each path's own. */

void hfptq_gemv_fp8(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, float *y, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = w + n * K;
        ROW_DOTS(e4m3x16(row + k), E4M3_UNIT)
    }
}

/* INT8 weight-only: codes int8 (N, K); the per-channel scales are the caller's. */
void hfptq_gemv_int8(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, float *y, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = w + n * K;
        ROW_DOTS(int8x16(row + k), 1.0f)
    }
}
#endif
