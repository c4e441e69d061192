/*
 * Key codebook training (method note section 6): EM per layer, per KV head,
 * stage after stage (greedy), on the pre-RoPE keys normalised by their
 * prescale exactly as the encoder does (core/ref_keys.c).
 *
 * One stage r of one head h:
 *   init   4096 random data rows (seeded) taken as the centres c(A,B), then
 *          one M-step that projects them onto the structured form
 *   step s E-step over all tokens with the current sub-codes w_s: hard code
 *          and error (the stage's hard MSE of w_s), and, in soft mode, the
 *          weights W_t(A,B) = softmax(-D_t(A,B)/tau_s) accumulated into
 *          N[A][B] and the marginal-weighted sums SR, SC; hard mode uses the
 *          argmin code with weight 1 (k-means-like, Lloyd: the hard MSE of
 *          successive iterates never increases)
 *          M-step: the 64x64 Hermitian system (cvq__key_mstep), then every
 *          dead sub-code (used by no token's hard code) re-seeded so that
 *          code (a, B_t) reproduces exactly the worst-fitted token t
 *   split  on a plateau (`patience` steps without a relative improvement
 *          above `plateau`), up to max_splits times: under-used sub-codes
 *          are re-seeded to split over-used ones (project rule: plain EM
 *          stalls where one sub-code serves two clusters), then EM goes on
 *   end    the iterate with the lowest hard MSE is kept; a stage stops on a
 *          plateau with no split left to try, or after `steps` M-steps;
 *          the stage is written to key_w (fp32)
 *          and the residual of every token is advanced with the encoder's
 *          own stage function (cvq_ref_key_stage) on tables built exactly as
 *          cvq_codebook_commit builds them, so later stages train on exactly
 *          the residual the encoder will see.
 *
 * Distances use the decomposition of method note 2.4, never [T,4096,d]
 * work: per token f[a], g[b] from 64 complex dot products, then
 * D^2 = |z|^2 + f[A] + g[B] + G[A][B] (clamped at 0 before the root).
 * Soft weights below exp(-SOFT_CUT) of the largest are skipped (they are
 * below double rounding of the sum).
 *
 * Reproducibility: tokens are processed in fixed chunks of CVQ__TRAIN_CHUNK
 * whose partial sums are merged in chunk order, so results depend on the
 * seed and the data only, never on the thread count. Random streams depend
 * on (seed, layer, head, stage) only, so training stages 0..R1-1 gives the
 * same sub-codes whatever R is, and resuming at first_stage gives the same
 * result as one uninterrupted run.
 *
 * Index names: t token row, h KV head, r stage, a/A/B sub-code (< 64),
 * p RoPE pair (< P = d/2); sub-codes are w[a][p][2] = (x, y), w = x + i*y.
 */
#include "train_keys_internal.h"
#include "reference.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#define NC CVQ_SUBCODES /* 64 */
#define SOFT_CUT 40.0   /* exp(-40) ~ 4e-18: below double rounding */
#define MAX_P 128       /* d <= 256 */
/* Split moves: a sub-code used by fewer than SPLIT_LOW x the mean use is
 * moved to split one used by more than SPLIT_HIGH x the mean. */
#define SPLIT_LOW 0.5
#define SPLIT_HIGH 1.5

cvq_key_train_params cvq_key_train_default_params(void) {
    cvq_key_train_params p;
    memset(&p, 0, sizeof p);
    p.seed = 0;
    p.max_tokens = 0;
    p.steps = 100;
    p.first_stage = 0;
    p.n_stages = 0;
    p.hard = 0;
    p.tau_start = 1e-3;
    p.tau_end = 1e-5;
    p.plateau = 1e-5;
    p.patience = 5;
    p.max_splits = 8;
    p.n_threads = 0;
    p.progress = NULL;
    p.progress_user = NULL;
    p.allocator = NULL;
    return p;
}

/* ---- M-step ----------------------------------------------------------------- */

/* In-place complex Cholesky M = L L^H of an n x n Hermitian matrix held as
 * (re, im) [n][n] (lower triangle read and overwritten by L). 0 on success,
 * -1 when a pivot is not positive and finite. */
static int cholesky_c(double *re, double *im, uint32_t n) {
    for (uint32_t j = 0; j < n; j++) {
        double dj = re[j * n + j];
        for (uint32_t k = 0; k < j; k++)
            dj -= re[j * n + k] * re[j * n + k] + im[j * n + k] * im[j * n + k];
        if (!(dj > 0.0) || !isfinite(dj)) return -1;
        const double ljj = sqrt(dj);
        re[j * n + j] = ljj;
        im[j * n + j] = 0.0;
        for (uint32_t i = j + 1; i < n; i++) {
            /* L[i][j] = (M[i][j] - sum_k L[i][k] conj(L[j][k])) / L[j][j] */
            double sr = re[i * n + j], si = im[i * n + j];
            for (uint32_t k = 0; k < j; k++) {
                const double ar = re[i * n + k], ai = im[i * n + k];
                const double br = re[j * n + k], bi = im[j * n + k];
                sr -= ar * br + ai * bi;
                si -= ai * br - ar * bi;
            }
            re[i * n + j] = sr / ljj;
            im[i * n + j] = si / ljj;
        }
    }
    return 0;
}

/* Solves L L^H x = b in place (b: n complex values as re[], im[]). */
static void chol_solve_c(const double *lre, const double *lim, uint32_t n,
                         double *br, double *bi) {
    for (uint32_t i = 0; i < n; i++) { /* L y = b */
        double sr = br[i], si = bi[i];
        for (uint32_t k = 0; k < i; k++) {
            const double ar = lre[i * n + k], ai = lim[i * n + k];
            sr -= ar * br[k] - ai * bi[k];
            si -= ar * bi[k] + ai * br[k];
        }
        br[i] = sr / lre[i * n + i];
        bi[i] = si / lre[i * n + i];
    }
    for (uint32_t ii = n; ii-- > 0;) { /* L^H x = y: (L^H)[i][k] = conj(L[k][i]) */
        double sr = br[ii], si = bi[ii];
        for (uint32_t k = ii + 1; k < n; k++) {
            const double ar = lre[k * n + ii], ai = -lim[k * n + ii];
            sr -= ar * br[k] - ai * bi[k];
            si -= ar * bi[k] + ai * br[k];
        }
        br[ii] = sr / lre[ii * n + ii];
        bi[ii] = si / lre[ii * n + ii];
    }
}

int cvq__key_mstep(uint32_t P, const double *N, const double *SR, const double *SC,
                   const double *w_prev, double ridge, double *w_out) {
    double mre[NC * NC], mim[NC * NC];
    double cnt[NC], lam[NC];
    double total = 0.0;
    for (uint32_t a = 0; a < NC; a++) {
        double r = 0.0, c = 0.0; /* row and column sums of N */
        for (uint32_t b = 0; b < NC; b++) {
            r += N[a * NC + b];
            c += N[b * NC + a];
        }
        cnt[a] = r + c;
        total += cnt[a];
    }
    double base = ridge * (total / NC > 1.0 ? total / NC : 1.0);
    for (int attempt = 0; attempt < 8; attempt++, base = base > 0.0 ? base * 100.0 : 1e-12) {
        for (uint32_t a = 0; a < NC; a++) {
            lam[a] = base + (cnt[a] < 1.0 ? 1.0 - cnt[a] : 0.0);
            for (uint32_t b = 0; b < NC; b++) {
                mre[a * NC + b] = a == b ? cnt[a] + lam[a] : 0.0;
                mim[a * NC + b] = a == b ? 0.0 : N[a * NC + b] - N[b * NC + a];
            }
        }
        if (cholesky_c(mre, mim, NC) != 0) continue;
        double br[NC], bi[NC];
        for (uint32_t p = 0; p < P; p++) {
            for (uint32_t a = 0; a < NC; a++) {
                const size_t i = ((size_t)a * P + p) * 2;
                /* SR - i*SC + lambda * w_prev */
                br[a] = SR[i] + SC[i + 1] + lam[a] * w_prev[i];
                bi[a] = SR[i + 1] - SC[i] + lam[a] * w_prev[i + 1];
            }
            chol_solve_c(mre, mim, NC, br, bi);
            for (uint32_t a = 0; a < NC; a++) {
                const size_t i = ((size_t)a * P + p) * 2;
                w_out[i] = br[a];
                w_out[i + 1] = bi[a];
            }
        }
        for (size_t i = 0; i < (size_t)NC * P * 2; i++)
            if (!isfinite(w_out[i])) return -1;
        return 0;
    }
    return -1;
}

/* ---- tables ------------------------------------------------------------------ */

/* n[a] and G[A][B] of one fp32 stage exactly as cvq_codebook_commit builds
 * them (double sums in ascending p, one rounding, G from its upper
 * triangle), so cvq_ref_key_stage here gives the encoder's codes. */
static void stage_tables_f32(const float *w, uint32_t P, float *n, float *G) {
    for (uint32_t a = 0; a < NC; a++) {
        const float *wa = w + (size_t)a * P * 2;
        double acc = 0.0;
        for (uint32_t p = 0; p < P; p++) {
            const double x = wa[2 * p], y = wa[2 * p + 1];
            acc = acc + (x * x + y * y);
        }
        n[a] = (float)acc;
    }
    for (uint32_t A = 0; A < NC; A++) {
        const float *wA = w + (size_t)A * P * 2;
        G[A * NC + A] = 0.0f;
        for (uint32_t B = A + 1; B < NC; B++) {
            const float *wB = w + (size_t)B * P * 2;
            double acc = 0.0;
            for (uint32_t p = 0; p < P; p++) {
                const double xA = wA[2 * p], yA = wA[2 * p + 1];
                const double xB = wB[2 * p], yB = wB[2 * p + 1];
                acc = acc + (xA * yB - yA * xB);
            }
            const float v = (float)(-2.0 * acc);
            G[A * NC + B] = v;
            G[B * NC + A] = -v;
        }
    }
}

/* ---- one head's EM state --------------------------------------------------------- */

typedef struct em_head {
    uint32_t P, d;
    cvq_pair_layout layout;
    size_t n;           /* token rows of this head */
    const float *res;   /* [n][d] residual, head layout */
    /* current iterate, double */
    double *w;          /* [64][P][2] */
    double *wxT, *wyT;  /* [P][64] transposed x and y for the dot products */
    double nrm[NC];     /* n_a = sum_p |w_a,p|^2 */
    double G[NC * NC];  /* G[A][B] = -2 Im sum_p conj(w_A,p) w_B,p */
    /* per-chunk partial sums, merged in chunk order */
    size_t n_chunks;
    size_t stride;      /* doubles per chunk: N, SR, SC, err */
    double *part;
    uint16_t *code;     /* [n] hard code of each row under the current w */
    double *err;        /* [n] its squared error */
} em_head;

static size_t part_stride(uint32_t P) { return (size_t)NC * NC + 4u * NC * P + 1u; }

static void em_tables(em_head *e) {
    const uint32_t P = e->P;
    for (uint32_t a = 0; a < NC; a++) {
        const double *wa = e->w + (size_t)a * P * 2;
        double acc = 0.0;
        for (uint32_t p = 0; p < P; p++) {
            acc += wa[2 * p] * wa[2 * p] + wa[2 * p + 1] * wa[2 * p + 1];
            e->wxT[(size_t)p * NC + a] = wa[2 * p];
            e->wyT[(size_t)p * NC + a] = wa[2 * p + 1];
        }
        e->nrm[a] = acc;
    }
    for (uint32_t A = 0; A < NC; A++) {
        const double *wA = e->w + (size_t)A * P * 2;
        e->G[A * NC + A] = 0.0;
        for (uint32_t B = A + 1; B < NC; B++) {
            const double *wB = e->w + (size_t)B * P * 2;
            double acc = 0.0;
            for (uint32_t p = 0; p < P; p++)
                acc += wA[2 * p] * wB[2 * p + 1] - wA[2 * p + 1] * wB[2 * p];
            e->G[A * NC + B] = -2.0 * acc;
            e->G[B * NC + A] = 2.0 * acc;
        }
    }
}

/* E-step over chunk c: hard codes and errors of its rows, and the chunk's
 * partial N, SR, SC and error sum (soft weights at temperature tau, or the
 * hard code with weight 1 when soft == 0). */
static void estep_chunk(const em_head *e, size_t c, int soft, double tau) {
    const uint32_t P = e->P, d = e->d;
    double *acc = e->part + c * e->stride;
    memset(acc, 0, e->stride * sizeof(double));
    double *N = acc;                          /* [64][64] */
    double *SR = N + NC * NC;                 /* [64][P][2] */
    double *SC = SR + (size_t)NC * P * 2;     /* [64][P][2] */
    double *err_sum = SC + (size_t)NC * P * 2;
    const size_t t0 = c * CVQ__TRAIN_CHUNK;
    const size_t t1 = t0 + CVQ__TRAIN_CHUNK < e->n ? t0 + CVQ__TRAIN_CHUNK : e->n;

    double zr[MAX_P], zi[MAX_P];
    double dr[NC], di[NC], f[NC], g[NC], rw[NC], cw[NC];
    double d2[NC * NC], wv[NC * NC], colmin[NC];
    uint16_t cand[NC * NC];

    for (size_t t = t0; t < t1; t++) {
        const float *z = e->res + t * d;
        double zz = 0.0;
        for (uint32_t p = 0; p < P; p++) {
            uint32_t ire, iim;
            cvq__pair_index(e->layout, d, p, &ire, &iim);
            zr[p] = z[ire];
            zi[p] = z[iim];
            zz += zr[p] * zr[p] + zi[p] * zi[p];
        }
        /* <w_a, z> = sum_p conj(w_a,p) z_p for all a at once (inner loop
         * over a so that it vectorises without reassociation) */
        for (uint32_t a = 0; a < NC; a++) dr[a] = di[a] = 0.0;
        for (uint32_t p = 0; p < P; p++) {
            const double *wx = e->wxT + (size_t)p * NC, *wy = e->wyT + (size_t)p * NC;
            const double xr = zr[p], xi = zi[p];
            for (uint32_t a = 0; a < NC; a++) {
                dr[a] += wx[a] * xr + wy[a] * xi;
                di[a] += wx[a] * xi - wy[a] * xr;
            }
        }
        for (uint32_t a = 0; a < NC; a++) {
            f[a] = e->nrm[a] - 2.0 * dr[a];
            g[a] = e->nrm[a] - 2.0 * di[a];
        }
        /* D^2(A,B) = |z|^2 + f[A] + g[B] + G[A][B], and per column B the
         * smallest value over A */
        for (uint32_t A = 0; A < NC; A++) {
            const double base = zz + f[A];
            const double *GA = e->G + A * NC;
            double *row = d2 + A * NC;
            for (uint32_t B = 0; B < NC; B++) row[B] = base + (g[B] + GA[B]);
        }
        for (uint32_t B = 0; B < NC; B++) colmin[B] = d2[B];
        for (uint32_t A = 1; A < NC; A++) {
            const double *row = d2 + A * NC;
            for (uint32_t B = 0; B < NC; B++) {
                const double v = row[B], cm = colmin[B];
                colmin[B] = v < cm ? v : cm; /* a plain min: vectorises */
            }
        }
        /* hard code: the smallest D^2, lowest k = 64A + B on a tie (the
         * same as a scan of k in ascending order with strict <): among
         * the columns reaching the minimum, the first row reaching it */
        double best = colmin[0];
        for (uint32_t B = 1; B < NC; B++) best = colmin[B] < best ? colmin[B] : best;
        uint32_t kb = NC * NC;
        for (uint32_t B = 0; B < NC; B++) {
            if (colmin[B] != best) continue;
            for (uint32_t A = 0; A < NC && A * NC + B < kb; A++)
                if (d2[A * NC + B] == best) {
                    kb = A * NC + B;
                    break;
                }
        }
        const double emin = best > 0.0 ? best : 0.0;
        e->code[t] = (uint16_t)kb;
        e->err[t] = emin;
        *err_sum += emin;

        if (!soft) {
            const uint32_t A = kb / NC, B = kb % NC;
            N[kb] += 1.0;
            double *sa = SR + (size_t)A * P * 2, *sb = SC + (size_t)B * P * 2;
            for (uint32_t p = 0; p < P; p++) {
                sa[2 * p] += zr[p];
                sa[2 * p + 1] += zi[p];
                sb[2 * p] += zr[p];
                sb[2 * p + 1] += zi[p];
            }
            continue;
        }

        /* soft weights exp(-(D - Dmin)/tau) of the codes within SOFT_CUT*tau
         * of the nearest; D = sqrt(max(0, D^2)) */
        const double dmin = sqrt(emin);
        const double lim = dmin + SOFT_CUT * tau;
        const double thr = lim * lim;
        /* only columns whose minimum is within the threshold hold
         * candidates; visit them in ascending k */
        uint32_t cols[NC], nq = 0;
        for (uint32_t B = 0; B < NC; B++)
            if (colmin[B] <= thr) cols[nq++] = B;
        uint32_t m = 0;
        double sum = 0.0;
        for (uint32_t A = 0; A < NC; A++) {
            const double *row = d2 + A * NC;
            for (uint32_t j = 0; j < nq; j++) {
                const double v = row[cols[j]];
                if (v <= thr) {
                    const double D = sqrt(v > 0.0 ? v : 0.0);
                    const double wk = exp(-(D - dmin) / tau);
                    cand[m] = (uint16_t)(A * NC + cols[j]);
                    wv[m] = wk;
                    sum += wk;
                    m++;
                }
            }
        }
        const double inv = 1.0 / sum;
        for (uint32_t a = 0; a < NC; a++) rw[a] = cw[a] = 0.0;
        for (uint32_t j = 0; j < m; j++) {
            const double wk = wv[j] * inv;
            N[cand[j]] += wk;
            rw[cand[j] / NC] += wk;
            cw[cand[j] % NC] += wk;
        }
        for (uint32_t a = 0; a < NC; a++) {
            if (rw[a] != 0.0) {
                double *sa = SR + (size_t)a * P * 2;
                const double q = rw[a];
                for (uint32_t p = 0; p < P; p++) {
                    sa[2 * p] += q * zr[p];
                    sa[2 * p + 1] += q * zi[p];
                }
            }
            if (cw[a] != 0.0) {
                double *sb = SC + (size_t)a * P * 2;
                const double q = cw[a];
                for (uint32_t p = 0; p < P; p++) {
                    sb[2 * p] += q * zr[p];
                    sb[2 * p + 1] += q * zi[p];
                }
            }
        }
    }
}

/* Runs the E-step on all chunks (in parallel) and merges the partials in
 * chunk order into out (stride doubles: N, SR, SC, err). */
static void estep_all(em_head *e, int nt, int soft, double tau, double *out) {
    const long long nch = (long long)e->n_chunks;
    (void)nt;
#ifdef COMMVQ_HAVE_OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
#endif
    for (long long c = 0; c < nch; c++) estep_chunk(e, (size_t)c, soft, tau);
    memset(out, 0, e->stride * sizeof(double));
    for (size_t c = 0; c < e->n_chunks; c++) {
        const double *src = e->part + c * e->stride;
        for (size_t i = 0; i < e->stride; i++) out[i] += src[i];
    }
}

/* The row with the largest hard error among the rows whose code uses
 * sub-code `donor` (either half; donor < 0: any row), skipping the rows in
 * picked[] and the rows whose other half is `target`; lowest row on ties.
 * Rows with zero error never qualify. Returns (size_t)-1 when none does;
 * *role is 0 when the row uses donor as its A half (or donor < 0), else 1. */
static size_t worst_row(const em_head *e, int donor, uint32_t target,
                        const size_t *picked, uint32_t n_picked, int *role) {
    size_t bt = (size_t)-1;
    double be = 0.0;
    int brole = 0;
    for (size_t t = 0; t < e->n; t++) {
        const uint32_t A = e->code[t] / NC, B = e->code[t] % NC;
        int rl = 0;
        if (donor >= 0) {
            if (A == (uint32_t)donor) rl = 0;
            else if (B == (uint32_t)donor) rl = 1;
            else continue;
        }
        if ((rl == 0 && B == target) || (rl == 1 && A == target)) continue;
        if (!(e->err[t] > be)) continue;
        int seen = 0;
        for (uint32_t i = 0; i < n_picked && !seen; i++) seen = picked[i] == t;
        if (seen) continue;
        be = e->err[t];
        bt = t;
        brole = rl;
    }
    *role = brole;
    return bt;
}

/* Sets sub-code a so that row t's code, with a in place of its A half
 * (role 0) or B half (role 1), reproduces z_t exactly under w_new. */
static void seed_from_row(const em_head *e, double *w_new, uint32_t a, size_t t, int role) {
    const uint32_t P = e->P, d = e->d;
    const float *z = e->res + t * e->d;
    double *wa = w_new + (size_t)a * P * 2;
    const uint32_t other = role == 0 ? e->code[t] % NC : e->code[t] / NC;
    const double *wo = w_new + (size_t)other * P * 2;
    for (uint32_t p = 0; p < P; p++) {
        uint32_t ire, iim;
        cvq__pair_index(e->layout, d, p, &ire, &iim);
        if (role == 0) {
            /* w_a = z - i*w_B = (z_re + y_B) + i*(z_im - x_B) */
            wa[2 * p] = (double)z[ire] + wo[2 * p + 1];
            wa[2 * p + 1] = (double)z[iim] - wo[2 * p];
        } else {
            /* w_a = -i*(z - w_A) = (z_im - y_A) - i*(z_re - x_A) */
            wa[2 * p] = (double)z[iim] - wo[2 * p + 1];
            wa[2 * p + 1] = -((double)z[ire] - wo[2 * p]);
        }
    }
}

/* After an M-step (w_new), with the hard codes and errors of the E-step:
 *  - every dead sub-code (used by no row's hard code) is re-seeded from one
 *    of the worst-fitted rows (distinct rows, largest error first). Only
 *    unused codes change, so the next hard MSE cannot increase (Lloyd).
 *  - split != 0: every under-used sub-code (below SPLIT_LOW x the mean
 *    use) is moved to split one of the most-used ones (above SPLIT_HIGH x
 *    the mean): it is seeded from the worst-fitted row among those using
 *    that donor, likely a row of a second cluster the donor has absorbed
 *    (the usual k-means split move against merged clusters). This can
 *    raise the hard MSE for a step; the stage keeps its best iterate. */
static void reseed(em_head *e, double *w_new, int split) {
    uint32_t use[NC];
    memset(use, 0, sizeof use);
    for (size_t t = 0; t < e->n; t++) {
        use[e->code[t] / NC]++;
        use[e->code[t] % NC]++;
    }
    size_t picked[NC];
    uint32_t n_picked = 0;
    for (uint32_t a = 0; a < NC; a++) {
        if (use[a]) continue;
        int role;
        const size_t t = worst_row(e, -1, a, picked, n_picked, &role);
        if (t == (size_t)-1) break; /* no row left with a positive error */
        seed_from_row(e, w_new, a, t, role);
        picked[n_picked++] = t;
    }
    if (!split) return;
    /* under-used codes by ascending use, donors by descending use (ties:
     * lower sub-code first) */
    const double mean = 2.0 * (double)e->n / NC;
    uint32_t under[NC], donor[NC], nu = 0, nd = 0;
    for (uint32_t a = 0; a < NC; a++) {
        if (use[a] > 0 && (double)use[a] < SPLIT_LOW * mean) under[nu++] = a;
        if ((double)use[a] > SPLIT_HIGH * mean) donor[nd++] = a;
    }
    for (uint32_t i = 1; i < nu; i++)
        for (uint32_t j = i; j > 0 && use[under[j]] < use[under[j - 1]]; j--) {
            const uint32_t x = under[j]; under[j] = under[j - 1]; under[j - 1] = x;
        }
    for (uint32_t i = 1; i < nd; i++)
        for (uint32_t j = i; j > 0 && use[donor[j]] > use[donor[j - 1]]; j--) {
            const uint32_t x = donor[j]; donor[j] = donor[j - 1]; donor[j - 1] = x;
        }
    for (uint32_t i = 0; i < nu && i < nd && n_picked < NC; i++) {
        int role;
        const size_t t = worst_row(e, (int)donor[i], under[i], picked, n_picked, &role);
        if (t == (size_t)-1) continue;
        seed_from_row(e, w_new, under[i], t, role);
        picked[n_picked++] = t;
    }
}

/* True when some sub-code is under-used and another over-used (a split
 * move is possible). */
static int has_underused(const em_head *e) {
    uint32_t use[NC];
    memset(use, 0, sizeof use);
    for (size_t t = 0; t < e->n; t++) {
        use[e->code[t] / NC]++;
        use[e->code[t] % NC]++;
    }
    const double mean = 2.0 * (double)e->n / NC;
    int under = 0, over = 0;
    for (uint32_t a = 0; a < NC; a++) {
        under |= use[a] > 0 && (double)use[a] < SPLIT_LOW * mean;
        over |= (double)use[a] > SPLIT_HIGH * mean;
    }
    return under && over;
}

/* ---- the trainer ------------------------------------------------------------------- */

typedef struct key_job {
    cvq_codebook *cb;
    const cvq_geometry *g;
    uint32_t layer;
    const cvq_key_train_params *kp;
    const cvq_allocator *al;
    int nt;
    cvq__train_meter meter;
    uint64_t steps_run;
    size_t n_used;
} key_job;

static float *stage_w(cvq_codebook *cb, uint32_t layer, uint32_t h, uint32_t r) {
    const cvq_geometry *g = &cb->geom;
    const size_t P = cvq__pairs(g);
    return cb->tensors[CVQ_T_KEY_W] + layer * cb->layer_stride[CVQ_T_KEY_W] +
           ((size_t)h * g->key_stages + r) * NC * P * 2;
}

/* Advances every row of res [n][d] by stage (h, r) of the codebook. */
static void apply_stage(key_job *j, uint32_t h, uint32_t r, float *res, size_t n,
                        float *nG) {
    const cvq_geometry *g = j->g;
    const uint32_t P = cvq__pairs(g), d = g->head_dim;
    const float *w = stage_w(j->cb, j->layer, h, r);
    float *nn = nG, *G = nG + NC;
    stage_tables_f32(w, P, nn, G);
    const long long nn_rows = (long long)n;
    const int nt = j->nt;
    (void)nt;
#ifdef COMMVQ_HAVE_OPENMP
#pragma omp parallel for schedule(static) num_threads(nt)
#endif
    for (long long t = 0; t < nn_rows; t++)
        (void)cvq_ref_key_stage(w, nn, G, d, g->pair_layout, res + (size_t)t * d);
}

/* Trains stage r of head h on res [n][d]; writes the best iterate into
 * key_w. Returns CVQ_ERR_CANCELLED (nothing written) when asked to stop. */
static cvq_status train_stage(key_job *j, uint32_t h, uint32_t r, em_head *e,
                              double *sums, double *w_best, double *w_next) {
    const cvq_key_train_params *kp = j->kp;
    const uint32_t P = e->P, d = e->d;
    const size_t n = e->n;
    const size_t wn = (size_t)NC * P * 2;
    float *dst = stage_w(j->cb, j->layer, h, r);

    if (n == 0) { /* no data for this head: an all-zero stage (codes 0) */
        for (size_t i = 0; i < wn; i++) dst[i] = 0.0f;
        return CVQ_OK;
    }

    /* Seeded initialisation: 4096 random rows as the centres of codes
     * k = 64A + B, projected by one M-step with N = 1 everywhere. */
    cvq__rng rng;
    cvq__rng_init(&rng, kp->seed,
                  (1ull << 62) | ((uint64_t)j->layer << 32) | ((uint64_t)h << 8) | r);
    double *N = sums, *SR = sums + NC * NC, *SC = SR + wn;
    for (size_t i = 0; i < NC * NC; i++) N[i] = 1.0;
    memset(SR, 0, 2 * wn * sizeof(double));
    for (uint32_t k = 0; k < NC * NC; k++) {
        const size_t t = (size_t)cvq__rng_below(&rng, n);
        const float *z = e->res + t * d;
        double *sa = SR + (size_t)(k / NC) * P * 2, *sb = SC + (size_t)(k % NC) * P * 2;
        for (uint32_t p = 0; p < P; p++) {
            uint32_t ire, iim;
            cvq__pair_index(e->layout, d, p, &ire, &iim);
            sa[2 * p] += z[ire];
            sa[2 * p + 1] += z[iim];
            sb[2 * p] += z[ire];
            sb[2 * p + 1] += z[iim];
        }
    }
    memset(w_next, 0, wn * sizeof(double));
    if (cvq__key_mstep(P, N, SR, SC, w_next, CVQ__KEY_RIDGE, e->w) != 0)
        return CVQ_FAIL(NULL, CVQ_ERR_INTERNAL,
                        "train-keys layer %u head %u stage %u: the initial M-step failed",
                        j->layer, h, r);

    const double s_r = pow(10.0, -floor((double)(r + 3) / 4.0));
    const uint32_t steps = kp->steps;
    double best = INFINITY;
    uint32_t stale = 0, splits = 0;
    cvq_train_progress pr;
    memset(&pr, 0, sizeof pr);
    pr.phase = "keys";
    pr.layer = j->layer;
    pr.part = h;
    pr.n_parts = j->g->n_kv_heads;
    pr.stage = r;
    pr.n_stages = j->g->key_stages;
    pr.n_steps = steps;

    for (uint32_t s = 0; s <= steps; s++) {
        const int soft = !kp->hard && s < steps;
        const double frac = steps > 1 ? (double)s / (double)(steps - 1) : 0.0;
        const double tau = s_r * kp->tau_start * pow(kp->tau_end / kp->tau_start,
                                                     frac < 1.0 ? frac : 1.0);
        em_tables(e);
        estep_all(e, j->nt, soft, tau, sums);
        const double mse = sums[e->stride - 1] / ((double)n * d);
        int improved;
        if (s == 0) {
            improved = 1;
        } else {
            improved = mse < best && (best - mse) > kp->plateau * best;
        }
        if (mse < best || s == 0) {
            best = mse;
            memcpy(w_best, e->w, wn * sizeof(double));
        }
        stale = improved ? 0 : stale + 1;
        /* on a plateau: a split round if allowed and useful, else stop */
        const uint32_t split_wait = kp->patience > 0 ? kp->patience : 5;
        int split = 0;
        if (stale >= split_wait && splits < kp->max_splits && s < steps && has_underused(e)) {
            split = 1;
            splits++;
            stale = 0;
        }
        const int stop = s == steps || (kp->patience > 0 && stale >= kp->patience);

        pr.step = s;
        pr.loss = mse;
        /* the last evaluation is not an EM step of the budget; when
         * stopping early the skipped steps count as done for the estimate */
        const uint64_t units = s == steps ? 0 : (stop ? (uint64_t)(steps - s) : 1);
        if (cvq__train_meter_tick(&j->meter, units, (double)n, kp->progress,
                                  kp->progress_user, &pr))
            return CVQ_FAIL(NULL, CVQ_ERR_CANCELLED,
                            "train-keys: cancelled by the progress callback (layer %u, "
                            "head %u, stage %u, step %u)",
                            j->layer, h, r, s);
        if (stop) break;

        if (cvq__key_mstep(P, N, SR, SC, e->w, CVQ__KEY_RIDGE, w_next) != 0)
            return CVQ_FAIL(NULL, CVQ_ERR_INTERNAL,
                            "train-keys layer %u head %u stage %u step %u: the M-step "
                            "system could not be factorised",
                            j->layer, h, r, s);
        reseed(e, w_next, split);
        memcpy(e->w, w_next, wn * sizeof(double));
        j->steps_run++;
    }

    for (size_t i = 0; i < wn; i++) {
        const float v = (float)w_best[i];
        if (!isfinite(v))
            return CVQ_FAIL(NULL, CVQ_ERR_INTERNAL,
                            "train-keys layer %u head %u stage %u: a sub-code overflowed "
                            "binary32",
                            j->layer, h, r);
        dst[i] = v;
    }
    return CVQ_OK;
}

/* Key scales of token row k [Hkv][d] exactly as the encoder computes them;
 * false when a sum of squares overflows. */
static bool token_scales(const cvq_geometry *g, const float *k, float *scales) {
    cvq_layer_view lv;
    memset(&lv, 0, sizeof lv);
    lv.g = g;
    return cvq_ref_key_scales(&lv, k, scales);
}

static cvq_status check_params(const cvq_geometry *g, const cvq_key_train_params *kp,
                               uint32_t *first, uint32_t *count) {
    const uint32_t R = g->key_stages;
    if (kp->steps < 1)
        return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT, "train-keys: steps must be >= 1");
    if (!(kp->tau_start > 0.0) || !(kp->tau_end > 0.0) || !isfinite(kp->tau_start) ||
        !isfinite(kp->tau_end))
        return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT,
                        "train-keys: tau_start and tau_end must be finite and > 0 "
                        "(got %g, %g)",
                        kp->tau_start, kp->tau_end);
    if (!(kp->plateau >= 0.0) || !isfinite(kp->plateau))
        return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT,
                        "train-keys: plateau must be finite and >= 0 (got %g)", kp->plateau);
    if (kp->first_stage >= R)
        return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT,
                        "train-keys: first_stage %u, the codebook has %u stages",
                        kp->first_stage, R);
    const uint32_t nst = kp->n_stages ? kp->n_stages : R - kp->first_stage;
    if (nst > R - kp->first_stage)
        return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT,
                        "train-keys: stages %u..%u requested, the codebook has %u",
                        kp->first_stage, kp->first_stage + nst - 1, R);
    *first = kp->first_stage;
    *count = nst;
    return CVQ_OK;
}

cvq_status cvq_train_keys(cvq_codebook *cb, uint32_t layer, const cvq_train_data *data,
                          const cvq_key_train_params *params, cvq_train_report *report) {
    CVQ__NONNULL(NULL, "cvq_train_keys", cb, "cb");
    CVQ__NONNULL(NULL, "cvq_train_keys", data, "data");
    const cvq_key_train_params kp =
        params ? *params : cvq_key_train_default_params();
    const cvq_geometry *g = &cb->geom;
    if (layer >= g->n_layers)
        return CVQ_FAIL(NULL, CVQ_ERR_LAYER_RANGE,
                        "train-keys: layer %u, the codebook has %u layers", layer,
                        g->n_layers);
    uint32_t first = 0, count = 0;
    cvq_status st = check_params(g, &kp, &first, &count);
    if (st != CVQ_OK) return st;
    st = cvq__train_validate(g, data, CVQ__TRAIN_NEED_KEYS, "train-keys");
    if (st != CVQ_OK) return st;
    if (cb->dirty) { /* refuse a codebook with non-finite earlier stages */
        st = cvq_codebook_commit(cb);
        if (st != CVQ_OK) return st;
    }

    key_job j;
    memset(&j, 0, sizeof j);
    j.cb = cb;
    j.g = g;
    j.layer = layer;
    j.kp = &kp;
    j.al = kp.allocator ? kp.allocator : &cb->alloc;
    const cvq_allocator *al = j.al;
    const double t_start = cvq__train_now();

    const uint32_t H = g->n_kv_heads, d = g->head_dim, P = cvq__pairs(g);
    const uint32_t ns = cvq__key_scale_count(g);
    const size_t kvd = cvq__kv_dims(g);
    size_t *idx = NULL, n = 0;
    float *k32 = NULL, *scales = NULL, *res = NULL, *tabs = NULL;
    double *dbl = NULL, *part = NULL;
    uint16_t *code = NULL;
    size_t *rows = NULL;

    st = cvq__train_subsample(al, kp.seed, data->n_tokens, kp.max_tokens, &idx, &n);
    if (st != CVQ_OK) return st;
    j.n_used = n;

    /* Everything is sized by n * Hkv * d (fits: validation checked T*Hq*d). */
    const size_t wn = (size_t)NC * P * 2;
    const size_t stride = part_stride(P);
    const size_t n_chunks = cvq__train_n_chunks(n);
    k32 = cvq__calloc(al, n * kvd, sizeof(float));
    scales = cvq__calloc(al, n * ns, sizeof(float));
    res = cvq__calloc(al, n * kvd, sizeof(float));  /* [H][n][d] rows packed */
    rows = cvq__calloc(al, H, sizeof(size_t));      /* rows of each head */
    tabs = cvq__calloc(al, NC + NC * NC, sizeof(float));
    /* w, wxT, wyT, w_best, w_next, sums */
    dbl = cvq__calloc(al, 5 * wn + stride, sizeof(double));
    part = cvq__calloc(al, (n_chunks ? n_chunks : 1) * stride, sizeof(double));
    code = cvq__calloc(al, n ? n : 1, sizeof(uint16_t));
    double *err = cvq__calloc(al, n ? n : 1, sizeof(double));
    if (!k32 || !scales || !res || !rows || !tabs || !dbl || !part || !code || !err) {
        st = CVQ_FAIL(NULL, CVQ_ERR_OUT_OF_MEMORY,
                      "train-keys: cannot allocate the work buffers for %zu tokens", n);
        goto done_err;
    }
    cvq__train_gather_f32(data->keys, data->dtype, kvd, idx, n, k32);

    /* Prescale exactly as the encoder; rows with a zero scale (codes 0 in
     * the encoder) carry no information and are left out. */
    double k_energy = 0.0;
    for (size_t t = 0; t < n; t++) {
        const float *kt = k32 + t * kvd;
        if (!token_scales(g, kt, scales + t * ns)) {
            st = CVQ_FAIL(NULL, CVQ_ERR_INPUT_RANGE,
                          "train-keys: the sum of squares of key token %zu overflows "
                          "binary32",
                          idx[t]);
            goto done_err;
        }
        for (size_t i = 0; i < kvd; i++) k_energy += (double)kt[i] * kt[i];
    }
    for (uint32_t h = 0; h < H; h++) {
        float *rh = res + (size_t)h * n * d;
        size_t m = 0;
        for (size_t t = 0; t < n; t++) {
            const float s = scales[t * ns + (ns > 1 ? h : 0)];
            if (s == 0.0f) continue;
            const float inv = 1.0f / s;
            const float *kh = k32 + t * kvd + (size_t)h * d;
            for (uint32_t i = 0; i < d; i++) rh[m * d + i] = kh[i] * inv;
            m++;
        }
        rows[h] = m;
    }
    cvq__free(al, k32); /* only the normalised rows are needed from here */
    k32 = NULL;

    j.nt = cvq__train_threads(kp.n_threads, n_chunks > 0 ? n_chunks : 1);
    cvq__train_meter_start(&j.meter, (uint64_t)H * count * kp.steps);

    em_head e;
    memset(&e, 0, sizeof e);
    e.P = P;
    e.d = d;
    e.layout = g->pair_layout;
    e.w = dbl;
    e.wxT = dbl + wn;
    e.wyT = dbl + wn + wn / 2;
    double *w_best = dbl + 2 * wn, *w_next = dbl + 3 * wn, *sums = dbl + 4 * wn;
    e.stride = stride;
    e.part = part;
    e.code = code;
    e.err = err;

    cvq_status train_st = CVQ_OK;
    for (uint32_t h = 0; h < H && train_st == CVQ_OK; h++) {
        float *rh = res + (size_t)h * n * d;
        e.res = rh;
        e.n = rows[h];
        e.n_chunks = cvq__train_n_chunks(rows[h]);
        /* residual after the kept stages below first_stage */
        for (uint32_t r = 0; r < first; r++) apply_stage(&j, h, r, rh, rows[h], tabs);
        for (uint32_t r = first; r < first + count; r++) {
            train_st = train_stage(&j, h, r, &e, sums, w_best, w_next);
            if (train_st != CVQ_OK) break;
            apply_stage(&j, h, r, rh, rows[h], tabs);
        }
        /* the stages after the trained ones, for the report */
        if (train_st == CVQ_OK)
            for (uint32_t r = first + count; r < g->key_stages; r++)
                apply_stage(&j, h, r, rh, rows[h], tabs);
    }

    /* report: relative error with every stage of the codebook */
    double r_energy = 0.0;
    if (train_st == CVQ_OK) {
        for (uint32_t h = 0; h < H; h++) {
            const float *rh = res + (size_t)h * n * d;
            size_t m = 0;
            for (size_t t = 0; t < n; t++) {
                const double s = scales[t * ns + (ns > 1 ? h : 0)];
                if (s == 0.0) continue;
                double e2 = 0.0;
                for (uint32_t i = 0; i < d; i++) e2 += (double)rh[m * d + i] * rh[m * d + i];
                r_energy += s * s * e2;
                m++;
            }
        }
    }
    const double rel = k_energy > 0.0 ? r_energy / k_energy : 0.0;
    const double secs = cvq__train_now() - t_start;

    /* Commit what was written (complete stages), then the provenance. */
    cvq_status cst = cvq_codebook_commit(cb);
    if (train_st == CVQ_OK && cst != CVQ_OK) train_st = cst;
    if (train_st == CVQ_OK || train_st == CVQ_ERR_CANCELLED) {
        char rel_txt[48];
        if (train_st == CVQ_OK)
            snprintf(rel_txt, sizeof rel_txt, "rel_error %.6g", rel);
        else
            snprintf(rel_txt, sizeof rel_txt, "cancelled");
        cvq_status nst = cvq__train_append_note(
            cb,
            "train-keys layer %u: %zu of %zu tokens (%s), seed %llu, stages %u..%u of %u%s, "
            "%s EM, steps %u, tau %g..%g x s_r, plateau %g, patience %u: %s",
            layer, n, data->n_tokens, cvq__train_dtype_name(data->dtype),
            (unsigned long long)kp.seed, first, first + count - 1, g->key_stages,
            first > 0 ? " (resumed)" : "", kp.hard ? "hard" : "soft", kp.steps,
            kp.tau_start, kp.tau_end, kp.plateau, kp.patience, rel_txt);
        if (train_st == CVQ_OK && nst != CVQ_OK) train_st = nst;
    }
    if (report) {
        report->rel_error = train_st == CVQ_OK ? rel : -1.0;
        report->attn_rel_error = -1.0;
        report->steps_run = j.steps_run;
        report->tokens_used = n;
        report->seconds = secs;
    }
    st = train_st;
    if (st == CVQ_ERR_CANCELLED) /* restore the thread's message */
        (void)CVQ_FAIL(NULL, CVQ_ERR_CANCELLED,
                       "train-keys: cancelled by the progress callback (layer %u; complete "
                       "stages kept)",
                       layer);

done_err:
    cvq__free(al, idx);
    cvq__free(al, k32);
    cvq__free(al, scales);
    cvq__free(al, res);
    cvq__free(al, rows);
    cvq__free(al, tabs);
    cvq__free(al, dbl);
    cvq__free(al, part);
    cvq__free(al, code);
    cvq__free(al, err);
    return st;
}

/* ---- extracting stages ------------------------------------------------------------ */

cvq_status cvq_codebook_extract_stages(const cvq_codebook *src, uint32_t stages,
                                       cvq_codebook **out) {
    if (!out)
        return CVQ_FAIL(NULL, CVQ_ERR_NULL_POINTER, "extract-stages: out is NULL");
    *out = NULL;
    if (!src)
        return CVQ_FAIL(NULL, CVQ_ERR_NULL_POINTER, "extract-stages: src is NULL");
    const cvq_geometry *g = &src->geom;
    if (stages < 1 || stages > g->key_stages)
        return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT,
                        "extract-stages: %u stages requested, the codebook has %u "
                        "(1..%u allowed)",
                        stages, g->key_stages, g->key_stages);
    cvq_geometry ng = *g;
    ng.key_stages = stages;
    cvq_codebook *cb = NULL;
    cvq_status st = cvq_codebook_create(&ng, src->rope_theta, &src->alloc, &cb);
    if (st != CVQ_OK) return st;
    const size_t P = cvq__pairs(g);
    const size_t per_stage = (size_t)NC * P * 2;
    /* key_w: the first `stages` of every (layer, head) block */
    for (uint32_t l = 0; l < g->n_layers; l++)
        for (uint32_t h = 0; h < g->n_kv_heads; h++) {
            const float *s = src->tensors[CVQ_T_KEY_W] + l * src->layer_stride[CVQ_T_KEY_W] +
                             (size_t)h * g->key_stages * per_stage;
            float *dd = cb->tensors[CVQ_T_KEY_W] + l * cb->layer_stride[CVQ_T_KEY_W] +
                        (size_t)h * stages * per_stage;
            memcpy(dd, s, stages * per_stage * sizeof(float));
        }
    /* value tensors: same geometry, same sizes */
    for (int i = CVQ_T_VAL_LS; i < CVQ_T_COUNT; i++)
        memcpy(cb->tensors[i], src->tensors[i],
               (size_t)g->n_layers * src->layer_stride[i] * sizeof(float));
    st = cvq_codebook_set_note(cb, cvq_codebook_note(src));
    if (st == CVQ_OK)
        st = cvq__train_append_note(cb, "extract-stages: first %u of %u key stages", stages,
                                    g->key_stages);
    if (st == CVQ_OK) st = cvq_codebook_commit(cb);
    if (st != CVQ_OK) {
        cvq_codebook_free(cb);
        return st;
    }
    *out = cb;
    return CVQ_OK;
}
