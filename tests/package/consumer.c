/* A tiny program built against the *installed* package (find_package and
 * pkg-config): create a CPU context, a random codebook, encode one token
 * and attend to it. Exits non-zero on any failure. */
#include <commvq.h>
#include <stdio.h>

int main(void) {
    cvq_context_params p = cvq_context_default_params();
    p.backend = CVQ_BACKEND_CPU;
    cvq_context *ctx = NULL;
    cvq_codebook *cb = NULL;
    cvq_cache *cache = NULL;
    cvq_geometry g = {0};
    g.n_layers = 1; g.n_q_heads = 2; g.n_kv_heads = 1; g.head_dim = 64;
    g.key_stages = 2; g.value_bits = 64;
    double theta[32];
    float k[64], v[64], q[128], out[128];
    for (int i = 0; i < 64; i++) { k[i] = (float)(i % 7) - 3.0f; v[i] = (float)(i % 5) - 2.0f; }
    for (int i = 0; i < 128; i++) q[i] = (float)(i % 3) - 1.0f;
    int32_t pos = 0, qpos = 1;
    cvq_status st = cvq_geometry_resolve(&g);
    if (!st) st = cvq_rope_freqs_default(64, 10000.0, theta);
    if (!st) st = cvq_context_create(&p, &ctx);
    if (!st) st = cvq_codebook_random(&g, theta, 1, NULL, &cb);
    if (!st) st = cvq_cache_create(ctx, cb, NULL, &cache);
    if (!st) st = cvq_cache_append(cache, k, v, CVQ_F32, &pos, 1);
    if (!st) st = cvq_cache_attend(cache, q, &qpos, 1, 0, out);
    if (st) {
        fprintf(stderr, "consumer: %s: %s\n", cvq_status_name(st), cvq_last_error());
        return 1;
    }
    printf("consumer: commvq %s ok, out[0] = %g\n", cvq_version_string(), (double)out[0]);
    cvq_cache_free(cache);
    cvq_codebook_free(cb);
    cvq_context_free(ctx);
    return 0;
}
