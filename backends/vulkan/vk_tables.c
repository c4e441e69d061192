/*
 * Codebook tables on the device: per (codebook, layer), the arrays the
 * kernels read (shaders/iface.h), uploaded once and reused by every call.
 *
 *   key_w [Hkv][R][64][P][2], key_n [Hkv][R][64], key_G [Hkv][R][64][64],
 *   rope_t [P][2] uint (lo, hi of the 64-bit phase step t_p),
 *   inv_ls, ln_w, ln_b, ls_eps [groups][F], w1 [groups][I][F], b1 [groups][I],
 *   w2 [groups][2Nc][I], b2 [groups][2Nc], E [groups][Nc][F]
 * (value tensors gathered densely from the layer view's group strides).
 *
 * An entry is found by (codebook pointer, layer) and is current when the
 * codebook's generation AND a hash of each host table the op reads match:
 * the generation is per codebook and starts at the same value for every
 * codebook, so a codebook freed and another allocated at the same address
 * would otherwise be taken for the old one. The hash reads those tables
 * once per call (LLaMA-3.1-8B layer: ~4 MB for keys, ~7 MB for attend,
 * ~30 MB for values); a process-unique generation in the core would make it
 * unnecessary.
 */
#define _POSIX_C_SOURCE 200809L
#include "vk_internal.h"

#include <string.h>

/* Sizes (floats, or uints for rope_t) of each dense table, and where its
 * group g starts on the host (stride in floats; 0 for non-group tables). */
typedef struct {
    const void *src;
    size_t per_group; /* elements per group (or the whole table)  */
    size_t stride;    /* host elements between groups              */
    size_t groups;
} tab_src;

static void table_sources(const cvq_layer_view *lv, tab_src t[CVQ_VK_T_COUNT]) {
    const cvq_geometry *g = lv->g;
    const size_t H = g->n_kv_heads, R = g->key_stages, P = lv->P, G = lv->n_groups;
    const size_t F = g->value_group_width, I = g->value_hidden, Nc = g->value_bits;
    memset(t, 0, sizeof(tab_src) * CVQ_VK_T_COUNT);
    t[CVQ_VK_T_KEY_W] = (tab_src){lv->key_w, H * R * 64 * P * 2, 0, 1};
    t[CVQ_VK_T_KEY_N] = (tab_src){lv->key_n, H * R * 64, 0, 1};
    t[CVQ_VK_T_KEY_G] = (tab_src){lv->key_G, H * R * 64 * 64, 0, 1};
    t[CVQ_VK_T_ROPE_T] = (tab_src){lv->rope_t, P * 2, 0, 1}; /* converted below */
    t[CVQ_VK_T_INV_LS] = (tab_src){lv->val_inv_ls, F, lv->s_vec, G};
    t[CVQ_VK_T_LN_W] = (tab_src){lv->ln_w, F, lv->s_vec, G};
    t[CVQ_VK_T_LN_B] = (tab_src){lv->ln_b, F, lv->s_vec, G};
    t[CVQ_VK_T_W1] = (tab_src){lv->w1, I * F, lv->s_w1, G};
    t[CVQ_VK_T_B1] = (tab_src){lv->b1, I, lv->s_b1, G};
    t[CVQ_VK_T_W2] = (tab_src){lv->w2, 2 * Nc * I, lv->s_w2, G};
    t[CVQ_VK_T_B2] = (tab_src){lv->b2, 2 * Nc, lv->s_b2, G};
    t[CVQ_VK_T_E] = (tab_src){lv->E, Nc * F, lv->s_E, G};
    t[CVQ_VK_T_LS_EPS] = (tab_src){lv->val_ls_eps, F, lv->s_vec, G};
}

/* 64-bit hash of 32-bit words, four independent lanes (fast), then mixed. */
static uint64_t mix(uint64_t h) {
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ull;
    h ^= h >> 33;
    return h;
}

/* Word i of a table, read as bytes (no aliasing of float as uint). */
static uint32_t word_at(const unsigned char *p, size_t i) {
    uint32_t w;
    memcpy(&w, p + 4 * i, 4);
    return w;
}

static uint64_t hash_words(uint64_t seed, const void *src, size_t n) {
    const unsigned char *w = src;
    uint64_t a = seed ^ 0x9e3779b97f4a7c15ull, b = seed + 1, c = seed + 2, d = seed + 3;
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        a = (a ^ word_at(w, i)) * 0x100000001b3ull;
        b = (b ^ word_at(w, i + 1)) * 0x100000001b3ull;
        c = (c ^ word_at(w, i + 2)) * 0x100000001b3ull;
        d = (d ^ word_at(w, i + 3)) * 0x100000001b3ull;
    }
    for (; i < n; i++) a = (a ^ word_at(w, i)) * 0x100000001b3ull;
    return mix(a ^ mix(b) ^ mix(mix(c)) ^ mix(mix(mix(d))) ^ (uint64_t)n);
}

/* Hash of table k of the layer (every group). */
static uint64_t table_hash(const cvq_layer_view *lv, const tab_src *t, int k) {
    uint64_t h = 0x243f6a8885a308d3ull ^ (uint64_t)k;
    for (size_t gi = 0; gi < t->groups; gi++) {
        if (k == CVQ_VK_T_ROPE_T)
            h = hash_words(h, lv->rope_t, t->per_group);
        else
            h = hash_words(h, (const float *)t->src + gi * t->stride, t->per_group);
    }
    return h;
}

static void tables_free(cvq_vk *vk, cvq_vk_tables *e) {
    /* (recorded work may still read them: released, not freed) */
    for (int k = 0; k < CVQ_VK_T_COUNT; k++) cvq_vk_buffer_release(vk, &e->t[k]);
    cvq__free(&vk->ctx->alloc, e);
}

/* Uploads every table of the layer into e. */
static cvq_status upload(cvq_vk *vk, const cvq_layer_view *lv, const tab_src t[CVQ_VK_T_COUNT],
                         cvq_vk_tables *e) {
    cvq_context *ctx = vk->ctx;
    for (int k = 0; k < CVQ_VK_T_COUNT; k++) {
        size_t elems = t[k].per_group * t[k].groups;
        size_t bytes = elems * 4;
        cvq_status st = cvq_vk_buffer_alloc(vk, bytes, &e->t[k]);
        if (st) return st;
        if (k == CVQ_VK_T_ROPE_T) {
            uint32_t tmp[512]; /* P <= 128 */
            for (size_t p = 0; p < lv->P; p++) {
                tmp[2 * p] = (uint32_t)(lv->rope_t[p] & 0xffffffffu);
                tmp[2 * p + 1] = (uint32_t)(lv->rope_t[p] >> 32);
            }
            st = cvq_vk_buffer_write(vk, &e->t[k], 0, tmp, bytes);
        } else if (t[k].groups == 1 || t[k].stride == t[k].per_group) {
            st = cvq_vk_buffer_write(vk, &e->t[k], 0, t[k].src, bytes);
        } else {
            for (size_t gi = 0; gi < t[k].groups && !st; gi++)
                st = cvq_vk_buffer_write(vk, &e->t[k], gi * t[k].per_group * 4,
                                         (const float *)t[k].src + gi * t[k].stride, t[k].per_group * 4);
        }
        if (st) return st;
    }
    (void)ctx;
    return CVQ_OK;
}

cvq_status cvq_vk_tables_get(cvq_vk *vk, const cvq_codebook *cb, const cvq_layer_view *lv, uint32_t used,
                             const cvq_vk_tables **out) {
    cvq_context *ctx = vk->ctx;
    tab_src t[CVQ_VK_T_COUNT];
    table_sources(lv, t);
    if (lv->P > 256) return CVQ_FAIL(ctx, CVQ_ERR_GEOMETRY, "head dim %u too large", 2 * lv->P);
    cvq_vk_tables **link = &vk->tables;
    for (cvq_vk_tables *e = vk->tables; e; link = &e->next, e = e->next) {
        if (e->cb != cb || e->layer != lv->layer) continue;
        bool same = e->generation == cb->generation;
        for (int k = 0; k < CVQ_VK_T_COUNT && same; k++)
            if ((used >> k) & 1u) same = e->hash[k] == table_hash(lv, &t[k], k);
        if (same) {
            /* move to front */
            *link = e->next;
            e->next = vk->tables;
            vk->tables = e;
            *out = e;
            return CVQ_OK;
        }
        /* stale: the codebook changed (or another took its address) */
        *link = e->next;
        tables_free(vk, e);
        break;
    }
    cvq_vk_tables *e = cvq__calloc(&ctx->alloc, 1, sizeof *e);
    if (!e) return CVQ_FAIL(ctx, CVQ_ERR_OUT_OF_MEMORY, "cannot allocate a table record");
    cvq_status st = upload(vk, lv, t, e);
    if (st) {
        tables_free(vk, e);
        return st;
    }
    e->cb = cb;
    e->generation = cb->generation;
    e->layer = lv->layer;
    for (int k = 0; k < CVQ_VK_T_COUNT; k++) e->hash[k] = table_hash(lv, &t[k], k);
    e->next = vk->tables;
    vk->tables = e;
    *out = e;
    return CVQ_OK;
}

void cvq_vk_tables_close(cvq_vk *vk) {
    while (vk->tables) {
        cvq_vk_tables *e = vk->tables;
        vk->tables = e->next;
        tables_free(vk, e);
    }
}
