/*
 * The codebook object: primary tensors of every layer (and value group),
 * the derived host tables of docs/numerics.md section 3, random codebooks,
 * and the per-layer view handed to kernels.
 *
 * Memory layout (struct cvq_codebook in cvq_internal.h). Each tensor kind is
 * one allocation holding all layers contiguously:
 *   key_w            [L][Hkv][R][64][P][2]   (x, y) of sub-code a, pair p
 *   value tensor t   [L][groups][shape of t]  (shape: cvq_codebook_tensor_info)
 * layer_stride[id] is the floats of one layer, group_stride[id] the floats
 * of one (layer, group) view; for key_w both equal one layer.
 * Derived tables, rebuilt by commit:
 *   key_n [L][Hkv][R][64], key_G [L][Hkv][R][64][64],
 *   val_inv_ls, val_ls_eps [L][groups][F], inv_F, rope_t [P].
 */
#include "cvq_internal.h"
#include "numerics.h"

#include <math.h>
#include <stdatomic.h>
#include <string.h>

/* Source of codebook generations (see cvq_codebook commit). */
static atomic_uint_fast64_t g_generation;

/* ---- tensor names and shapes ---------------------------------------------- */

static const char *const k_tensor_name[CVQ_T_COUNT] = {
    "rope_theta", "key_w", "val_ls", "val_ln_w", "val_ln_b",
    "val_w1",     "val_b1", "val_w2", "val_b2",  "val_E"};

static const char *const k_tensor_meaning[CVQ_T_COUNT] = {
    "RoPE frequency theta_p (radians per position) of pair p = 0..d/2-1, f64",
    "key sub-codes w[h][r][a][p] = (x, y) = x + i*y: KV head h, stage r, "
    "sub-code a < 64, RoPE pair p; code 64*A+B has pairs w_A + i*w_B",
    "value per-channel scale ls[j]: the encoder divides v[j] by ls[j] + 1e-6",
    "value LayerNorm weight [j] (affine, eps 1e-5, biased variance)",
    "value LayerNorm bias [j]",
    "value encoder Linear 1 weight W1[o][i]: o < I outputs, i < F inputs",
    "value encoder Linear 1 bias [o], o < I",
    "value encoder Linear 2 weight W2[o][i]: o < 2*Nc logits (4 per 2 bits), "
    "i < I",
    "value encoder Linear 2 bias [o], o < 2*Nc",
    "value binary additive codebook E[i][f]: row i is added when code bit i "
    "is 1 (i < Nc, f < F)"};

static bool is_value_tensor(cvq_tensor_id id) { return id >= CVQ_T_VAL_LS; }

/* Shape of one (layer, group) view of tensor `id`; returns its element
 * count (fits size_t: cvq_geometry_resolve checked every tensor's size). */
size_t cvq__tensor_view_shape(const cvq_geometry *g, cvq_tensor_id id,
                              uint64_t dims[5], uint32_t *n_dims) {
    const uint64_t Hkv = g->n_kv_heads, R = g->key_stages, P = g->head_dim / 2;
    const uint64_t F = g->value_group_width, I = g->value_hidden;
    const uint64_t Nc = g->value_bits;
    uint32_t n = 0;
    switch (id) {
    case CVQ_T_ROPE_THETA: dims[n++] = P; break;
    case CVQ_T_KEY_W:
        dims[n++] = Hkv; dims[n++] = R; dims[n++] = CVQ_SUBCODES;
        dims[n++] = P; dims[n++] = 2;
        break;
    case CVQ_T_VAL_LS:
    case CVQ_T_VAL_LN_W:
    case CVQ_T_VAL_LN_B: dims[n++] = F; break;
    case CVQ_T_VAL_W1: dims[n++] = I; dims[n++] = F; break;
    case CVQ_T_VAL_B1: dims[n++] = I; break;
    case CVQ_T_VAL_W2: dims[n++] = 2 * Nc; dims[n++] = I; break;
    case CVQ_T_VAL_B2: dims[n++] = 2 * Nc; break;
    case CVQ_T_VAL_E: dims[n++] = Nc; dims[n++] = F; break;
    default: break;
    }
    uint64_t count = 1;
    for (uint32_t i = 0; i < n; i++) count *= dims[i];
    for (uint32_t i = n; i < 5; i++) dims[i] = 0;
    *n_dims = n;
    return (size_t)count;
}

/* ---- create / free ---------------------------------------------------------- */

void cvq_codebook_free(cvq_codebook *cb) {
    if (!cb) return;
    /* The allocator lives inside the block being freed: copy it first. */
    const cvq_allocator a = cb->alloc;
    cvq__free(&a, cb->rope_theta);
    cvq__free(&a, cb->rope_t);
    for (int id = 0; id < CVQ_T_COUNT; id++) cvq__free(&a, cb->tensors[id]);
    cvq__free(&a, cb->key_n);
    cvq__free(&a, cb->key_G);
    cvq__free(&a, cb->val_inv_ls);
    cvq__free(&a, cb->val_ls_eps);
    cvq__free(&a, cb->note);
    cvq__free(&a, cb);
}

/* n items of elem bytes from the codebook's allocator, zeroed. After the
 * first failure *ok is false and later calls allocate nothing, so that one
 * check after all of them suffices (cvq_codebook_free frees the rest). */
static void *alloc_zero(cvq_codebook *cb, size_t n, size_t elem, bool *ok) {
    if (!*ok) return NULL;
    void *p = cvq__calloc(&cb->alloc, n, elem);
    if (!p) *ok = false;
    return p;
}

cvq_status cvq_codebook_create(const cvq_geometry *geometry,
                               const double *rope_theta,
                               const cvq_allocator *allocator,
                               cvq_codebook **out) {
    CVQ__NONNULL(NULL, "cvq_codebook_create", out, "out");
    *out = NULL;
    CVQ__NONNULL(NULL, "cvq_codebook_create", geometry, "geometry");
    CVQ__NONNULL(NULL, "cvq_codebook_create", rope_theta, "rope_theta");
    cvq_geometry g = *geometry;
    cvq_status s = cvq_geometry_resolve(&g);
    if (s != CVQ_OK) return s;
    const uint32_t P = cvq__pairs(&g);
    for (uint32_t p = 0; p < P; p++)
        if (!isfinite(rope_theta[p]))
            return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT,
                            "codebook: rope_theta[%u] = %g is not finite", p,
                            rope_theta[p]);

    cvq_allocator a;
    cvq__allocator_init(&a, allocator);
    cvq_codebook *cb = cvq__calloc(&a, 1, sizeof *cb);
    if (!cb)
        return CVQ_FAIL(NULL, CVQ_ERR_OUT_OF_MEMORY,
                        "codebook: cannot allocate the codebook object");
    cb->alloc = a;
    cb->geom = g;

    /* All sizes below fit size_t: cvq_geometry_resolve checked them. */
    const size_t L = g.n_layers, groups = cvq__value_groups(&g);
    const size_t blocks = L * g.n_kv_heads * g.key_stages; /* (l, h, r) */
    bool ok = true;
    cb->rope_theta = alloc_zero(cb, P, sizeof(double), &ok);
    cb->rope_t = alloc_zero(cb, P, sizeof(uint64_t), &ok);
    for (int i = 1; i < CVQ_T_COUNT; i++) {
        const cvq_tensor_id id = (cvq_tensor_id)i;
        uint64_t dims[5];
        uint32_t nd;
        const size_t per_view = cvq__tensor_view_shape(&g, id, dims, &nd);
        const size_t views = is_value_tensor(id) ? groups : 1;
        cb->group_stride[id] = per_view;
        cb->layer_stride[id] = views * per_view;
        cb->tensors[id] = alloc_zero(cb, L * cb->layer_stride[id], sizeof(float), &ok);
    }
    cb->key_n = alloc_zero(cb, blocks * CVQ_SUBCODES, sizeof(float), &ok);
    cb->key_G = alloc_zero(cb, blocks * CVQ_CODES, sizeof(float), &ok);
    cb->val_inv_ls = alloc_zero(cb, L * groups * g.value_group_width, sizeof(float), &ok);
    cb->val_ls_eps = alloc_zero(cb, L * groups * g.value_group_width, sizeof(float), &ok);
    if (!ok) {
        cvq_codebook_free(cb);
        return CVQ_FAIL(NULL, CVQ_ERR_OUT_OF_MEMORY,
                        "codebook: cannot allocate the tensors of L=%u layers",
                        g.n_layers);
    }
    memcpy(cb->rope_theta, rope_theta, P * sizeof(double));
    /* Zero-filled tensors are valid; the tables are built on first use. */
    cb->dirty = true;
    cb->generation = 0;
    *out = cb;
    return CVQ_OK;
}

/* ---- accessors -------------------------------------------------------------- */

cvq_status cvq_codebook_geometry(const cvq_codebook *cb, cvq_geometry *out) {
    CVQ__NONNULL(NULL, "cvq_codebook_geometry", cb, "cb");
    CVQ__NONNULL(NULL, "cvq_codebook_geometry", out, "out");
    *out = cb->geom;
    return CVQ_OK;
}

cvq_status cvq_codebook_rope_theta(const cvq_codebook *cb, double *theta_out) {
    CVQ__NONNULL(NULL, "cvq_codebook_rope_theta", cb, "cb");
    CVQ__NONNULL(NULL, "cvq_codebook_rope_theta", theta_out, "theta_out");
    memcpy(theta_out, cb->rope_theta, cvq__pairs(&cb->geom) * sizeof(double));
    return CVQ_OK;
}

cvq_status cvq_codebook_set_note(cvq_codebook *cb, const char *text) {
    if (!cb)
        return CVQ_FAIL(NULL, CVQ_ERR_NULL_POINTER, "cvq_codebook_set_note: cb is NULL");
    char *copy = NULL;
    if (text && text[0]) {
        const size_t n = strlen(text);
        if (n == SIZE_MAX)
            return CVQ_FAIL(NULL, CVQ_ERR_SIZE_OVERFLOW, "note too long");
        copy = cvq__alloc(&cb->alloc, n + 1);
        if (!copy)
            return CVQ_FAIL(NULL, CVQ_ERR_OUT_OF_MEMORY,
                            "cannot allocate a note of %zu bytes", n);
        memcpy(copy, text, n + 1);
    }
    cvq__free(&cb->alloc, cb->note);
    cb->note = copy;
    return CVQ_OK;
}

const char *cvq_codebook_note(const cvq_codebook *cb) {
    return (cb && cb->note) ? cb->note : "";
}

cvq_status cvq_codebook_tensor_info(const cvq_codebook *cb, cvq_tensor_id id,
                                    cvq_tensor_info *out) {
    CVQ__NONNULL(NULL, "cvq_codebook_tensor_info", cb, "cb");
    CVQ__NONNULL(NULL, "cvq_codebook_tensor_info", out, "out");
    if ((unsigned)id >= (unsigned)CVQ_T_COUNT)
        return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT,
                        "cvq_codebook_tensor_info: tensor id %u out of range",
                        (unsigned)id);
    cvq_tensor_info info;
    info.name = k_tensor_name[id];
    info.meaning = k_tensor_meaning[id];
    info.n_elements = cvq__tensor_view_shape(&cb->geom, id, info.dims, &info.n_dims);
    *out = info;
    return CVQ_OK;
}

/* Pointer to the (layer, group) view, after checking the indices. */
static cvq_status locate(const char *fn, const cvq_codebook *cb, cvq_tensor_id id,
                         uint32_t layer, uint32_t group, float **data) {
    CVQ__NONNULL(NULL, fn, cb, "cb");
    CVQ__NONNULL(NULL, fn, data, "data");
    if ((unsigned)id >= (unsigned)CVQ_T_COUNT)
        return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT,
                        "codebook tensor data: tensor id %u out of range",
                        (unsigned)id);
    if (id == CVQ_T_ROPE_THETA)
        return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT,
                        "rope_theta is f64 and fixed at creation: read it with "
                        "cvq_codebook_rope_theta()");
    if (layer >= cb->geom.n_layers)
        return CVQ_FAIL(NULL, CVQ_ERR_LAYER_RANGE,
                        "codebook tensor %s: layer %u, the codebook has %u",
                        k_tensor_name[id], layer, cb->geom.n_layers);
    size_t off = (size_t)layer * cb->layer_stride[id];
    if (is_value_tensor(id)) {
        const uint32_t groups = cvq__value_groups(&cb->geom);
        if (group >= groups)
            return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT,
                            "codebook tensor %s: group %u, the codebook has %u",
                            k_tensor_name[id], group, groups);
        off += (size_t)group * cb->group_stride[id];
    }
    *data = cb->tensors[id] + off;
    return CVQ_OK;
}

cvq_status cvq_codebook_tensor_data(cvq_codebook *cb, cvq_tensor_id id,
                                    uint32_t layer, uint32_t group,
                                    float **data) {
    cvq_status s = locate("cvq_codebook_tensor_data", cb, id, layer, group, data);
    /* The caller may write: the derived tables are stale from now on. */
    if (s == CVQ_OK) cb->dirty = true;
    return s;
}

cvq_status cvq_codebook_tensor_cdata(const cvq_codebook *cb, cvq_tensor_id id,
                                     uint32_t layer, uint32_t group,
                                     const float **data) {
    float *p = NULL;
    cvq_status s = locate("cvq_codebook_tensor_cdata", cb, id, layer, group, data ? &p : NULL);
    if (s == CVQ_OK) *data = p;
    return s;
}

/* ---- commit: derived tables ----------------------------------------------- */

/* Refuses a non-finite primary value, naming tensor, layer, group, index. */
static cvq_status check_tensors_finite(cvq_context *ctx, const cvq_codebook *cb) {
    const uint32_t groups = cvq__value_groups(&cb->geom);
    for (int i = 1; i < CVQ_T_COUNT; i++) {
        const cvq_tensor_id id = (cvq_tensor_id)i;
        const size_t views = is_value_tensor(id) ? groups : 1;
        const size_t n = cb->group_stride[id];
        const float *t = cb->tensors[id];
        for (uint32_t l = 0; l < cb->geom.n_layers; l++)
            for (size_t v = 0; v < views; v++) {
                const float *x = t + (size_t)l * cb->layer_stride[id] + v * n;
                for (size_t j = 0; j < n; j++)
                    if (!isfinite(x[j]))
                        return CVQ_FAIL(ctx, CVQ_ERR_FORMAT_NONFINITE,
                                        "codebook tensor %s, layer %u, group %zu, "
                                        "element %zu is %s",
                                        k_tensor_name[id], l, v, j,
                                        isnan(x[j]) ? "NaN" : "infinite");
            }
    }
    return CVQ_OK;
}

/* n[a] and G[A][B] of one stage (numerics.md section 3): sums in double
 * (each float*float product is exact in double), one rounding to float.
 * G is built from its upper triangle: the double sum for (B, A) is the
 * exact negation of the one for (A, B) term by term, so this equals the
 * direct formula and is exactly antisymmetric with a zero diagonal. */
static bool stage_tables(const float *w, uint32_t P, float *n, float *G) {
    bool finite = true;
    for (uint32_t a = 0; a < CVQ_SUBCODES; a++) {
        const float *wa = w + (size_t)a * P * 2;
        double acc = 0.0;
        for (uint32_t p = 0; p < P; p++) {
            const double x = wa[2 * p], y = wa[2 * p + 1];
            acc = acc + (x * x + y * y);
        }
        n[a] = (float)acc;
        finite = finite && isfinite(n[a]);
    }
    for (uint32_t A = 0; A < CVQ_SUBCODES; A++) {
        const float *wA = w + (size_t)A * P * 2;
        G[A * CVQ_SUBCODES + A] = 0.0f;
        for (uint32_t B = A + 1; B < CVQ_SUBCODES; B++) {
            const float *wB = w + (size_t)B * P * 2;
            double acc = 0.0;
            for (uint32_t p = 0; p < P; p++) {
                const double xA = wA[2 * p], yA = wA[2 * p + 1];
                const double xB = wB[2 * p], yB = wB[2 * p + 1];
                acc = acc + (xA * yB - yA * xB);
            }
            const float v = (float)(-2.0 * acc);
            G[A * CVQ_SUBCODES + B] = v;
            G[B * CVQ_SUBCODES + A] = -v;
            finite = finite && isfinite(v);
        }
    }
    return finite;
}

static cvq_status commit_impl(cvq_context *ctx, cvq_codebook *cb) {
    const cvq_geometry *g = &cb->geom;
    cvq_status s = check_tensors_finite(ctx, cb);
    if (s != CVQ_OK) return s;

    const uint32_t P = cvq__pairs(g);
    for (uint32_t p = 0; p < P; p++)
        cb->rope_t[p] = cvq_rope_phase_step(cb->rope_theta[p]);

    /* Key tables, one block per (layer, KV head, stage). */
    const size_t stage_w = (size_t)CVQ_SUBCODES * P * 2;
    for (uint32_t l = 0; l < g->n_layers; l++)
        for (uint32_t h = 0; h < g->n_kv_heads; h++)
            for (uint32_t r = 0; r < g->key_stages; r++) {
                const size_t blk =
                    ((size_t)l * g->n_kv_heads + h) * g->key_stages + r;
                if (!stage_tables(cb->tensors[CVQ_T_KEY_W] + blk * stage_w, P,
                                  cb->key_n + blk * CVQ_SUBCODES,
                                  cb->key_G + blk * CVQ_CODES))
                    return CVQ_FAIL(ctx, CVQ_ERR_FORMAT_NONFINITE,
                                    "codebook key_w layer %u head %u stage %u: "
                                    "sub-codes so large that n_a or G[A][B] "
                                    "overflows binary32",
                                    l, h, r);
            }

    /* Value scales: ls + eps (float add) and its float reciprocal. */
    const size_t n_vec = (size_t)g->n_layers * cvq__value_groups(g) *
                         g->value_group_width;
    const float *ls = cb->tensors[CVQ_T_VAL_LS];
    for (size_t j = 0; j < n_vec; j++) {
        const float e = ls[j] + CVQ_VAL_EPS;
        const float inv = 1.0f / e;
        if (!isfinite(e) || !isfinite(inv)) {
            const size_t F = g->value_group_width;
            const size_t per_layer = cvq__value_groups(g) * F;
            return CVQ_FAIL(ctx, CVQ_ERR_FORMAT_NONFINITE,
                            "codebook val_ls layer %zu group %zu element %zu: "
                            "ls + 1e-6 = %g has no finite reciprocal",
                            j / per_layer, (j % per_layer) / F, j % F,
                            (double)e);
        }
        cb->val_ls_eps[j] = e;
        cb->val_inv_ls[j] = inv;
    }
    cb->inv_F = 1.0f / (float)g->value_group_width;
    /* Unique across the process (not per codebook): a backend caching
     * device copies keyed on (pointer, generation) must not mistake a new
     * codebook allocated at a freed one's address for the old one. */
    cb->generation = atomic_fetch_add(&g_generation, 1) + 1;
    cb->dirty = false;
    return CVQ_OK;
}

cvq_status cvq_codebook_commit(cvq_codebook *cb) {
    if (!cb) return CVQ_FAIL(NULL, CVQ_ERR_NULL_POINTER, "cvq_codebook_commit: cb is NULL");
    return commit_impl(NULL, cb);
}

cvq_status cvq__layer_view(cvq_context *ctx, const cvq_codebook *cb,
                           uint32_t layer, cvq_layer_view *lv) {
    if (!cb || !lv)
        return CVQ_FAIL(ctx, CVQ_ERR_NULL_POINTER, "layer view: NULL argument");
    const cvq_geometry *g = &cb->geom;
    if (layer >= g->n_layers)
        return CVQ_FAIL(ctx, CVQ_ERR_LAYER_RANGE,
                        "layer %u out of range: the codebook has %u layers",
                        layer, g->n_layers);
    if (cb->dirty) {
        /* The codebook is logically const: commit only rebuilds the derived
         * tables from the primary tensors (and refuses non-finite ones), so
         * casting const away here changes no observable value. Callers that
         * share one codebook between threads commit it before sharing. */
        cvq_status s = commit_impl(ctx, (cvq_codebook *)cb);
        if (s != CVQ_OK) return s;
    }
    const size_t groups = cvq__value_groups(g);
    const size_t F = g->value_group_width;
    const size_t blocks = (size_t)layer * g->n_kv_heads * g->key_stages;
    cvq_layer_view v;
    v.g = g;
    v.layer = layer;
    v.P = cvq__pairs(g);
    v.n_groups = (uint32_t)groups;
    v.rope_t = cb->rope_t;
    v.key_w = cb->tensors[CVQ_T_KEY_W] + layer * cb->layer_stride[CVQ_T_KEY_W];
    v.key_n = cb->key_n + blocks * CVQ_SUBCODES;
    v.key_G = cb->key_G + blocks * CVQ_CODES;
    v.val_inv_ls = cb->val_inv_ls + layer * groups * F;
    v.val_ls_eps = cb->val_ls_eps + layer * groups * F;
#define CVQ_LAYER_PTR(id) (cb->tensors[id] + layer * cb->layer_stride[id])
    v.ln_w = CVQ_LAYER_PTR(CVQ_T_VAL_LN_W);
    v.ln_b = CVQ_LAYER_PTR(CVQ_T_VAL_LN_B);
    v.w1 = CVQ_LAYER_PTR(CVQ_T_VAL_W1);
    v.b1 = CVQ_LAYER_PTR(CVQ_T_VAL_B1);
    v.w2 = CVQ_LAYER_PTR(CVQ_T_VAL_W2);
    v.b2 = CVQ_LAYER_PTR(CVQ_T_VAL_B2);
    v.E = CVQ_LAYER_PTR(CVQ_T_VAL_E);
#undef CVQ_LAYER_PTR
    v.s_vec = F;
    v.s_w1 = cb->group_stride[CVQ_T_VAL_W1];
    v.s_b1 = cb->group_stride[CVQ_T_VAL_B1];
    v.s_w2 = cb->group_stride[CVQ_T_VAL_W2];
    v.s_b2 = cb->group_stride[CVQ_T_VAL_B2];
    v.s_E = cb->group_stride[CVQ_T_VAL_E];
    v.inv_F = cb->inv_F;
    v.logit_scale = g->logit_scale;
    *lv = v;
    return CVQ_OK;
}

/* ---- random codebooks -------------------------------------------------------- */

/* splitmix64 (Steele, Lea, Flood 2014): integer-only, so identical on every
 * platform. */
static uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9u;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBu;
    return z ^ (z >> 31);
}
static uint64_t splitmix64(uint64_t *state) {
    *state += 0x9E3779B97F4A7C15u;
    return mix64(*state);
}

/* An approximately standard normal number, bit-reproducible everywhere: the
 * sum of the four 16-bit fields of one draw (Irwin-Hall of 4 discrete
 * uniforms on 0..65535) is exact integer arithmetic; centring it is exact
 * in double; the one scaling by 1/sd is a single correctly rounded multiply
 * by a constant that is itself correctly rounded (sqrt, division).
 * Mean 0, variance 1, support +-sqrt(12) (no libm involved). */
static double rng_normal(uint64_t *state, double inv_sd) {
    const uint64_t x = splitmix64(state);
    const uint64_t sum = (x & 0xFFFFu) + ((x >> 16) & 0xFFFFu) +
                         ((x >> 32) & 0xFFFFu) + (x >> 48);
    /* each field: mean 32767.5, variance (65536^2 - 1)/12; four of them:
     * mean 131070, variance (65536^2 - 1)/3 = 1431655765 */
    return ((double)sum - 131070.0) * inv_sd;
}

/* Fills n floats with N(0, sd^2)-like values from the stream `state`. */
static void fill_normal(float *x, size_t n, double sd, uint64_t *state,
                        double inv_sd) {
    for (size_t i = 0; i < n; i++) x[i] = (float)(rng_normal(state, inv_sd) * sd);
}

static void fill_const(float *x, size_t n, float v) {
    for (size_t i = 0; i < n; i++) x[i] = v;
}

cvq_status cvq_codebook_random(const cvq_geometry *geometry,
                               const double *rope_theta, uint64_t seed,
                               const cvq_allocator *allocator,
                               cvq_codebook **out) {
    CVQ__NONNULL(NULL, "cvq_codebook_random", out, "out");
    *out = NULL;
    CVQ__NONNULL(NULL, "cvq_codebook_random", geometry, "geometry");
    CVQ__NONNULL(NULL, "cvq_codebook_random", rope_theta, "rope_theta");
    cvq_codebook *cb = NULL;
    cvq_status s = cvq_codebook_create(geometry, rope_theta, allocator, &cb);
    if (s != CVQ_OK) return s;
    const cvq_geometry *g = &cb->geom;
    const double inv_sd = 1.0 / sqrt(1431655765.0);
    const size_t L = g->n_layers, groups = cvq__value_groups(g);
    const size_t P = cvq__pairs(g), F = g->value_group_width;
    const size_t I = g->value_hidden, Nc = g->value_bits;
    /* One independent stream per tensor kind, so that changing the size of
     * one tensor does not change the others. */
    uint64_t st[CVQ_T_COUNT];
    for (int i = 0; i < CVQ_T_COUNT; i++)
        st[i] = mix64(seed ^ mix64(0xC0DEB00Cu + (uint64_t)i));

    /* Keys. A head of the normalised key has norm rho0 = 1 (head scale) or
     * about 1/sqrt(Hkv) (token scale). The best of 4096 roughly independent
     * directions in d dims has cosine about kappa = sqrt(2 ln 4096 / d) with
     * the residual, so a centre of norm rho*kappa removes a fraction kappa^2
     * of its energy and leaves rho*q, q = sqrt(1 - kappa^2). Stage r's
     * centres therefore get norm t_r = rho0 * kappa * q^r, i.e. sub-code
     * components with sd t_r / sqrt(2d) (a centre (x_A - y_B, y_A + x_B)
     * has d components of variance 2 sd^2). kappa is damped by 0.8 so that
     * the centres stay smaller than twice the projection and every stage
     * reduces the residual on average. */
    const double d = (double)g->head_dim;
    const double ln4096 = 8.317766166719343; /* 12 ln 2 */
    double kappa = 0.8 * sqrt(2.0 * ln4096 / d);
    if (kappa > 0.9) kappa = 0.9;
    const double q = sqrt(1.0 - kappa * kappa);
    const double rho0 = g->key_scale == CVQ_KEY_SCALE_HEAD
                            ? 1.0
                            : 1.0 / sqrt((double)g->n_kv_heads);
    const size_t stage_w = (size_t)CVQ_SUBCODES * P * 2;
    float *kw = cb->tensors[CVQ_T_KEY_W];
    for (size_t l = 0; l < L; l++)
        for (uint32_t h = 0; h < g->n_kv_heads; h++) {
            double t = rho0 * kappa;
            for (uint32_t r = 0; r < g->key_stages; r++) {
                const size_t blk = (l * g->n_kv_heads + h) * g->key_stages + r;
                fill_normal(kw + blk * stage_w, stage_w, t / sqrt(2.0 * d),
                            &st[CVQ_T_KEY_W], inv_sd);
                t = t * q;
            }
        }

    /* Values: identity normalisation, weights ~ N(0, 1/fan_in), zero biases.
     * The scale of E cancels in decoding (u/||u||); 1/sqrt(Nc) keeps ||u||
     * near sqrt(F/2). */
    const size_t vec = L * groups * F;
    fill_const(cb->tensors[CVQ_T_VAL_LS], vec, 1.0f);
    fill_const(cb->tensors[CVQ_T_VAL_LN_W], vec, 1.0f);
    /* ln_b, b1, b2 stay zero from create. */
    fill_normal(cb->tensors[CVQ_T_VAL_W1], L * groups * I * F,
                1.0 / sqrt((double)F), &st[CVQ_T_VAL_W1], inv_sd);
    fill_normal(cb->tensors[CVQ_T_VAL_W2], L * groups * 2 * Nc * I,
                1.0 / sqrt((double)I), &st[CVQ_T_VAL_W2], inv_sd);
    fill_normal(cb->tensors[CVQ_T_VAL_E], L * groups * Nc * F,
                1.0 / sqrt((double)Nc), &st[CVQ_T_VAL_E], inv_sd);

    s = cvq_codebook_commit(cb);
    if (s != CVQ_OK) { /* cannot happen: every value is finite and small */
        cvq_codebook_free(cb);
        return s;
    }
    *out = cb;
    return CVQ_OK;
}
