#version 450
/*
 * Packs one-bit-per-uint values (0 or 1, the value encoder's CVQ_EV_BITS)
 * into bit words (shaders/iface.h, CVQ_PK_*): bit j of output word w is
 * in[32w + j] != 0. Read as little-endian bytes, that puts stream bit i in
 * byte i/8 at bit position i%8 (least significant first), the record's bit
 * order. Bits past count are 0. One thread per output word, bounds-checked
 * against ceil(count/32); 2-D dispatches as in pack_u16.comp.
 */
#extension GL_GOOGLE_include_directive : require
#include "iface.h"

layout(local_size_x = 64, local_size_x_id = CVQ_SC_WG) in;

layout(std430, set = 0, binding = CVQ_PK_IN) readonly buffer In { uint in_bits[]; };     /* [count] */
layout(std430, set = 0, binding = CVQ_PK_OUT) writeonly buffer Out { uint out_words[]; }; /* [ceil(count/32)] */

layout(push_constant) uniform PushConstants {
    uint count; /* input bits */
} pc;

void main() {
    uint w = gl_GlobalInvocationID.x +
             gl_GlobalInvocationID.y * gl_NumWorkGroups.x * gl_WorkGroupSize.x;
    uint n_words = pc.count / 32u + ((pc.count & 31u) != 0u ? 1u : 0u);
    if (w >= n_words) {
        return;
    }
    uint first = 32u * w;
    uint n = min(32u, pc.count - first);
    uint word = 0u;
    for (uint j = 0u; j < n; ++j) {
        word |= (in_bits[first + j] != 0u ? 1u : 0u) << j;
    }
    out_words[w] = word;
}
