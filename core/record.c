/*
 * 12-bit packing of key codes (docs/format.md, "Compressed record").
 *
 * The codes form one little-endian bit stream, least significant bit
 * first: code i occupies stream bits [12i, 12i+12), and stream bit b lives
 * in byte b/8 at bit position b%8. Two codes therefore fill three bytes:
 *   byte 0 = c0 bits 0..7
 *   byte 1 = c0 bits 8..11 (low nibble) | c1 bits 0..3 (high nibble)
 *   byte 2 = c1 bits 4..11
 * An odd count ends with a byte whose high nibble is zero. Only the low 12
 * bits of each code are stored (a valid code is < 4096).
 */
#include "cvq_internal.h"

void cvq_pack_codes12(const uint16_t *codes, size_t n, uint8_t *out) {
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

void cvq_unpack_codes12(const uint8_t *in, size_t n, uint16_t *codes) {
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
}
