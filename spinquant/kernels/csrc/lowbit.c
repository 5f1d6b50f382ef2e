/* spinquant's own CPU kernels: int4 / int8 weights x int8 per-token activations, quantization fused in.
 *
 * One call per linear layer: x [M, K] (float32 or bf16) is quantized per token exactly as
 * spinquant.kernels.linear.token_codes does (same float operations, same order: bit-identical codes),
 * then multiplied with integer arithmetic against weights held in a row-tiled layout:
 *
 *   int4: wt [N/16][Kp/8][16 rows][4 bytes]; byte j of row r in k-block b holds the unsigned code u of
 *         k = 8b + j in its low nibble and of k = 8b + 4 + j in its high nibble; w = (u - 8)·s + z per group.
 *         scales / zeros bf16 [N/16][G][16]; rsum float32 [N] = sum_k w (the activation zero-point term).
 *   int8: w [N, ldw] row-major signed codes q (torch's layout, shared with a tied embedding), w = q·s per
 *         row; rsum int32 [N] = sum_k q.
 *
 * int4: sixteen rows sit in the sixteen int32 lanes of an AVX-512 register and four consecutive k in each
 * lane's bytes, so one VPDPBUSD does 64 multiply-adds with a broadcast activation word and no
 * horizontal sums. int8: one VPDPBUSD per 64 k of a row, reduced once per row. Integer sums are exact per group; only group scales are applied in float.
 * x86 without AVX-512 VNNI runs the same layouts on AVX2 (vpmaddubsw / vpmaddwd), ARMv8.2+ on sdot; anything
 * else through plain C loops (each tested like the AVX-512 path; ARM cross-compiled and run under qemu-user).
 * Built and loaded by spinquant/kernels/native.py (gcc -O3 -march=native -fopenmp).
 */
#include <math.h>
#include <stdint.h>

/* return codes of the sq_* entry points */
#define SQ_OK 0
#define SQ_EINVAL (-1)  /* arguments that would read or write out of bounds (native.py checks first, with a message) */
#define SQ_ENOMEM (-2)  /* a work buffer could not be allocated */
#define SQ_W8A8_MAX_K 65793  /* int8 x int8 sums stay exact in int32 up to this K (65793·255·128 < 2^31) */
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && !defined(SQ_NO_SIMD)
#include <immintrin.h>
#define SQ_VNNI 1
#ifndef SQ_DPBUSD_INTRINSIC
/* acc += VPDPBUSD(a unsigned, b signed) in place, for the int4 kernels: GCC 12 compiles the intrinsic in their loops
 * with two register copies around every instruction (inline asm: 1.26x the int4 GEMM on the 1B shapes at 512
 * tokens, 1.06x at one token; the int8 kernels keep the intrinsic, whose one-token stream was measured faster) */
#define DPBUSD(acc, a, b) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "vm"(b))
#else
#define DPBUSD(acc, a, b) ((acc) = _mm512_dpbusd_epi32((acc), (a), (b)))
#endif
#else
#define SQ_VNNI 0
#endif
/* x86 without AVX-512 (most laptops): the same layouts on AVX2 (vpmaddubsw / vpmaddwd: u8 x s8 pairs summed in
 * int16, |sum| <= 2·15·128, then in int32; int8 x int8 widened to int16 first, exact). */
#if !SQ_VNNI && defined(__AVX2__) && defined(__FMA__) && !defined(SQ_NO_SIMD)
#include <immintrin.h>
#define SQ_AVX2 1
#else
#define SQ_AVX2 0
#endif
/* ARMv8.2+ with the dot-product extension (phones, Apple / Graviton machines): sdot multiplies signed bytes in
 * groups of four into int32 lanes, so the int4 nibbles (0..15) and int8 codes enter as they are. */
#if defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD) && !defined(SQ_NO_SIMD)
#include <arm_neon.h>
#define SQ_SDOT 1
#else
#define SQ_SDOT 0
#endif

#define MB 4 /* tokens per register block */
#ifndef PREFETCH
#define PREFETCH 4096 /* bytes ahead of the int4 weight stream (software prefetch; 4096 against 2048: 1.2x decode of the 1B shape on 2 EPYC cores) */
#endif
#if !defined(__x86_64__) && !defined(__i386__)
#define _mm_prefetch(p, h) __builtin_prefetch((p))
#endif

/* which vector path this build runs: 0 portable C loops, 1 AVX-512 VNNI, 2 AVX2, 3 ARM sdot */
int sq_simd(void) { return SQ_VNNI ? 1 : SQ_AVX2 ? 2 : SQ_SDOT ? 3 : 0; }

#ifdef _OPENMP
#include <omp.h>
int sq_threads(void) { return omp_get_max_threads(); }
#else
int sq_threads(void) { return 1; }
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch's .to(torch.bfloat16) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Activation spec of the per-token quantizer (see linear.token_codes). */
typedef struct {
    float qmin, qmax, clip;
    int symmetric, shift; /* codes are stored as v + shift in int8 */
    float had;            /* > 0: each token is first multiplied by H_K / had (a fused online R4; K a power of two) */
} act_spec;

/* One token: x [K] -> codes c [Kp] (int8, v + shift; padding gets the code of 0), returns scale and
 * zp = zero + shift, so that x = (c - zp)·scale. */
static void quant_token(const float *x, int K, int Kp, const act_spec *a, int8_t *c, float *scale_out, int *zp_out) {
    float mn = 0.0f, mx = 0.0f; /* aminmax, then clamp(max=0) / clamp(min=0) */
    for (int k = 0; k < K; k++) {
        mn = x[k] < mn ? x[k] : mn;
        mx = x[k] > mx ? x[k] : mx;
    }
    if (a->clip != 1.0f) {
        mn *= a->clip;
        mx *= a->clip;
    }
    float scale, zero;
    if (a->symmetric) {
        float amx = fabsf(mx), amn = fabsf(mn);
        scale = (amx >= amn ? amx : amn) / a->qmax;
        zero = 0.0f;
    } else {
        scale = (mx - mn) / a->qmax;
        zero = rintf(-mn / (scale > 1.17549435e-38f ? scale : 1.17549435e-38f));
    }
    if (!(scale > 0.0f)) scale = 1.0f;
    for (int k = 0; k < K; k++) {
        float v = rintf(x[k] / scale) + zero;
        v = v < a->qmin ? a->qmin : (v > a->qmax ? a->qmax : v);
        c[k] = (int8_t)((int)v + a->shift);
    }
    int zp = (int)zero + a->shift;
    for (int k = K; k < Kp; k++) c[k] = (int8_t)zp;
    *scale_out = scale;
    *zp_out = zp;
}

/* v [n] <- v · H_n / div in place (n a power of two, Sylvester order): the butterfly stages of
 * spinquant.rotation.hadamard._fwht_pow2 in the same order, in float32. */
static void fwht_row(float *v, int n, float div) {
    for (int h = 1; h < n; h *= 2)
        for (int j0 = 0; j0 < n; j0 += 2 * h)
            for (int j = j0; j < j0 + h; j++) {
                const float a = v[j], b = v[j + h];
                v[j] = a + b;
                v[j + h] = a - b;
            }
    for (int j = 0; j < n; j++) v[j] /= div;
}

/* Quantize M tokens (float32 or bf16 input rows of stride K), each rotated first when a->had > 0 (then exactly
 * what sq_fwht followed by the float32 quantization computes). Returns SQ_ENOMEM when a row buffer cannot be had. */
static int quant_tokens(const void *x, int x_bf16, int M, int K, int Kp, const act_spec *a, int8_t *c, float *scale,
                        int *zp) {
    int failed = 0;
    #pragma omp parallel if (M > 8)
    {
        const int need_row = x_bf16 || a->had > 0.0f;
        float *row = need_row ? (float *)malloc(sizeof(float) * (size_t)K) : NULL;
        const int ok = !need_row || row != NULL;
        if (!ok) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int m = 0; m < M; m++) {
            if (!ok) continue;
            const float *xr;
            if (x_bf16) {
                const uint16_t *h = (const uint16_t *)x + (size_t)m * K;
                for (int k = 0; k < K; k++) row[k] = bf16_to_f32(h[k]);
                xr = row;
            } else if (a->had > 0.0f) {
                memcpy(row, (const float *)x + (size_t)m * K, sizeof(float) * (size_t)K);
                xr = row;
            } else {
                xr = (const float *)x + (size_t)m * K;
            }
            if (a->had > 0.0f) fwht_row(row, K, a->had);
            quant_token(xr, K, Kp, a, c + (size_t)m * Kp, scale + m, zp + m);
        }
        free(row);
    }
    return failed ? SQ_ENOMEM : SQ_OK;
}

/* Exposed for the tests: the codes (v + shift), scales and zp of M tokens. */
int sq_quant_act(const void *x, int x_bf16, int M, int K, int Kp, float qmin, float qmax, float clip, int symmetric,
                 int shift, float had, int8_t *c, float *scale, int *zp) {
    if (!x || !c || !scale || !zp || M < 0 || K < 1 || Kp < K || (had > 0.0f && (K & (K - 1)))) return SQ_EINVAL;
    act_spec a = {qmin, qmax, clip, symmetric, shift, had};
    return quant_tokens(x, x_bf16, M, K, Kp, &a, c, scale, zp);
}

/* y[m, n0 : n0 + count] = v (bf16 or float32 output of row stride N). */
static inline void store_row(const float *v, int count, void *y, int y_bf16, int m, int N, int n0) {
    if (y_bf16) {
        uint16_t *o = (uint16_t *)y + (size_t)m * N + n0;
        for (int i = 0; i < count; i++) o[i] = f32_to_bf16(v[i]);
    } else {
        memcpy((float *)y + (size_t)m * N + n0, v, sizeof(float) * count);
    }
}

/* ---- int4 weights ------------------------------------------------------------------------------ */

#if SQ_VNNI
/* One 16-row tile x mb tokens (mb a compile-time constant at each call site: the loops over tokens unroll and
 * the accumulators live in registers; two per token, for the low and high nibbles, halve the dependency
 * chains). out[i][r] = y of token m0 + i, row r of the tile. */
static inline __attribute__((always_inline)) void w4_tile_vnni(
    const uint8_t *wtile, const uint16_t *st, const uint16_t *zt, const int8_t *c, int Kp, const int32_t *csum,
    int G, int bpg, const float *rsum, const int *zp, const float *sx, int m0, const int mb, float out[][16]) {
    const __m512i low = _mm512_set1_epi8(0x0f);
    __m512 facc[MB];
    for (int i = 0; i < mb; i++) facc[i] = _mm512_setzero_ps();
    for (int g = 0; g < G; g++) {
        __m512i a0[MB], a1[MB];
        for (int i = 0; i < mb; i++) a0[i] = a1[i] = _mm512_setzero_si512();
        for (int b = g * bpg; b < (g + 1) * bpg; b++) {
            _mm_prefetch((const char *)(wtile + (size_t)b * 64 + PREFETCH), _MM_HINT_T0);
            __m512i w = _mm512_loadu_si512((const void *)(wtile + (size_t)b * 64));
            __m512i lo = _mm512_and_si512(w, low), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low);
            for (int i = 0; i < mb; i++) {
                const int8_t *ci = c + (size_t)(m0 + i) * Kp + (size_t)b * 8;
                int32_t w0, w1;
                memcpy(&w0, ci, 4);
                memcpy(&w1, ci + 4, 4);
                DPBUSD(a0[i], lo, _mm512_set1_epi32(w0));
                DPBUSD(a1[i], hi, _mm512_set1_epi32(w1));
            }
        }
        __m512 s = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(st + (size_t)g * 16))), 16));
        __m512 z = zt ? _mm512_castsi512_ps(_mm512_slli_epi32(
                            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(zt + (size_t)g * 16))), 16))
                      : _mm512_setzero_ps();
        for (int i = 0; i < mb; i++) {
            int32_t cs = csum[(size_t)(m0 + i) * G + g];
            __m512i d = _mm512_sub_epi32(_mm512_add_epi32(a0[i], a1[i]), _mm512_set1_epi32(8 * cs)); /* sum (u-8)c */
            facc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, facc[i]);
            if (zt) facc[i] = _mm512_fmadd_ps(z, _mm512_set1_ps((float)cs), facc[i]);
        }
    }
    __m512 r = _mm512_loadu_ps(rsum);
    for (int i = 0; i < mb; i++) {
        __m512 v = _mm512_fnmadd_ps(_mm512_set1_ps((float)zp[m0 + i]), r, facc[i]);
        _mm512_storeu_ps(out[i], _mm512_mul_ps(v, _mm512_set1_ps(sx[m0 + i])));
    }
}
#endif

#if SQ_AVX2
/* w4_tile_vnni on AVX2: the 64-byte k-block of a tile is two 256-bit halves (rows 0-7, 8-15); per half and token,
 * vpmaddubsw multiplies the unsigned nibbles by the broadcast signed activation bytes into int16 pairs and
 * vpmaddwd(·, 1) sums each row's four products into its int32 lane. */
static inline __attribute__((always_inline)) void w4_tile_avx2(
    const uint8_t *wtile, const uint16_t *st, const uint16_t *zt, const int8_t *c, int Kp, const int32_t *csum,
    int G, int bpg, const float *rsum, const int *zp, const float *sx, int m0, const int mb, float out[][16]) {
    const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    __m256 facc[MB][2];
    for (int i = 0; i < mb; i++) facc[i][0] = facc[i][1] = _mm256_setzero_ps();
    for (int g = 0; g < G; g++) {
        __m256i acc[MB][2];
        for (int i = 0; i < mb; i++) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
        for (int b = g * bpg; b < (g + 1) * bpg; b++) {
            _mm_prefetch((const char *)(wtile + (size_t)b * 64 + PREFETCH), _MM_HINT_T0);
            for (int h = 0; h < 2; h++) {
                __m256i w = _mm256_loadu_si256((const __m256i *)(wtile + (size_t)b * 64 + 32 * h));
                __m256i lo = _mm256_and_si256(w, low), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
                for (int i = 0; i < mb; i++) {
                    const int8_t *ci = c + (size_t)(m0 + i) * Kp + (size_t)b * 8;
                    int32_t w0, w1;
                    memcpy(&w0, ci, 4);
                    memcpy(&w1, ci + 4, 4);
                    __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(w0)),
                                                 _mm256_maddubs_epi16(hi, _mm256_set1_epi32(w1)));
                    acc[i][h] = _mm256_add_epi32(acc[i][h], _mm256_madd_epi16(p, ones));
                }
            }
        }
        for (int h = 0; h < 2; h++) {
            __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(st + (size_t)g * 16 + 8 * h))), 16));
            __m256 z = zt ? _mm256_castsi256_ps(_mm256_slli_epi32(
                                _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(zt + (size_t)g * 16 + 8 * h))), 16))
                          : _mm256_setzero_ps();
            for (int i = 0; i < mb; i++) {
                int32_t cs = csum[(size_t)(m0 + i) * G + g];
                __m256i d = _mm256_sub_epi32(acc[i][h], _mm256_set1_epi32(8 * cs)); /* sum (u - 8)·c */
                facc[i][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), s, facc[i][h]);
                if (zt) facc[i][h] = _mm256_fmadd_ps(z, _mm256_set1_ps((float)cs), facc[i][h]);
            }
        }
    }
    for (int h = 0; h < 2; h++) {
        __m256 r = _mm256_loadu_ps(rsum + 8 * h);
        for (int i = 0; i < mb; i++) {
            __m256 v = _mm256_fnmadd_ps(_mm256_set1_ps((float)zp[m0 + i]), r, facc[i][h]);
            _mm256_storeu_ps(out[i] + 8 * h, _mm256_mul_ps(v, _mm256_set1_ps(sx[m0 + i])));
        }
    }
}
#endif

#if SQ_SDOT
/* w4_tile_vnni on ARM: the 64-byte k-block of a tile is four 128-bit quarters (rows 4q..4q+3, four k each); sdot
 * of a quarter's nibbles with the broadcast activation word sums each row's four products into its int32 lane. */
static inline __attribute__((always_inline)) void w4_tile_sdot(
    const uint8_t *wtile, const uint16_t *st, const uint16_t *zt, const int8_t *c, int Kp, const int32_t *csum,
    int G, int bpg, const float *rsum, const int *zp, const float *sx, int m0, const int mb, float out[][16]) {
    const uint8x16_t low = vdupq_n_u8(0x0f);
    float32x4_t facc[MB][4];
    for (int i = 0; i < mb; i++)
        for (int q = 0; q < 4; q++) facc[i][q] = vdupq_n_f32(0.0f);
    for (int g = 0; g < G; g++) {
        int32x4_t acc[MB][4];
        for (int i = 0; i < mb; i++)
            for (int q = 0; q < 4; q++) acc[i][q] = vdupq_n_s32(0);
        for (int b = g * bpg; b < (g + 1) * bpg; b++) {
            __builtin_prefetch(wtile + (size_t)b * 64 + PREFETCH);
            int8x16_t lo[4], hi[4];
            for (int q = 0; q < 4; q++) {
                uint8x16_t w = vld1q_u8(wtile + (size_t)b * 64 + 16 * q);
                lo[q] = vreinterpretq_s8_u8(vandq_u8(w, low));
                hi[q] = vreinterpretq_s8_u8(vshrq_n_u8(w, 4));
            }
            for (int i = 0; i < mb; i++) {
                const int8_t *ci = c + (size_t)(m0 + i) * Kp + (size_t)b * 8;
                int32_t w0, w1;
                memcpy(&w0, ci, 4);
                memcpy(&w1, ci + 4, 4);
                const int8x16_t a0 = vreinterpretq_s8_s32(vdupq_n_s32(w0)), a1 = vreinterpretq_s8_s32(vdupq_n_s32(w1));
                for (int q = 0; q < 4; q++) acc[i][q] = vdotq_s32(vdotq_s32(acc[i][q], lo[q], a0), hi[q], a1);
            }
        }
        for (int q = 0; q < 4; q++) {
            float32x4_t sc = vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(st + (size_t)g * 16 + 4 * q), 16));
            float32x4_t z = zt ? vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(zt + (size_t)g * 16 + 4 * q), 16))
                               : vdupq_n_f32(0.0f);
            for (int i = 0; i < mb; i++) {
                int32_t cs = csum[(size_t)(m0 + i) * G + g];
                int32x4_t d = vsubq_s32(acc[i][q], vdupq_n_s32(8 * cs)); /* sum (u - 8)·c */
                facc[i][q] = vfmaq_f32(facc[i][q], vcvtq_f32_s32(d), sc);
                if (zt) facc[i][q] = vfmaq_f32(facc[i][q], z, vdupq_n_f32((float)cs));
            }
        }
    }
    for (int q = 0; q < 4; q++) {
        float32x4_t r = vld1q_f32(rsum + 4 * q);
        for (int i = 0; i < mb; i++) {
            float32x4_t v = vfmsq_f32(facc[i][q], vdupq_n_f32((float)zp[m0 + i]), r);
            vst1q_f32(out[i] + 4 * q, vmulq_f32(v, vdupq_n_f32(sx[m0 + i])));
        }
    }
}
#endif

/* One register block of mb tokens on a tile kernel, with mb a constant at each call (the loops over tokens unroll
 * and the accumulators stay in registers). */
#define W4_TILES(tile)                                                                                                \
    switch (mb) {                                                                                                     \
    case 1: tile(wtile, st, zt, c, Kp, csum, G, bpg, rsum + (size_t)t * 16, zp, sx, m0, 1, out); break;              \
    case 2: tile(wtile, st, zt, c, Kp, csum, G, bpg, rsum + (size_t)t * 16, zp, sx, m0, 2, out); break;              \
    case 3: tile(wtile, st, zt, c, Kp, csum, G, bpg, rsum + (size_t)t * 16, zp, sx, m0, 3, out); break;              \
    default: tile(wtile, st, zt, c, Kp, csum, G, bpg, rsum + (size_t)t * 16, zp, sx, m0, 4, out);                    \
    }

#if SQ_VNNI
#define LANES 16 /* int4 prefill: tokens per register (one per int32 lane) */
#define RB 8     /* int4 prefill: rows per register block (8 int32 + 8 float accumulators) */
#ifndef W4_LANES_MIN
#define W4_LANES_MIN 32 /* the prefill kernel takes calls of at least this many tokens (measured faster from 32 on the 1B shapes) */
#endif
/* int4 prefill on AVX-512 VNNI, for many tokens: the 16 lanes of a register are 16 tokens (four consecutive k of
 * each in its lane's bytes, codes + 128 as unsigned), and a weight row's four k as signed bytes (u - 8), unpacked
 * once per tile for all tokens, are the broadcast operand. One VPDPBUSD: one row x 16 tokens x 4 k; RB rows share
 * each activation load; one int32 -> float multiply-add per row and group. With c' = c + 128:
 *   sum_k w_k c_k = sum_g [s_g · sum (u - 8)·c' + z_g · sum c'] - 128·rsum,  so  y = (that - zp·rsum)·sx.
 * al: codes [TB][Kp/4][16][4] (c + 128; tokens past M hold 128), csf: float [TB][G][16] per-group sums of c' (only
 * with zeros: the z_g term is their one reader). */
static void w4_tile_lanes(const uint8_t *wtile, const uint16_t *st, const uint16_t *zt, const uint8_t *al,
                          const float *csf, int TB, int Kp, int G, int gs, const float *rsum, const int *zp,
                          const float *sx, int M, int rows, int8_t *wus, float *sf, float *zf, void *y, int y_bf16,
                          int N, int n0) {
    const int KB = Kp / 8, KQ = Kp / 4, cpg = gs / 4; /* 4-k chunks: per row, per group */
    const __m512i low = _mm512_set1_epi8(0x0f), eight = _mm512_set1_epi8(8);
    for (int b = 0; b < KB; b++) { /* unpack the tile once: wus [Kp/4][16 rows][4] signed u - 8 */
        __m512i w = _mm512_loadu_si512((const void *)(wtile + (size_t)b * 64));
        _mm512_storeu_si512((void *)(wus + (size_t)b * 128), _mm512_sub_epi8(_mm512_and_si512(w, low), eight));
        _mm512_storeu_si512((void *)(wus + (size_t)b * 128 + 64),
                            _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(w, 4), low), eight));
    }
    for (int i = 0; i < G * 16; i++) {
        sf[i] = bf16_to_f32(st[i]);
        if (zt) zf[i] = bf16_to_f32(zt[i]);
    }
    for (int tb = 0; tb < TB; tb++) {
        const uint8_t *at = al + (size_t)tb * KQ * 64;
        const int valid = M - tb * LANES < LANES ? M - tb * LANES : LANES;
        float zpv[LANES] = {0}, sxv[LANES] = {0}, o[16][LANES];
        for (int l = 0; l < valid; l++) {
            zpv[l] = (float)(zp[tb * LANES + l] + 128);
            sxv[l] = sx[tb * LANES + l];
        }
        const __m512 zp128 = _mm512_loadu_ps(zpv), sxl = _mm512_loadu_ps(sxv);
        for (int h = 0; h < 16; h += RB) {
            __m512 facc[RB];
            for (int r = 0; r < RB; r++) facc[r] = _mm512_setzero_ps();
            for (int g = 0; g < G; g++) {
                __m512i acc[RB];
                for (int r = 0; r < RB; r++) acc[r] = _mm512_setzero_si512();
                for (int q = g * cpg; q < (g + 1) * cpg; q++) {
                    const __m512i a = _mm512_loadu_si512((const void *)(at + (size_t)q * 64));
                    const int8_t *wq = wus + (size_t)q * 64 + 4 * h;
                    for (int r = 0; r < RB; r++) {
                        int32_t w4;
                        memcpy(&w4, wq + 4 * r, 4);
                        DPBUSD(acc[r], a, _mm512_set1_epi32(w4));
                    }
                }
                const __m512 cs = zt ? _mm512_loadu_ps(csf + ((size_t)tb * G + g) * LANES) : _mm512_setzero_ps();
                for (int r = 0; r < RB; r++) {
                    facc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r]), _mm512_set1_ps(sf[g * 16 + h + r]), facc[r]);
                    if (zt) facc[r] = _mm512_fmadd_ps(cs, _mm512_set1_ps(zf[g * 16 + h + r]), facc[r]);
                }
            }
            for (int r = 0; r < RB; r++) {
                __m512 v = _mm512_fnmadd_ps(zp128, _mm512_set1_ps(rsum[h + r]), facc[r]);
                _mm512_storeu_ps(o[h + r], _mm512_mul_ps(v, sxl));
            }
        }
        for (int l = 0; l < valid; l++) {
            float v[16];
            for (int r = 0; r < rows; r++) v[r] = o[r][l];
            store_row(v, rows, y, y_bf16, tb * LANES + l, N, n0);
        }
    }
}

/* The prefill path of sq_w4a8_linear: codes c [M][Kp] (v + shift) -> lane layout, then the tiles in parallel. */
static int w4a8_lanes(const int8_t *c, int M, const uint8_t *wt, const uint16_t *scales, const uint16_t *zeros,
                      const float *rsum, int N, int Kp, int gs, const float *sx, const int *zp, void *y, int y_bf16) {
    const int TB = (M + LANES - 1) / LANES, KQ = Kp / 4, G = Kp / gs, KB = Kp / 8, NT = (N + 15) / 16;
    uint8_t *al = (uint8_t *)aligned_alloc(64, (size_t)TB * KQ * 64);
    float *csf = zeros ? (float *)malloc(sizeof(float) * (size_t)TB * G * LANES + 1) : NULL;
    if (!al || (zeros && !csf)) {
        free(al);
        free(csf);
        return SQ_ENOMEM;
    }
    #pragma omp parallel for schedule(static)
    for (int tb = 0; tb < TB; tb++)
        for (int l = 0; l < LANES; l++) {
            const int m = tb * LANES + l;
            for (int q = 0; q < KQ; q++) {
                uint32_t v = 0x80808080u; /* a token past M: code 0 + 128 */
                if (m < M) {
                    memcpy(&v, c + (size_t)m * Kp + 4 * q, 4);
                    v ^= 0x80808080u;
                }
                memcpy(al + ((size_t)tb * KQ + q) * 64 + 4 * l, &v, 4);
            }
            for (int g = 0; csf && g < G; g++) {
                int32_t s = 0;
                if (m < M)
                    for (int k = g * gs; k < (g + 1) * gs; k++) s += c[(size_t)m * Kp + k] + 128;
                csf[((size_t)tb * G + g) * LANES + l] = (float)s;
            }
        }
    int failed = 0;
    #pragma omp parallel
    {
        int8_t *wus = (int8_t *)aligned_alloc(64, (size_t)KB * 128);
        float *sf = (float *)malloc(sizeof(float) * (size_t)G * 16), *zf = (float *)malloc(sizeof(float) * (size_t)G * 16);
        const int ok = wus && sf && zf;
        if (!ok) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int t = 0; t < NT; t++) {
            if (!ok) continue;
            const int rows = N - t * 16 < 16 ? N - t * 16 : 16;
            w4_tile_lanes(wt + (size_t)t * KB * 64, scales + (size_t)t * G * 16, zeros ? zeros + (size_t)t * G * 16 : NULL,
                          al, csf, TB, Kp, G, gs, rsum + (size_t)t * 16, zp, sx, M, rows, wus, sf, zf, y, y_bf16, N,
                          t * 16);
        }
        free(wus);
        free(sf);
        free(zf);
    }
    free(al);
    free(csf);
    return failed ? SQ_ENOMEM : SQ_OK;
}
#endif

/* y [M, N] = dequant(x) @ W^T. gs: group size (a multiple of 8 dividing Kp); zeros may be NULL (symmetric). */
int sq_w4a8_linear(const void *x, int x_bf16, int M, int K, float qmin, float qmax, float clip, int symmetric,
                   int shift, float had, const uint8_t *wt, const uint16_t *scales, const uint16_t *zeros,
                   const float *rsum, int N, int Kp, int gs, void *y, int y_bf16) {
    /* the caller (native.py) checks all of this with a message; here it only keeps a bad call from writing out of
     * bounds: K <= Kp (the codes buffer is Kp wide), gs a multiple of 8 dividing Kp, the int32 sums within range */
    if (!x || !wt || !scales || !rsum || !y || M < 0 || N < 1 || K < 1 || K > Kp || gs < 8 || gs % 8 || Kp % gs ||
        (int64_t)gs * 255 * 15 > INT32_MAX || (had > 0.0f && (K & (K - 1))))
        return SQ_EINVAL;
    act_spec a = {qmin, qmax, clip, symmetric, shift, had};
    const int G = Kp / gs, KB = Kp / 8, NT = (N + 15) / 16, bpg = gs / 8;
    int8_t *c = (int8_t *)aligned_alloc(64, ((size_t)M * Kp + 63) / 64 * 64 + 64);
    float *sx = (float *)malloc(sizeof(float) * M + 1);
    int *zp = (int *)malloc(sizeof(int) * M + 1);
    int32_t *csum = (int32_t *)malloc(sizeof(int32_t) * (size_t)M * G + 1); /* per-group code sums */
    if (!c || !sx || !zp || !csum || quant_tokens(x, x_bf16, M, K, Kp, &a, c, sx, zp) != SQ_OK) {
        free(c);
        free(sx);
        free(zp);
        free(csum);
        return SQ_ENOMEM;
    }
#if SQ_VNNI
    if (M >= W4_LANES_MIN) {
        const int rc = w4a8_lanes(c, M, wt, scales, zeros, rsum, N, Kp, gs, sx, zp, y, y_bf16);
        free(c);
        free(sx);
        free(zp);
        free(csum);
        return rc;
    }
#endif
    for (int m = 0; m < M; m++)
        for (int g = 0; g < G; g++) {
            int32_t s = 0;
            for (int k = g * gs; k < (g + 1) * gs; k++) s += c[(size_t)m * Kp + k];
            csum[(size_t)m * G + g] = s;
        }
    #pragma omp parallel for schedule(static)
    for (int t = 0; t < NT; t++) {
        const uint8_t *wtile = wt + (size_t)t * KB * 64;
        const uint16_t *st = scales + (size_t)t * G * 16, *zt = zeros ? zeros + (size_t)t * G * 16 : NULL;
        for (int m0 = 0; m0 < M; m0 += MB) {
            const int mb = M - m0 < MB ? M - m0 : MB;
            float out[MB][16];
#if SQ_VNNI
            W4_TILES(w4_tile_vnni);
#elif SQ_AVX2
            W4_TILES(w4_tile_avx2);
#elif SQ_SDOT
            W4_TILES(w4_tile_sdot);
#else
            for (int i = 0; i < mb; i++) {
                float f[16] = {0};
                const int8_t *ci = c + (size_t)(m0 + i) * Kp;
                for (int g = 0; g < G; g++) {
                    int32_t acc[16] = {0};
                    for (int b = g * bpg; b < (g + 1) * bpg; b++) {
                        const uint8_t *wb = wtile + (size_t)b * 64;
                        for (int r = 0; r < 16; r++)
                            for (int j = 0; j < 4; j++) {
                                uint8_t byte = wb[r * 4 + j];
                                acc[r] += (int32_t)(byte & 15) * ci[b * 8 + j] + (int32_t)(byte >> 4) * ci[b * 8 + 4 + j];
                            }
                    }
                    int32_t cs = csum[(size_t)(m0 + i) * G + g];
                    for (int r = 0; r < 16; r++) {
                        f[r] += (float)(acc[r] - 8 * cs) * bf16_to_f32(st[(size_t)g * 16 + r]);
                        if (zt) f[r] += bf16_to_f32(zt[(size_t)g * 16 + r]) * (float)cs;
                    }
                }
                for (int r = 0; r < 16; r++) out[i][r] = (f[r] - (float)zp[m0 + i] * rsum[(size_t)t * 16 + r]) * sx[m0 + i];
            }
#endif
            const int rows = N - t * 16 < 16 ? N - t * 16 : 16; /* the last tile may be partial */
            for (int i = 0; i < mb; i++) store_row(out[i], rows, y, y_bf16, m0 + i, N, t * 16);
        }
    }
    free(c);
    free(sx);
    free(zp);
    free(csum);
    return SQ_OK;
}

/* ---- int8 weights ------------------------------------------------------------------------------ */

#define NR 8  /* int8: rows per step (eight streams in flight) */
#define MB8 2 /* int8: tokens per step (NR x MB8 accumulators stay in registers) */
#ifndef W8_AHEAD
#define W8_AHEAD NR /* rows ahead the int8 weight streams prefetch */
#endif
#ifndef W8_STREAM_AHEAD
#define W8_STREAM_AHEAD 4096 /* bytes ahead the one-token int8 stream prefetches */
#endif

#if SQ_VNNI
/* acc[r][i] = sum_k w[n0 + r][k] · c[m0 + i][k] for nb rows x mb tokens (both compile-time constants at the full-block
 * call: GCC unrolls the loops and keeps the NR x MB8 accumulators in registers; with runtime counts it kept them on
 * the stack). NR rows x MB8 tokens share each 64-byte load; the K tail is a masked load. */
static inline __attribute__((always_inline)) void w8_block_vnni(const int8_t *w, int ldw, const int8_t *c, int Kp,
                                                                int K, int n0, int m0, const int nb, const int mb,
                                                                int32_t acc[NR][MB8]) {
    __m512i va[NR][MB8], wv[NR];
    for (int r = 0; r < nb; r++)
        for (int i = 0; i < mb; i++) va[r][i] = _mm512_setzero_si512();
    for (int k = 0; k < K; k += 64) {
        const __mmask64 mask = K - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (K - k)) - 1);
        for (int r = 0; r < nb; r++) {
            _mm_prefetch((const char *)(w + (size_t)(n0 + r + W8_AHEAD) * ldw + k), _MM_HINT_T0);
            wv[r] = _mm512_maskz_loadu_epi8(mask, w + (size_t)(n0 + r) * ldw + k);
        }
        for (int i = 0; i < mb; i++) {
            __m512i av = _mm512_load_si512((const void *)(c + (size_t)(m0 + i) * Kp + k));
            for (int r = 0; r < nb; r++) va[r][i] = _mm512_dpbusd_epi32(va[r][i], av, wv[r]);
        }
    }
    for (int r = 0; r < nb; r++)
        for (int i = 0; i < mb; i++) acc[r][i] = _mm512_reduce_add_epi32(va[r][i]);
}
#endif

/* y [M, N] = dequant(x) @ W^T with symmetric per-row int8 weights w [N, ldw] (row-major, the layout torch's
 * int8 ops and a tied embedding use): y = ((acc - zp·rsum)·sx)·s with acc = sum_k q·c exact in int32.
 * NR rows x MB8 tokens per step share each 64-byte load; the K tail is a masked load. */
int sq_w8a8_linear(const void *x, int x_bf16, int M, int K, float qmin, float qmax, float clip, int symmetric,
                   int shift, float had, const int8_t *w, int ldw, const float *wscale, const int32_t *rsum, int N,
                   void *y, int y_bf16) {
    /* exact while |sum_k (c - zp)·q| <= K·255·128 fits int32: K <= SQ_W8A8_MAX_K (native.py says so first) */
    if (!x || !w || !wscale || !rsum || !y || M < 0 || N < 1 || K < 1 || ldw < K || K > SQ_W8A8_MAX_K ||
        (had > 0.0f && (K & (K - 1))))
        return SQ_EINVAL;
    act_spec a = {qmin, qmax, clip, symmetric, shift, had};
    const int Kp = (K + 63) / 64 * 64;
    int8_t *c = (int8_t *)aligned_alloc(64, (size_t)M * Kp + 64);
    float *sx = (float *)malloc(sizeof(float) * M + 1);
    int *zp = (int *)malloc(sizeof(int) * M + 1);
    if (!c || !sx || !zp || quant_tokens(x, x_bf16, M, K, Kp, &a, c, sx, zp) != SQ_OK) {
        free(c);
        free(sx);
        free(zp);
        return SQ_ENOMEM;
    }
#if SQ_VNNI
    /* VPDPBUSD multiplies unsigned by signed bytes: the activations enter as c + 128 (unsigned) */
    for (size_t i = 0; i < (size_t)M * Kp; i++) c[i] = (int8_t)((uint8_t)c[i] ^ 0x80u);
    const int bias = 128;
#else
    const int bias = 0;
#endif
#if SQ_VNNI
    if (M == 1) { /* decode: rows in memory order, one sequential weight stream per thread (eight row streams at once
                   * read ~35 GB/s where one stream reads ~50 on 2 EPYC cores); four accumulators per row */
        #pragma omp parallel for schedule(static)
        for (int n = 0; n < N; n++) {
            const int8_t *wr = w + (size_t)n * ldw;
            __m512i acc4[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                               _mm512_setzero_si512()};
            int k = 0;
            for (; k + 256 <= K; k += 256)
                for (int j = 0; j < 4; j++) {
                    _mm_prefetch((const char *)(wr + k + 64 * j + W8_STREAM_AHEAD), _MM_HINT_T0);
                    acc4[j] = _mm512_dpbusd_epi32(acc4[j], _mm512_load_si512((const void *)(c + k + 64 * j)),
                                                  _mm512_loadu_si512((const void *)(wr + k + 64 * j)));
                }
            for (; k < K; k += 64) {
                const __mmask64 mask = K - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (K - k)) - 1);
                acc4[0] = _mm512_dpbusd_epi32(acc4[0], _mm512_load_si512((const void *)(c + k)),
                                              _mm512_maskz_loadu_epi8(mask, wr + k));
            }
            const int32_t acc = _mm512_reduce_add_epi32(
                _mm512_add_epi32(_mm512_add_epi32(acc4[0], acc4[1]), _mm512_add_epi32(acc4[2], acc4[3])));
            const float out = ((float)(acc - (bias + zp[0]) * rsum[n]) * sx[0]) * wscale[n];
            store_row(&out, 1, y, y_bf16, 0, N, n);
        }
        free(c);
        free(sx);
        free(zp);
        return SQ_OK;
    }
#endif
    #pragma omp parallel for schedule(static)
    for (int n0 = 0; n0 < N; n0 += NR) {
        const int nb = N - n0 < NR ? N - n0 : NR;
        for (int m0 = 0; m0 < M; m0 += MB8) {
            const int mb = M - m0 < MB8 ? M - m0 : MB8;
            int32_t acc[NR][MB8];
#if SQ_VNNI
            if (nb == NR && mb == MB8) /* a full block: constant counts, the accumulators stay in registers */
                w8_block_vnni(w, ldw, c, Kp, K, n0, m0, NR, MB8, acc);
            else
                w8_block_vnni(w, ldw, c, Kp, K, n0, m0, nb, mb, acc);
#elif SQ_AVX2
            const int K16 = K & ~15;
            for (int r = 0; r < nb; r++) {
                const int8_t *wr = w + (size_t)(n0 + r) * ldw;
                _mm_prefetch((const char *)(wr + PREFETCH), _MM_HINT_T0);
                for (int i = 0; i < mb; i++) {
                    const int8_t *ci = c + (size_t)(m0 + i) * Kp;
                    __m256i v = _mm256_setzero_si256();
                    for (int k = 0; k < K16; k += 16) /* int8 widened to int16: exact products, pairs in int32 */
                        v = _mm256_add_epi32(v, _mm256_madd_epi16(
                                                    _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wr + k))),
                                                    _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(ci + k)))));
                    __m128i q = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
                    q = _mm_add_epi32(q, _mm_shuffle_epi32(q, 0x4e));
                    q = _mm_add_epi32(q, _mm_shuffle_epi32(q, 0xb1));
                    int32_t s = _mm_cvtsi128_si32(q);
                    for (int k = K16; k < K; k++) s += (int32_t)wr[k] * ci[k];
                    acc[r][i] = s;
                }
            }
#elif SQ_SDOT
            const int K16 = K & ~15;
            for (int r = 0; r < nb; r++) {
                const int8_t *wr = w + (size_t)(n0 + r) * ldw;
                __builtin_prefetch(wr + PREFETCH);
                for (int i = 0; i < mb; i++) {
                    const int8_t *ci = c + (size_t)(m0 + i) * Kp;
                    int32x4_t v = vdupq_n_s32(0);
                    for (int k = 0; k < K16; k += 16) v = vdotq_s32(v, vld1q_s8(wr + k), vld1q_s8(ci + k));
                    int32_t s = vaddvq_s32(v);
                    for (int k = K16; k < K; k++) s += (int32_t)wr[k] * ci[k];
                    acc[r][i] = s;
                }
            }
#else
            for (int r = 0; r < nb; r++)
                for (int i = 0; i < mb; i++) {
                    const int8_t *wr = w + (size_t)(n0 + r) * ldw, *ci = c + (size_t)(m0 + i) * Kp;
                    int32_t s = 0;
                    for (int k = 0; k < K; k++) s += (int32_t)wr[k] * ci[k];
                    acc[r][i] = s;
                }
#endif
            for (int i = 0; i < mb; i++) {
                float out[NR];
                for (int r = 0; r < nb; r++) /* remove the +128 and the zero point: acc - (bias + zp)·rsum */
                    out[r] = ((float)(acc[r][i] - (bias + zp[m0 + i]) * rsum[n0 + r]) * sx[m0 + i]) * wscale[n0 + r];
                store_row(out, nb, y, y_bf16, m0 + i, N, n0);
            }
        }
    }
    free(c);
    free(sx);
    free(zp);
    return SQ_OK;
}

/* ---- attention of one decoded token (spinquant.decode) ---------------------------------------------------------
 * Grouped-query heads: the g query heads sharing a KV head are the rows of q [H][g][d] (float32, H = batch·kv
 * heads). Keys are cached transposed, kt [H][d][stride], values row-major, v [H][stride][d] (bf16 or float32);
 * positions 0 .. len-1 are read. Both loops are then plain vertical multiply-adds over a register of floats (GCC vector
 * extensions: AVX-512, AVX2 or NEON registers as the target has), with no horizontal sums:
 *   sq_attn_scores: s[h][r][t] = scale · sum_i q[h][r][i]·kt[h][i][t]   -> float32 [H][g][len]
 *   sq_attn_mix:    o[h][r][:] = sum_t p[h][r][t] · v[h][t][:]          -> float32 [H][g][d]
 * The softmax between the two is torch's. float32 sums, parallel over heads. */
#define SQ_ATTN_MAX_G 64

/* VW floats: one vector register of the target (wider GCC vectors are lowered through the stack: 64-byte vectors
 * on AVX2 ran the scores 9x slower than AVX-512, not 2x). Every lane sums in the same order whatever VW is. */
#if defined(__AVX512F__)
#define VW 16
#elif defined(__AVX__)
#define VW 8
#else
#define VW 4
#endif
typedef float fvec __attribute__((vector_size(VW * 4)));
typedef uint32_t uvec __attribute__((vector_size(VW * 4)));
typedef uint16_t hvec __attribute__((vector_size(VW * 2)));

static inline fvec loadv(const void *base, int is_bf16, size_t off) {
    fvec f;
    if (is_bf16) {
        hvec h;
        memcpy(&h, (const uint16_t *)base + off, sizeof h);
        uvec u = __builtin_convertvector(h, uvec) << 16;
        memcpy(&f, &u, sizeof f);
    } else {
        memcpy(&f, (const float *)base + off, sizeof f);
    }
    return f;
}

static inline float load1(const void *base, int is_bf16, size_t off) {
    return is_bf16 ? bf16_to_f32(((const uint16_t *)base)[off]) : ((const float *)base)[off];
}

/* call(G) with G the group size g as a compile-time constant for the group sizes of common models (their loops unroll
 * and the accumulators stay in registers), else call(0): g at run time */
#define ATTN_BY_GROUP(call)                                                                                           \
    switch (g) {                                                                                                      \
    case 1: call(1); break;                                                                                           \
    case 2: call(2); break;                                                                                           \
    case 4: call(4); break;                                                                                           \
    case 8: call(8); break;                                                                                           \
    default: call(0);                                                                                                 \
    }

/* one head's scores; G > 0 is a compile-time group size (its accumulators stay in registers), 0: g at run time */
static inline __attribute__((always_inline)) void attn_scores_head(const float *qh, const void *kt, int kv_bf16, size_t base,
                                                                   int G, int g, int d, int len, int stride, float *sh) {
    if (G) g = G;
    int t0 = 0;
    for (; t0 + 2 * VW <= len; t0 += 2 * VW) { /* 2·VW keys (32 on AVX-512: every row of kt is read a whole cache
                                                 * line at a time) */
        fvec acc[SQ_ATTN_MAX_G][2];
        for (int r = 0; r < g; r++) acc[r][0] = acc[r][1] = (fvec){0};
        for (int i = 0; i < d; i++) {
            const size_t off = base + (size_t)i * stride + t0;
            /* two lines ahead: the cache is cold at every decoded token (the weight stream evicted it) */
            __builtin_prefetch((const char *)kt + (off + 64) * (kv_bf16 ? 2 : 4));
            const fvec k0 = loadv(kt, kv_bf16, off), k1 = loadv(kt, kv_bf16, off + VW);
            for (int r = 0; r < g; r++) {
                const float qv = qh[(size_t)r * d + i];
                acc[r][0] += qv * k0;
                acc[r][1] += qv * k1;
            }
        }
        for (int r = 0; r < g; r++) memcpy(sh + (size_t)r * len + t0, acc[r], sizeof acc[r]);
    }
    for (; t0 + VW <= len; t0 += VW) {
        fvec acc[SQ_ATTN_MAX_G];
        for (int r = 0; r < g; r++) acc[r] = (fvec){0};
        for (int i = 0; i < d; i++) {
            const fvec kv = loadv(kt, kv_bf16, base + (size_t)i * stride + t0);
            for (int r = 0; r < g; r++) acc[r] += qh[(size_t)r * d + i] * kv;
        }
        for (int r = 0; r < g; r++) memcpy(sh + (size_t)r * len + t0, &acc[r], sizeof(fvec));
    }
    for (int r = 0; r < g; r++) /* the last len % VW keys */
        for (int t = t0; t < len; t++) {
            float a = 0.0f;
            for (int i = 0; i < d; i++) a += qh[(size_t)r * d + i] * load1(kt, kv_bf16, base + (size_t)i * stride + t);
            sh[(size_t)r * len + t] = a;
        }
}

int sq_attn_scores(const float *q, const void *kt, int kv_bf16, int H, int g, int d, int len, int stride, float scale,
                   float *s) {
    if (!q || !kt || !s || H < 1 || g < 1 || g > SQ_ATTN_MAX_G || d < 1 || len < 1 || len > stride) return SQ_EINVAL;
    #pragma omp parallel for schedule(static) if ((long)H * len * d > 32768)
    for (int h = 0; h < H; h++) {
        const float *qh = q + (size_t)h * g * d;
        float *sh = s + (size_t)h * g * len;
        const size_t base = (size_t)h * d * stride;
#define SCORES(G) attn_scores_head(qh, kt, kv_bf16, base, G, g, d, len, stride, sh)
        ATTN_BY_GROUP(SCORES);
#undef SCORES
        for (size_t j = 0; j < (size_t)g * len; j++) sh[j] *= scale;
    }
    return SQ_OK;
}

static inline __attribute__((always_inline)) void attn_mix_head(const float *ph, const void *v, int kv_bf16, size_t base,
                                                                int G, int g, int d, int len, float *oh) {
    if (G) g = G;
    int c = 0;
    for (; c + VW <= d; c += VW) { /* VW output features of every row at a time, accumulated in registers */
        fvec acc[SQ_ATTN_MAX_G];
        for (int r = 0; r < g; r++) acc[r] = (fvec){0};
        for (int t = 0; t < len; t++) {
            const fvec vv = loadv(v, kv_bf16, base + (size_t)t * d + c);
            for (int r = 0; r < g; r++) acc[r] += ph[(size_t)r * len + t] * vv;
        }
        for (int r = 0; r < g; r++) memcpy(oh + (size_t)r * d + c, &acc[r], sizeof(fvec));
    }
    for (int r = 0; r < g; r++) /* the last d % VW features */
        for (int i = c; i < d; i++) {
            float a = 0.0f;
            for (int t = 0; t < len; t++) a += ph[(size_t)r * len + t] * load1(v, kv_bf16, base + (size_t)t * d + i);
            oh[(size_t)r * d + i] = a;
        }
}

int sq_attn_mix(const float *p, const void *v, int kv_bf16, int H, int g, int d, int len, int stride, float *o) {
    if (!p || !v || !o || H < 1 || g < 1 || g > SQ_ATTN_MAX_G || d < 1 || len < 1 || len > stride) return SQ_EINVAL;
    #pragma omp parallel for schedule(static) if ((long)H * len * d > 32768)
    for (int h = 0; h < H; h++) {
        const float *ph = p + (size_t)h * g * len;
        float *oh = o + (size_t)h * g * d;
        const size_t base = (size_t)h * stride * d;
#define MIX(G) attn_mix_head(ph, v, kv_bf16, base, G, g, d, len, oh)
        ATTN_BY_GROUP(MIX);
#undef MIX
    }
    return SQ_OK;
}

/* ---- online Hadamard (R4) of a packed linear's input ------------------------------------------------------------
 * y[m] = x[m] · H_n / div for a power-of-two n (Sylvester order): the butterfly stages of
 * spinquant.rotation.hadamard._fwht_pow2 in the same order, in float32 (bit-identical to it on float32 input; one
 * rounding at the end instead of one per stage on bf16 input). x float32 or bf16 [rows][n] -> y float32. */
int sq_fwht(const void *x, int x_bf16, int rows, int n, float div, float *y) {
    if (!x || !y || rows < 0 || n < 1 || (n & (n - 1))) return SQ_EINVAL;
    #pragma omp parallel for schedule(static) if (rows > 4)
    for (int m = 0; m < rows; m++) {
        float *v = y + (size_t)m * n;
        for (int j = 0; j < n; j++) v[j] = load1(x, x_bf16, (size_t)m * n + j);
        fwht_row(v, n, div);
    }
    return SQ_OK;
}
