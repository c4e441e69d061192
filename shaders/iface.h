/*
 * The interface between the Vulkan backend's host code (backends/vulkan/)
 * and its compute shaders (shaders/*.comp): binding numbers, specialization
 * constant ids and push-constant blocks. Included from C and from GLSL
 * (glslangValidator -I shaders, GL_GOOGLE_include_directive), so it holds
 * only #defines and a push-constant field list macro.
 *
 * Conventions for every kernel:
 *  - descriptor set 0; every binding a std430 storage buffer; the host
 *    binds each at the byte offset of its view (offsets are multiples of
 *    the device's minStorageBufferOffsetAlignment: the backend allocates
 *    each array in its own buffer or aligns it).
 *  - push constants: at most 128 bytes, all 32-bit fields.
 *  - sizes that shape loops are specialization constants.
 *  - uint64 values (RoPE phase steps t_p) are stored as two uints (lo, hi).
 */
#ifndef CVQ_SHADER_IFACE_H
#define CVQ_SHADER_IFACE_H

/* ---- specialization constant ids (all kernels share the numbering) ---- */
#define CVQ_SC_WG          0  /* local_size_x                               */
#define CVQ_SC_D           1  /* head dim d                                 */
#define CVQ_SC_HKV         2  /* KV heads                                   */
#define CVQ_SC_HQ          3  /* query heads                                */
#define CVQ_SC_R           4  /* key stages                                 */
#define CVQ_SC_LAYOUT      5  /* 0 rotate_half, 1 interleaved               */
#define CVQ_SC_SCALE_MODE  6  /* 0 token, 1 head                            */
#define CVQ_SC_F           7  /* value group width                          */
#define CVQ_SC_NC          8  /* value code bits                            */
#define CVQ_SC_I           9  /* value hidden width                         */
#define CVQ_SC_GROUPS     10  /* value groups per token                     */

/* ---- encode_keys.comp: one workgroup per token (all heads) ------------- */
#define CVQ_EK_KEYS     0  /* float  [n][Hkv][d]      input (checked)       */
#define CVQ_EK_W        1  /* float  [Hkv][R][64][P][2] layer's sub-codes   */
#define CVQ_EK_N        2  /* float  [Hkv][R][64]      n_a                  */
#define CVQ_EK_G        3  /* float  [Hkv][R][64][64]  G[A][B]              */
#define CVQ_EK_CODES    4  /* uint   [n][Hkv][R]       code 64*A+B (32-bit) */
#define CVQ_EK_SCALES   5  /* float  [n][ns]  (a scratch buffer: the pack pass
                              copies it out when the call's status is 0) */
#define CVQ_EK_STATUS   6  /* uint   [1] status word (0 ok; bit 0 non-finite
                              input; bit 1 overflow), set with atomicOr   */
/* push constants: uint n_tokens; uint token_base; uint check_only;
 * (workgroup x covers tokens token_base + gl_WorkGroupID.x; dispatches are
 * split to respect maxComputeWorkGroupCount; check_only != 0: run the
 * input checks, set the status bits, write nothing else) */

/* ---- encode_values.comp: one workgroup per (token, value group) -------- */
#define CVQ_EV_VALUES   0  /* float [n][Hkv*d]                               */
#define CVQ_EV_INV_LS   1  /* float [groups][F]  1/(ls+eps)                  */
#define CVQ_EV_LN_W     2  /* float [groups][F]                              */
#define CVQ_EV_LN_B     3  /* float [groups][F]                              */
#define CVQ_EV_W1       4  /* float [groups][I][F]                           */
#define CVQ_EV_B1       5  /* float [groups][I]                              */
#define CVQ_EV_W2       6  /* float [groups][2Nc][I]                         */
#define CVQ_EV_B2       7  /* float [groups][2Nc]                            */
#define CVQ_EV_E        8  /* float [groups][Nc][F]                          */
#define CVQ_EV_SCRATCH  9  /* float [n][groups][F + I + 2Nc] work space     */
#define CVQ_EV_BITS    10  /* uint  [n][groups][Nc]  one 0/1 per code bit    */
#define CVQ_EV_SIGMA   11  /* float [n][groups]  (scratch, as CVQ_EK_SCALES)  */
#define CVQ_EV_STATUS  12  /* uint  [1] status word, as CVQ_EK_STATUS        */
/* push constants: uint n_tokens; uint token_base; float inv_F;
 * uint check_only (as for encode_keys) */

/* ---- the pack kernels: the last pass of an encode, one thread per word.
 * They write the call's outputs only when its status word is 0, so a call
 * with one bad token writes nothing at all (the encoders put codes, bits,
 * scales and sigma in scratch buffers first). ------------------------- */
#define CVQ_PK_IN       0  /* uint [count]                                   */
#define CVQ_PK_OUT      1  /* uint words of the packed output                */
#define CVQ_PK_STATUS   2  /* uint [1] the call's status word (read only)    */
#define CVQ_PK_SIN      3  /* uint [scale_count] scales / sigma, as bits     */
#define CVQ_PK_SOUT     4  /* uint [scale_count] their output                */
/* pack_u16.comp: word w = in[2w] | in[2w+1]<<16 (uint16 codes).
 * pack_bits.comp: word w bit j = in[32w + j] (bit i of the stream lives in
 * byte i/8 at position i%8: the record's little-endian bit order).
 * pack_codes12.comp: the 12-bit packed key-code records of docs/format.md,
 * per_token codes -> rec_bytes bytes per token, records back to back.
 * push constants for all three: uint count (input values); uint
 * scale_count; uint per_token; uint rec_bytes (the last two: pack_codes12) */

/* ---- attend.comp: one workgroup per (query, query head) ---------------- */
#define CVQ_AT_Q          0  /* float [n_q][Hq][d]                           */
#define CVQ_AT_QPOS       1  /* int   [n_q]                                  */
#define CVQ_AT_OUT        2  /* float [n_q][Hq][d]                           */
#define CVQ_AT_SINK_K     3  /* float [n_sink][Hkv][d] (pre-RoPE)            */
#define CVQ_AT_SINK_V     4
#define CVQ_AT_SINK_POS   5  /* int   [n_sink]                               */
#define CVQ_AT_CODES      6  /* uint  words of [n_comp][key_code_bytes]      */
#define CVQ_AT_KSCALE     7  /* float [n_comp][ns]                           */
#define CVQ_AT_VBITS      8  /* uint  words of [n_comp][groups*Nc/8]         */
#define CVQ_AT_VSIGMA     9  /* float [n_comp][groups]                       */
#define CVQ_AT_COMP_POS  10  /* int   [n_comp]                               */
#define CVQ_AT_WIN_K     11
#define CVQ_AT_WIN_V     12
#define CVQ_AT_WIN_POS   13
#define CVQ_AT_KEY_W     14  /* float [Hkv][R][64][P][2]                      */
#define CVQ_AT_ROPE_T    15  /* uint  [P][2] (lo, hi) of t_p                  */
#define CVQ_AT_E         16  /* float [groups][Nc][F]                         */
#define CVQ_AT_LS_EPS    17  /* float [groups][F]                             */
#define CVQ_AT_SCRATCH   18  /* float [n_q*Hq][n_tok + Nc] logits, code acc   */
/* push constants: uint n_q; uint n_sink; uint n_comp; uint n_win;
 * uint q_rotated; float logit_scale; uint key_code_bytes; uint vbit_bytes;
 * uint qh_base (first (query*Hq + head) index of this dispatch) */

#endif
