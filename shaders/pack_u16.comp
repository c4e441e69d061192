#version 450
/*
 * Packs 32-bit codes into 16-bit pairs (shaders/iface.h, CVQ_PK_*): output
 * word w = in[2w] | in[2w+1] << 16, little-endian uint16 values as the cache
 * record stores them; when count is odd the last word's high half is 0.
 * One thread per output word, bounds-checked against ceil(count/2).
 *
 * The word index is gl_GlobalInvocationID.x plus, if the host dispatches a
 * second dimension to stay within maxComputeWorkGroupCount[0], y times the
 * dispatch's width in threads (a 1-D dispatch has y = 0).
 */
#extension GL_GOOGLE_include_directive : require
#include "iface.h"

layout(local_size_x = 64, local_size_x_id = CVQ_SC_WG) in;

layout(std430, set = 0, binding = CVQ_PK_IN) readonly buffer In { uint in_codes[]; };   /* [count] */
layout(std430, set = 0, binding = CVQ_PK_OUT) writeonly buffer Out { uint out_words[]; }; /* [ceil(count/2)] */

layout(push_constant) uniform PushConstants {
    uint count; /* input values */
} pc;

void main() {
    uint w = gl_GlobalInvocationID.x +
             gl_GlobalInvocationID.y * gl_NumWorkGroups.x * gl_WorkGroupSize.x;
    uint n_words = pc.count / 2u + (pc.count & 1u);
    if (w >= n_words) {
        return;
    }
    uint i = 2u * w;
    uint lo = in_codes[i] & 0xFFFFu;
    uint hi = i + 1u < pc.count ? in_codes[i + 1u] & 0xFFFFu : 0u;
    out_words[w] = lo | (hi << 16);
}
