/*
 * Attention pieces of the value trainer's loss (core/train_values_nn.h):
 * exact RoPE in double, the fixed attention weights of a batch, and the
 * product of those weights with a [B][Hkv*d] matrix and its transpose.
 * Training is not bit-contracted; what matters is determinism: every sum
 * runs in a fixed order inside one thread, parallel loops split outputs.
 *
 * Index names: i query token, j key/value token (0..B-1), h query head,
 * kv its KV head, c dimension within a head (0..d-1), p RoPE pair.
 */
#include "train_values_nn.h"

#include <math.h>

void cvq__tv_rope(double *x, uint32_t n_heads, uint32_t d, cvq_pair_layout layout,
                  const double *theta, int32_t pos) {
    for (uint32_t p = 0; p < d / 2; p++) {
        const double ang = theta[p] * (double)pos;
        const double c = cos(ang), s = sin(ang);
        uint32_t re, im;
        cvq__pair_index(layout, d, p, &re, &im);
        for (uint32_t h = 0; h < n_heads; h++) {
            double *xh = x + (size_t)h * d;
            const double r = xh[re], m = xh[im];
            xh[re] = r * c - m * s;
            xh[im] = r * s + m * c;
        }
    }
}

/* Copies head `hd` of rows [B][H][d] into dst [B][d]. */
static void gather_head(size_t B, uint32_t H, uint32_t d, uint32_t hd, const double *src,
                        double *dst) {
    for (size_t i = 0; i < B; i++)
        for (uint32_t c = 0; c < d; c++) dst[i * d + c] = src[(i * H + hd) * d + c];
}

void cvq__tv_attn_weights(size_t B, uint32_t Hq, uint32_t Hkv, uint32_t d,
                          const uint32_t *kv_of,
                          const double *q, const double *k, const int32_t *pos,
                          const uint32_t *seg, double scale, int n_threads,
                          double *scratch, double *attn) {
    double *qh = scratch, *kT = scratch + B * d; /* [B][d], [d][B] */
    uint32_t kv_done = UINT32_MAX;
    for (uint32_t h = 0; h < Hq; h++) {
        double *Ah = attn + (size_t)h * B * B; /* [i][j] */
        if (kv_of[h] != kv_done) { /* keys of this KV head, transposed */
            kv_done = kv_of[h];
            for (size_t j = 0; j < B; j++)
                for (uint32_t c = 0; c < d; c++)
                    kT[(size_t)c * B + j] = k[(j * Hkv + kv_done) * d + c];
        }
        gather_head(B, Hq, d, h, q, qh);
        cvq__tv_gemm(B, B, d, qh, 0, kT, Ah, n_threads); /* q_i . k_j */
        const long long nb = (long long)B;
        (void)n_threads;
#ifdef COMMVQ_HAVE_OPENMP
#pragma omp parallel for schedule(static) num_threads(n_threads) if(B * B >= CVQ__TV_PAR_MIN)
#endif
        for (long long ii = 0; ii < nb; ii++) {
            const size_t i = (size_t)ii;
            double *row = Ah + i * B;
            double mx = -INFINITY;
            for (size_t j = 0; j < B; j++) {
                if (seg[j] != seg[i] || pos[j] > pos[i]) {
                    row[j] = -INFINITY;
                    continue;
                }
                row[j] = scale * row[j];
                if (row[j] > mx) mx = row[j];
            }
            /* token i always sees itself, so mx is finite */
            double sum = 0.0;
            for (size_t j = 0; j < B; j++) {
                row[j] = row[j] == -INFINITY ? 0.0 : exp(row[j] - mx);
                sum += row[j];
            }
            for (size_t j = 0; j < B; j++) row[j] /= sum;
        }
    }
}

void cvq__tv_attn_apply(size_t B, uint32_t Hq, uint32_t Hkv, uint32_t d,
                        const uint32_t *kv_of, const double *attn, const double *x,
                        int n_threads, double *scratch, double *out) {
    double *xk = scratch, *oh = scratch + B * d; /* [B][d] each */
    uint32_t kv_done = UINT32_MAX;
    for (uint32_t h = 0; h < Hq; h++) {
        if (kv_of[h] != kv_done) {
            kv_done = kv_of[h];
            gather_head(B, Hkv, d, kv_done, x, xk);
        }
        cvq__tv_gemm(B, d, B, attn + (size_t)h * B * B, 0, xk, oh, n_threads);
        for (size_t i = 0; i < B; i++)
            for (uint32_t c = 0; c < d; c++) out[(i * Hq + h) * d + c] = oh[i * d + c];
    }
}

void cvq__tv_attn_apply_t(size_t B, uint32_t Hq, uint32_t Hkv, uint32_t d,
                          const uint32_t *kv_of, const double *attn, const double *g,
                          double coef, int n_threads, double *scratch, double *dx) {
    double *gh = scratch, *th = scratch + B * d; /* [B][d] each */
    for (uint32_t h = 0; h < Hq; h++) {
        gather_head(B, Hq, d, h, g, gh);
        /* th[j][c] = sum_i attn[h][i][j] * g[i][h][c] */
        cvq__tv_gemm(B, d, B, attn + (size_t)h * B * B, 1, gh, th, n_threads);
        const size_t off = (size_t)kv_of[h] * d;
        for (size_t j = 0; j < B; j++)
            for (uint32_t c = 0; c < d; c++) dx[j * Hkv * d + off + c] += coef * th[j * d + c];
    }
}
