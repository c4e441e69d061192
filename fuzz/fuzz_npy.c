/*
 * Fuzz harness: the tool's .npy reader (tools/npy.c, npy_load_memory).
 * The input sits in a buffer of exactly its size; an accepted array must
 * have a shape whose product is its count, and data for every element.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"
#include "npy.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    uint8_t *copy = malloc(size ? size : 1);
    if (!copy) return 0;
    memcpy(copy, data, size);
    npy_array a;
    char err[256];
    memset(&a, 0, sizeof a);
    if (npy_load_memory(copy, size, &a, err, sizeof err) == 0) {
        uint64_t count = 1;
        for (uint32_t i = 0; i < a.ndim; i++) count *= a.shape[i];
        FUZZ_CHECK(a.ndim <= NPY_MAX_DIMS, "ndim within the limit");
        FUZZ_CHECK(count == a.count, "count is the product of the shape");
        FUZZ_CHECK(a.count == 0 || a.data != NULL, "data for every element");
        /* touch every byte, so a short allocation is an ASan report */
        volatile unsigned char sink = 0;
        const unsigned char *d = a.data;
        size_t bytes = (size_t)a.count * npy_dtype_size(a.dtype);
        for (size_t i = 0; i < bytes; i++) sink ^= d[i];
        (void)sink;
        npy_free(&a);
    } else {
        FUZZ_CHECK(err[0] != '\0', "a refusal says why");
        FUZZ_CHECK(a.data == NULL, "a refusal holds no data");
    }
    free(copy);
    return 0;
}
