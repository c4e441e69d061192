#version 450
/*
 * Packs 32-bit codes into 16-bit pairs (shaders/iface.h, CVQ_PK_*): output
 * word w = in[2w] | in[2w+1] << 16, little-endian uint16 values as
 * cvq_encode_keys returns them; when count is odd the last word's high half
 * is 0. One thread per output word, bounds-checked against ceil(count/2);
 * the status gate and the scale copy are in pack_common.glsl.
 */
#extension GL_GOOGLE_include_directive : require
#include "pack_common.glsl"

void main() {
    uint w = gl_GlobalInvocationID.x;
    if (!pk_begin(w)) {
        return;
    }
    uint n_words = pc.count / 2u + (pc.count & 1u);
    if (w >= n_words) {
        return;
    }
    uint i = 2u * w;
    uint lo = pk_in[i] & 0xFFFFu;
    uint hi = i + 1u < pc.count ? pk_in[i + 1u] & 0xFFFFu : 0u;
    pk_out[w] = lo | (hi << 16);
}
