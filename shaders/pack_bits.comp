#version 450
/*
 * Packs one-bit-per-uint values (0 or 1, the value encoder's CVQ_EV_BITS)
 * into bit words (shaders/iface.h, CVQ_PK_*): bit j of output word w is
 * in[32w + j] != 0. Read as little-endian bytes, that puts stream bit i in
 * byte i/8 at bit position i%8 (least significant first), the record's bit
 * order. Bits past count are 0. One thread per output word, bounds-checked
 * against ceil(count/32); the status gate and the sigma copy are in
 * pack_common.glsl.
 */
#extension GL_GOOGLE_include_directive : require
#include "pack_common.glsl"

void main() {
    uint w = gl_GlobalInvocationID.x;
    if (!pk_begin(w)) {
        return;
    }
    uint n_words = pc.count / 32u + ((pc.count & 31u) != 0u ? 1u : 0u);
    if (w >= n_words) {
        return;
    }
    uint first = 32u * w;
    uint n = min(32u, pc.count - first);
    uint word = 0u;
    for (uint j = 0u; j < n; ++j) {
        word |= (pk_in[first + j] != 0u ? 1u : 0u) << j;
    }
    pk_out[w] = word;
}
