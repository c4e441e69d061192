#version 450
/*
 * Packs 32-bit key codes (the key encoder's CVQ_EK_CODES, [n][Hkv*R]) into
 * the 12-bit records of docs/format.md, the layout the attention kernel
 * reads: token t's record is rec_bytes = ceil(12*per_token/8) bytes at byte
 * t*rec_bytes; code i of a record occupies bits [12i, 12i+12), little-
 * endian (cvq_pack_codes12). One thread per output word of 4 bytes; bytes
 * past the last record are 0. Status gate and scale copy: pack_common.glsl.
 *
 * Index names: w output word, b byte (4w + j), t token (b / rec_bytes),
 * jb byte within the record, c first code touching that byte, sh the bit
 * of code c where the byte starts (0, 4 or 8).
 */
#extension GL_GOOGLE_include_directive : require
#include "pack_common.glsl"

/* Code c of token t (0 past the record's last code). */
uint code_at(uint t, uint c) {
    return c < pc.per_token ? (pk_in[t * pc.per_token + c] & 0xFFFu) : 0u;
}

void main() {
    uint w = gl_GlobalInvocationID.x;
    if (!pk_begin(w)) {
        return;
    }
    const uint n_tok = pc.per_token == 0u ? 0u : pc.count / pc.per_token;
    const uint total = n_tok * pc.rec_bytes; /* bytes of all records */
    const uint n_words = total / 4u + ((total & 3u) != 0u ? 1u : 0u);
    if (w >= n_words) {
        return;
    }
    uint word = 0u;
    for (uint j = 0u; j < 4u; ++j) {
        const uint b = 4u * w + j;
        if (b >= total) {
            break;
        }
        const uint t = b / pc.rec_bytes;
        const uint jb = b - t * pc.rec_bytes;
        const uint c = (8u * jb) / 12u;
        const uint sh = 8u * jb - 12u * c;
        uint v = code_at(t, c) >> sh;
        if (sh > 4u) {
            v |= code_at(t, c + 1u) << (12u - sh);
        }
        word |= (v & 0xFFu) << (8u * j);
    }
    pk_out[w] = word;
}
