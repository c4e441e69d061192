/*
 * cuda_emulated: the CUDA kernels of backends/cuda run on CPU threads
 * (cuda_emu.h) against the CPU reference, so that the kernels' logic is
 * executed and checked on machines without a GPU (CI):
 *   keys    encode_keys (grid-strided with a grid smaller than the tokens,
 *           and one block per token): codes and scales bit-identical to
 *           cvq_ref_encode_key_token;
 *   values  encode_values with x/hid in shared memory and in the global
 *           scratch: bits and sigma bit-identical to the reference;
 *   bad     a NaN key / value / query: the status word is set and nothing is
 *           written;
 *   attend  check_queries + attend_split + attend_reduce over
 *           [sinks | compressed | window] with ragged GQA, a group larger
 *           than 8 heads (two head chunks), several splits, tiles of 16..256,
 *           raw and pre-rotated queries, a causal cut and a query that sees
 *           no token (exact zeros): within 1e-4 (relative to the largest
 *           output) of cvq_ref_attend on the same records.
 * The arithmetic is the host's; the device's own rounding is cuda_check's
 * job on a GPU. Plain C++ (no cmocka); exit status 0 when all passed.
 */
#define CVQ_CU_EMULATE 1
#include "cuda_emu.h"

#include "../../backends/cuda/cuda_kernels_encode.cu"
#include "../../backends/cuda/cuda_kernels_attend.cu"

#include "commvq.h"
extern "C" {
#include "reference.h"
void cvq_cu_geom_of(const cvq_layer_view *lv, cvq_cu_geom *g); /* backends/cuda/cuda_ops.c */
}

#include <stdio.h>

/* The emulated runtime (threads, barriers, shuffles, launches): cuda_emu_runtime.cpp. */

/* ---- the launch sequences of cuda_kernels_*.cu, emulated -------------------------------------- */

static void emu_encode_keys(const cvq_cu_geom &g, const cvq_cu_tables &t, const float *keys, size_t n,
                            uint16_t *codes, float *scales, uint32_t *status, unsigned grid) {
    status[0] = 0;
    cvq_emu_launch(dim3(2), dim3(128), 0, [&] { check_keys(g, keys, n, status); });
    status[1] |= status[0];
    cvq_emu_launch(dim3(grid), dim3(kKeyThreads), 0, [&] { encode_keys(g, t, keys, codes, scales, n, status); });
}

static void emu_encode_values(const cvq_cu_geom &g, const cvq_cu_tables &t, const float *values, size_t n,
                              uint8_t *bits, float *sigma, uint32_t *status, unsigned grid, size_t smem_max) {
    size_t smem, scratch_bytes;
    emu_values_plan(&g, smem_max, &smem, &scratch_bytes);
    std::vector<float> scratch(scratch_bytes / 4 + 1);
    status[0] = 0;
    cvq_emu_launch(dim3(2), dim3(128), 0, [&] { check_values(g, t, values, n, status); });
    status[1] |= status[0];
    cvq_emu_launch(dim3(grid, g.groups), dim3(kValThreads), smem, [&] {
        encode_values(g, t, values, bits, sigma, n, scratch.data(), scratch_bytes == 0, status);
    });
}

static bool emu_attend(const cvq_cu_geom &g, const cvq_cu_tables &t, cvq_cu_attend a, size_t smem_max, uint32_t n_sm,
                       uint32_t tile, uint32_t *status, cvq_cu_attend_plan *plan_out) {
    cvq_cu_attend_plan p;
    const char *why;
    if (emu_attend_plan_make(&g, a.n_q, a.n_sink + a.n_comp + a.n_win, smem_max, n_sm, tile, &p, &why)) {
        printf("FAIL plan: %s\n", why);
        return false;
    }
    *plan_out = p;
    std::vector<float> scratch(p.scratch_bytes / 4 + 1);
    a.scratch = scratch.data();
    status[0] = 0;
    const size_t nqv = a.n_q * g.Hq * g.d;
    cvq_emu_launch(dim3(2), dim3(256), 0, [&] { check_queries(a.q, nqv, status); });
    status[1] |= status[0];
    cvq_emu_launch(dim3(p.n_split, g.Hkv * p.n_hchunk, (unsigned)a.n_q), dim3(kThreads), p.smem, [&] {
        attend_split(g, t, a, 0, p.tile, p.qg, p.n_hchunk, p.split_len, p.n_split, status);
    });
    cvq_emu_launch(dim3((unsigned)(a.n_q * g.Hq)), dim3(kThreads), p.smem_reduce,
                   [&] { attend_reduce(g, t, a, 0, p.n_split, status); });
    return true;
}

/* ---- data ------------------------------------------------------------------------------------ */

static int g_fail, g_pass;
static void report(bool ok, const char *what, const char *name) {
    printf("%s %-7s %s\n", ok ? "pass" : "FAIL", what, name);
    if (ok) g_pass++; else g_fail++;
}

static uint64_t rng_state;
static uint64_t rnd_u64(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static double rnd_unit(void) { return ((double)(rnd_u64() >> 11) + 0.5) / 9007199254740992.0; }
static double rnd_normal(void) {
    double u0 = rnd_unit(), u1 = rnd_unit();
    return sqrt(-2.0 * log(u0)) * cos(6.283185307179586 * u1);
}

static void fill(float *x, size_t n, size_t kvd, const float *w, uint32_t d, bool special) {
    for (size_t t = 0; t < n; t++) {
        float *v = x + t * kvd;
        const int kind = special ? (int)(t % 9) : 0;
        if (kind == 1 && t) {
            memcpy(v, v - kvd, kvd * sizeof(float));
            continue;
        }
        /* huge: 1e17, so that no span's sum of squares overflows (that call would be refused) */
        const double sc = kind == 3 ? 1e-40 : kind == 4 ? 1e17 : kind == 5 ? 1e-30 : 1.0;
        for (size_t i = 0; i < kvd; i++) v[i] = kind == 6 ? 0.0f : (float)(rnd_normal() * sc);
        if (kind == 2 && w)
            for (uint32_t i = 0; i < d; i++) v[i] = 3.0f * w[i];
        if (kind == 3) v[0] = 1e-42f;
    }
}

static std::vector<float> pack(const float *src, size_t per, size_t stride, size_t groups) {
    std::vector<float> o(per * groups);
    for (size_t gi = 0; gi < groups; gi++) memcpy(o.data() + gi * per, src + gi * stride, per * sizeof(float));
    return o;
}

struct gcase {
    uint32_t Hq, Hkv, d, R, F, Nc;
    cvq_key_scale_mode scale;
    cvq_pair_layout layout;
};

static const gcase k_grid[] = {
    {8, 2, 64, 3, 0, 64, CVQ_KEY_SCALE_HEAD, CVQ_PAIRS_INTERLEAVED},
    {6, 4, 96, 2, 192, 64, CVQ_KEY_SCALE_TOKEN, CVQ_PAIRS_ROTATE_HALF}, /* ragged GQA 6:4 */
    {3, 1, 128, 2, 0, 256, CVQ_KEY_SCALE_TOKEN, CVQ_PAIRS_ROTATE_HALF},
    {16, 1, 64, 2, 0, 32, CVQ_KEY_SCALE_HEAD, CVQ_PAIRS_ROTATE_HALF},   /* 16 heads: two chunks of 8 */
    {2, 2, 256, 1, 256, 16, CVQ_KEY_SCALE_TOKEN, CVQ_PAIRS_INTERLEAVED},
};

static void run_case(const gcase &c, size_t ci) {
    char name[200];
    snprintf(name, sizeof name, "case %zu (hq=%u hkv=%u d=%u R=%u F=%u Nc=%u %s %s)", ci, c.Hq, c.Hkv, c.d, c.R, c.F,
             c.Nc, c.scale ? "head" : "token", c.layout ? "interleaved" : "rotate_half");
    cvq_geometry G = {1, c.Hq, c.Hkv, c.d, c.R, c.scale, c.layout, c.F, c.Nc, 0, 0.0f};
    double theta[128];
    cvq_codebook *cb = NULL;
    if (cvq_geometry_resolve(&G) || cvq_rope_freqs_default(c.d, 10000.0, theta) ||
        cvq_codebook_random(&G, theta, 0xE4A1 + ci, NULL, &cb)) {
        printf("FAIL setup %s: %s\n", name, cvq_last_error());
        g_fail++;
        return;
    }
    cvq_layer_view lv;
    cvq__layer_view(NULL, cb, 0, &lv);
    cvq_cu_geom g;
    cvq_cu_geom_of(&lv, &g);
    const size_t Gn = lv.n_groups, F = G.value_group_width, I = G.value_hidden, Nc = G.value_bits;
    std::vector<float> inv_ls = pack(lv.val_inv_ls, F, lv.s_vec, Gn), ls_eps = pack(lv.val_ls_eps, F, lv.s_vec, Gn),
                       ln_w = pack(lv.ln_w, F, lv.s_vec, Gn), ln_b = pack(lv.ln_b, F, lv.s_vec, Gn),
                       w1 = pack(lv.w1, I * F, lv.s_w1, Gn), b1 = pack(lv.b1, I, lv.s_b1, Gn),
                       w2 = pack(lv.w2, 2 * Nc * I, lv.s_w2, Gn), b2 = pack(lv.b2, 2 * Nc, lv.s_b2, Gn),
                       E = pack(lv.E, Nc * F, lv.s_E, Gn);
    cvq_cu_tables t = {lv.key_w, lv.key_n, lv.key_G, lv.rope_t, inv_ls.data(), ls_eps.data(), ln_w.data(),
                       ln_b.data(), w1.data(), b1.data(), w2.data(), b2.data(), E.data()};
    const size_t n = 24, kvd = (size_t)c.Hkv * c.d, HR = (size_t)c.Hkv * c.R;
    const size_t ns = c.scale == CVQ_KEY_SCALE_HEAD ? c.Hkv : 1, vbb = g.value_bit_bytes;
    std::vector<float> k(n * kvd), v(n * kvd), s0(n * ns), s1(n * ns), sg0(n * Gn), sg1(n * Gn);
    std::vector<uint16_t> c0(n * HR), c1(n * HR);
    std::vector<uint8_t> b0(n * vbb), bb1(n * vbb);
    std::vector<float> scratch(cvq_ref_value_scratch(&lv));
    rng_state = 0x5EED + ci;
    fill(k.data(), n, kvd, lv.key_w, c.d, true);
    fill(v.data(), n, kvd, NULL, c.d, true);
    for (size_t i = 0; i < n; i++) {
        cvq_ref_encode_key_token(&lv, &k[i * kvd], &c0[i * HR], &s0[i * ns]);
        cvq_ref_encode_value_token(&lv, &v[i * kvd], &b0[i * vbb], &sg0[i * Gn], scratch.data());
    }
    uint32_t status[2] = {0, 0};
    /* keys: grid-strided (7 blocks for 24 tokens) */
    memset(c1.data(), 0xFF, c1.size() * 2);
    emu_encode_keys(g, t, k.data(), n, c1.data(), s1.data(), status, 7);
    if (status[1]) printf("status word %u\n", status[1]);
    report(status[1] == 0 && c0 == c1 && !memcmp(s0.data(), s1.data(), s0.size() * 4), "keys", name);
    /* values: x/hid in shared memory, then in the global scratch */
    for (int mode = 0; mode < 2; mode++) {
        memset(bb1.data(), 0x5A, bb1.size());
        emu_encode_values(g, t, v.data(), n, bb1.data(), sg1.data(), status, mode ? 5 : 24, mode ? 64 : 1u << 20);
        if (status[1]) printf("status word %u\n", status[1]);
        report(status[1] == 0 && b0 == bb1 && !memcmp(sg0.data(), sg1.data(), sg0.size() * 4), "values", name);
    }
    /* bad input: nothing written, status set */
    {
        std::vector<float> kb = k;
        kb[(n / 2) * kvd + 1] = NAN;
        std::vector<uint16_t> cs(n * HR, 0x7777);
        status[1] = 0;
        emu_encode_keys(g, t, kb.data(), n, cs.data(), s1.data(), status, 7);
        bool untouched = true;
        for (uint16_t x : cs) untouched &= x == 0x7777;
        report(status[1] == CVQ_CU_ST_NONFINITE && untouched, "bad", name);
        std::vector<float> vb = v;
        vb[3] = 1e30f; /* its square overflows */
        std::vector<uint8_t> bs(n * vbb, 0x33);
        status[1] = 0;
        emu_encode_values(g, t, vb.data(), n, bs.data(), sg1.data(), status, 9, 1u << 20);
        untouched = true;
        for (uint8_t x : bs) untouched &= x == 0x33;
        report(status[1] == CVQ_CU_ST_RANGE && untouched, "bad", name);
        status[1] = 0;
    }
    /* attention: sinks 3, 150 compressed, window 9 */
    {
        const size_t S = 3, W = 9, C = 110, nq = 4, qd = (size_t)c.Hq * c.d;
        std::vector<float> sk(S * kvd), sv(S * kvd), wk(W * kvd), wv(W * kvd), q(nq * qd);
        rng_state = 0xA77 + ci;
        fill(sk.data(), S, kvd, NULL, c.d, false);
        fill(sv.data(), S, kvd, NULL, c.d, false);
        fill(wk.data(), W, kvd, NULL, c.d, false);
        fill(wv.data(), W, kvd, NULL, c.d, false);
        fill(q.data(), nq, qd, NULL, c.d, false);
        /* compressed records of normal tokens: re-encode normal data */
        std::vector<float> kc(C * kvd), vc(C * kvd), ks(C * ns), vsg(C * Gn);
        fill(kc.data(), C, kvd, NULL, c.d, false);
        fill(vc.data(), C, kvd, NULL, c.d, false);
        const size_t kcb = g.key_code_bytes;
        std::vector<uint8_t> codes(C * kcb), vbits(C * vbb);
        std::vector<uint16_t> ct(HR);
        for (size_t i = 0; i < C; i++) {
            cvq_ref_encode_key_token(&lv, &kc[i * kvd], ct.data(), &ks[i * ns]);
            cvq_pack_codes12(ct.data(), HR, &codes[i * kcb]);
            cvq_ref_encode_value_token(&lv, &vc[i * kvd], &vbits[i * vbb], &vsg[i * Gn], scratch.data());
        }
        std::vector<int32_t> sp(S), cp(C), wp(W);
        for (size_t i = 0; i < S; i++) sp[i] = (int32_t)(5 + i);
        for (size_t i = 0; i < C; i++) cp[i] = (int32_t)(5 + S + 2 * i);
        for (size_t i = 0; i < W; i++) wp[i] = (int32_t)(5 + S + 2 * C + i);
        const int32_t qp[4] = {wp[W - 1], cp[C / 2], 2, (int32_t)(5 + 1)}; /* all, a cut, none, 2 sinks */
        std::vector<float> o0(nq * qd), o1(nq * qd);
        for (int rot = 0; rot < 2; rot++) {
            cvq_attend_host h;
            memset(&h, 0, sizeof h);
            h.n_q = nq;
            h.q = q.data();
            h.q_pos = qp;
            h.q_rotated = rot;
            h.n_sink = S;
            h.sink_k = sk.data();
            h.sink_v = sv.data();
            h.sink_pos = sp.data();
            h.n_comp = C;
            h.comp_codes = codes.data();
            h.comp_kscale = ks.data();
            h.comp_vbits = vbits.data();
            h.comp_vsigma = vsg.data();
            h.comp_pos = cp.data();
            h.n_win = W;
            h.win_k = wk.data();
            h.win_v = wv.data();
            h.win_pos = wp.data();
            h.out = o0.data();
            if (cvq_ref_attend(NULL, &lv, &h)) {
                printf("FAIL reference attend: %s\n", cvq_last_error());
                g_fail++;
                continue;
            }
            cvq_cu_attend a;
            memset(&a, 0, sizeof a);
            a.n_q = nq;
            a.q = q.data();
            a.q_pos = qp;
            a.q_rotated = rot;
            a.out = o1.data();
            a.n_sink = S;
            a.n_comp = C;
            a.n_win = W;
            a.sink_k = sk.data();
            a.sink_v = sv.data();
            a.sink_pos = sp.data();
            a.comp_codes = codes.data();
            a.comp_kscale = ks.data();
            a.comp_vbits = vbits.data();
            a.comp_vsigma = vsg.data();
            a.comp_pos = cp.data();
            a.win_k = wk.data();
            a.win_v = wv.data();
            a.win_pos = wp.data();
            /* (tile, multiprocessors): default tile and one split; tile 16 and many splits */
            const uint32_t tiles[3] = {0, 16, 256}, sms[3] = {1, 64, 1};
            for (int pi = 0; pi < (rot ? 1 : 3); pi++) { /* rotated queries: one plan is enough */
                std::fill(o1.begin(), o1.end(), NAN);
                cvq_cu_attend_plan plan;
                if (!emu_attend(g, t, a, 227 * 1024, sms[pi], tiles[pi], status, &plan)) continue;
                double mx = 0, err = 0;
                bool zeros = true, finite = true;
                for (size_t i = 0; i < nq * qd; i++) {
                    if (!(o1[i] == o1[i])) finite = false;
                    mx = fmax(mx, fabs(o0[i]));
                    err = fmax(err, fabs((double)o1[i] - o0[i]));
                }
                for (size_t i = 2 * qd; i < 3 * qd; i++) zeros &= o1[i] == 0.0f && o0[i] == 0.0f;
                const double rel = err / (mx + 1e-6);
                char nm[300];
                snprintf(nm, sizeof nm, "%s %s tile %u splits %u chunks %u: rel.err %.2e", name,
                         rot ? "q rotated" : "q raw", plan.tile, plan.n_split, plan.n_hchunk, rel);
                report(status[1] == 0 && finite && zeros && rel <= 1e-4 && (pi != 1 || plan.n_split > 1), "attend", nm);
            }
        }
        /* a NaN query: out untouched, status set */
        std::vector<float> qb = q;
        qb[qd + 2] = NAN;
        cvq_cu_attend a;
        memset(&a, 0, sizeof a);
        a.n_q = nq;
        a.q = qb.data();
        a.q_pos = qp;
        a.out = o1.data();
        a.n_sink = S;
        a.sink_k = sk.data();
        a.sink_v = sv.data();
        a.sink_pos = sp.data();
        std::fill(o1.begin(), o1.end(), 7.0f);
        status[1] = 0;
        cvq_cu_attend_plan plan;
        emu_attend(g, t, a, 227 * 1024, 4, 0, status, &plan);
        bool untouched = true;
        for (float x : o1) untouched &= x == 7.0f;
        report(status[1] == CVQ_CU_ST_NONFINITE && untouched, "bad", name);
    }
    cvq_codebook_free(cb);
}

int main(void) {
    for (size_t i = 0; i < sizeof k_grid / sizeof k_grid[0]; i++) run_case(k_grid[i], i);
    printf("cuda_emulated: %d passed, %d failed (kernels run on CPU threads; the arithmetic is the host's)\n", g_pass,
           g_fail);
    return g_fail ? 1 : 0;
}
