/*
 * Value encoder network: forward, loss and backward over a batch, in double
 * (core/train_values_nn.h has the formulas). Training is not bit-contracted;
 * the only rule here is determinism: every sum over tokens runs in ascending
 * token order inside one thread, parallel loops split output rows or
 * columns, so the result does not depend on the thread count.
 *
 * Index names: b token of the batch (0..B-1), g value group, f feature
 * (0..F-1), o/i output/input of a Linear layer, t 4-way logit group,
 * c choice within it (0..3), k code bit (0..Nc-1).
 */
#include "train_values_nn.h"

#include <math.h>
#include <string.h>

#ifdef COMMVQ_HAVE_OPENMP
#include <omp.h>
#endif

#define TV_EPS 1e-6   /* value scale epsilon (ls, pre, ||u||) */
#define TV_LN_EPS 1e-5

void cvq__tv_layout_of(const cvq__tv_net *net, cvq__tv_layout *lay) {
    const size_t F = net->F, I = net->I, Nc = net->Nc;
    const size_t len[7] = {F, F, I * F, I, 2 * Nc * I, 2 * Nc, Nc * F};
    size_t o = 0;
    for (int i = 0; i < 7; i++) {
        lay->off[i] = o;
        lay->len[i] = len[i];
        o += len[i];
    }
    lay->n = o;
}

/* ---- matrix products ------------------------------------------------------ */
/* Row-major, every product element summed over its k in ascending order,
 * starting from +0, one thread per output row block. Zero multipliers are
 * skipped (adding +-0 changes no nonzero sum; the bit matrices are mostly 0
 * and 1). Tiles: rows in blocks of TV_MB, columns in tiles of TV_NT, so a
 * tile of B stays in cache across the rows of a block. */
#define TV_MB 16
#define TV_NT 256

/* The products dominate the cost. Where the toolchain supports function
 * multi-versioning (GCC/Clang on x86-64 glibc: ifunc), they are also compiled for
 * AVX2 and the loader picks the version the CPU runs. Every element is
 * still computed with the same separate multiplies and adds in the same
 * order (the build forbids contraction), so both versions give identical
 * results; only the vector width differs. */
#if defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && \
    (defined(__GNUC__) || defined(__clang__)) && !defined(COMMVQ_NO_TARGET_CLONES)
#define TV_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TV_CLONES
#endif

/* Rows m0..m1-1 of C = A @ Bm (A [M][K], Bm [K][N]); a_col = 1: A is given
 * transposed, [K][M] (C = A^T @ Bm, K = tokens: weight gradients). */
TV_CLONES static void tv_gemm_rows(size_t m0, size_t m1, size_t M, size_t N, size_t K,
                                const double *A, int a_col, const double *Bm, double *C) {
    for (size_t m = m0; m < m1; m++) memset(C + m * N, 0, N * sizeof(double));
    for (size_t n0 = 0; n0 < N; n0 += TV_NT) {
        const size_t n1 = n0 + TV_NT < N ? n0 + TV_NT : N;
        for (size_t k = 0; k < K; k++) {
            const double *Bk = Bm + k * N;
            for (size_t m = m0; m < m1; m++) {
                const double am = a_col ? A[k * M + m] : A[m * K + k];
                if (am == 0.0) continue;
                double *Cm = C + m * N;
                for (size_t n = n0; n < n1; n++) Cm[n] += am * Bk[n];
            }
        }
    }
}

/* C[M][N] = A[M][K] @ Bm[K][N], or A[K][M]^T @ Bm[K][N] with a_col = 1;
 * one thread per block of TV_MB rows. */
void cvq__tv_gemm(size_t M, size_t N, size_t K, const double *A, int a_col, const double *Bm,
                 double *C, int nt) {
    const long long nblk = (long long)((M + TV_MB - 1) / TV_MB);
    (void)nt;
#ifdef COMMVQ_HAVE_OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if((size_t)M * N * K >= CVQ__TV_PAR_MIN)
#endif
    for (long long blk = 0; blk < nblk; blk++) {
        const size_t m0 = (size_t)blk * TV_MB;
        tv_gemm_rows(m0, m0 + TV_MB < M ? m0 + TV_MB : M, M, N, K, A, a_col, Bm, C);
    }
}

static void gemm_nn(size_t M, size_t N, size_t K, const double *A, const double *Bm,
                    double *C, int nt) {
    cvq__tv_gemm(M, N, K, A, 0, Bm, C, nt);
}

static void gemm_tn(size_t M, size_t N, size_t K, const double *A, const double *Bm,
                    double *C, int nt) {
    cvq__tv_gemm(M, N, K, A, 1, Bm, C, nt);
}

/* dst[c][r] = src[r][c], src [R][C]. */
static void transpose(size_t R, size_t C, const double *src, double *dst, int nt) {
    const long long nr = (long long)R;
    (void)nt;
#ifdef COMMVQ_HAVE_OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if(R * C >= CVQ__TV_PAR_MIN)
#endif
    for (long long r = 0; r < nr; r++)
        for (size_t c = 0; c < C; c++) dst[c * R + (size_t)r] = src[(size_t)r * C + c];
}

/* out[n] = sum_b X[b][n] (b ascending), X [B][N]; parallel over columns. */
static void col_sum(size_t B, size_t N, const double *X, double *out, int nt) {
    const long long nn = (long long)N;
    (void)nt;
#ifdef COMMVQ_HAVE_OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if(B * N >= CVQ__TV_PAR_MIN)
#endif
    for (long long n = 0; n < nn; n++) {
        double acc = 0.0;
        for (size_t b = 0; b < B; b++) acc += X[b * N + (size_t)n];
        out[n] = acc;
    }
}

/* ---- work ----------------------------------------------------------------- */

cvq_status cvq__tv_work_create(const cvq__tv_net *net, size_t Bmax,
                               const cvq_allocator *alloc, cvq__tv_work **out) {
    *out = NULL;
    cvq_allocator al;
    cvq__allocator_init(&al, alloc);
    cvq__tv_work *w = cvq__calloc(&al, 1, sizeof *w);
    if (!w) return CVQ_FAIL(NULL, CVQ_ERR_OUT_OF_MEMORY, "train-values: work struct");
    w->al = al;
    w->Bmax = Bmax;
    const size_t G = net->groups, F = net->F, I = net->I, Nc = net->Nc;
    const size_t kvd = G * F;
    size_t wt = F * I;
    if (I * 2 * Nc > wt) wt = I * 2 * Nc;
    if (F * Nc > wt) wt = F * Nc;
    struct { double **p; size_t n; } bufs[] = {
        {&w->xhat, G * Bmax * F}, {&w->y, G * Bmax * F}, {&w->pre, G * Bmax},
        {&w->h, G * Bmax * I}, {&w->a, G * Bmax * I}, {&w->p, G * Bmax * 2 * Nc},
        {&w->bits, G * Bmax * Nc}, {&w->dbits, G * Bmax * Nc}, {&w->u, G * Bmax * F},
        {&w->nu, G * Bmax}, {&w->vhat, Bmax * kvd}, {&w->diff, Bmax * kvd},
        {&w->dvhat, Bmax * kvd}, {&w->attn_out, Bmax * (size_t)net->Hq * net->d},
        {&w->tok, Bmax}, {&w->attn_scr, cvq__tv_attn_scratch_len(Bmax, net->d)},
        {&w->du, Bmax * F}, {&w->dl, Bmax * 2 * Nc},
        {&w->da, Bmax * I}, {&w->dy, Bmax * F}, {&w->wT, wt},
    };
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) {
        *bufs[i].p = cvq__calloc(&w->al, bufs[i].n ? bufs[i].n : 1, sizeof(double));
        if (!*bufs[i].p) {
            cvq__tv_work_free(w);
            return CVQ_FAIL(NULL, CVQ_ERR_OUT_OF_MEMORY,
                            "train-values: activations for %zu tokens", Bmax);
        }
    }
    *out = w;
    return CVQ_OK;
}

void cvq__tv_work_free(cvq__tv_work *w) {
    if (!w) return;
    double *bufs[] = {w->xhat, w->y, w->pre, w->h, w->a, w->p, w->bits, w->dbits,
                      w->u, w->nu, w->vhat, w->diff, w->dvhat, w->attn_out, w->tok, w->attn_scr,
                      w->du, w->dl, w->da, w->dy, w->wT};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i]) cvq__free(&w->al, bufs[i]);
    const cvq_allocator al = w->al;
    cvq__free(&al, w);
}

/* ---- Gumbel noise ----------------------------------------------------------- */

static uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9u;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBu;
    return z ^ (z >> 31);
}

void cvq__tv_gumbel_fill(const cvq__tv_net *net, uint64_t seed, uint64_t step,
                         size_t B, double *noise) {
    const size_t L2 = 2 * (size_t)net->Nc;
    const long long nb = (long long)B;
    for (uint32_t g = 0; g < net->groups; g++) {
        double *ng = noise + (size_t)g * B * L2;
#ifdef COMMVQ_HAVE_OPENMP
#pragma omp parallel for schedule(static) num_threads(net->n_threads) if(B * L2 >= CVQ__TV_PAR_MIN)
#endif
        for (long long b = 0; b < nb; b++) {
            /* key of (seed, step, row, group): a chain of mixes, then one
             * counter per logit */
            const uint64_t key = mix64(mix64(mix64(seed ^ 0x6A09E667F3BCC908u) ^ step) ^
                                       (((uint64_t)b << 24) ^ g));
            for (size_t o = 0; o < L2; o++) {
                const uint64_t r = mix64(key + 0x9E3779B97F4A7C15u * (o + 1));
                const double uu = ((double)(r >> 11) + 0.5) * (1.0 / 9007199254740992.0);
                ng[(size_t)b * L2 + o] = -log(-log(uu));
            }
        }
    }
}

/* ---- forward ---------------------------------------------------------------- */

static double gelu(double x) { return 0.5 * x * (1.0 + erf(x * 0.70710678118654752440)); }
static double gelu_grad(double x) {
    const double Phi = 0.5 * (1.0 + erf(x * 0.70710678118654752440));
    const double phi = 0.39894228040143267794 * exp(-0.5 * x * x);
    return Phi + x * phi;
}

/* Group g's forward pass over the batch: fills xhat, y, pre, h, a, p, bits,
 * u, nu and group g's columns of vhat. */
static void forward_group(const cvq__tv_net *net, const cvq__tv_layout *lay,
                          const double *P, cvq__tv_work *w, const cvq__tv_batch *bt,
                          uint32_t g) {
    const size_t F = net->F, I = net->I, Nc = net->Nc, B = bt->B;
    const size_t kvd = (size_t)net->groups * F, L2 = 2 * Nc;
    const int nt = net->n_threads;
    const double *ln_w = P + lay->off[0], *ln_b = P + lay->off[1];
    const double *w1 = P + lay->off[2], *b1 = P + lay->off[3];
    const double *w2 = P + lay->off[4], *b2 = P + lay->off[5], *E = P + lay->off[6];
    double *xhat = w->xhat + (size_t)g * w->Bmax * F, *y = w->y + (size_t)g * w->Bmax * F;
    double *pre = w->pre + (size_t)g * w->Bmax;
    double *h = w->h + (size_t)g * w->Bmax * I, *a = w->a + (size_t)g * w->Bmax * I;
    double *p = w->p + (size_t)g * w->Bmax * L2, *bits = w->bits + (size_t)g * w->Bmax * Nc;
    double *u = w->u + (size_t)g * w->Bmax * F, *nu = w->nu + (size_t)g * w->Bmax;
    const double *lse = bt->lse + (size_t)g * F;
    const double *gum = bt->gumbel ? bt->gumbel + (size_t)g * B * L2 : NULL;
    const long long nb = (long long)B;

    /* 1-3: scale, pre-normalise, LayerNorm */
#ifdef COMMVQ_HAVE_OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if(B * F >= CVQ__TV_PAR_MIN)
#endif
    for (long long bb = 0; bb < nb; bb++) {
        const size_t b = (size_t)bb;
        const double *vb = bt->v + b * kvd + (size_t)g * F;
        double *xb = xhat + b * F, *yb = y + b * F;
        double ss = 0.0;
        for (size_t f = 0; f < F; f++) {
            xb[f] = vb[f] / lse[f];
            ss += xb[f] * xb[f];
        }
        pre[b] = sqrt(ss);
        const double r = 1.0 / (pre[b] + TV_EPS);
        double mean = 0.0;
        for (size_t f = 0; f < F; f++) {
            xb[f] *= r;
            mean += xb[f];
        }
        mean /= (double)F;
        double var = 0.0;
        for (size_t f = 0; f < F; f++) {
            xb[f] -= mean;
            var += xb[f] * xb[f];
        }
        var /= (double)F;
        const double rstd = 1.0 / sqrt(var + TV_LN_EPS);
        for (size_t f = 0; f < F; f++) {
            xb[f] *= rstd;
            yb[f] = xb[f] * ln_w[f] + ln_b[f];
        }
    }
    /* 4: h = y W1^T + b1; a = gelu(h); logits (kept in p) = a W2^T + b2 */
    transpose(I, F, w1, w->wT, nt);
    gemm_nn(B, I, F, y, w->wT, h, nt);
#ifdef COMMVQ_HAVE_OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if(B * I >= CVQ__TV_PAR_MIN)
#endif
    for (long long bb = 0; bb < nb; bb++)
        for (size_t o = 0; o < I; o++) {
            const size_t i = (size_t)bb * I + o;
            h[i] += b1[o];
            a[i] = gelu(h[i]);
        }
    transpose(L2, I, w2, w->wT, nt);
    gemm_nn(B, L2, I, a, w->wT, p, nt);
    /* 5: per 4-way group softmax of (l + gumbel)/tau, argmax, bits */
    const int hard = bt->mode == CVQ__TV_HARD_ST;
#ifdef COMMVQ_HAVE_OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if(B * L2 >= CVQ__TV_PAR_MIN)
#endif
    for (long long bb = 0; bb < nb; bb++) {
        const size_t b = (size_t)bb;
        for (size_t t = 0; t < Nc / 2; t++) {
            double *pt = p + b * L2 + 4 * t;
            double z[4], zmax = 0.0;
            size_t jbest = 0;
            for (size_t c = 0; c < 4; c++) {
                z[c] = pt[c] + b2[4 * t + c];
                if (gum) z[c] += gum[b * L2 + 4 * t + c];
                z[c] /= bt->tau;
                if (c == 0 || z[c] > zmax) { /* strict >: lowest index wins */
                    zmax = z[c];
                    jbest = c;
                }
            }
            double sum = 0.0;
            for (size_t c = 0; c < 4; c++) {
                pt[c] = exp(z[c] - zmax);
                sum += pt[c];
            }
            for (size_t c = 0; c < 4; c++) pt[c] /= sum;
            double *bk = bits + b * Nc + 2 * t;
            if (hard) { /* j -> (1,0), (0,1), (1,1), (0,0) */
                bk[0] = (jbest == 0 || jbest == 2) ? 1.0 : 0.0;
                bk[1] = (jbest == 1 || jbest == 2) ? 1.0 : 0.0;
            } else {
                bk[0] = pt[0] + pt[2];
                bk[1] = pt[1] + pt[2];
            }
        }
    }
    /* 6: u = bits E; v_hat = u / (||u|| + eps) * (pre + eps) * lse */
    gemm_nn(B, F, Nc, bits, E, u, nt);
#ifdef COMMVQ_HAVE_OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if(B * F >= CVQ__TV_PAR_MIN)
#endif
    for (long long bb = 0; bb < nb; bb++) {
        const size_t b = (size_t)bb;
        const double *ub = u + b * F;
        double ss = 0.0;
        for (size_t f = 0; f < F; f++) ss += ub[f] * ub[f];
        nu[b] = sqrt(ss);
        const double k = (pre[b] + TV_EPS) / (nu[b] + TV_EPS);
        double *vh = w->vhat + b * kvd + (size_t)g * F;
        for (size_t f = 0; f < F; f++) vh[f] = ub[f] * k * lse[f];
    }
}

/* ---- backward ---------------------------------------------------------------- */

/* Group g's backward pass from w->dvhat; writes the group's gradient block. */
static void backward_group(const cvq__tv_net *net, const cvq__tv_layout *lay,
                           const double *P, cvq__tv_work *w, const cvq__tv_batch *bt,
                           uint32_t g, double *G) {
    const size_t F = net->F, I = net->I, Nc = net->Nc, B = bt->B;
    const size_t kvd = (size_t)net->groups * F, L2 = 2 * Nc;
    const int nt = net->n_threads;
    const double *ln_w = P + lay->off[0];
    const double *w1 = P + lay->off[2], *w2 = P + lay->off[4], *E = P + lay->off[6];
    const double *xhat = w->xhat + (size_t)g * w->Bmax * F, *y = w->y + (size_t)g * w->Bmax * F;
    const double *pre = w->pre + (size_t)g * w->Bmax;
    const double *h = w->h + (size_t)g * w->Bmax * I, *a = w->a + (size_t)g * w->Bmax * I;
    const double *p = w->p + (size_t)g * w->Bmax * L2;
    const double *bits = w->bits + (size_t)g * w->Bmax * Nc;
    double *dbits = w->dbits + (size_t)g * w->Bmax * Nc;
    const double *u = w->u + (size_t)g * w->Bmax * F, *nu = w->nu + (size_t)g * w->Bmax;
    const double *lse = bt->lse + (size_t)g * F;
    double *du = w->du, *dl = w->dl, *da = w->da, *dy = w->dy;
    const long long nb = (long long)B;

    /* v_hat = u * k * lse, k = (pre+eps)/(||u||+eps):
     * du = q/(nu+eps) - u (q.u) / ((nu+eps)^2 nu), q = dvhat * (pre+eps) * lse */
#ifdef COMMVQ_HAVE_OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if(B * F >= CVQ__TV_PAR_MIN)
#endif
    for (long long bb = 0; bb < nb; bb++) {
        const size_t b = (size_t)bb;
        const double *dv = w->dvhat + b * kvd + (size_t)g * F;
        const double *ub = u + b * F;
        double *dub = du + b * F;
        const double s = pre[b] + TV_EPS, ne = nu[b] + TV_EPS;
        double qu = 0.0;
        for (size_t f = 0; f < F; f++) {
            dub[f] = dv[f] * s * lse[f];
            qu += dub[f] * ub[f];
        }
        const double c2 = nu[b] > 0.0 ? qu / (ne * ne * nu[b]) : 0.0;
        for (size_t f = 0; f < F; f++) dub[f] = dub[f] / ne - ub[f] * c2;
    }
    /* dE = bits^T du; dbits = du E^T */
    gemm_tn(Nc, F, B, bits, du, G + lay->off[6], nt);
    transpose(Nc, F, E, w->wT, nt);
    gemm_nn(B, Nc, F, du, w->wT, dbits, nt);
    /* bits (2t, 2t+1) = (p0 + p2, p1 + p2) (soft; straight-through uses the
     * same derivative); softmax of z = (l + gumbel)/tau */
#ifdef COMMVQ_HAVE_OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if(B * L2 >= CVQ__TV_PAR_MIN)
#endif
    for (long long bb = 0; bb < nb; bb++) {
        const size_t b = (size_t)bb;
        for (size_t t = 0; t < Nc / 2; t++) {
            const double *pt = p + b * L2 + 4 * t;
            const double d0 = dbits[b * Nc + 2 * t], d1 = dbits[b * Nc + 2 * t + 1];
            const double dp[4] = {d0, d1, d0 + d1, 0.0};
            const double s = pt[0] * dp[0] + pt[1] * dp[1] + pt[2] * dp[2] + pt[3] * dp[3];
            for (size_t c = 0; c < 4; c++)
                dl[b * L2 + 4 * t + c] = pt[c] * (dp[c] - s) / bt->tau;
        }
    }
    col_sum(B, L2, dl, G + lay->off[5], nt);
    gemm_tn(L2, I, B, dl, a, G + lay->off[4], nt);
    gemm_nn(B, I, L2, dl, w2, da, nt);
#ifdef COMMVQ_HAVE_OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if(B * I >= CVQ__TV_PAR_MIN)
#endif
    for (long long bb = 0; bb < nb; bb++)
        for (size_t o = 0; o < I; o++) {
            const size_t i = (size_t)bb * I + o;
            da[i] *= gelu_grad(h[i]);
        }
    /* da now holds d loss / d h */
    col_sum(B, I, da, G + lay->off[3], nt);
    gemm_tn(I, F, B, da, y, G + lay->off[2], nt);
    gemm_nn(B, F, I, da, w1, dy, nt);
    /* y = xhat * ln_w + ln_b */
    {
        double *gw = G + lay->off[0], *gb = G + lay->off[1];
        const long long nf = (long long)F;
#ifdef COMMVQ_HAVE_OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if(B * F >= CVQ__TV_PAR_MIN)
#endif
        for (long long ff = 0; ff < nf; ff++) {
            const size_t f = (size_t)ff;
            double sw = 0.0, sb = 0.0;
            for (size_t b = 0; b < B; b++) {
                sw += dy[b * F + f] * xhat[b * F + f];
                sb += dy[b * F + f];
            }
            gw[f] = sw;
            gb[f] = sb;
        }
    }
    (void)ln_w;
}

double cvq__tv_loss_grad(const cvq__tv_net *net, const double *params,
                         cvq__tv_work *w, const cvq__tv_batch *bt, double *grad) {
    cvq__tv_layout lay;
    cvq__tv_layout_of(net, &lay);
    const size_t B = bt->B, kvd = (size_t)net->groups * net->F;
    const size_t Hq = net->Hq, d = net->d;
    const int nt = net->n_threads;
    const long long nb = (long long)B;
    for (uint32_t g = 0; g < net->groups; g++)
        forward_group(net, &lay, params + (size_t)g * lay.n, w, bt, g);

    /* value MSE: per-token sums, then in token order */
#ifdef COMMVQ_HAVE_OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if(B * kvd >= CVQ__TV_PAR_MIN)
#endif
    for (long long bb = 0; bb < nb; bb++) {
        const size_t b = (size_t)bb;
        double acc = 0.0;
        for (size_t k = 0; k < kvd; k++) {
            const double e = w->vhat[b * kvd + k] - bt->v[b * kvd + k];
            w->diff[b * kvd + k] = e;
            acc += e * e;
        }
        w->tok[b] = acc;
    }
    double sv = 0.0;
    for (size_t b = 0; b < B; b++) sv += w->tok[b];
    const double nv = (double)B * (double)kvd;
    w->mse_v = sv / nv;

    /* attention-output MSE */
    const int use_attn = bt->attn != NULL && bt->attn_weight != 0.0;
    double na = 1.0;
    w->mse_attn = 0.0;
    if (use_attn) {
        cvq__tv_attn_apply(B, net->Hq, net->Hkv, net->d, bt->kv_of, bt->attn, w->diff, nt,
                           w->attn_scr, w->attn_out);
#ifdef COMMVQ_HAVE_OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if(B * Hq * d >= CVQ__TV_PAR_MIN)
#endif
        for (long long bb = 0; bb < nb; bb++) {
            double acc = 0.0;
            const double *o = w->attn_out + (size_t)bb * Hq * d;
            for (size_t k = 0; k < Hq * d; k++) acc += o[k] * o[k];
            w->tok[bb] = acc;
        }
        double sa = 0.0;
        for (size_t b = 0; b < B; b++) sa += w->tok[b];
        na = (double)B * (double)Hq * (double)d;
        w->mse_attn = sa / na;
    }
    const double loss = w->mse_v + (use_attn ? bt->attn_weight * w->mse_attn : 0.0);
    if (!grad) return loss;

    /* d loss / d v_hat */
    const double cv = 2.0 / nv;
#ifdef COMMVQ_HAVE_OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if(B * kvd >= CVQ__TV_PAR_MIN)
#endif
    for (long long i = 0; i < (long long)(B * kvd); i++) w->dvhat[i] = cv * w->diff[i];
    if (use_attn)
        cvq__tv_attn_apply_t(B, net->Hq, net->Hkv, net->d, bt->kv_of, bt->attn, w->attn_out,
                             bt->attn_weight * 2.0 / na, nt, w->attn_scr, w->dvhat);
    for (uint32_t g = 0; g < net->groups; g++)
        backward_group(net, &lay, params + (size_t)g * lay.n, w, bt, g,
                       grad + (size_t)g * lay.n);
    return loss;
}
