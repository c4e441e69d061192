/*
 * The value encoder as a trainable network (method note sections 4 and 6):
 * forward pass, loss and hand-written backward pass over a batch of tokens,
 * in double precision, for every value group of one layer. Used by
 * core/train_values.c (the AdamW loop) and by tests/test_train_values.c
 * (finite-difference checks of this very code). Implemented in
 * core/train_values_nn.c (network) and core/train_values_attn.c (RoPE,
 * attention weights, attention loss).
 *
 * Per token and value group (F features, I hidden units, Nc code bits):
 *   x = v / lse (lse = ls + eps, frozen); pre = ||x||; xn = x / (pre + eps)
 *   y = LayerNorm(xn) * ln_w + ln_b;  h = W1 y + b1;  a = gelu(h)
 *   l = W2 a + b2 (2*Nc logits, 4-way group t = logits 4t..4t+3)
 *   p = softmax((l + gumbel) / tau) per group; bits (2t, 2t+1) =
 *       (p0 + p2, p1 + p2)            soft mode (the relaxation)
 *       the same map of onehot(argmax)  straight-through mode (forward);
 *       its backward is the soft one (bits are linear in the one-hot)
 *   u = bits @ E;  v_hat = u / (||u|| + eps) * (pre + eps) * lse
 * Loss = mean over B*Hkv*d elements of (v_hat - v)^2
 *      + attn_weight * mean over B*Hq*d of (A_h (v_hat - v)_kv(h))^2
 * where A_h [B][B] are fixed attention weights of query head h (keys are
 * not trained, so the attention output error is linear in v_hat - v).
 *
 * Determinism: every sum over tokens is evaluated in ascending token order
 * by one thread (parallel loops split outputs, never a sum), so results are
 * identical for any thread count.
 */
#ifndef CVQ_TRAIN_VALUES_NN_H
#define CVQ_TRAIN_VALUES_NN_H

#include "cvq_internal.h"

#include <stddef.h>
#include <stdint.h>

/* Parallel loops with less work than this (multiply-adds or elements) run on
 * one thread: a parallel region costs more than it saves there, and far more
 * on a loaded machine. Which thread computes what never changes a result. */
#define CVQ__TV_PAR_MIN 32768u

typedef enum cvq__tv_mode {
    CVQ__TV_SOFT = 0,     /* forward and backward on the soft relaxation */
    CVQ__TV_HARD_ST = 1   /* forward hard one-hot, backward soft (STE) */
} cvq__tv_mode;

typedef struct cvq__tv_net {
    uint32_t F, I, Nc;   /* group width, hidden units, code bits */
    uint32_t groups;     /* value groups; kvd = groups*F = Hkv*d */
    uint32_t Hq, Hkv, d; /* attention geometry */
    int n_threads;       /* >= 1 */
} cvq__tv_net;

/* Offsets (doubles) of each tensor in one group's flat parameter block,
 * tensors in this order and shape (as in cvq_tensor_info):
 * ln_w[F] ln_b[F] w1[I][F] b1[I] w2[2Nc][I] b2[2Nc] E[Nc][F]. Group g's
 * block starts at g*n. */
typedef struct cvq__tv_layout {
    size_t off[7]; /* by cvq_tensor_id - CVQ_T_VAL_LN_W */
    size_t len[7];
    size_t n;
} cvq__tv_layout;

void cvq__tv_layout_of(const cvq__tv_net *net, cvq__tv_layout *lay);

typedef struct cvq__tv_batch {
    size_t B;               /* tokens (<= the work's capacity) */
    const double *v;        /* [B][kvd] true values */
    const double *lse;      /* [kvd] ls + eps */
    const double *gumbel;   /* [groups][B][2Nc] noise added to the logits, or NULL */
    double tau;             /* Gumbel-softmax temperature > 0 */
    cvq__tv_mode mode;
    const double *attn;     /* [Hq][B][B] attention weights, or NULL */
    const uint32_t *kv_of;  /* [Hq] KV head of each query head (with attn) */
    double attn_weight;
} cvq__tv_batch;

/* Activations and scratch for batches of up to Bmax tokens. Public so that
 * tests can look at the forward quantities. */
typedef struct cvq__tv_work {
    size_t Bmax;
    cvq_allocator al;   /* defaults filled in */
    /* per group g: arrays [groups][Bmax][...] */
    double *xhat;   /* [g][B][F]  LayerNorm input normalised (before affine) */
    double *y;      /* [g][B][F]  LayerNorm output */
    double *pre;    /* [g][B]     ||v / lse|| */
    double *h;      /* [g][B][I]  Linear 1 output */
    double *a;      /* [g][B][I]  gelu(h) */
    double *p;      /* [g][B][2Nc] soft probabilities */
    double *bits;   /* [g][B][Nc] bits used in the forward pass */
    double *dbits;  /* [g][B][Nc] d loss / d bits (backward) */
    double *u;      /* [g][B][F]  bits @ E */
    double *nu;     /* [g][B]     ||u|| */
    double *vhat;   /* [B][kvd] */
    double *diff;   /* [B][kvd]   v_hat - v */
    double *dvhat;  /* [B][kvd] */
    double *attn_out; /* [B][Hq][d] A_h (v_hat - v) */
    double *tok;    /* [B] per-token partial sums */
    double *attn_scr; /* attention scratch (cvq__tv_attn_scratch_len) */
    /* backward scratch, one group at a time */
    double *du, *dl, *da, *dy; /* [B][F], [B][2Nc], [B][I], [B][F] */
    double *wT;     /* transposes: max(F*I, I*2Nc, F*Nc) */
    double mse_v, mse_attn; /* of the last forward */
} cvq__tv_work;

/* alloc: a user allocator or NULL (the default). */
cvq_status cvq__tv_work_create(const cvq__tv_net *net, size_t Bmax,
                               const cvq_allocator *alloc, cvq__tv_work **out);
void cvq__tv_work_free(cvq__tv_work *w);

/* Forward pass and loss (returned). With grad != NULL also the backward
 * pass: grad (groups * layout.n doubles) is overwritten with d loss / d
 * params. params: groups * layout.n doubles. */
double cvq__tv_loss_grad(const cvq__tv_net *net, const double *params,
                         cvq__tv_work *w, const cvq__tv_batch *bt, double *grad);

/* C[M][N] = A[M][K] @ Bm[K][N] (a_col = 0) or A[K][M]^T @ Bm[K][N]
 * (a_col = 1), row-major; every element summed over k in ascending order
 * from +0 (zero terms of A skipped, which changes no sum); parallel over
 * blocks of rows of C. */
void cvq__tv_gemm(size_t M, size_t N, size_t K, const double *A, int a_col, const double *Bm,
                  double *C, int nt);

/* Gumbel noise for the batch rows of one step: noise[g][b][o] is a pure
 * function of (seed, step, row b, group g, logit o), so it depends neither
 * on the thread count nor on the order of evaluation. */
void cvq__tv_gumbel_fill(const cvq__tv_net *net, uint64_t seed, uint64_t step,
                         size_t B, double *noise);

/* ---- attention (core/train_values_attn.c) --------------------------------- */

/* Applies RoPE in double to n_heads head vectors x[n_heads][d] at `pos`
 * (theta_p in radians per position, pair layout as in the geometry). */
void cvq__tv_rope(double *x, uint32_t n_heads, uint32_t d, cvq_pair_layout layout,
                  const double *theta, int32_t pos);

/* Doubles of scratch the three functions below need for B tokens. */
static inline size_t cvq__tv_attn_scratch_len(size_t B, uint32_t d) { return 3 * B * d; }

/* Attention weights of a batch: attn[h][i][j] = softmax over the visible j
 * of scale * q_i,h . k_j,kv(h) (both already rotated), where j is visible
 * from i when seg[j] == seg[i] and pos[j] <= pos[i]; 0 elsewhere.
 * q [B][Hq][d], k [B][Hkv][d]. Logits are products (cvq__tv_gemm). */
void cvq__tv_attn_weights(size_t B, uint32_t Hq, uint32_t Hkv, uint32_t d,
                          const uint32_t *kv_of,
                          const double *q, const double *k, const int32_t *pos,
                          const uint32_t *seg, double scale, int n_threads,
                          double *scratch, double *attn);

/* out[i][h][c] = sum_j attn[h][i][j] * x[j][kv(h)*d + c] (j ascending);
 * x [B][Hkv*d], out [B][Hq][d]. */
void cvq__tv_attn_apply(size_t B, uint32_t Hq, uint32_t Hkv, uint32_t d,
                        const uint32_t *kv_of, const double *attn, const double *x,
                        int n_threads, double *scratch, double *out);

/* dx[j][kv(h)*d + c] += coef * (sum_i attn[h][i][j] * g[i][h][c]) for each
 * h in ascending order (the inner sum over i ascending): the transpose of
 * cvq__tv_attn_apply. g [B][Hq][d]. */
void cvq__tv_attn_apply_t(size_t B, uint32_t Hq, uint32_t Hkv, uint32_t d,
                          const uint32_t *kv_of, const double *attn, const double *g,
                          double coef, int n_threads, double *scratch, double *dx);

#endif /* CVQ_TRAIN_VALUES_NN_H */
