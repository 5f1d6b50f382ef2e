/* Test driver for the native kernels on another architecture (ARM under qemu-user): reads one call's arguments
 * from a file, runs it, writes the result. Used by tests/test_native_kernels.py, which compares the output with
 * the same float64 references as the host build.
 *
 *   driver quant_act IN OUT    IN: int32 M K Kp | float qmin qmax clip | int32 symmetric shift | float had | float32 x[M*K]
 *                              OUT: int32 rc | int8 c[M*Kp] | float32 scale[M] | int32 zp[M]
 *   driver w4a8 IN OUT         IN: int32 M K N Kp gs has_zero | float qmin qmax clip | int32 symmetric shift | float had |
 *                                  float32 x[M*K] | uint8 tiles[NT*Kp/8*64] | uint16 scales[NT*G*16] |
 *                                  uint16 zeros[NT*G*16] (if has_zero) | float32 rsum[NT*16]
 *                              OUT: int32 rc | float32 y[M*N]
 *   driver w8a8 IN OUT         IN: int32 M K N ldw | float qmin qmax clip | int32 symmetric shift | float had | float32 x[M*K] |
 *                                  int8 w[N*ldw] | float32 wscale[N] | int32 rsum[N]
 *                              OUT: int32 rc | float32 y[M*N]
 *   driver attn_scores IN OUT  IN: int32 H g d len stride bf16 | float scale | float32 q[H*g*d] |
 *                                  kt[H*d*stride] (uint16 bf16 bits, or float32)
 *                              OUT: int32 rc | float32 s[H*g*len]
 *   driver attn_mix IN OUT     IN: int32 H g d len stride bf16 | float32 p[H*g*len] | v[H*stride*d] (as kt)
 *                              OUT: int32 rc | float32 o[H*g*d]
 *   driver simd                prints sq_simd()
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int sq_simd(void);
int sq_quant_act(const void *x, int x_bf16, int M, int K, int Kp, float qmin, float qmax, float clip, int symmetric,
                 int shift, float had, int8_t *c, float *scale, int *zp);
int sq_w4a8_linear(const void *x, int x_bf16, int M, int K, float qmin, float qmax, float clip, int symmetric,
                   int shift, float had, const uint8_t *wt, const uint16_t *scales, const uint16_t *zeros,
                   const float *rsum, int N, int Kp, int gs, void *y, int y_bf16);
int sq_w8a8_linear(const void *x, int x_bf16, int M, int K, float qmin, float qmax, float clip, int symmetric,
                   int shift, float had, const int8_t *w, int ldw, const float *wscale, const int32_t *rsum, int N,
                   void *y, int y_bf16);

int sq_attn_scores(const float *q, const void *kt, int kv_bf16, int H, int g, int d, int len, int stride, float scale,
                   float *s);
int sq_attn_mix(const float *p, const void *v, int kv_bf16, int H, int g, int d, int len, int stride, float *o);

static FILE *in;

static void *take(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p || fread(p, 1, n, in) != n) {
        fprintf(stderr, "short input\n");
        exit(2);
    }
    return p;
}

static int32_t i32(void) { int32_t v; memcpy(&v, take(4), 4); return v; }
static float f32(void) { float v; memcpy(&v, take(4), 4); return v; }

int main(int argc, char **argv) {
    if (argc == 2 && !strcmp(argv[1], "simd")) {
        printf("%d\n", sq_simd());
        return 0;
    }
    if (argc != 4) return 2;
    in = fopen(argv[2], "rb");
    FILE *out = fopen(argv[3], "wb");
    if (!in || !out) return 2;
    int32_t rc;
    if (!strcmp(argv[1], "quant_act")) {
        int M = i32(), K = i32(), Kp = i32();
        float qmin = f32(), qmax = f32(), clip = f32();
        int sym = i32(), shift = i32();
        float had = f32();
        float *x = take(sizeof(float) * (size_t)M * K);
        int8_t *c = malloc((size_t)M * Kp + 1);
        float *s = malloc(sizeof(float) * M + 1);
        int *zp = malloc(sizeof(int) * M + 1);
        rc = sq_quant_act(x, 0, M, K, Kp, qmin, qmax, clip, sym, shift, had, c, s, zp);
        fwrite(&rc, 4, 1, out);
        fwrite(c, 1, (size_t)M * Kp, out);
        fwrite(s, 4, M, out);
        fwrite(zp, 4, M, out);
    } else if (!strcmp(argv[1], "w4a8")) {
        int M = i32(), K = i32(), N = i32(), Kp = i32(), gs = i32(), has_zero = i32();
        float qmin = f32(), qmax = f32(), clip = f32();
        int sym = i32(), shift = i32();
        float had = f32();
        int NT = (N + 15) / 16, G = Kp / gs;
        float *x = take(sizeof(float) * (size_t)M * K);
        uint8_t *tiles = take((size_t)NT * (Kp / 8) * 64);
        uint16_t *scales = take(2 * (size_t)NT * G * 16);
        uint16_t *zeros = has_zero ? take(2 * (size_t)NT * G * 16) : NULL;
        float *rsum = take(4 * (size_t)NT * 16);
        float *y = malloc(sizeof(float) * (size_t)M * N + 1);
        rc = sq_w4a8_linear(x, 0, M, K, qmin, qmax, clip, sym, shift, had, tiles, scales, zeros, rsum, N, Kp, gs, y, 0);
        fwrite(&rc, 4, 1, out);
        fwrite(y, 4, (size_t)M * N, out);
    } else if (!strcmp(argv[1], "w8a8")) {
        int M = i32(), K = i32(), N = i32(), ldw = i32();
        float qmin = f32(), qmax = f32(), clip = f32();
        int sym = i32(), shift = i32();
        float had = f32();
        float *x = take(sizeof(float) * (size_t)M * K);
        int8_t *w = take((size_t)N * ldw);
        float *ws = take(4 * (size_t)N);
        int32_t *rsum = take(4 * (size_t)N);
        float *y = malloc(sizeof(float) * (size_t)M * N + 1);
        rc = sq_w8a8_linear(x, 0, M, K, qmin, qmax, clip, sym, shift, had, w, ldw, ws, rsum, N, y, 0);
        fwrite(&rc, 4, 1, out);
        fwrite(y, 4, (size_t)M * N, out);
    } else if (!strcmp(argv[1], "attn_scores") || !strcmp(argv[1], "attn_mix")) {
        const int scores = !strcmp(argv[1], "attn_scores");
        int H = i32(), g = i32(), d = i32(), len = i32(), stride = i32(), bf16 = i32();
        const size_t esize = bf16 ? 2 : 4, kv = (size_t)H * d * stride * esize;
        if (scores) {
            float scale = f32();
            float *q = take(sizeof(float) * (size_t)H * g * d);
            void *kt = take(kv);
            float *s = malloc(sizeof(float) * (size_t)H * g * len + 1);
            rc = sq_attn_scores(q, kt, bf16, H, g, d, len, stride, scale, s);
            fwrite(&rc, 4, 1, out);
            fwrite(s, 4, (size_t)H * g * len, out);
        } else {
            float *pr = take(sizeof(float) * (size_t)H * g * len);
            void *v = take(kv);
            float *o = malloc(sizeof(float) * (size_t)H * g * d + 1);
            rc = sq_attn_mix(pr, v, bf16, H, g, d, len, stride, o);
            fwrite(&rc, 4, 1, out);
            fwrite(o, 4, (size_t)H * g * d, out);
        }
    } else {
        return 2;
    }
    fclose(out);
    return 0;
}
