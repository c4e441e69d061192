/*
 * 12-bit packing of key codes (docs/format.md, "Compressed record").
 *
 * The codes form one little-endian bit stream, least significant bit
 * first: code i occupies stream bits [12i, 12i+12), and stream bit b lives
 * in byte b/8 at bit position b%8. Two codes therefore fill three bytes:
 *   byte 0 = c0 bits 0..7
 *   byte 1 = c0 bits 8..11 (low nibble) | c1 bits 0..3 (high nibble)
 *   byte 2 = c1 bits 4..11
 * An odd count ends with a byte whose high nibble is zero. A valid code is
 * < 4096; the public call refuses any other rather than drop its high bits.
 */
#include "cvq_internal.h"

/* Checks shared by pack and unpack (n > 0): both arrays present, and n
 * uint16 codes fit size_t (then so do their ceil(3n/2) packed bytes). */
static cvq_status codes12_args(const char *fn, const void *src, const char *src_name,
                               const void *dst, const char *dst_name, size_t n) {
    if (!src) return CVQ_FAIL(NULL, CVQ_ERR_NULL_POINTER, "%s: %s is NULL", fn, src_name);
    if (!dst) return CVQ_FAIL(NULL, CVQ_ERR_NULL_POINTER, "%s: %s is NULL", fn, dst_name);
    if (n > SIZE_MAX / sizeof(uint16_t))
        return CVQ_FAIL(NULL, CVQ_ERR_SIZE_OVERFLOW, "%s: %zu codes overflow size_t", fn, n);
    return CVQ_OK;
}

/* No checks: the cache packs codes its encoder made (all < 4096). */
void cvq__pack_codes12(const uint16_t *codes, size_t n, uint8_t *out) {
    size_t i = 0;
    for (; i + 1 < n; i += 2) {
        const unsigned c0 = codes[i] & 0xFFFu, c1 = codes[i + 1] & 0xFFFu;
        uint8_t *o = out + (i / 2) * 3;
        o[0] = (uint8_t)(c0 & 0xFFu);
        o[1] = (uint8_t)((c0 >> 8) | ((c1 & 0xFu) << 4));
        o[2] = (uint8_t)(c1 >> 4);
    }
    if (i < n) { /* last, unpaired code: 1.5 bytes, unused high nibble 0 */
        const unsigned c0 = codes[i] & 0xFFFu;
        uint8_t *o = out + (i / 2) * 3;
        o[0] = (uint8_t)(c0 & 0xFFu);
        o[1] = (uint8_t)(c0 >> 8);
    }
}

cvq_status cvq_pack_codes12(const uint16_t *codes, size_t n, uint8_t *out) {
    if (n == 0) return CVQ_OK;
    const cvq_status st = codes12_args("cvq_pack_codes12", codes, "codes", out, "out", n);
    if (st) return st;
    /* A code of 12 bits or more would lose its high bits: refused, nothing
     * written (the scan comes first). */
    for (size_t i = 0; i < n; i++)
        if (codes[i] >= CVQ_CODES)
            return CVQ_FAIL(NULL, CVQ_ERR_INVALID_ARGUMENT, "cvq_pack_codes12: code %u at index %zu is >= 4096",
                            (unsigned)codes[i], i);
    cvq__pack_codes12(codes, n, out);
    return CVQ_OK;
}

cvq_status cvq_unpack_codes12(const uint8_t *in, size_t n, uint16_t *codes) {
    if (n == 0) return CVQ_OK;
    const cvq_status st = codes12_args("cvq_unpack_codes12", in, "in", codes, "codes", n);
    if (st) return st;
    size_t i = 0;
    for (; i + 1 < n; i += 2) {
        const uint8_t *b = in + (i / 2) * 3;
        codes[i] = (uint16_t)(b[0] | ((unsigned)(b[1] & 0x0Fu) << 8));
        codes[i + 1] = (uint16_t)((b[1] >> 4) | ((unsigned)b[2] << 4));
    }
    if (i < n) {
        const uint8_t *b = in + (i / 2) * 3;
        codes[i] = (uint16_t)(b[0] | ((unsigned)(b[1] & 0x0Fu) << 8));
    }
    return CVQ_OK;
}
