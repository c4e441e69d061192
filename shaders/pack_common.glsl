/*
 * Shared part of the pack kernels (pack_u16.comp, pack_bits.comp,
 * pack_codes12.comp): bindings, push constants, the status gate and the copy
 * of the scales (or sigma). The pack pass is the only one that writes an
 * encode call's outputs; it runs after every encoder dispatch of the call
 * (a barrier in between) and writes nothing when the call's status word is
 * nonzero: a call with one bad token leaves all of its outputs untouched.
 *
 * The word index is gl_GlobalInvocationID.x (the host keeps one dispatch
 * within maxComputeWorkGroupCount[0]).
 */
#extension GL_GOOGLE_include_directive : require
#include "iface.h"

layout(local_size_x = 64, local_size_x_id = CVQ_SC_WG) in;

layout(std430, set = 0, binding = CVQ_PK_IN) readonly buffer In { uint pk_in[]; };        /* [count] */
layout(std430, set = 0, binding = CVQ_PK_OUT) writeonly buffer Out { uint pk_out[]; };    /* packed words */
layout(std430, set = 0, binding = CVQ_PK_STATUS) readonly buffer Status { uint pk_status[]; }; /* [1] */
layout(std430, set = 0, binding = CVQ_PK_SIN) readonly buffer ScaleIn { uint pk_sin[]; };   /* [scale_count] */
layout(std430, set = 0, binding = CVQ_PK_SOUT) writeonly buffer ScaleOut { uint pk_sout[]; }; /* [scale_count] */

layout(push_constant) uniform PushConstants {
    uint count;       /* input values (codes or bits) of this pass          */
    uint scale_count; /* scales / sigma of this pass, copied as bit patterns */
    uint per_token;   /* pack_codes12: codes per token (Hkv*R)               */
    uint rec_bytes;   /* pack_codes12: bytes per token record                */
} pc;

/* False when the call failed (the thread must then write nothing). Also
 * copies scales i = w, w + threads, ... (there may be more scales than
 * packed words). */
bool pk_begin(uint w) {
    if (pk_status[0] != 0u) {
        return false;
    }
    const uint threads = gl_NumWorkGroups.x * gl_WorkGroupSize.x;
    for (uint i = w; i < pc.scale_count; i += threads) {
        pk_sout[i] = pk_sin[i];
    }
    return true;
}
