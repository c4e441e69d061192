/*
 * Engine interop (include/commvq_vulkan.h): a context on an engine's
 * VkDevice, engine buffers as regions, recording into the engine's command
 * buffer, and the deferred status of the device-side input checks.
 *
 * Regions become cvq_view's of a temporary cvq_buffer whose cvq_vk_buf
 * names the engine's VkBuffer (no memory of ours, never freed), so the ops
 * of vk_ops.c run on them unchanged: each binding covers the region from
 * the (chunk's) offset to the region's end.
 *
 * Recording: while vk->rec is set, the cvq_vulkan_* calls record into it
 * (vk_ops.c op_begin/op_end) with a status slot each (1, 2, ...), take
 * their descriptor sets from vk->rec_pool, and anything they may still use
 * that would be freed (a scratch buffer outgrown, stale tables, a full
 * pool) is retired until cvq_vulkan_collect_status.
 */
#define _POSIX_C_SOURCE 200809L
#include "vk_internal.h"

#include "context_ext.h"

#include <stdio.h>
#include <string.h>

/* ---- context -------------------------------------------------------------------------- */

static cvq_status ext_init(cvq_context *ctx, void *arg, void **state) {
    const cvq_vulkan_device_desc *d = arg;
    *state = NULL;
    cvq_vk *vk = cvq__calloc(&ctx->alloc, 1, sizeof *vk);
    if (!vk) return CVQ_FAIL(ctx, CVQ_ERR_OUT_OF_MEMORY, "cannot allocate the Vulkan context state");
    vk->ctx = ctx;
    cvq_status st = cvq_vk_device_adopt(vk, d);
    if (!st) st = cvq_vk_state_setup(vk);
    if (st) {
        cvq_vk_shutdown(vk);
        return st;
    }
    cvq_vk_device_info(&vk->ext_proc, 0, &ctx->device);
    size_t l = strlen(ctx->device.note);
    if (l + 1 < sizeof ctx->device.note)
        snprintf(ctx->device.note + l, sizeof ctx->device.note - l, "%sthe engine's device (commvq_vulkan.h)",
                 l ? "; " : "");
    *state = vk;
    return CVQ_OK;
}

cvq_status cvq_vulkan_context_create(const cvq_context_params *params, const cvq_vulkan_device_desc *dev,
                                     cvq_context **out) {
    if (!out) return CVQ_FAIL(NULL, CVQ_ERR_NULL_POINTER, "out is required");
    *out = NULL;
    if (!dev) return CVQ_FAIL(NULL, CVQ_ERR_NULL_POINTER, "dev (the engine's device description) is required");
    const char *null = !dev->instance ? "instance"
                       : !dev->physical_device ? "physical_device"
                       : !dev->device ? "device"
                       : !dev->queue ? "queue"
                       : !dev->get_instance_proc_addr ? "get_instance_proc_addr" : NULL;
    if (null) return CVQ_FAIL(NULL, CVQ_ERR_NULL_POINTER, "cvq_vulkan_device_desc.%s is NULL", null);
    if (dev->api_version && dev->api_version < VK_API_VERSION_1_2)
        return CVQ_FAIL(NULL, CVQ_ERR_NO_DEVICE, "the engine's instance is Vulkan %u.%u; the kernels need 1.2",
                        VK_API_VERSION_MAJOR(dev->api_version), VK_API_VERSION_MINOR(dev->api_version));
    return cvq__context_create_with(params, CVQ_BACKEND_VULKAN, ext_init, (void *)dev, out);
}

/* The state of a context made by cvq_vulkan_context_create, or NULL with
 * the reason recorded. */
static cvq_vk *ext_state(cvq_context *ctx, const char *what) {
    if (!ctx) {
        CVQ_FAIL(NULL, CVQ_ERR_NULL_POINTER, "%s: ctx is NULL", what);
        return NULL;
    }
    if (ctx->kind != CVQ_BACKEND_VULKAN || ctx->be != &cvq_backend_vulkan || !ctx->be_state) {
        CVQ_FAIL(ctx, CVQ_ERR_UNSUPPORTED, "%s: not a Vulkan context", what);
        return NULL;
    }
    cvq_vk *vk = ctx->be_state;
    if (!vk->external) {
        CVQ_FAIL(ctx, CVQ_ERR_UNSUPPORTED,
                 "%s: the context owns its Vulkan device; engine buffers and command buffers need a context "
                 "from cvq_vulkan_context_create", what);
        return NULL;
    }
    if (vk->lost) {
        CVQ_FAIL(ctx, CVQ_ERR_DEVICE_LOST, "%s: the Vulkan device was lost", what);
        return NULL;
    }
    return vk;
}

/* The status of ext_state's failure (it recorded one). */
static cvq_status ext_fail(cvq_context *ctx) {
    if (!ctx) return CVQ_ERR_NULL_POINTER;
    if (ctx->kind != CVQ_BACKEND_VULKAN || ctx->be != &cvq_backend_vulkan || !ctx->be_state)
        return CVQ_ERR_UNSUPPORTED;
    return ((cvq_vk *)ctx->be_state)->lost ? CVQ_ERR_DEVICE_LOST : CVQ_ERR_UNSUPPORTED;
}

cvq_status cvq_vulkan_offset_alignment(const cvq_context *ctx, VkDeviceSize *out) {
    if (!ctx || !out) return CVQ_FAIL(NULL, CVQ_ERR_NULL_POINTER, "ctx and out are required");
    if (ctx->kind != CVQ_BACKEND_VULKAN || ctx->be != &cvq_backend_vulkan || !ctx->be_state)
        return CVQ_FAIL(NULL, CVQ_ERR_UNSUPPORTED, "not a Vulkan context");
    const cvq_vk *vk = ctx->be_state;
    *out = vk->caps.props.limits.minStorageBufferOffsetAlignment;
    return CVQ_OK;
}

cvq_status cvq_vulkan_prepare(cvq_context *ctx, const cvq_codebook *cb, uint32_t layer) {
    cvq_vk *vk = ext_state(ctx, "cvq_vulkan_prepare");
    if (!vk) return ext_fail(ctx);
    cvq_layer_view lv;
    cvq_status st = cvq__check_layer(ctx, cb, layer, &lv);
    if (st) return st;
    if (vk->pending && (st = cvq_vk_retire_reserve(vk, 2 * CVQ_VK_T_COUNT + 8))) return st;
    const cvq_vk_tables *tb;
    return cvq_vk_tables_get(vk, cb, &lv, CVQ_VK_USES_KEYS | CVQ_VK_USES_VALUES | CVQ_VK_USES_ATTEND, &tb);
}

/* ---- recording ----------------------------------------------------------------------------- */

cvq_status cvq_vulkan_begin_recording(cvq_context *ctx, VkCommandBuffer cmd) {
    cvq_vk *vk = ext_state(ctx, "cvq_vulkan_begin_recording");
    if (!vk) return ext_fail(ctx);
    if (!cmd) return CVQ_FAIL(ctx, CVQ_ERR_NULL_POINTER, "cvq_vulkan_begin_recording: cmd is NULL");
    if (vk->rec)
        return CVQ_FAIL(ctx, CVQ_ERR_INVALID_ARGUMENT,
                        "cvq_vulkan_begin_recording: already recording (call cvq_vulkan_end_recording first)");
    vk->rec = cmd;
    return CVQ_OK;
}

cvq_status cvq_vulkan_end_recording(cvq_context *ctx) {
    cvq_vk *vk = ext_state(ctx, "cvq_vulkan_end_recording");
    if (!vk) return ext_fail(ctx);
    if (!vk->rec)
        return CVQ_FAIL(ctx, CVQ_ERR_INVALID_ARGUMENT, "cvq_vulkan_end_recording: not recording");
    vk->rec = VK_NULL_HANDLE;
    vk->cur = vk->cmd;
    return CVQ_OK;
}

/* How the next call runs: recorded (with a status slot of its own) or
 * submitted (slot 0). Inputs are the engine's: always checked on the
 * device, across all chunks before any output is written. */
static cvq_status run_of(cvq_vk *vk, const char *what, bool needs_slot, cvq_vk_run *run) {
    memset(run, 0, sizeof *run);
    run->check_pass = true;
    if (!vk->rec) return CVQ_OK;
    run->record = true;
    if (needs_slot) {
        if (vk->slots_used + 1 >= CVQ_VK_STATUS_SLOTS)
            return CVQ_FAIL(vk->ctx, CVQ_ERR_UNSUPPORTED,
                            "%s: %u encode calls recorded since the last cvq_vulkan_collect_status, the most "
                            "one collect covers; submit, wait and collect first", what, CVQ_VK_STATUS_SLOTS - 1);
        run->slot = vk->slots_used + 1;
    }
    return CVQ_OK;
}

/* ---- regions ------------------------------------------------------------------------------ */

/* One region of a call, as a view the ops can bind. */
typedef struct region_ref {
    cvq_vk_buf vb;
    cvq_buffer b;
    cvq_view v;
    const char *name;
    cvq_vulkan_region r;
    bool used;
} region_ref;

/* Checks region r (named `name`) for `need` bytes (an output: rounded up
 * to 4, the kernels write whole words) and makes its view. need == 0: an
 * empty segment, bound to a dummy (r may be empty). */
static cvq_status region_check(cvq_vk *vk, const char *what, const char *name, cvq_vulkan_region r, size_t need,
                               bool output, region_ref *out) {
    cvq_context *ctx = vk->ctx;
    memset(out, 0, sizeof *out);
    out->name = name;
    out->r = r;
    if (need == 0) return CVQ_OK; /* view with no buffer: the dummy */
    if (!r.buffer) return CVQ_FAIL(ctx, CVQ_ERR_NULL_POINTER, "%s: region %s has no VkBuffer", what, name);
    const VkDeviceSize align = vk->caps.props.limits.minStorageBufferOffsetAlignment;
    if (align > 1 && r.offset % align)
        return CVQ_FAIL(ctx, CVQ_ERR_INVALID_ARGUMENT,
                        "%s: region %s starts at byte %llu, not a multiple of the device's "
                        "minStorageBufferOffsetAlignment (%llu)", what, name, (unsigned long long)r.offset,
                        (unsigned long long)align);
    size_t want = need;
    if (output && !cvq__add_size(need, (4 - need % 4) % 4, &want))
        return CVQ_FAIL(ctx, CVQ_ERR_SIZE_OVERFLOW, "%s: region %s: size overflow", what, name);
    if (r.size < want)
        return CVQ_FAIL(ctx, CVQ_ERR_SHAPE, "%s: region %s holds %llu bytes; the call needs %zu%s", what, name,
                        (unsigned long long)r.size, want,
                        output && want != need ? " (outputs: rounded up to a multiple of 4)" : "");
    if (r.offset > (VkDeviceSize)SIZE_MAX || r.size > (VkDeviceSize)SIZE_MAX - r.offset)
        return CVQ_FAIL(ctx, CVQ_ERR_SIZE_OVERFLOW, "%s: region %s: offset + size overflows", what, name);
    out->used = true;
    out->vb.buf = r.buffer;
    out->vb.size = r.offset + r.size;
    out->b.handle = &out->vb;
    out->b.size = (size_t)(r.offset + r.size);
    out->v.buf = &out->b;
    out->v.offset = (size_t)r.offset;
    return CVQ_OK;
}

/* Outputs must not overlap any other region of the call (the kernels read
 * inputs while writing outputs). */
static cvq_status no_overlap(cvq_vk *vk, const char *what, const region_ref *rs, size_t n, size_t n_out) {
    for (size_t i = 0; i < n_out; i++) {
        if (!rs[i].used) continue;
        for (size_t j = 0; j < n; j++) {
            if (j == i || !rs[j].used || rs[j].r.buffer != rs[i].r.buffer) continue;
            const VkDeviceSize a0 = rs[i].r.offset, a1 = a0 + rs[i].r.size;
            const VkDeviceSize b0 = rs[j].r.offset, b1 = b0 + rs[j].r.size;
            if (a0 < b1 && b0 < a1)
                return CVQ_FAIL(vk->ctx, CVQ_ERR_INVALID_ARGUMENT, "%s: output region %s overlaps region %s",
                                what, rs[i].name, rs[j].name);
        }
    }
    return CVQ_OK;
}

/* n items of `per` bytes, or CVQ_ERR_SIZE_OVERFLOW. */
static cvq_status bytes_of(cvq_vk *vk, const char *what, size_t n, size_t per, size_t *out) {
    if (!cvq__mul_size(n, per, out))
        return CVQ_FAIL(vk->ctx, CVQ_ERR_SIZE_OVERFLOW, "%s: %zu items of %zu bytes overflow size_t", what, n, per);
    return CVQ_OK;
}

/* ---- encoding ----------------------------------------------------------------------------------- */

/* After a call: a recorded one took its slot; an immediate one has its
 * answer (the op returned it). */
static cvq_status finish(cvq_vk *vk, const cvq_vk_run *run, cvq_status st) {
    if (!st && run->record && run->slot) vk->slots_used = run->slot;
    return st;
}

cvq_status cvq_vulkan_encode_keys(cvq_context *ctx, const cvq_codebook *cb, uint32_t layer, cvq_vulkan_region keys,
                                  size_t n, cvq_vulkan_region codes, cvq_vulkan_region scales, uint32_t flags) {
    static const char what[] = "cvq_vulkan_encode_keys";
    cvq_vk *vk = ext_state(ctx, what);
    if (!vk) return ext_fail(ctx);
    if (flags & ~CVQ_VULKAN_CODES_PACKED12)
        return CVQ_FAIL(ctx, CVQ_ERR_INVALID_ARGUMENT, "%s: unknown flags 0x%x", what, flags);
    cvq_layer_view lv;
    cvq_status st = cvq__check_layer(ctx, cb, layer, &lv);
    if (st) return st;
    if (n == 0) return CVQ_OK;
    if (n > UINT32_MAX) return CVQ_FAIL(ctx, CVQ_ERR_UNSUPPORTED, "%s: %zu tokens in one call", what, n);
    const cvq_geometry *g = lv.g;
    const bool p12 = (flags & CVQ_VULKAN_CODES_PACKED12) != 0;
    const size_t HR = (size_t)g->n_kv_heads * g->key_stages;
    size_t kb, cb_bytes, sb;
    if ((st = bytes_of(vk, what, n, (size_t)cvq__kv_dims(g) * 4, &kb))) return st;
    if ((st = bytes_of(vk, what, n, p12 ? (HR * 12 + 7) / 8 : HR * 2, &cb_bytes))) return st;
    if ((st = bytes_of(vk, what, n, (size_t)cvq__key_scale_count(g) * 4, &sb))) return st;
    region_ref rs[3];
    if ((st = region_check(vk, what, "codes", codes, cb_bytes, true, &rs[0]))) return st;
    if ((st = region_check(vk, what, "scales", scales, sb, true, &rs[1]))) return st;
    if ((st = region_check(vk, what, "keys", keys, kb, false, &rs[2]))) return st;
    if ((st = no_overlap(vk, what, rs, 3, 2))) return st;
    cvq_vk_run run;
    if ((st = run_of(vk, what, true, &run))) return st;
    run.packed12 = p12;
    cvq_encode_keys_args a;
    memset(&a, 0, sizeof a);
    a.lv = &lv;
    a.cb = cb;
    a.n = n;
    a.keys = rs[2].v;
    a.codes = rs[0].v;
    a.scales = rs[1].v;
    return finish(vk, &run, cvq_vk_encode_keys_run(vk, &a, &run));
}

cvq_status cvq_vulkan_encode_values(cvq_context *ctx, const cvq_codebook *cb, uint32_t layer,
                                    cvq_vulkan_region values, size_t n, cvq_vulkan_region bits,
                                    cvq_vulkan_region sigma) {
    static const char what[] = "cvq_vulkan_encode_values";
    cvq_vk *vk = ext_state(ctx, what);
    if (!vk) return ext_fail(ctx);
    cvq_layer_view lv;
    cvq_status st = cvq__check_layer(ctx, cb, layer, &lv);
    if (st) return st;
    if (n == 0) return CVQ_OK;
    if (n > UINT32_MAX) return CVQ_FAIL(ctx, CVQ_ERR_UNSUPPORTED, "%s: %zu tokens in one call", what, n);
    const cvq_geometry *g = lv.g;
    const size_t G = cvq__value_groups(g);
    size_t vb, bb, sb;
    if ((st = bytes_of(vk, what, n, (size_t)cvq__kv_dims(g) * 4, &vb))) return st;
    if ((st = bytes_of(vk, what, n, G * g->value_bits / 8, &bb))) return st;
    if ((st = bytes_of(vk, what, n, G * 4, &sb))) return st;
    region_ref rs[3];
    if ((st = region_check(vk, what, "bits", bits, bb, true, &rs[0]))) return st;
    if ((st = region_check(vk, what, "sigma", sigma, sb, true, &rs[1]))) return st;
    if ((st = region_check(vk, what, "values", values, vb, false, &rs[2]))) return st;
    if ((st = no_overlap(vk, what, rs, 3, 2))) return st;
    cvq_vk_run run;
    if ((st = run_of(vk, what, true, &run))) return st;
    cvq_encode_values_args a;
    memset(&a, 0, sizeof a);
    a.lv = &lv;
    a.cb = cb;
    a.n = n;
    a.values = rs[2].v;
    a.bits = rs[0].v;
    a.sigma = rs[1].v;
    return finish(vk, &run, cvq_vk_encode_values_run(vk, &a, &run));
}

/* ---- attention ------------------------------------------------------------------------------- */

cvq_status cvq_vulkan_attend(cvq_context *ctx, const cvq_codebook *cb, uint32_t layer,
                             const cvq_vulkan_attend_desc *d) {
    static const char what[] = "cvq_vulkan_attend";
    cvq_vk *vk = ext_state(ctx, what);
    if (!vk) return ext_fail(ctx);
    if (!d) return CVQ_FAIL(ctx, CVQ_ERR_NULL_POINTER, "%s: the attend description is NULL", what);
    if (d->flags & ~CVQ_ATTEND_QUERIES_ROTATED)
        return CVQ_FAIL(ctx, CVQ_ERR_INVALID_ARGUMENT, "%s: unknown flags 0x%x", what, d->flags);
    cvq_layer_view lv;
    cvq_status st = cvq__check_layer(ctx, cb, layer, &lv);
    if (st) return st;
    if (d->n_q == 0) return CVQ_OK;
    const cvq_geometry *g = lv.g;
    cvq_record_layout rl;
    if ((st = cvq_record_layout_of(g, &rl))) return st;
    if (d->n_q > UINT32_MAX || d->n_sink > UINT32_MAX || d->n_comp > UINT32_MAX || d->n_win > UINT32_MAX)
        return CVQ_FAIL(ctx, CVQ_ERR_UNSUPPORTED, "%s: more than 2^32-1 queries or tokens", what);
    const size_t qd = (size_t)g->n_q_heads * g->head_dim * 4, kvd = (size_t)cvq__kv_dims(g) * 4;
    /* name, region, items, bytes per item, output */
    const struct {
        const char *name;
        cvq_vulkan_region r;
        size_t n, per;
    } spec[] = {
        {"out", d->out, d->n_q, qd},
        {"queries", d->queries, d->n_q, qd},
        {"q_pos", d->q_pos, d->n_q, 4},
        {"sink_k", d->sink_k, d->n_sink, kvd},
        {"sink_v", d->sink_v, d->n_sink, kvd},
        {"sink_pos", d->sink_pos, d->n_sink, 4},
        {"comp_codes", d->comp_codes, d->n_comp, rl.key_code_bytes},
        {"comp_kscale", d->comp_kscale, d->n_comp, (size_t)rl.key_scale_count * 4},
        {"comp_vbits", d->comp_vbits, d->n_comp, rl.value_bit_bytes},
        {"comp_vsigma", d->comp_vsigma, d->n_comp, (size_t)rl.value_scale_count * 4},
        {"comp_pos", d->comp_pos, d->n_comp, 4},
        {"win_k", d->win_k, d->n_win, kvd},
        {"win_v", d->win_v, d->n_win, kvd},
        {"win_pos", d->win_pos, d->n_win, 4},
    };
    enum { N_REG = sizeof spec / sizeof spec[0] };
    region_ref rs[N_REG];
    for (size_t i = 0; i < N_REG; i++) {
        size_t bytes;
        if ((st = bytes_of(vk, what, spec[i].n, spec[i].per, &bytes))) return st;
        if ((st = region_check(vk, what, spec[i].name, spec[i].r, bytes, i == 0, &rs[i]))) return st;
    }
    if ((st = no_overlap(vk, what, rs, N_REG, 1))) return st;
    cvq_vk_run run;
    if ((st = run_of(vk, what, false, &run))) return st;
    cvq_attend_args a;
    memset(&a, 0, sizeof a);
    a.lv = &lv;
    a.cb = cb;
    a.n_q = d->n_q;
    a.out = rs[0].v;
    a.q = rs[1].v;
    a.q_pos = rs[2].v;
    a.q_rotated = (d->flags & CVQ_ATTEND_QUERIES_ROTATED) != 0;
    a.n_sink = d->n_sink;
    a.n_comp = d->n_comp;
    a.n_win = d->n_win;
    a.sink_k = rs[3].v;
    a.sink_v = rs[4].v;
    a.sink_pos = rs[5].v;
    a.comp_codes = rs[6].v;
    a.comp_kscale = rs[7].v;
    a.comp_vbits = rs[8].v;
    a.comp_vsigma = rs[9].v;
    a.comp_pos = rs[10].v;
    a.win_k = rs[11].v;
    a.win_v = rs[12].v;
    a.win_pos = rs[13].v;
    return cvq_vk_attend_run(vk, &a, &run);
}

/* ---- the deferred status ---------------------------------------------------------------------- */

cvq_status cvq_vulkan_collect_status(cvq_context *ctx, uint32_t *flags, uint32_t *failed_calls) {
    static const char what[] = "cvq_vulkan_collect_status";
    if (flags) *flags = 0;
    if (failed_calls) *failed_calls = 0;
    cvq_vk *vk = ext_state(ctx, what);
    if (!vk) return ext_fail(ctx);
    if (vk->rec)
        return CVQ_FAIL(ctx, CVQ_ERR_INVALID_ARGUMENT,
                        "%s: still recording; end the recording, submit it, wait for its fence, then collect", what);
    uint32_t word = 0, failed = 0;
    const uint32_t calls = vk->slots_used;
    if (vk->status.map) {
        for (uint32_t s = 1; s <= vk->slots_used; s++) {
            char *p = (char *)vk->status.map + (size_t)s * vk->slot_stride;
            uint32_t w;
            memcpy(&w, p, 4);
            word |= w;
            failed += w != 0;
            memset(p, 0, 4); /* a command buffer never submitted reads as clean */
        }
    }
    /* The recorded work has completed (the caller waited): what it held on
     * to can go, and its descriptor sets with it. */
    cvq_vk_retired_free(vk);
    if (vk->rec_pool) {
        VkResult r = vk->fn.ResetDescriptorPool(vk->dev, vk->rec_pool, 0);
        if (r != VK_SUCCESS) {
            /* keep the pool out of use: a fresh one is made on demand */
            vk->fn.DestroyDescriptorPool(vk->dev, vk->rec_pool, NULL);
            vk->rec_pool = VK_NULL_HANDLE;
        }
    }
    vk->rec_sets_used = 0;
    vk->slots_used = 0;
    vk->pending = false;
    if (flags) *flags = word;
    if (failed_calls) *failed_calls = failed;
    if (!word) return CVQ_OK;
    char op[96];
    snprintf(op, sizeof op, "%u of %u recorded encode calls", failed, calls);
    return cvq_vk_status_of_word(vk, word, op);
}
