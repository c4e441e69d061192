/*
 * Fuzz harness: the .cvq reader (cvq_codebook_load_memory).
 *
 * The input is handed to the loader in a buffer of exactly its size, so an
 * over-read is an ASan report. A file the loader accepts must be usable:
 * its geometry resolves, every tensor is reachable, and one token encodes
 * and decodes on the CPU reference without error other than the documented
 * input statuses. Anything else (a crash, a sanitizer report, an accepted
 * file that then fails with an internal status) is a finding.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "commvq.h"
#include "fuzz_common.h"

/* Geometry caps for the "accepted file" path: a fuzzed header may describe a
 * huge (valid) model whose tables the loader had to read anyway; encoding a
 * token of it is bounded by these. */
#define MAX_ENCODE_ELEMS (1u << 16)

/* CRC-32/ISO-HDLC (the harness's own, independent of the library), one
 * table lookup per byte: a bitwise loop, instrumented for coverage, took
 * most of an execution's time. The table is built once on first use. */
static uint32_t crc32_update(uint32_t crc, const uint8_t *p, size_t n) {
    static uint32_t t[256];
    static int ready;
    if (!ready) {
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
            t[i] = c;
        }
        ready = 1;
    }
    for (size_t i = 0; i < n; i++) crc = t[(crc ^ p[i]) & 0xFFu] ^ (crc >> 8);
    return crc;
}
static uint64_t rd64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}
static uint32_t rd32(const uint8_t *p) { return (uint32_t)rd64(p) & 0xFFFFFFFFu; }
static void wr32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

/* Rewrites the section CRCs (where the section lies inside the buffer) and
 * the header CRC of a buffer that starts like a .cvq file. */
static void fix_checksums(uint8_t *b, size_t size) {
    if (size < 64 + 112 || memcmp(b, "COMMVQCB", 8) != 0) return;
    uint32_t n = rd32(b + 20);
    if (n == 0 || n > 64 || 64 + (size_t)n * 112 > size) return;
    for (uint32_t i = 0; i < n; i++) {
        uint8_t *e = b + 64 + (size_t)i * 112;
        uint64_t off = rd64(e + 88), len = rd64(e + 96);
        if (off <= size && len <= size - off)
            wr32(e + 104, crc32_update(0xFFFFFFFFu, b + off, (size_t)len) ^ 0xFFFFFFFFu);
    }
    uint32_t c = crc32_update(0xFFFFFFFFu, b, 60);
    c = crc32_update(c, b + 64, (size_t)n * 112) ^ 0xFFFFFFFFu;
    wr32(b + 60, c);
}

static void load_and_use(const uint8_t *data, size_t size, int fix);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    load_and_use(data, size, 0);
    load_and_use(data, size, 1);
    return 0;
}

static void load_and_use(const uint8_t *data, size_t size, int fix) {
    uint8_t *copy = malloc(size ? size : 1);
    if (!copy) return;
    memcpy(copy, data, size);
    if (fix) fix_checksums(copy, size);
    cvq_codebook *cb = NULL;
    cvq_status st = cvq_codebook_load_memory(copy, size, NULL, &cb);
    if (st != CVQ_OK) {
        FUZZ_CHECK(cb == NULL, "failed load left a codebook");
        FUZZ_CHECK(fuzz_status_is_load_error(st), "unexpected load status");
        free(copy);
        return;
    }
    free(copy); /* the codebook must not point into the caller's bytes */

    cvq_geometry g;
    FUZZ_CHECK(cvq_codebook_geometry(cb, &g) == CVQ_OK, "geometry of a loaded codebook");
    for (int id = 0; id < (int)CVQ_T_COUNT; id++) {
        cvq_tensor_info info;
        FUZZ_CHECK(cvq_codebook_tensor_info(cb, (cvq_tensor_id)id, &info) == CVQ_OK,
                   "tensor info of a loaded codebook");
    }
    (void)cvq_codebook_note(cb);

    size_t elems = (size_t)g.n_kv_heads * g.head_dim;
    if (elems <= MAX_ENCODE_ELEMS && (size_t)g.value_bits * g.value_hidden <= (1u << 22)) {
        cvq_context_params cp = cvq_context_default_params();
        cp.backend = CVQ_BACKEND_CPU;
        cp.cpu_reference = 1;
        cp.n_threads = 1;
        cvq_context *ctx = NULL;
        if (cvq_context_create(&cp, &ctx) == CVQ_OK) {
            float *kv = malloc(elems * sizeof(float));
            uint16_t *codes = malloc((size_t)g.n_kv_heads * g.key_stages * sizeof(uint16_t));
            float scales[256];
            if (kv && codes && g.n_kv_heads <= 256) {
                for (size_t i = 0; i < elems; i++) kv[i] = (float)((i * 2654435761u) % 1000) / 500.0f - 1.0f;
                st = cvq_encode_keys(ctx, cb, 0, kv, CVQ_F32, 1, codes, scales);
                FUZZ_CHECK(st == CVQ_OK, "encoding a token with an accepted codebook");
                st = cvq_decode_keys(ctx, cb, 0, codes, scales, 1, kv);
                FUZZ_CHECK(st == CVQ_OK, "decoding a token with an accepted codebook");
            }
            free(kv);
            free(codes);
            cvq_context_free(ctx);
        }
    }
    cvq_codebook_free(cb);
}
