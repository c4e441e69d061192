/*
 * Weight products (see matmul.h).
 *
 * Work unit: a tile of MM_R consecutive weight rows, dequantized once into a
 * per-thread fp32 buffer, then dotted with the batch's input vectors MM_T
 * tokens at a time (the batch's last n % MM_T tokens one at a time). Each
 * x element loaded feeds MM_R rows and each weight element MM_T tokens, and
 * the MM_R * MM_T sums are independent chains that keep the FMA units busy.
 *
 * Bit-identity across batch sizes: one (row r, token t) product is always
 * computed the same way, whatever tile holds it:
 *   lane l (l < 8) accumulates w[k] * x[k] for k = l, l + 8, ... below
 *   cols8 = cols rounded down to 8, in increasing k, from 0;
 *   the 8 lanes are summed in the fixed order of lanes_finish(), then the
 *   remaining columns cols8.. are added one by one.
 * The kernels for MM_T tokens and for one token differ only in how many such
 * chains run side by side. The AVX2 kernels fuse each lane's multiply-add
 * (FMA, one rounding); the portable ones round the product and the sum
 * (the build has -ffp-contract=off). One of the two sets is chosen once per
 * process, so every call of a run uses the same arithmetic.
 */
#include "matmul.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* AVX2+FMA kernels are compiled with a per-function target attribute (the
 * build stays baseline x86-64) and chosen at run time. */
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define MM_HAVE_AVX2 1
#include <immintrin.h>
#else
#define MM_HAVE_AVX2 0
#endif

#define MM_R 3 /* weight rows per tile */
#define MM_T 3 /* tokens per tile: 9 accumulators + 3 row vectors + 1 x vector fit the 16 ymm
                  registers with room to spare (3 x 4 made clang spill) */

/* ---- dequantization ------------------------------------------------------------ */

/* binary16 -> binary32 for every bit pattern (exact), built on the first
 * call of mm_matmul, before its parallel region. */
static float f16_table[65536];
static int f16_ready;

static float f16(const uint8_t *p) {
    return f16_table[(uint16_t)(p[0] | (p[1] << 8))];
}

/* Row r of w as fp32 into out[w->cols]. Block layouts as in ggml (32 values
 * per block):
 *  Q4_0: fp16 d, 16 bytes; value j = (lo nibble of byte j - 8) * d,
 *        value j+16 = (hi nibble of byte j - 8) * d
 *  Q4_1: fp16 d, fp16 m, 16 bytes; value j = lo(j) * d + m, j+16 = hi(j) * d + m
 *  Q8_0: fp16 d, 32 int8; value j = q[j] * d
 * Products and sums are rounded separately (no FMA), as ggml's reference
 * dequantizers do. */
static void dequant_row(const weight *w, uint32_t r, float *out) {
    const uint8_t *p = w->data + (size_t)r * w->row_bytes;
    uint32_t i, j, nb = w->cols / 32;
    switch (w->type) {
    case GGML_F32:
        memcpy(out, p, sizeof(float) * w->cols);
        break;
    case GGML_F16:
        for (i = 0; i < w->cols; i++) out[i] = f16(p + 2 * i);
        break;
    case GGML_BF16:
        for (i = 0; i < w->cols; i++) {
            uint32_t b = (uint32_t)(p[2 * i] | (p[2 * i + 1] << 8)) << 16;
            memcpy(&out[i], &b, 4);
        }
        break;
    case GGML_Q4_0:
        for (i = 0; i < nb; i++, p += 18, out += 32) {
            float d = f16(p);
            for (j = 0; j < 16; j++) {
                out[j] = (float)((int)(p[2 + j] & 15) - 8) * d;
                out[j + 16] = (float)((int)(p[2 + j] >> 4) - 8) * d;
            }
        }
        break;
    case GGML_Q4_1:
        for (i = 0; i < nb; i++, p += 20, out += 32) {
            float d = f16(p), m = f16(p + 2);
            for (j = 0; j < 16; j++) {
                out[j] = (float)(p[4 + j] & 15) * d + m;
                out[j + 16] = (float)(p[4 + j] >> 4) * d + m;
            }
        }
        break;
    case GGML_Q8_0:
        for (i = 0; i < nb; i++, p += 34, out += 32) {
            float d = f16(p);
            for (j = 0; j < 32; j++) out[j] = (float)(int8_t)p[2 + j] * d;
        }
        break;
    default:
        break; /* refused at load time */
    }
}

/* ---- the shared end of every (row, token) product ------------------------------- */

/* lanes[l] holds lane l's sum (see the top of the file); adds the lanes in a
 * fixed tree order, then the columns k.. cols that did not fill a lane
 * vector. Plain C for both instruction sets. */
static float lanes_finish(const float *lanes, const float *w, const float *x, size_t k,
                          size_t cols) {
    float s = ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) +
              ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
    for (; k < cols; k++) s += w[k] * x[k];
    return s;
}

/* ---- portable kernels --------------------------------------------------------- */

/* res[r][t] = wr[r] . xt[t] for r < MM_R, t < T (T = 1 or MM_T, a constant
 * after inlining). acc[r][t][l] is lane l of the (r, t) chain; the innermost
 * loop over l is what the compiler vectorizes. */
static void tile_c(const float *const *wr, const float *const *xt, size_t cols,
                   float res[MM_R][MM_T], int T) {
    float acc[MM_R][MM_T][8];
    size_t k;
    int r, t, l;
    memset(acc, 0, sizeof acc);
    for (k = 0; k + 8 <= cols; k += 8)
        for (r = 0; r < MM_R; r++)
            for (t = 0; t < T; t++)
                for (l = 0; l < 8; l++) acc[r][t][l] += wr[r][k + l] * xt[t][k + l];
    for (r = 0; r < MM_R; r++)
        for (t = 0; t < T; t++) res[r][t] = lanes_finish(acc[r][t], wr[r], xt[t], k, cols);
}

static void tile_c_full(const float *const *wr, const float *const *xt, size_t cols,
                        float res[MM_R][MM_T]) {
    tile_c(wr, xt, cols, res, MM_T);
}

static void tile_c_one(const float *const *wr, const float *const *xt, size_t cols,
                       float res[MM_R][MM_T]) {
    tile_c(wr, xt, cols, res, 1);
}

/* ---- AVX2 + FMA kernels ----------------------------------------------------------- */

#if MM_HAVE_AVX2
/* As tile_c with one ymm register per (r, t) chain: lane l of acc[r][t] is
 * lane l of the chain. Each step loads MM_R row vectors and MM_T x vectors
 * for MM_R * MM_T fused multiply-adds. */
__attribute__((target("avx2,fma"))) static void tile_avx2_full(const float *const *wr,
                                                               const float *const *xt,
                                                               size_t cols,
                                                               float res[MM_R][MM_T]) {
    __m256 acc[MM_R][MM_T];
    float lanes[8];
    size_t k;
    int r, t;
    for (r = 0; r < MM_R; r++)
        for (t = 0; t < MM_T; t++) acc[r][t] = _mm256_setzero_ps();
    for (k = 0; k + 8 <= cols; k += 8) {
        __m256 wv[MM_R];
        for (r = 0; r < MM_R; r++) wv[r] = _mm256_loadu_ps(wr[r] + k);
        for (t = 0; t < MM_T; t++) {
            __m256 xv = _mm256_loadu_ps(xt[t] + k);
            for (r = 0; r < MM_R; r++) acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
        }
    }
    for (r = 0; r < MM_R; r++)
        for (t = 0; t < MM_T; t++) {
            _mm256_storeu_ps(lanes, acc[r][t]);
            res[r][t] = lanes_finish(lanes, wr[r], xt[t], k, cols);
        }
}

/* One token: the same chains, MM_R of them side by side. */
__attribute__((target("avx2,fma"))) static void tile_avx2_one(const float *const *wr,
                                                              const float *const *xt,
                                                              size_t cols,
                                                              float res[MM_R][MM_T]) {
    __m256 acc[MM_R];
    float lanes[8];
    size_t k;
    int r;
    for (r = 0; r < MM_R; r++) acc[r] = _mm256_setzero_ps();
    for (k = 0; k + 8 <= cols; k += 8) {
        __m256 xv = _mm256_loadu_ps(xt[0] + k);
        for (r = 0; r < MM_R; r++)
            acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(wr[r] + k), xv, acc[r]);
    }
    for (r = 0; r < MM_R; r++) {
        _mm256_storeu_ps(lanes, acc[r]);
        res[r][0] = lanes_finish(lanes, wr[r], xt[0], k, cols);
    }
}
#endif

#if MM_HAVE_AVX2
/* Q4_1 and Q8_0 rows as dequant_row computes them (the same multiply, then
 * add, per value: bit-identical), eight values per instruction. */
__attribute__((target("avx2,fma"))) static void dequant_row_avx2(const weight *w, uint32_t r,
                                                                 float *out) {
    const uint8_t *p = w->data + (size_t)r * w->row_bytes;
    uint32_t i, nb = w->cols / 32;
    if (w->type == GGML_Q4_1) {
        const __m128i low4 = _mm_set1_epi8(15);
        for (i = 0; i < nb; i++, p += 20, out += 32) {
            __m256 d = _mm256_set1_ps(f16(p)), m = _mm256_set1_ps(f16(p + 2));
            __m128i q = _mm_loadu_si128((const __m128i *)(const void *)(p + 4));
            /* lo: values 0..15 (low nibbles), hi: values 16..31 */
            __m128i lo = _mm_and_si128(q, low4), hi = _mm_and_si128(_mm_srli_epi16(q, 4), low4);
            __m128i part[4];
            int h;
            part[0] = lo;
            part[1] = _mm_srli_si128(lo, 8);
            part[2] = hi;
            part[3] = _mm_srli_si128(hi, 8);
            for (h = 0; h < 4; h++) {
                __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part[h]));
                _mm256_storeu_ps(out + 8 * h, _mm256_add_ps(_mm256_mul_ps(v, d), m));
            }
        }
    } else if (w->type == GGML_Q8_0) {
        for (i = 0; i < nb; i++, p += 34, out += 32) {
            __m256 d = _mm256_set1_ps(f16(p));
            int h;
            for (h = 0; h < 4; h++) {
                __m128i q = _mm_loadl_epi64((const __m128i *)(const void *)(p + 2 + 8 * h));
                __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
                _mm256_storeu_ps(out + 8 * h, _mm256_mul_ps(v, d));
            }
        }
    } else {
        dequant_row(w, r, out);
    }
}
#endif

#if MM_HAVE_AVX2
/* One token against MM_R rows of Q4_1 or Q8_0 with the dequantization fused
 * in (generate's case, n = 1: no buffer to write and read back). Each value
 * is dequantized exactly as dequant_row_avx2 does and meets the same x
 * vector in the same order as in tile_avx2_one, so the chains are the
 * batched path's. p[r] is row r's first block; cols is a multiple of 32,
 * so no column is left for lanes_finish's tail. */
__attribute__((target("avx2,fma"))) static void fused_avx2_one(uint32_t type, size_t cols,
                                                               const uint8_t *const *p,
                                                               const float *x,
                                                               float res[MM_R][MM_T]) {
    const __m128i low4 = _mm_set1_epi8(15);
    __m256 acc[MM_R];
    float lanes[8];
    size_t i, nb = cols / 32, bb = type == GGML_Q4_1 ? 20 : 34; /* bytes per block */
    int r, h;
    for (r = 0; r < MM_R; r++) acc[r] = _mm256_setzero_ps();
    for (i = 0; i < nb; i++) {
        const float *xb = x + 32 * i;
        /* the next tiles' rows follow this one's in memory: fetch them
         * ahead (generate streams every weight from DRAM once per token).
         * The address may lie past the tensor: a prefetch never faults,
         * and it is formed as an integer so that no pointer is. */
        _mm_prefetch((const char *)((uintptr_t)(p[MM_R - 1] + bb * i) + 1024), _MM_HINT_T0);
        for (r = 0; r < MM_R; r++) {
            __m256 d, m;
            if (type == GGML_Q4_1) {
                const uint8_t *b = p[r] + bb * i;
                __m128i q = _mm_loadu_si128((const __m128i *)(const void *)(b + 4));
                __m128i lo = _mm_and_si128(q, low4);
                __m128i hi = _mm_and_si128(_mm_srli_epi16(q, 4), low4);
                d = _mm256_set1_ps(f16(b));
                m = _mm256_set1_ps(f16(b + 2));
                /* h = 0..3: values 8h..8h+7 (lo then hi nibbles) */
                for (h = 0; h < 4; h++) {
                    __m128i src = h < 2 ? lo : hi;
                    __m128i q8 = (h & 1) ? _mm_srli_si128(src, 8) : src;
                    __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q8));
                    __m256 wv = _mm256_add_ps(_mm256_mul_ps(v, d), m);
                    acc[r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xb + 8 * h), acc[r]);
                }
            } else {
                const uint8_t *b = p[r] + bb * i;
                d = _mm256_set1_ps(f16(b));
                for (h = 0; h < 4; h++) {
                    __m128i q8 = _mm_loadl_epi64((const __m128i *)(const void *)(b + 2 + 8 * h));
                    __m256 wv = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)), d);
                    acc[r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xb + 8 * h), acc[r]);
                }
            }
        }
    }
    for (r = 0; r < MM_R; r++) {
        _mm256_storeu_ps(lanes, acc[r]);
        res[r][0] = lanes_finish(lanes, x, x, cols, cols);
    }
}
#endif

/* ---- dispatch --------------------------------------------------------------------- */

typedef void (*tile_fn)(const float *const *wr, const float *const *xt, size_t cols,
                        float res[MM_R][MM_T]);
typedef void (*dequant_fn)(const weight *w, uint32_t r, float *out);

static int use_avx2 = -1; /* -1: not chosen yet */

/* Called before any parallel region: builds the fp16 table and picks the
 * kernels (AVX2 when the CPU and OS support AVX2 and FMA, unless
 * COMMVQ_CPU_ISA=portable, the variable the library's CPU backend reads). */
static void mm_init(void) {
    uint32_t i;
    if (!f16_ready) {
        for (i = 0; i < 65536; i++) f16_table[i] = cvq_f16_to_f32((uint16_t)i);
        f16_ready = 1;
    }
    if (use_avx2 < 0) {
        const char *env = getenv("COMMVQ_CPU_ISA");
        use_avx2 = 0;
#if MM_HAVE_AVX2
        if (!(env && !strcmp(env, "portable")))
            use_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
        (void)env;
#endif
    }
}

void mm_dequant_row(const weight *w, uint32_t r, float *out) {
    mm_init();
    dequant_row(w, r, out);
}

const char *mm_kernel_name(void) {
    mm_init();
    return use_avx2 ? "avx2" : "portable";
}

int mm_matmul(float *out, const weight *w, const float *x, size_t n) {
    const size_t cols = w->cols, rows = w->rows;
    const long ntiles = (long)((rows + MM_R - 1) / MM_R);
    tile_fn full, one;
    dequant_fn deq;
    int failed = 0, fused = 0;
    mm_init();
    full = tile_c_full;
    one = tile_c_one;
    deq = dequant_row;
#if MM_HAVE_AVX2
    if (use_avx2) {
        full = tile_avx2_full;
        one = tile_avx2_one;
        deq = dequant_row_avx2;
        fused = n == 1 && (w->type == GGML_Q4_1 || w->type == GGML_Q8_0);
    }
#endif
    (void)fused; /* read only where AVX2 is compiled in */
#ifdef _OPENMP
#pragma omp parallel reduction(| : failed)
#endif
    {
        float *buf = (float *)malloc(sizeof(float) * MM_R * cols); /* [MM_R][cols] */
        long tile;
        /* every thread takes part in the loop (a worksharing construct);
         * one without a buffer only records the failure. nowait: the end of
         * the parallel region is the only barrier needed (a barrier costs a
         * time slice when the cores are shared with other jobs) */
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 4) nowait
#endif
        for (tile = 0; tile < ntiles; tile++) {
            size_t r0 = (size_t)tile * MM_R, nr = rows - r0 < MM_R ? rows - r0 : MM_R, t, r;
            const float *wr[MM_R], *xt[MM_T];
            float res[MM_R][MM_T];
            if (!buf) {
                failed = 1;
                continue;
            }
#if MM_HAVE_AVX2
            if (fused) {
                const uint8_t *p[MM_R];
                for (r = 0; r < MM_R; r++)
                    p[r] = w->data + (r0 + (r < nr ? r : nr - 1)) * w->row_bytes;
                fused_avx2_one(w->type, cols, p, x, res);
                for (r = 0; r < nr; r++) out[r0 + r] = res[r][0];
                continue;
            }
#endif
            for (r = 0; r < nr; r++) deq(w, (uint32_t)(r0 + r), buf + r * cols);
            /* a last tile of fewer rows repeats its last row (the extra
             * results are dropped; each chain is independent) */
            for (r = 0; r < MM_R; r++) wr[r] = buf + (r < nr ? r : nr - 1) * cols;
            for (t = 0; t + MM_T <= n; t += MM_T) {
                size_t i;
                for (i = 0; i < MM_T; i++) xt[i] = x + (t + i) * cols;
                full(wr, xt, cols, res);
                for (i = 0; i < MM_T; i++)
                    for (r = 0; r < nr; r++) out[(t + i) * rows + r0 + r] = res[r][i];
            }
            for (; t < n; t++) {
                xt[0] = x + t * cols;
                one(wr, xt, cols, res);
                for (r = 0; r < nr; r++) out[t * rows + r0 + r] = res[r][0];
            }
        }
        free(buf);
    }
    return failed ? -1 : 0;
}
