/* NVFP4 fake quantization in one pass, bit for bit the torch versions: activations in the serving engine's order
   (`cpu_activations.nvfp4_fake_quantize`), weights in ModelOpt's (`numerics.weights.fake_quantize_weight`).

   Built with `native_gemv.c` into one library by `native.py`, called through `native.nvfp4_fake_quantize` and
   `native.nvfp4_fake_quantize_weight`. At decode sizes (one row of a few thousand activations) the torch
   activation quantizer's dozen ops cost far more than the arithmetic (about 0.25 ms at K = 4096, a fifth of an
   NVFP4 layer's time there); the calibration searches (AWQ's scales, the clip of NVFP4's global amax) fake-quantize
   whole weights dozens of times, a dozen passes each in torch. Here each 16-value block is quantized and
   dequantized in registers. Plain C: every step is one correctly rounded fp32 operation in the reference's order
   (no product is followed by a sum, so the compiler has nothing to contract into an FMA).

   Activations, per block (see `numerics.nvfp4.nvfp4_activation_block_scales`): the scale
   SF = e4m3(min(G * (amax * rcp(6)), 448)) and output scale 1 / (SF * rcp(G)) (0 when SF is 0), then each
   value's E2M1 rounding of x * output scale, times SF * input_scale. Weights, per block (`nvfp4_block_scales`,
   `nvfp4_quantize`, `nvfp4_dequantize`): SF = e4m3(clamp(amax / (6 * scale_2) or 1 when 0, 2**-9, 448)), the
   step SF * scale_2, and each value's E2M1 rounding of x / step, times the step.
*/
#include <stdint.h>
#include <string.h>

#define NVFP4_BLOCK 16
#define PARALLEL_VALUES 65536 /* fewer values than this run on one thread: a decode row gains nothing from more */

static inline uint32_t bits_of(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return u;
}

static inline float float_of(uint32_t u) {
    float v;
    memcpy(&v, &u, sizeof v);
    return v;
}

/* v in [0, 448] rounded to an e4m3 value, to nearest even: adding c = 2**(e + 20) for v in [2**e, 2**(e+1)) rounds
   v to a multiple of c's ulp, 2**(e-3) (3 mantissa bits); below 2**-6, c = 2**14 and its ulp 2**-9 is e4m3's
   subnormal step. Subtracting c back is exact. */
static inline float e4m3_rounded(float v) {
    uint32_t binade = bits_of(v) & 0x7F800000u;
    binade = binade < (121u << 23) ? 121u << 23 : binade;
    float c = float_of(binade + (20u << 23));
    return (v + c) - c;
}

/* |y| rounded onto E2M1's grid, ties to the even mantissa (`numerics.nvfp4.e2m1_codes`), saturating at 6. */
static inline float e2m1_magnitude(float m) {
    static const float grid[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    int index = (m > 0.25f) + (m >= 0.75f) + (m > 1.25f) + (m >= 1.75f) + (m > 2.5f) + (m >= 3.5f) + (m > 5.0f);
    return grid[index];
}

/* max |x| over one block, and whether the block holds a NaN or an infinity. */
static inline float block_amax(const float *x, int *non_finite) {
    float amax = 0.0f;
    for (int i = 0; i < NVFP4_BLOCK; i++) {
        float m = float_of(bits_of(x[i]) & 0x7FFFFFFFu);
        *non_finite |= (bits_of(m) >= 0x7F800000u);
        amax = m > amax ? m : amax;
    }
    return amax;
}

/* The block's values rounded onto E2M1 after `scaled` (x * output scale or x / step), times `step`. */
#define E2M1_ROUND_TRIP(SCALED)                                                        \
    for (int i = 0; i < NVFP4_BLOCK; i++) {                                            \
        float y = SCALED;                                                              \
        float magnitude = e2m1_magnitude(float_of(bits_of(y) & 0x7FFFFFFFu));         \
        out[i] = (y < 0.0f ? -magnitude : magnitude) * step;                           \
    }

/* One block of activations, g = 1 / input_scale and rcp_g = 1 / g: returns 0, or 1 if it holds a NaN or an
   infinity (the caller then keeps the torch version). */
static inline int activation_block(const float *x, float g, float rcp_g, float input_scale, float *out) {
    int non_finite = 0;
    float scale = block_amax(x, &non_finite) * 0x1.555556p-3f; /* rcp(6) in fp32, as numerics.nvfp4.RCP_E2M1_MAX */
    scale = scale * g;
    float sf = e4m3_rounded(scale < 448.0f ? scale : 448.0f);
    float output_scale = sf > 0.0f ? 1.0f / (sf * rcp_g) : 0.0f;
    float step = sf * input_scale;
    E2M1_ROUND_TRIP(x[i] * output_scale)
    return non_finite;
}

/* One block of weights under the second-level scale `scale_2`, `denominator` being the fp32 6 * scale_2; returns 0,
   or 1 if it holds a NaN or an infinity. */
static inline int weight_block(const float *x, float scale_2, float denominator, float *out) {
    int non_finite = 0;
    float block = block_amax(x, &non_finite) / denominator;
    block = block == 0.0f ? 1.0f : block;
    block = block < 0x1p-9f ? 0x1p-9f : (block > 448.0f ? 448.0f : block);
    float step = e4m3_rounded(block) * scale_2;
    E2M1_ROUND_TRIP(x[i] / step)
    return non_finite;
}

/* x (count values, count a multiple of 16, contiguous fp32) -> out, the fake-quantized activations under the fp32
   `input_scale`. Returns 1 if x holds a NaN or an infinity (out is then not the reference's), else 0. */
int hfptq_nvfp4_activation_fake_quantize(const float *x, int64_t count, float input_scale, float *out, int threads) {
    int non_finite = 0;
    int64_t blocks = count / NVFP4_BLOCK;
    const float g = 1.0f / input_scale, rcp_g = 1.0f / g; /* correctly rounded, as torch.reciprocal */
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : non_finite) if (count >= PARALLEL_VALUES)
    for (int64_t b = 0; b < blocks; b++)
        non_finite |= activation_block(x + b * NVFP4_BLOCK, g, rcp_g, input_scale, out + b * NVFP4_BLOCK);
    return non_finite;
}

/* x (count weights, rows of a multiple of 16, contiguous fp32) -> out, the fake-quantized weights under the fp32
   second-level scale `scale_2` (`numerics.nvfp4.nvfp4_global_scale`). Returns 1 if x holds a NaN or an infinity. */
int hfptq_nvfp4_weight_fake_quantize(const float *x, int64_t count, float scale_2, float *out, int threads) {
    int non_finite = 0;
    int64_t blocks = count / NVFP4_BLOCK;
    const float denominator = 6.0f * scale_2;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : non_finite) if (count >= PARALLEL_VALUES)
    for (int64_t b = 0; b < blocks; b++)
        non_finite |= weight_block(x + b * NVFP4_BLOCK, scale_2, denominator, out + b * NVFP4_BLOCK);
    return non_finite;
}
