/*
 * The ops of the Vulkan backend, as dispatch sequences of the kernels of
 * shaders/ (bindings and push constants: shaders/iface.h):
 *
 *   encode_keys   = encode_keys.comp (uint codes into a scratch buffer,
 *                   scales straight into the output) + pack_u16.comp (the
 *                   uint16 codes of the output)
 *   encode_values = encode_values.comp (0/1 uint per code bit into a
 *                   scratch buffer, sigma straight into the output) +
 *                   pack_bits.comp (the bit bytes of the output)
 *   attend        = attend.comp
 *
 * Each op records one command buffer and waits for it once. Work is cut in
 * two ways:
 *  - chunks: when a tensor of the whole call would exceed the device's
 *    maxStorageBufferRange, or a scratch buffer CVQ_VK_SCRATCH_BUDGET, the
 *    call runs as consecutive chunks of tokens (queries for attend), each
 *    binding its slice of the inputs and outputs at an aligned offset and
 *    reusing the scratch (with a barrier between chunks). Slices start at
 *    multiples of a granule chosen so that every offset is a multiple of
 *    minStorageBufferOffsetAlignment.
 *  - dispatches: within a chunk, at most maxComputeWorkGroupCount[0]
 *    workgroups per vkCmdDispatch, the first index passed as token_base /
 *    qh_base.
 * supports() (cvq_vk_op_supported) refuses a call that no chunking can fit.
 */
#define _POSIX_C_SOURCE 200809L
#include "vk_internal.h"

/* shaders/iface.h is shared with GLSL; its comments may hold a glob such
 * as shaders/NAME.comp written with a star, which -Wcomment flags. */
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wcomment"
#endif
#include "../../shaders/iface.h"
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

#include <stddef.h>
#include <string.h>

/* Local size of the kernels (the shaders work with any size; 64 is the
 * least every usable device offers). On a device with a loop budget
 * (llvmpipe) an op doubles it, up to CVQ_VK_WG_MAX, until the kernel's
 * per-invocation loop count fits (see "loop budget" below). */
#define CVQ_VK_WG 64u
#define CVQ_VK_WG_MAX 1024u

/* ---- planning ----------------------------------------------------------------------- */

/* A per-item (token or query) byte stride of something bound per chunk:
 * `aligned` for slices of caller views bound at an offset, with the limit
 * their per-chunk size must respect. */
typedef struct {
    size_t stride;
    size_t limit;
    bool aligned;
} per_item;

static size_t gcd_size(size_t a, size_t b) {
    while (b) {
        size_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

/* Items per chunk for n items (all of them when they fit), or 0 when not
 * even one granule fits. Scratch items (not aligned) are held to their
 * limit (the scratch budget) first; when that leaves no granule, to the
 * storage-buffer range (a few large scratch buffers beat refusing). */
static size_t plan_with(const cvq_vk *vk, size_t n, const per_item *it, size_t n_it, size_t scratch_cap) {
    const size_t align = (size_t)vk->caps.props.limits.minStorageBufferOffsetAlignment;
    size_t gran = 1, most = n;
    for (size_t i = 0; i < n_it; i++) {
        if (it[i].stride == 0) continue;
        size_t lim = it[i].limit;
        if (!it[i].aligned && scratch_cap > lim) lim = scratch_cap;
        size_t m = lim / it[i].stride;
        if (m < most) most = m;
        if (it[i].aligned && align > 1) {
            size_t g = align / gcd_size(align, it[i].stride % align ? it[i].stride % align : align);
            if (g > gran) gran = g; /* powers of two: the largest is the lcm */
        }
    }
    if (most >= n) return n;
    most -= most % gran;
    return most;
}

static size_t storage_range(const cvq_vk *vk) {
    return (size_t)vk->caps.props.limits.maxStorageBufferRange;
}

static size_t plan_chunk(const cvq_vk *vk, size_t n, const per_item *it, size_t n_it) {
    size_t m = plan_with(vk, n, it, n_it, 0);
    if (m) return m;
    size_t cap = storage_range(vk);
    if (vk->caps.max_alloc < cap) cap = (size_t)vk->caps.max_alloc;
    return plan_with(vk, n, it, n_it, cap);
}

static size_t scratch_limit(const cvq_vk *vk) {
    size_t m = storage_range(vk);
    return m < vk->scratch_budget ? m : vk->scratch_budget;
}

static void spec_of(const cvq_geometry *g, uint32_t wg, cvq_vk_spec *s) {
    memset(s, 0, sizeof *s);
    s->v[CVQ_SC_WG] = wg;
    s->v[CVQ_SC_D] = g->head_dim;
    s->v[CVQ_SC_HKV] = g->n_kv_heads;
    s->v[CVQ_SC_HQ] = g->n_q_heads;
    s->v[CVQ_SC_R] = g->key_stages;
    s->v[CVQ_SC_LAYOUT] = g->pair_layout == CVQ_PAIRS_INTERLEAVED ? 1u : 0u;
    s->v[CVQ_SC_SCALE_MODE] = g->key_scale == CVQ_KEY_SCALE_HEAD ? 1u : 0u;
    s->v[CVQ_SC_F] = g->value_group_width;
    s->v[CVQ_SC_NC] = g->value_bits;
    s->v[CVQ_SC_I] = g->value_hidden;
    s->v[CVQ_SC_GROUPS] = cvq__value_groups(g);
}

/* ---- loop budget ------------------------------------------------------------------------
 * llvmpipe stops all loops of a shader invocation after 65535 iterations
 * in total and carries on with wrong results (caps.loop_budget). The
 * counts below are upper bounds of the loop iterations one invocation of
 * each kernel runs, following the kernels' own accounting (the "loop
 * budget" notes at the top of shaders/encode_keys.comp, encode_values.comp
 * and attend.comp); the encoders also report a cut-short run through
 * status bit 2, so an estimate that is too low fails loudly, never
 * silently. 10% of the budget is kept free. */

static size_t cdiv(size_t a, size_t b) { return (a + b - 1) / b; }

static size_t loops_encode_keys(const cvq_geometry *g, size_t wg) {
    const size_t H = g->n_kv_heads, D = g->head_dim, P = D / 2, R = g->key_stages, span = H * D;
    /* input checks, the token's sum of squares (thread 0, 16 per step) */
    size_t n = cdiv(span, wg) + span / 16 + 24;
    /* per stage: dot products (8 pairs per step), the 4096-way scan (8 per
     * step), the residual update, barriers' bookkeeping */
    const size_t stage = cdiv(64, wg) * (P / 8 + P % 8 + 2) + cdiv(4096, 8 * wg) + 8 + cdiv(P, wg) + 2;
    /* per head: head-mode sum of squares, x = k * inv, the stages, one
     * division and one square root (25 steps each) */
    n += H * (D / 16 + 16 + cdiv(D, wg) + R * (stage + 1) + 60);
    return n + 100;
}

static size_t loops_encode_values(const cvq_geometry *g, size_t wg) {
    const size_t F = g->value_group_width, I = g->value_hidden, NC = g->value_bits;
    return F / 2 + 40 + cdiv(I, wg) * (F / 8 + 9 + 50) + cdiv(2 * NC, wg) * (I / 8 + 9) +
           cdiv(F, wg) * (NC / 8 + 9) + 2 * cdiv(F, wg) + cdiv(NC / 2, wg) + 150;
}

static size_t loops_attend(const cvq_geometry *g, size_t wg, size_t n_sink, size_t n_comp, size_t n_win) {
    /* The bound stated in shaders/attend.comp's header comment. */
    const size_t D = g->head_dim, P = D / 2, NC = g->value_bits, n_tok = n_sink + n_comp + n_win;
    const size_t nch = cdiv(NC, 32);
    size_t slices = wg / nch;
    if (n_comp / NC < slices) slices = n_comp / NC;
    if (slices < 1) slices = 1;
    return cdiv(n_tok, wg) * (P / 2 + 4) + cdiv(n_comp, 4 * slices) * cdiv(nch, wg) + slices * cdiv(NC, wg) +
           cdiv(D, wg) * (n_sink + n_win + NC / 8) + wg / 8 + 200;
}

/* Loop counts of an op instance (the kernels it runs) at workgroup size
 * wg; for attend, n_sink / n_win unknown (supports) count as n_tok. */
typedef struct {
    cvq_op op;
    const cvq_geometry *g;
    size_t n_sink, n_comp, n_win;
} loop_case;

static size_t loops_of(const loop_case *c, size_t wg) {
    switch (c->op) {
    case CVQ_OP_ENCODE_KEYS: return loops_encode_keys(c->g, wg);
    case CVQ_OP_ENCODE_VALUES: return loops_encode_values(c->g, wg);
    default: return loops_attend(c->g, wg, c->n_sink, c->n_comp, c->n_win);
    }
}

/* The workgroup size for an op instance: CVQ_VK_WG, or on a device with a
 * loop budget the smallest power of two that keeps the kernel inside it;
 * 0 when none does (*need: the count at the largest size). */
static uint32_t choose_wg(const cvq_vk *vk, const loop_case *c, size_t *need) {
    *need = 0;
    const uint32_t budget = vk->caps.loop_budget;
    if (!budget) return CVQ_VK_WG;
    const VkPhysicalDeviceLimits *L = &vk->caps.props.limits;
    uint32_t most = CVQ_VK_WG_MAX;
    if (L->maxComputeWorkGroupInvocations < most) most = L->maxComputeWorkGroupInvocations;
    if (L->maxComputeWorkGroupSize[0] < most) most = L->maxComputeWorkGroupSize[0];
    for (uint32_t wg = CVQ_VK_WG; wg <= most; wg *= 2) {
        *need = loops_of(c, wg);
        if (*need <= (size_t)budget / 10 * 9) return wg;
    }
    return 0;
}

static cvq_status over_budget(cvq_vk *vk, const char *op, size_t need) {
    return CVQ_FAIL(vk->ctx, CVQ_ERR_UNSUPPORTED,
                    "vulkan %s: this geometry needs about %zu loop iterations per shader invocation even "
                    "at the largest workgroup size, and device %u (%s) stops loops after %u (llvmpipe's "
                    "loop limit)", op, need, vk->index, vk->caps.props.deviceName, vk->caps.loop_budget);
}

/* The pack kernels depend on nothing but their local size: one pipeline
 * each, whatever the geometry. */
static void pack_spec(cvq_vk_spec *s) {
    memset(s, 0, sizeof *s);
    s->v[CVQ_SC_WG] = CVQ_VK_WG;
}

/* The per-token items of each op, in the order used by the ops below. */
/* Bytes of one token's 12-bit code record (docs/format.md). */
static size_t code_record_bytes(const cvq_geometry *g) {
    return ((size_t)g->n_kv_heads * g->key_stages * 12 + 7) / 8;
}

static size_t keys_items(const cvq_vk *vk, const cvq_geometry *g, bool packed12, per_item it[5]) {
    const size_t HR = (size_t)g->n_kv_heads * g->key_stages;
    const size_t wg_words = (size_t)vk->max_groups * CVQ_VK_WG;
    const size_t ns = cvq__key_scale_count(g);
    it[0] = (per_item){(size_t)cvq__kv_dims(g) * 4, storage_range(vk), true}; /* keys          */
    it[1] = (per_item){HR * 4, scratch_limit(vk), false};                      /* uint codes    */
    it[2] = (per_item){ns * 4, storage_range(vk), true};                       /* scales out    */
    /* codes out (uint16, or 12-bit records); the pack kernels have no base
     * index: one dispatch per chunk */
    size_t lim = storage_range(vk);
    if (wg_words * 4 < lim) lim = wg_words * 4;
    it[3] = (per_item){packed12 ? code_record_bytes(g) : HR * 2, lim, true};
    it[4] = (per_item){ns * 4, scratch_limit(vk), false};                      /* scale scratch */
    return 5;
}

static size_t values_items(const cvq_vk *vk, const cvq_geometry *g, per_item it[6]) {
    const size_t G = cvq__value_groups(g), F = g->value_group_width, I = g->value_hidden;
    const size_t Nc = g->value_bits;
    const size_t wg_words = (size_t)vk->max_groups * CVQ_VK_WG;
    it[0] = (per_item){(size_t)cvq__kv_dims(g) * 4, storage_range(vk), true}; /* values        */
    it[1] = (per_item){G * (F + I + 2 * Nc) * 4, scratch_limit(vk), false};   /* work space    */
    it[2] = (per_item){G * Nc * 4, scratch_limit(vk), false};                 /* 0/1 bits      */
    it[3] = (per_item){G * 4, storage_range(vk), true};                       /* sigma         */
    size_t lim = storage_range(vk);
    if (wg_words * 4 < lim) lim = wg_words * 4;
    it[4] = (per_item){G * Nc / 8, lim, true};                                /* packed bits   */
    it[5] = (per_item){G * 4, scratch_limit(vk), false};                      /* sigma scratch */
    return 6;
}

static size_t attend_items(const cvq_vk *vk, const cvq_geometry *g, size_t n_tok, per_item it[4]) {
    const size_t qd = (size_t)g->n_q_heads * g->head_dim * 4;
    it[0] = (per_item){qd, storage_range(vk), true};                          /* q             */
    it[1] = (per_item){4, storage_range(vk), true};                           /* q_pos         */
    it[2] = (per_item){qd, storage_range(vk), true};                          /* out           */
    it[3] = (per_item){(size_t)g->n_q_heads * (n_tok + g->value_bits) * 4, scratch_limit(vk), false};
    return 4;
}

static cvq_status too_large(cvq_vk *vk, const char *op, size_t n) {
    return CVQ_FAIL(vk->ctx, CVQ_ERR_UNSUPPORTED,
                    "vulkan %s of %zu items: one item's data exceeds what device %u (%s) can bind "
                    "(maxStorageBufferRange %u bytes)", op, n, vk->index, vk->caps.props.deviceName,
                    vk->caps.props.limits.maxStorageBufferRange);
}

/* Per-layer tables must each fit one binding. */
static cvq_status check_tables(cvq_vk *vk, const cvq_geometry *g) {
    const size_t H = g->n_kv_heads, R = g->key_stages, P = g->head_dim / 2;
    const size_t G = cvq__value_groups(g), F = g->value_group_width, I = g->value_hidden;
    const size_t Nc = g->value_bits;
    const size_t sizes[] = {H * R * 64 * P * 2 * 4, H * R * 4096 * 4, G * I * F * 4, G * 2 * Nc * I * 4,
                            G * Nc * F * 4};
    const char *names[] = {"key sub-codes", "key G tables", "value W1", "value W2", "value E"};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
        if (sizes[i] > storage_range(vk))
            return CVQ_FAIL(vk->ctx, CVQ_ERR_UNSUPPORTED,
                            "the %s of this geometry take %zu bytes, more than device %u (%s) can bind "
                            "(maxStorageBufferRange %u)", names[i], sizes[i], vk->index,
                            vk->caps.props.deviceName, vk->caps.props.limits.maxStorageBufferRange);
    if (G > vk->caps.props.limits.maxComputeWorkGroupCount[1])
        return CVQ_FAIL(vk->ctx, CVQ_ERR_UNSUPPORTED, "%zu value groups exceed maxComputeWorkGroupCount[1]", G);
    return CVQ_OK;
}

cvq_status cvq_vk_op_supported(cvq_vk *vk, const cvq_op_desc *d) {
    cvq_status st;
    const cvq_geometry *g = d->g;
    per_item it[8];
    size_t n_it;
    switch (d->op) {
    case CVQ_OP_ENCODE_KEYS:
    case CVQ_OP_ENCODE_VALUES: {
        /* The two encoders: their kernel, then the packing kernel. */
        const bool keys = d->op == CVQ_OP_ENCODE_KEYS;
        const char *name = keys ? "encode_keys" : "encode_values";
        if ((st = cvq_vk_kernel_check(vk, keys ? CVQ_VK_K_ENCODE_KEYS : CVQ_VK_K_ENCODE_VALUES))) return st;
        if ((st = cvq_vk_kernel_check(vk, keys ? CVQ_VK_K_PACK_U16 : CVQ_VK_K_PACK_BITS))) return st;
        if ((st = check_tables(vk, g))) return st;
        n_it = keys ? keys_items(vk, g, false, it) : values_items(vk, g, it);
        if (d->n_tokens && plan_chunk(vk, d->n_tokens, it, n_it) == 0) return too_large(vk, name, d->n_tokens);
        loop_case lc = {d->op, g, 0, 0, 0};
        size_t need;
        if (!choose_wg(vk, &lc, &need)) return over_budget(vk, name, need);
        return CVQ_OK;
    }
    case CVQ_OP_ATTEND: {
        if ((st = cvq_vk_kernel_check(vk, CVQ_VK_K_ATTEND))) return st;
        if ((st = check_tables(vk, g))) return st;
        cvq_record_layout rl;
        if ((st = cvq_record_layout_of(g, &rl))) return st;
        /* The compressed arrays hold at most n_tokens records; full-precision
         * segments are checked by the op itself (their split is not known
         * here). */
        const size_t n = d->n_tokens;
        const size_t per[] = {rl.key_code_bytes, rl.key_scale_count * 4u, rl.value_bit_bytes,
                              rl.value_scale_count * 4u, 4};
        for (size_t i = 0; i < 5; i++)
            if (n && per[i] > storage_range(vk) / n)
                return CVQ_FAIL(vk->ctx, CVQ_ERR_UNSUPPORTED,
                                "a cache of %zu compressed tokens exceeds what device %u (%s) can bind "
                                "(maxStorageBufferRange %u bytes)", n, vk->index, vk->caps.props.deviceName,
                                vk->caps.props.limits.maxStorageBufferRange);
        if (n > UINT32_MAX / 2)
            return CVQ_FAIL(vk->ctx, CVQ_ERR_UNSUPPORTED, "vulkan attend over %zu tokens", n);
        n_it = attend_items(vk, g, n, it);
        if (d->n_q && plan_chunk(vk, d->n_q, it, n_it) == 0) return too_large(vk, "attend", d->n_q);
        {
            /* the split of n over the segments is not known here: count
             * them all as compressed (the op checks the real split) */
            loop_case lc = {d->op, g, 0, n, 0};
            size_t need;
            if (!choose_wg(vk, &lc, &need)) return over_budget(vk, "attend", need);
        }
        return CVQ_OK;
    }
    default: break;
    }
    return CVQ_FAIL(vk->ctx, CVQ_ERR_UNSUPPORTED, "unknown op %d", (int)d->op);
}

/* Push-constant blocks (shaders/iface.h). */
typedef struct ek_push {
    uint32_t n_tokens, token_base, check_only;
} ek_push;

typedef struct ev_push {
    uint32_t n_tokens, token_base;
    float inv_F;
    uint32_t check_only;
} ev_push;

typedef struct pk_push {
    uint32_t count, scale_count, per_token, rec_bytes;
} pk_push;

typedef struct at_push {
    uint32_t n_q, n_sink, n_comp, n_win, q_rotated;
    float logit_scale;
    uint32_t key_code_bytes, vbit_bytes, qh_base;
} at_push;

/* ---- recording helpers ---------------------------------------------------------------------- */

/* A slice of a view: `first` items of `stride` bytes in. */
static cvq_view slice(cvq_view v, size_t first, size_t stride) {
    v.offset += first * stride;
    return v;
}

/* Makes room for `sets` more descriptor sets: submitting what is recorded
 * so far when the pool is short, or, recording into an engine's command
 * buffer (which runs later), retiring the full pool for a fresh one. */
static cvq_status need_sets(cvq_vk *vk, uint32_t sets) {
    if (vk->cur == vk->rec && vk->rec) {
        if (vk->rec_pool && vk->rec_sets_used + sets <= CVQ_VK_MAX_SETS) return CVQ_OK;
        cvq_status st = cvq_vk_retire_reserve(vk, 1);
        if (st) return st;
        VkDescriptorPool np;
        if ((st = cvq_vk_pool_create(vk, &np))) return st;
        if (vk->rec_pool) {
            cvq_vk_retired *r = &vk->retired[vk->n_retired++];
            memset(r, 0, sizeof *r);
            r->pool = vk->rec_pool;
        }
        vk->rec_pool = np;
        vk->rec_sets_used = 0;
        return CVQ_OK;
    }
    if (vk->sets_used + sets <= CVQ_VK_MAX_SETS) return CVQ_OK;
    cvq_vk_cmd_barrier(vk);
    cvq_status st = cvq_vk_cmd_submit_wait(vk);
    if (!st) st = cvq_vk_cmd_begin(vk);
    if (!st) cvq_vk_cmd_barrier(vk);
    return st;
}

/* Dispatches `count` workgroups along x in pieces of at most
 * maxComputeWorkGroupCount[0], pushing the piece's first index at byte
 * `base_at` of the push block before each piece. */
static void dispatch_split(cvq_vk *vk, cvq_vk_kernel_id k, void *push, uint32_t push_bytes, size_t base_at,
                           size_t count, uint32_t y) {
    const size_t max_x = vk->max_groups;
    for (size_t first = 0; first < count; first += max_x) {
        size_t m = count - first < max_x ? count - first : max_x;
        uint32_t base = (uint32_t)first;
        memcpy((char *)push + base_at, &base, 4);
        cvq_vk_cmd_push(vk, k, push, push_bytes);
        vk->fn.CmdDispatch(vk->cur, (uint32_t)m, y, 1);
    }
}

static cvq_status range_of(cvq_vk *vk, cvq_view v, cvq_vk_range *r) { return cvq_vk_range_of(vk, v, r); }

static cvq_status range_buf(cvq_vk *vk, const cvq_buffer *b, cvq_vk_range *r) {
    return cvq_vk_range_of_buf(vk, b, r);
}

/* The status word of a call: slot `slot` of the status buffer. */
static void range_status(cvq_vk *vk, uint32_t slot, cvq_vk_range *r) {
    r->buf = vk->status.buf;
    r->offset = (VkDeviceSize)slot * vk->slot_stride;
    r->range = 4;
}

/* Zeroes the call's status word on the device, at the start of the call's
 * commands (so that a command buffer submitted again starts clean), and
 * makes the zero visible to the kernels. */
static void status_clear(cvq_vk *vk, uint32_t slot) {
    vk->fn.CmdFillBuffer(vk->cur, vk->status.buf, (VkDeviceSize)slot * vk->slot_stride, 4, 0);
    cvq_vk_cmd_barrier(vk);
}

static uint32_t status_word(const cvq_vk *vk, uint32_t slot) {
    uint32_t s;
    memcpy(&s, (const char *)vk->status.map + (size_t)slot * vk->slot_stride, 4);
    return s;
}

/* The status of a finished call from its word (also used by
 * cvq_vulkan_collect_status through cvq_vk_status_of_word). */
static cvq_status status_check(cvq_vk *vk, uint32_t s, const char *op) {
    if (s == 0) return CVQ_OK;
    if (s & 4u)
        return CVQ_FAIL(vk->ctx, CVQ_ERR_DEVICE,
                        "vulkan %s: device %u (%s) stopped the kernel's loops early (status 0x%x: a "
                        "driver loop limit the backend's estimate missed); nothing was written", op,
                        vk->index, vk->caps.props.deviceName, s);
    if (s & 1u)
        return CVQ_FAIL(vk->ctx, CVQ_ERR_NONFINITE_INPUT,
                        "vulkan %s: the kernel found NaN or Inf in its input; nothing was written", op);
    return CVQ_FAIL(vk->ctx, CVQ_ERR_INPUT_RANGE,
                    "vulkan %s: a sum of squares overflowed in the kernel; nothing was written", op);
}

cvq_status cvq_vk_status_of_word(cvq_vk *vk, uint32_t s, const char *what) { return status_check(vk, s, what); }

/* Pack pass of an encode chunk: `count` elements of the uint scratch `in`
 * into `out` (pack_u16: 2 a word, pack_bits: 32, pack_codes12: records of
 * rec_bytes per `per_token` codes), and the chunk's `scale_count` scales
 * (or sigma) from scratch `sin` to `sout`, all only if the call's status
 * word (slot) is 0. */
static cvq_status record_pack(cvq_vk *vk, cvq_vk_kernel_id k, const cvq_buffer *in, cvq_view out, size_t count,
                              size_t words, uint32_t slot, const cvq_buffer *sin, cvq_view sout,
                              size_t scale_count, size_t per_token, size_t rec_bytes) {
    cvq_vk_spec spec;
    pack_spec(&spec);
    VkPipeline p;
    cvq_status st = cvq_vk_pipeline(vk, k, &spec, &p);
    if (st) return st;
    cvq_vk_range r[5];
    if ((st = range_buf(vk, in, &r[CVQ_PK_IN]))) return st;
    if ((st = range_of(vk, out, &r[CVQ_PK_OUT]))) return st;
    range_status(vk, slot, &r[CVQ_PK_STATUS]);
    if ((st = range_buf(vk, sin, &r[CVQ_PK_SIN]))) return st;
    if ((st = range_of(vk, sout, &r[CVQ_PK_SOUT]))) return st;
    VkDescriptorSet set;
    if ((st = cvq_vk_descriptors(vk, k, r, 5, &set))) return st;
    cvq_vk_cmd_bind(vk, k, p, set);
    pk_push push = {(uint32_t)count, (uint32_t)scale_count, (uint32_t)per_token, (uint32_t)rec_bytes};
    cvq_vk_cmd_push(vk, k, &push, sizeof push);
    size_t groups = (words + CVQ_VK_WG - 1) / CVQ_VK_WG;
    if (groups == 0) groups = 1; /* the scales still need copying */
    vk->fn.CmdDispatch(vk->cur, (uint32_t)groups, 1, 1);
    return CVQ_OK;
}

/* Starts an op's commands: the context's command buffer (begun), or the
 * engine's (vk->rec). Then a barrier: earlier compute/transfer writes on
 * the queue become visible to this op. */
static cvq_status op_begin(cvq_vk *vk, const cvq_vk_run *run) {
    if (run->record) {
        vk->cur = vk->rec;
        vk->pending = true;
    } else {
        cvq_status st = cvq_vk_cmd_begin(vk);
        if (st) return st;
    }
    cvq_vk_cmd_barrier(vk);
    return CVQ_OK;
}

/* Ends an op: its writes visible to later compute/transfer work and to
 * the host, then (not recording) submit and wait. */
static cvq_status op_end(cvq_vk *vk, const cvq_vk_run *run) {
    cvq_vk_cmd_barrier(vk);
    cvq_vk_cmd_barrier_host(vk);
    if (run->record) {
        vk->cur = vk->cmd;
        return CVQ_OK;
    }
    return cvq_vk_cmd_submit_wait(vk);
}

/* An op that failed while recording: immediate work is abandoned (the next
 * cmd_begin resets it); commands already recorded into an engine's command
 * buffer cannot be taken back, so the failure is final for that buffer
 * (documented: the engine must not submit it). */
static cvq_status op_abort(cvq_vk *vk, cvq_status st) {
    vk->cur = vk->cmd;
    return st;
}

/* ---- encode_keys ---------------------------------------------------------------------------- */

static const cvq_vk_run k_immediate = {false, false, false, 0};

cvq_status cvq_vk_encode_keys(cvq_context *ctx, const cvq_encode_keys_args *a) {
    return cvq_vk_encode_keys_run(ctx->be_state, a, &k_immediate);
}

cvq_status cvq_vk_encode_keys_run(cvq_vk *vk, const cvq_encode_keys_args *a, const cvq_vk_run *run) {
    const cvq_geometry *g = a->lv->g;
    const size_t n = a->n;
    if (n == 0) return CVQ_OK;
    cvq_op_desc d = {CVQ_OP_ENCODE_KEYS, g, n, 0};
    cvq_status st = cvq_vk_op_supported(vk, &d);
    if (st) return st;
    if (run->packed12 && (st = cvq_vk_kernel_check(vk, CVQ_VK_K_PACK_CODES12))) return st;
    per_item it[5];
    size_t n_it = keys_items(vk, g, run->packed12, it);
    const size_t chunk = plan_chunk(vk, n, it, n_it);
    if (chunk == 0) return too_large(vk, "encode_keys", n);
    const size_t HR = (size_t)g->n_kv_heads * g->key_stages;
    const size_t ns = cvq__key_scale_count(g);
    const size_t kcb = code_record_bytes(g);

    const loop_case lc = {CVQ_OP_ENCODE_KEYS, g, 0, 0, 0};
    size_t need;
    const uint32_t wg = choose_wg(vk, &lc, &need); /* nonzero: checked by supported() */

    if ((run->record || vk->pending) && (st = cvq_vk_retire_reserve(vk, 2 * CVQ_VK_T_COUNT + 8))) return st;
    const cvq_vk_tables *tb;
    if ((st = cvq_vk_tables_get(vk, a->cb, a->lv, CVQ_VK_USES_KEYS, &tb))) return st;
    if ((st = cvq_vk_scratch_reserve(vk, &vk->s_codes, chunk * HR * 4))) return st;
    if ((st = cvq_vk_scratch_reserve(vk, &vk->s_scales, chunk * ns * 4))) return st;
    if ((st = cvq_vk_status_buffer(vk))) return st;
    cvq_vk_spec spec;
    spec_of(g, wg, &spec);
    VkPipeline pe;
    if ((st = cvq_vk_pipeline(vk, CVQ_VK_K_ENCODE_KEYS, &spec, &pe))) return st;
    const cvq_vk_kernel_id pk = run->packed12 ? CVQ_VK_K_PACK_CODES12 : CVQ_VK_K_PACK_U16;
    VkPipeline pp;
    cvq_vk_spec spec_pack;
    pack_spec(&spec_pack);
    if ((st = cvq_vk_pipeline(vk, pk, &spec_pack, &pp))) return st;

    if ((st = op_begin(vk, run))) return op_abort(vk, st);
    status_clear(vk, run->slot);
    /* The encoder's bindings of chunk t0 (m tokens). */
#define EK_RANGES(t0)                                                                                  \
    do {                                                                                               \
        st = range_of(vk, slice(a->keys, (t0), it[0].stride), &r[CVQ_EK_KEYS]);                       \
        if (!st) st = range_buf(vk, &tb->t[CVQ_VK_T_KEY_W], &r[CVQ_EK_W]);                          \
        if (!st) st = range_buf(vk, &tb->t[CVQ_VK_T_KEY_N], &r[CVQ_EK_N]);                          \
        if (!st) st = range_buf(vk, &tb->t[CVQ_VK_T_KEY_G], &r[CVQ_EK_G]);                          \
        if (!st) st = range_buf(vk, &vk->s_codes.b, &r[CVQ_EK_CODES]);                              \
        if (!st) st = range_buf(vk, &vk->s_scales.b, &r[CVQ_EK_SCALES]);                            \
        range_status(vk, run->slot, &r[CVQ_EK_STATUS]);                                              \
    } while (0)
    if (run->check_pass && chunk < n) {
        /* Inputs the host has not seen, in several chunks: check them all
         * before the first chunk's outputs are written. */
        for (size_t t0 = 0; t0 < n && !st; t0 += chunk) {
            const size_t m = n - t0 < chunk ? n - t0 : chunk;
            if ((st = need_sets(vk, 1))) break;
            cvq_vk_range r[7];
            EK_RANGES(t0);
            VkDescriptorSet set;
            if (!st) st = cvq_vk_descriptors(vk, CVQ_VK_K_ENCODE_KEYS, r, 7, &set);
            if (st) break;
            cvq_vk_cmd_bind(vk, CVQ_VK_K_ENCODE_KEYS, pe, set);
            ek_push push = {(uint32_t)m, 0, 1};
            dispatch_split(vk, CVQ_VK_K_ENCODE_KEYS, &push, sizeof push, offsetof(ek_push, token_base), m, 1);
        }
        cvq_vk_cmd_barrier(vk);
    }
    for (size_t t0 = 0; t0 < n && !st; t0 += chunk) {
        const size_t m = n - t0 < chunk ? n - t0 : chunk;
        if ((st = need_sets(vk, 2))) break;
        cvq_vk_range r[7];
        EK_RANGES(t0);
        VkDescriptorSet set;
        if (!st) st = cvq_vk_descriptors(vk, CVQ_VK_K_ENCODE_KEYS, r, 7, &set);
        if (st) break;
        cvq_vk_cmd_bind(vk, CVQ_VK_K_ENCODE_KEYS, pe, set);
        ek_push push = {(uint32_t)m, 0, 0};
        dispatch_split(vk, CVQ_VK_K_ENCODE_KEYS, &push, sizeof push, offsetof(ek_push, token_base), m, 1);
        cvq_vk_cmd_barrier(vk);
        const size_t words = run->packed12 ? (m * kcb + 3) / 4 : (m * HR + 1) / 2;
        st = record_pack(vk, pk, &vk->s_codes.b, slice(a->codes, t0, it[3].stride), m * HR, words, run->slot,
                         &vk->s_scales.b, slice(a->scales, t0, it[2].stride), m * ns, HR, kcb);
        cvq_vk_cmd_barrier(vk); /* the next chunk reuses the scratch */
    }
#undef EK_RANGES
    if (st) return op_abort(vk, st);
    if ((st = op_end(vk, run))) return st;
    if (run->record) return CVQ_OK;
    return status_check(vk, status_word(vk, run->slot), "encode_keys");
}

/* ---- encode_values ------------------------------------------------------------------------- */

cvq_status cvq_vk_encode_values(cvq_context *ctx, const cvq_encode_values_args *a) {
    return cvq_vk_encode_values_run(ctx->be_state, a, &k_immediate);
}

cvq_status cvq_vk_encode_values_run(cvq_vk *vk, const cvq_encode_values_args *a, const cvq_vk_run *run) {
    const cvq_geometry *g = a->lv->g;
    const size_t n = a->n;
    if (n == 0) return CVQ_OK;
    cvq_op_desc d = {CVQ_OP_ENCODE_VALUES, g, n, 0};
    cvq_status st = cvq_vk_op_supported(vk, &d);
    if (st) return st;
    per_item it[6];
    size_t n_it = values_items(vk, g, it);
    const size_t chunk = plan_chunk(vk, n, it, n_it);
    if (chunk == 0) return too_large(vk, "encode_values", n);
    const uint32_t G = cvq__value_groups(g);

    const loop_case lc = {CVQ_OP_ENCODE_VALUES, g, 0, 0, 0};
    size_t need;
    const uint32_t wg = choose_wg(vk, &lc, &need); /* nonzero: checked by supported() */

    if ((run->record || vk->pending) && (st = cvq_vk_retire_reserve(vk, 2 * CVQ_VK_T_COUNT + 8))) return st;
    const cvq_vk_tables *tb;
    if ((st = cvq_vk_tables_get(vk, a->cb, a->lv, CVQ_VK_USES_VALUES, &tb))) return st;
    if ((st = cvq_vk_scratch_reserve(vk, &vk->s_vscratch, chunk * it[1].stride))) return st;
    if ((st = cvq_vk_scratch_reserve(vk, &vk->s_bits, chunk * it[2].stride))) return st;
    if ((st = cvq_vk_scratch_reserve(vk, &vk->s_scales, chunk * it[5].stride))) return st;
    if ((st = cvq_vk_status_buffer(vk))) return st;
    cvq_vk_spec spec, spec_pack;
    spec_of(g, wg, &spec);
    pack_spec(&spec_pack);
    VkPipeline pe, pp;
    if ((st = cvq_vk_pipeline(vk, CVQ_VK_K_ENCODE_VALUES, &spec, &pe))) return st;
    if ((st = cvq_vk_pipeline(vk, CVQ_VK_K_PACK_BITS, &spec_pack, &pp))) return st;

    static const cvq_vk_tab tabs[] = {CVQ_VK_T_INV_LS, CVQ_VK_T_LN_W, CVQ_VK_T_LN_B, CVQ_VK_T_W1,
                                      CVQ_VK_T_B1, CVQ_VK_T_W2, CVQ_VK_T_B2, CVQ_VK_T_E};
    if ((st = op_begin(vk, run))) return op_abort(vk, st);
    status_clear(vk, run->slot);
#define EV_RANGES(t0)                                                                                  \
    do {                                                                                               \
        st = range_of(vk, slice(a->values, (t0), it[0].stride), &r[CVQ_EV_VALUES]);                   \
        for (int i_ = 0; i_ < 8 && !st; i_++) st = range_buf(vk, &tb->t[tabs[i_]], &r[CVQ_EV_INV_LS + i_]); \
        if (!st) st = range_buf(vk, &vk->s_vscratch.b, &r[CVQ_EV_SCRATCH]);                          \
        if (!st) st = range_buf(vk, &vk->s_bits.b, &r[CVQ_EV_BITS]);                                 \
        if (!st) st = range_buf(vk, &vk->s_scales.b, &r[CVQ_EV_SIGMA]);                              \
        range_status(vk, run->slot, &r[CVQ_EV_STATUS]);                                              \
    } while (0)
    if (run->check_pass && chunk < n) {
        for (size_t t0 = 0; t0 < n && !st; t0 += chunk) {
            const size_t m = n - t0 < chunk ? n - t0 : chunk;
            if ((st = need_sets(vk, 1))) break;
            cvq_vk_range r[13];
            EV_RANGES(t0);
            VkDescriptorSet set;
            if (!st) st = cvq_vk_descriptors(vk, CVQ_VK_K_ENCODE_VALUES, r, 13, &set);
            if (st) break;
            cvq_vk_cmd_bind(vk, CVQ_VK_K_ENCODE_VALUES, pe, set);
            ev_push push = {(uint32_t)m, 0, a->lv->inv_F, 1};
            dispatch_split(vk, CVQ_VK_K_ENCODE_VALUES, &push, sizeof push, offsetof(ev_push, token_base), m, G);
        }
        cvq_vk_cmd_barrier(vk);
    }
    for (size_t t0 = 0; t0 < n && !st; t0 += chunk) {
        const size_t m = n - t0 < chunk ? n - t0 : chunk;
        if ((st = need_sets(vk, 2))) break;
        cvq_vk_range r[13];
        EV_RANGES(t0);
        VkDescriptorSet set;
        if (!st) st = cvq_vk_descriptors(vk, CVQ_VK_K_ENCODE_VALUES, r, 13, &set);
        if (st) break;
        cvq_vk_cmd_bind(vk, CVQ_VK_K_ENCODE_VALUES, pe, set);
        ev_push push = {(uint32_t)m, 0, a->lv->inv_F, 0};
        dispatch_split(vk, CVQ_VK_K_ENCODE_VALUES, &push, sizeof push, offsetof(ev_push, token_base), m, G);
        cvq_vk_cmd_barrier(vk);
        const size_t count = m * G * g->value_bits;
        st = record_pack(vk, CVQ_VK_K_PACK_BITS, &vk->s_bits.b, slice(a->bits, t0, it[4].stride), count,
                         (count + 31) / 32, run->slot, &vk->s_scales.b, slice(a->sigma, t0, it[3].stride),
                         m * G, 0, 0);
        cvq_vk_cmd_barrier(vk);
    }
#undef EV_RANGES
    if (st) return op_abort(vk, st);
    if ((st = op_end(vk, run))) return st;
    if (run->record) return CVQ_OK;
    return status_check(vk, status_word(vk, run->slot), "encode_values");
}

/* ---- attend ----------------------------------------------------------------------------------- */

cvq_status cvq_vk_attend(cvq_context *ctx, const cvq_attend_args *a) {
    return cvq_vk_attend_run(ctx->be_state, a, &k_immediate);
}

cvq_status cvq_vk_attend_run(cvq_vk *vk, const cvq_attend_args *a, const cvq_vk_run *run) {
    cvq_context *ctx = vk->ctx;
    const cvq_layer_view *lv = a->lv;
    const cvq_geometry *g = lv->g;
    const size_t n_q = a->n_q;
    if (n_q == 0) return CVQ_OK;
    const size_t n_tok = a->n_sink + a->n_comp + a->n_win;
    cvq_op_desc d = {CVQ_OP_ATTEND, g, n_tok, n_q};
    cvq_status st = cvq_vk_op_supported(vk, &d);
    if (st) return st;
    const size_t kvb = (size_t)cvq__kv_dims(g) * 4;
    if (a->n_sink > storage_range(vk) / kvb || a->n_win > storage_range(vk) / kvb)
        return CVQ_FAIL(ctx, CVQ_ERR_UNSUPPORTED,
                        "vulkan attend: %zu sink / %zu window tokens exceed maxStorageBufferRange (%u bytes)",
                        a->n_sink, a->n_win, vk->caps.props.limits.maxStorageBufferRange);
    per_item it[4];
    size_t n_it = attend_items(vk, g, n_tok, it);
    const size_t chunk = plan_chunk(vk, n_q, it, n_it);
    if (chunk == 0) return too_large(vk, "attend", n_q);
    cvq_record_layout rl;
    if ((st = cvq_record_layout_of(g, &rl))) return st;

    const loop_case lc = {CVQ_OP_ATTEND, g, a->n_sink, a->n_comp, a->n_win};
    size_t need;
    const uint32_t wg = choose_wg(vk, &lc, &need); /* the exact split: at most what supported() saw */
    if (!wg) return over_budget(vk, "attend", need);

    if ((run->record || vk->pending) && (st = cvq_vk_retire_reserve(vk, 2 * CVQ_VK_T_COUNT + 8))) return st;
    const cvq_vk_tables *tb;
    if ((st = cvq_vk_tables_get(vk, a->cb, lv, CVQ_VK_USES_ATTEND, &tb))) return st;
    if ((st = cvq_vk_scratch_reserve(vk, &vk->s_attend, chunk * it[3].stride))) return st;
    cvq_vk_spec spec;
    spec_of(g, wg, &spec);
    VkPipeline pe;
    if ((st = cvq_vk_pipeline(vk, CVQ_VK_K_ATTEND, &spec, &pe))) return st;

    if ((st = op_begin(vk, run))) return op_abort(vk, st);
    for (size_t q0 = 0; q0 < n_q && !st; q0 += chunk) {
        const size_t m = n_q - q0 < chunk ? n_q - q0 : chunk;
        if ((st = need_sets(vk, 1))) break;
        cvq_vk_range r[19];
        st = range_of(vk, slice(a->q, q0, it[0].stride), &r[CVQ_AT_Q]);
        if (!st) st = range_of(vk, slice(a->q_pos, q0, it[1].stride), &r[CVQ_AT_QPOS]);
        if (!st) st = range_of(vk, slice(a->out, q0, it[2].stride), &r[CVQ_AT_OUT]);
        const cvq_view seg[] = {a->sink_k, a->sink_v, a->sink_pos, a->comp_codes, a->comp_kscale,
                                a->comp_vbits, a->comp_vsigma, a->comp_pos, a->win_k, a->win_v, a->win_pos};
        const size_t seg_n[] = {a->n_sink, a->n_sink, a->n_sink, a->n_comp, a->n_comp, a->n_comp,
                                a->n_comp, a->n_comp, a->n_win, a->n_win, a->n_win};
        for (int i = 0; i < 11 && !st; i++) {
            cvq_view v = seg[i];
            if (seg_n[i] == 0) v.buf = NULL; /* empty segment: the dummy buffer */
            st = range_of(vk, v, &r[CVQ_AT_SINK_K + i]);
        }
        if (!st) st = range_buf(vk, &tb->t[CVQ_VK_T_KEY_W], &r[CVQ_AT_KEY_W]);
        if (!st) st = range_buf(vk, &tb->t[CVQ_VK_T_ROPE_T], &r[CVQ_AT_ROPE_T]);
        if (!st) st = range_buf(vk, &tb->t[CVQ_VK_T_E], &r[CVQ_AT_E]);
        if (!st) st = range_buf(vk, &tb->t[CVQ_VK_T_LS_EPS], &r[CVQ_AT_LS_EPS]);
        if (!st) st = range_buf(vk, &vk->s_attend.b, &r[CVQ_AT_SCRATCH]);
        VkDescriptorSet set;
        if (!st) st = cvq_vk_descriptors(vk, CVQ_VK_K_ATTEND, r, 19, &set);
        if (st) break;
        cvq_vk_cmd_bind(vk, CVQ_VK_K_ATTEND, pe, set);
        at_push push = {(uint32_t)m, (uint32_t)a->n_sink, (uint32_t)a->n_comp, (uint32_t)a->n_win,
                  a->q_rotated ? 1u : 0u, lv->logit_scale, rl.key_code_bytes, rl.value_bit_bytes, 0};
        dispatch_split(vk, CVQ_VK_K_ATTEND, &push, sizeof push, offsetof(at_push, qh_base),
                       m * g->n_q_heads, 1);
        cvq_vk_cmd_barrier(vk); /* the next chunk reuses the scratch */
    }
    if (st) return op_abort(vk, st);
    return op_end(vk, run);
}
