/*
 * Model geometry: defaults, validation, and the byte layout of one
 * compressed token record (docs/format.md, "Compressed record").
 *
 * Every limit below exists for one of two reasons: the method needs it (d
 * even and one of the supported head sizes, Nc a multiple of 8 so that value
 * bits fill whole bytes and 4-way groups, F a whole number of heads), or it
 * keeps every derived count inside the integer types of the API (uint32
 * element counts, uint32 bytes per record, size_t tensor byte sizes), so that
 * no later computation needs its own overflow check.
 */
#include "cvq_internal.h"

#include <math.h>

#define CVQ_MAX_LAYERS 4096u
#define CVQ_MAX_HEADS 65536u   /* keeps Hkv*d, 12*Hkv*R and record sizes in uint32 */
#define CVQ_MAX_STAGES 32u
#define CVQ_MAX_VALUE_BITS 65536u
#define CVQ_MAX_HIDDEN 65536u
#define CVQ_DEFAULT_HIDDEN_CAP 4096u

static bool head_dim_supported(uint32_t d) {
    return d == 64 || d == 80 || d == 96 || d == 128 || d == 256;
}

/* Bytes of one tensor kind over all layers: L * groups * per_group * elem.
 * false if it does not fit size_t. */
static bool tensor_bytes(size_t L, size_t groups, size_t per_group,
                         size_t elem, size_t *total) {
    size_t n;
    return cvq__mul_size(L, groups, &n) && cvq__mul_size(n, per_group, &n) &&
           cvq__mul_size(n, elem, &n) && cvq__add_size(*total, n, total);
}

/* Checks that every primary tensor and derived table of a codebook of this
 * geometry, and their sum, has a byte size that fits size_t. */
static cvq_status check_sizes(const cvq_geometry *g) {
    const size_t L = g->n_layers, Hkv = g->n_kv_heads, R = g->key_stages;
    const size_t P = g->head_dim / 2, F = g->value_group_width;
    const size_t I = g->value_hidden, Nc = g->value_bits;
    const size_t G = (size_t)g->n_kv_heads * g->head_dim / F;
    const size_t fl = sizeof(float);
    size_t total = 0;
    size_t kw, kg, w1, w2, e;
    bool ok = cvq__mul_size(Hkv * R, (size_t)CVQ_SUBCODES * P * 2, &kw) &&
              cvq__mul_size(Hkv * R, (size_t)CVQ_CODES, &kg) &&
              cvq__mul_size(I, F, &w1) && cvq__mul_size(2 * Nc, I, &w2) &&
              cvq__mul_size(Nc, F, &e);
    ok = ok && tensor_bytes(L, 1, kw, fl, &total)           /* key_w       */
         && tensor_bytes(L, 1, Hkv * R * CVQ_SUBCODES, fl, &total) /* key_n */
         && tensor_bytes(L, 1, kg, fl, &total)              /* key_G       */
         && tensor_bytes(L, G, F, fl * 5, &total)           /* ls, ln_w, ln_b,
                                                               inv_ls, ls_eps */
         && tensor_bytes(L, G, w1, fl, &total)              /* val_w1      */
         && tensor_bytes(L, G, I, fl, &total)               /* val_b1      */
         && tensor_bytes(L, G, w2, fl, &total)              /* val_w2      */
         && tensor_bytes(L, G, 2 * Nc, fl, &total)          /* val_b2      */
         && tensor_bytes(L, G, e, fl, &total);              /* val_E       */
    if (!ok)
        return CVQ_FAIL(NULL, CVQ_ERR_GEOMETRY,
                        "geometry: the codebook's tensors (L=%u, Hkv=%u, R=%u, "
                        "F=%u, I=%u, Nc=%u) do not fit in addressable memory",
                        g->n_layers, g->n_kv_heads, g->key_stages,
                        g->value_group_width, g->value_hidden, g->value_bits);
    return CVQ_OK;
}

cvq_status cvq_geometry_resolve(cvq_geometry *g) {
    if (!g) return CVQ_FAIL(NULL, CVQ_ERR_NULL_POINTER, "geometry is NULL");

    if (g->n_layers < 1 || g->n_layers > CVQ_MAX_LAYERS)
        return CVQ_FAIL(NULL, CVQ_ERR_GEOMETRY,
                        "geometry: n_layers = %u, must be in 1..%u",
                        g->n_layers, CVQ_MAX_LAYERS);
    if (g->n_q_heads < 1 || g->n_q_heads > CVQ_MAX_HEADS)
        return CVQ_FAIL(NULL, CVQ_ERR_GEOMETRY,
                        "geometry: n_q_heads = %u, must be in 1..%u",
                        g->n_q_heads, CVQ_MAX_HEADS);
    if (g->n_kv_heads < 1 || g->n_kv_heads > g->n_q_heads)
        return CVQ_FAIL(NULL, CVQ_ERR_GEOMETRY,
                        "geometry: n_kv_heads = %u, must be in 1..n_q_heads (%u)",
                        g->n_kv_heads, g->n_q_heads);
    if (!head_dim_supported(g->head_dim))
        return CVQ_FAIL(NULL, CVQ_ERR_GEOMETRY,
                        "geometry: head_dim = %u, supported: 64, 80, 96, 128, 256",
                        g->head_dim);
    if (g->key_stages < 1 || g->key_stages > CVQ_MAX_STAGES)
        return CVQ_FAIL(NULL, CVQ_ERR_GEOMETRY,
                        "geometry: key_stages = %u, must be in 1..%u",
                        g->key_stages, CVQ_MAX_STAGES);
    /* Enums are compared as unsigned so that a stray negative value from a
     * cast is caught too. */
    if ((unsigned)g->key_scale > (unsigned)CVQ_KEY_SCALE_HEAD)
        return CVQ_FAIL(NULL, CVQ_ERR_GEOMETRY,
                        "geometry: key_scale = %u, must be 0 (token) or 1 (head)",
                        (unsigned)g->key_scale);
    if ((unsigned)g->pair_layout > (unsigned)CVQ_PAIRS_INTERLEAVED)
        return CVQ_FAIL(NULL, CVQ_ERR_GEOMETRY,
                        "geometry: pair_layout = %u, must be 0 (rotate_half) or "
                        "1 (interleaved)",
                        (unsigned)g->pair_layout);

    const uint32_t kv_dims = g->n_kv_heads * g->head_dim; /* <= 2^24 */
    if (g->value_group_width == 0) g->value_group_width = kv_dims;
    if (g->value_group_width % g->head_dim != 0 ||
        g->value_group_width > kv_dims || kv_dims % g->value_group_width != 0)
        return CVQ_FAIL(NULL, CVQ_ERR_GEOMETRY,
                        "geometry: value_group_width F = %u, must be a multiple "
                        "of head_dim (%u) dividing n_kv_heads*head_dim (%u)",
                        g->value_group_width, g->head_dim, kv_dims);
    if (g->value_bits < 8 || g->value_bits > CVQ_MAX_VALUE_BITS ||
        g->value_bits % 8 != 0)
        return CVQ_FAIL(NULL, CVQ_ERR_GEOMETRY,
                        "geometry: value_bits Nc = %u, must be a multiple of 8 "
                        "in 8..%u",
                        g->value_bits, CVQ_MAX_VALUE_BITS);
    if (g->value_hidden == 0)
        g->value_hidden = 2 * g->value_bits < CVQ_DEFAULT_HIDDEN_CAP
                              ? 2 * g->value_bits
                              : CVQ_DEFAULT_HIDDEN_CAP;
    if (g->value_hidden > CVQ_MAX_HIDDEN)
        return CVQ_FAIL(NULL, CVQ_ERR_GEOMETRY,
                        "geometry: value_hidden I = %u, must be in 1..%u",
                        g->value_hidden, CVQ_MAX_HIDDEN);
    /* lambda: 0 (either sign) means the default 1/sqrt(d), computed in
     * double and rounded once. */
    if (g->logit_scale == 0.0f)
        g->logit_scale = (float)(1.0 / sqrt((double)g->head_dim));
    if (!isfinite(g->logit_scale) || !(g->logit_scale > 0.0f))
        return CVQ_FAIL(NULL, CVQ_ERR_GEOMETRY,
                        "geometry: logit_scale = %g, must be finite and > 0",
                        (double)g->logit_scale);
    return check_sizes(g);
}

cvq_status cvq_record_layout_of(const cvq_geometry *geometry,
                                cvq_record_layout *out) {
    CVQ__NONNULL(NULL, "cvq_record_layout_of", geometry, "g");
    CVQ__NONNULL(NULL, "cvq_record_layout_of", out, "out");
    cvq_geometry g = *geometry;
    cvq_status s = cvq_geometry_resolve(&g);
    if (s != CVQ_OK) return s;

    /* With the limits above (Hkv <= 2^16, R <= 32, groups <= Hkv,
     * Nc <= 2^16) every count below fits uint32: the largest, value bits,
     * is at most 2^16 * 2^16 / 8 = 2^29 bytes. */
    const uint32_t n_codes = g.n_kv_heads * g.key_stages;
    const uint32_t groups = cvq__value_groups(&g);
    cvq_record_layout r;
    r.key_code_bytes = (uint32_t)(((uint64_t)n_codes * 12u + 7u) / 8u);
    r.key_scale_count = cvq__key_scale_count(&g);
    r.value_groups = groups;
    r.value_bit_bytes = groups * (g.value_bits / 8u);
    r.value_scale_count = groups;
    r.bytes_per_token = r.key_code_bytes + 4u * r.key_scale_count +
                        r.value_bit_bytes + 4u * r.value_scale_count;
    r.code_bits = 12u * (uint64_t)n_codes + (uint64_t)groups * g.value_bits;
    r.scale_bits = 32u * ((uint64_t)r.key_scale_count + groups);
    r.bits_per_element = (double)(r.code_bits + r.scale_bits) /
                         (2.0 * (double)cvq__kv_dims(&g));
    *out = r;
    return CVQ_OK;
}
