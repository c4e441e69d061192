/*
 * The ops of the CUDA backend: device copies of a layer's tables, the
 * enqueueing of the kernels (cuda_launch.h) on the context's stream, the
 * deferred status word, and the three entries of the backend table, which
 * enqueue and then wait for their own result (the core stages host arrays
 * through device buffers around them).
 */
#include "cuda_internal.h"

#include <stdlib.h>
#include <string.h>

/* ---- geometry --------------------------------------------------------------------------- */

void cvq_cu_geom_of(const cvq_layer_view *lv, cvq_cu_geom *g) {
    const cvq_geometry *G = lv->g;
    memset(g, 0, sizeof *g);
    g->Hq = G->n_q_heads;
    g->Hkv = G->n_kv_heads;
    g->d = G->head_dim;
    g->P = G->head_dim / 2;
    g->R = G->key_stages;
    g->layout = G->pair_layout == CVQ_PAIRS_INTERLEAVED ? 1u : 0u;
    g->scale_mode = G->key_scale == CVQ_KEY_SCALE_HEAD ? 1u : 0u;
    g->F = G->value_group_width;
    g->Nc = G->value_bits;
    g->I = G->value_hidden;
    g->groups = lv->n_groups;
    g->inv_F = lv->inv_F;
    g->logit_scale = lv->logit_scale;
    g->key_code_bytes = (uint32_t)(((size_t)12 * G->n_kv_heads * G->key_stages + 7) / 8);
    g->value_bit_bytes = lv->n_groups * (G->value_bits / 8);
}

/* ---- tables ------------------------------------------------------------------------------ */

/* One table of the packed upload: count floats (or uint64) from groups of
 * `per` elements at `stride` apart. */
typedef struct {
    const void *src;
    size_t elem;     /* bytes per element */
    size_t per;      /* elements per group */
    size_t stride;   /* elements between groups in the source */
    size_t groups;
    size_t off;      /* byte offset in the upload (256-aligned) */
} part;

static size_t align256(size_t x) { return (x + 255) & ~(size_t)255; }

void cvq_cu_tables_close(cvq_cuda *cu) {
    for (int i = 0; i < CVQ_CU_TABLE_SLOTS; i++) {
        if (cu->slots[i].dev) (void)cudaFree(cu->slots[i].dev);
        memset(&cu->slots[i], 0, sizeof cu->slots[i]);
    }
    (void)cudaGetLastError();
}

cvq_status cvq_cu_tables_get(cvq_cuda *cu, const cvq_codebook *cb, const cvq_layer_view *lv,
                             const cvq_cu_tables **out) {
    cvq_cu_table_slot *victim = &cu->slots[0];
    for (int i = 0; i < CVQ_CU_TABLE_SLOTS; i++) {
        cvq_cu_table_slot *s = &cu->slots[i];
        if (s->cb == cb && s->generation == cb->generation && s->layer == lv->layer && s->dev) {
            s->last_use = ++cu->use_clock;
            *out = &s->t;
            return CVQ_OK;
        }
        if (!s->dev || s->last_use < victim->last_use) victim = s;
    }
    const cvq_geometry *g = lv->g;
    const size_t HR = (size_t)g->n_kv_heads * g->key_stages, P = lv->P, G = lv->n_groups;
    const size_t F = g->value_group_width, I = g->value_hidden, Nc = g->value_bits;
    part p[13] = {
        {lv->key_w, 4, HR * 64 * P * 2, 0, 1, 0},
        {lv->key_n, 4, HR * 64, 0, 1, 0},
        {lv->key_G, 4, HR * 4096, 0, 1, 0},
        {lv->rope_t, 8, P, 0, 1, 0},
        {lv->val_inv_ls, 4, F, lv->s_vec, G, 0},
        {lv->val_ls_eps, 4, F, lv->s_vec, G, 0},
        {lv->ln_w, 4, F, lv->s_vec, G, 0},
        {lv->ln_b, 4, F, lv->s_vec, G, 0},
        {lv->w1, 4, I * F, lv->s_w1, G, 0},
        {lv->b1, 4, I, lv->s_b1, G, 0},
        {lv->w2, 4, 2 * Nc * I, lv->s_w2, G, 0},
        {lv->b2, 4, 2 * Nc, lv->s_b2, G, 0},
        {lv->E, 4, Nc * F, lv->s_E, G, 0},
    };
    size_t total = 0;
    for (int i = 0; i < 13; i++) {
        p[i].off = total;
        total = align256(total + p[i].elem * p[i].per * p[i].groups);
    }
    char *host = cvq__alloc(&cu->ctx->alloc, total);
    if (!host) return CVQ_FAIL(cu->ctx, CVQ_ERR_OUT_OF_MEMORY, "CUDA: cannot stage %zu bytes of tables", total);
    memset(host, 0, total);
    for (int i = 0; i < 13; i++)
        for (size_t gi = 0; gi < p[i].groups; gi++)
            memcpy(host + p[i].off + gi * p[i].per * p[i].elem,
                   (const char *)p[i].src + gi * p[i].stride * p[i].elem, p[i].per * p[i].elem);
    /* the victim may still be read by enqueued kernels */
    cudaError_t e = cudaStreamSynchronize(cu->stream);
    if (e == cudaSuccess && victim->dev) e = cudaFree(victim->dev);
    memset(victim, 0, sizeof *victim);
    void *dev = NULL;
    if (e == cudaSuccess) e = cudaMalloc(&dev, total);
    if (e == cudaSuccess) e = cudaMemcpyAsync(dev, host, total, cudaMemcpyHostToDevice, cu->stream);
    if (e == cudaSuccess) e = cudaStreamSynchronize(cu->stream); /* host staging freed below */
    cvq__free(&cu->ctx->alloc, host);
    if (e != cudaSuccess) {
        if (dev) (void)cudaFree(dev);
        return cvq_cu_fail(cu->ctx, (int)e, "uploading the codebook tables", __FILE__, __LINE__);
    }
    const char *b = dev;
    cvq_cu_tables *t = &victim->t;
    t->key_w = (const float *)(b + p[0].off);
    t->key_n = (const float *)(b + p[1].off);
    t->key_G = (const float *)(b + p[2].off);
    t->rope_t = (const uint64_t *)(b + p[3].off);
    t->inv_ls = (const float *)(b + p[4].off);
    t->ls_eps = (const float *)(b + p[5].off);
    t->ln_w = (const float *)(b + p[6].off);
    t->ln_b = (const float *)(b + p[7].off);
    t->w1 = (const float *)(b + p[8].off);
    t->b1 = (const float *)(b + p[9].off);
    t->w2 = (const float *)(b + p[10].off);
    t->b2 = (const float *)(b + p[11].off);
    t->E = (const float *)(b + p[12].off);
    victim->cb = cb;
    victim->generation = cb->generation;
    victim->layer = lv->layer;
    victim->dev = dev;
    victim->last_use = ++cu->use_clock;
    *out = t;
    return CVQ_OK;
}

/* ---- scratch and status ------------------------------------------------------------------ */

cvq_status cvq_cu_scratch(cvq_cuda *cu, size_t bytes, void **out) {
    if (bytes <= cu->scratch_size && cu->scratch) {
        *out = cu->scratch;
        return CVQ_OK;
    }
    CVQ_CU_TRY(cu->ctx, cudaStreamSynchronize(cu->stream)); /* the old scratch may be in use */
    if (cu->scratch) (void)cudaFree(cu->scratch);
    cu->scratch = NULL;
    cu->scratch_size = 0;
    CVQ_CU_TRY(cu->ctx, cudaMalloc(&cu->scratch, bytes ? bytes : 1));
    cu->scratch_size = bytes;
    *out = cu->scratch;
    return CVQ_OK;
}

cvq_status cvq_cu_collect(cvq_cuda *cu, const char *op) {
    uint32_t w[2] = {0, 0};
    CVQ_CU_TRY(cu->ctx, cudaStreamSynchronize(cu->stream));
    CVQ_CU_TRY(cu->ctx, cudaMemcpyAsync(w, cu->status, sizeof w, cudaMemcpyDeviceToHost, cu->stream));
    CVQ_CU_TRY(cu->ctx, cudaStreamSynchronize(cu->stream));
    const uint32_t bits = w[0] | w[1];
    if (bits) { /* cleared on the stream (cudaMemset would use the legacy stream, unordered with ours) */
        CVQ_CU_TRY(cu->ctx, cudaMemsetAsync(cu->status, 0, sizeof w, cu->stream));
        CVQ_CU_TRY(cu->ctx, cudaStreamSynchronize(cu->stream));
    }
    if (bits & CVQ_CU_ST_NONFINITE)
        return CVQ_FAIL(cu->ctx, CVQ_ERR_NONFINITE_INPUT,
                        "cuda %s: a NaN or Inf in the input (found on the device); nothing was written", op);
    if (bits & CVQ_CU_ST_RANGE)
        return CVQ_FAIL(cu->ctx, CVQ_ERR_INPUT_RANGE,
                        "cuda %s: a sum of squares overflows binary32 (found on the device); nothing was written",
                        op);
    return CVQ_OK;
}

/* Tokens per attention tile: COMMVQ_CUDA_ATTEND_TILE (16..256, a power of
 * two; a tuning knob for bench_cuda), else the kernel's default. */
static uint32_t tile_pref(void) {
    const char *v = getenv("COMMVQ_CUDA_ATTEND_TILE");
    return v && v[0] ? (uint32_t)strtoul(v, NULL, 10) : 0u;
}

/* ---- enqueue ---------------------------------------------------------------------------- */

cvq_status cvq_cu_enqueue_keys(cvq_cuda *cu, const cvq_codebook *cb, const cvq_layer_view *lv,
                               const float *keys, size_t n, uint16_t *codes, float *scales) {
    cvq_status st = cvq_cu_enter(cu);
    if (st || n == 0) return st;
    const cvq_cu_tables *t;
    if ((st = cvq_cu_tables_get(cu, cb, lv, &t))) return st;
    cvq_cu_geom g;
    cvq_cu_geom_of(lv, &g);
    cvq_cu_encode_keys a = {keys, codes, scales, n};
    const int e = cvq_cu_launch_encode_keys(&g, t, &a, cu->status, cu->stream);
    if (e) return cvq_cu_fail(cu->ctx, e, "launching the key encoder", __FILE__, __LINE__);
    return CVQ_OK;
}

cvq_status cvq_cu_enqueue_values(cvq_cuda *cu, const cvq_codebook *cb, const cvq_layer_view *lv,
                                 const float *values, size_t n, uint8_t *bits, float *sigma) {
    cvq_status st = cvq_cu_enter(cu);
    if (st || n == 0) return st;
    const cvq_cu_tables *t;
    if ((st = cvq_cu_tables_get(cu, cb, lv, &t))) return st;
    cvq_cu_geom g;
    cvq_cu_geom_of(lv, &g);
    size_t smem, scratch_bytes;
    cvq_cu_values_plan(&g, cu->smem_max, &smem, &scratch_bytes);
    void *scratch = NULL;
    if (scratch_bytes && (st = cvq_cu_scratch(cu, scratch_bytes, &scratch))) return st;
    cvq_cu_encode_values a = {values, bits, sigma, n, scratch};
    const int e = cvq_cu_launch_encode_values(&g, t, &a, cu->smem_max, cu->status, cu->stream);
    if (e) return cvq_cu_fail(cu->ctx, e, "launching the value encoder", __FILE__, __LINE__);
    return CVQ_OK;
}

cvq_status cvq_cu_enqueue_attend(cvq_cuda *cu, const cvq_codebook *cb, const cvq_layer_view *lv,
                                 cvq_cu_attend *a) {
    cvq_status st = cvq_cu_enter(cu);
    if (st || a->n_q == 0) return st;
    const cvq_cu_tables *t;
    if ((st = cvq_cu_tables_get(cu, cb, lv, &t))) return st;
    cvq_cu_geom g;
    cvq_cu_geom_of(lv, &g);
    cvq_cu_attend_plan plan;
    const char *why;
    if (cvq_cu_attend_plan_make(&g, a->n_q, a->n_sink + a->n_comp + a->n_win, cu->smem_max, cu->n_sm, tile_pref(), &plan, &why))
        return CVQ_FAIL(cu->ctx, CVQ_ERR_UNSUPPORTED, "cuda attend: %s (%zu bytes per block available)", why,
                        cu->smem_max);
    void *scratch;
    if ((st = cvq_cu_scratch(cu, plan.scratch_bytes, &scratch))) return st;
    a->scratch = scratch;
    const int e = cvq_cu_launch_attend(&g, t, a, &plan, cu->status, cu->stream);
    if (e) return cvq_cu_fail(cu->ctx, e, "launching attention (the output was not written)", __FILE__, __LINE__);
    return CVQ_OK;
}

/* ---- the backend table's ops ------------------------------------------------------------- */

static void *dev_ptr(cvq_view v) { return v.buf && v.buf->handle ? (char *)v.buf->handle + v.offset : NULL; }

cvq_status cvq_cu_supports(cvq_context *ctx, const cvq_op_desc *desc) {
    cvq_cuda *cu = ctx->be_state;
    const cvq_geometry *G = desc->g;
    if (desc->op != CVQ_OP_ATTEND) return CVQ_OK;
    cvq_cu_geom g;
    memset(&g, 0, sizeof g);
    g.Hq = G->n_q_heads;
    g.Hkv = G->n_kv_heads;
    g.d = G->head_dim;
    g.P = g.d / 2;
    g.R = G->key_stages;
    g.Nc = G->value_bits;
    cvq_cu_attend_plan plan;
    const char *why;
    if (cvq_cu_attend_plan_make(&g, desc->n_q, desc->n_tokens, cu->smem_max, cu->n_sm, tile_pref(), &plan, &why))
        return CVQ_FAIL(ctx, CVQ_ERR_UNSUPPORTED, "cuda attend: %s (%zu bytes per block on this device)", why,
                        cu->smem_max);
    return CVQ_OK;
}

cvq_status cvq_cu_op_encode_keys(cvq_context *ctx, const cvq_encode_keys_args *a) {
    cvq_cuda *cu = ctx->be_state;
    cvq_status st = cvq_cu_collect(cu, "encode_keys"); /* earlier interop status is not this call's */
    if (st) return st;
    st = cvq_cu_enqueue_keys(cu, a->cb, a->lv, dev_ptr(a->keys), a->n, dev_ptr(a->codes), dev_ptr(a->scales));
    if (st) return st;
    return cvq_cu_collect(cu, "encode_keys");
}

cvq_status cvq_cu_op_encode_values(cvq_context *ctx, const cvq_encode_values_args *a) {
    cvq_cuda *cu = ctx->be_state;
    cvq_status st = cvq_cu_collect(cu, "encode_values");
    if (st) return st;
    st = cvq_cu_enqueue_values(cu, a->cb, a->lv, dev_ptr(a->values), a->n, dev_ptr(a->bits), dev_ptr(a->sigma));
    if (st) return st;
    return cvq_cu_collect(cu, "encode_values");
}

cvq_status cvq_cu_op_attend(cvq_context *ctx, const cvq_attend_args *a) {
    cvq_cuda *cu = ctx->be_state;
    cvq_status st = cvq_cu_collect(cu, "attend");
    if (st) return st;
    cvq_cu_attend x;
    memset(&x, 0, sizeof x);
    x.n_q = a->n_q;
    x.q = dev_ptr(a->q);
    x.q_pos = dev_ptr(a->q_pos);
    x.q_rotated = a->q_rotated;
    x.out = dev_ptr(a->out);
    x.n_sink = a->n_sink;
    x.n_comp = a->n_comp;
    x.n_win = a->n_win;
    x.sink_k = dev_ptr(a->sink_k);
    x.sink_v = dev_ptr(a->sink_v);
    x.sink_pos = dev_ptr(a->sink_pos);
    x.comp_codes = dev_ptr(a->comp_codes);
    x.comp_kscale = dev_ptr(a->comp_kscale);
    x.comp_vbits = dev_ptr(a->comp_vbits);
    x.comp_vsigma = dev_ptr(a->comp_vsigma);
    x.comp_pos = dev_ptr(a->comp_pos);
    x.win_k = dev_ptr(a->win_k);
    x.win_v = dev_ptr(a->win_v);
    x.win_pos = dev_ptr(a->win_pos);
    st = cvq_cu_enqueue_attend(cu, a->cb, a->lv, &x);
    if (st) return st;
    return cvq_cu_collect(cu, "attend");
}
