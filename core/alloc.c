/*
 * Allocation through the user's hook (zstd-style custom memory), so tests
 * can fail the N-th allocation and check that nothing leaks.
 */
#include "cvq_internal.h"

#include <stdlib.h>
#include <string.h>

#define CVQ_ALIGN 64

/* Default: over-allocate and keep the original pointer just before the
 * aligned block (portable C11; aligned_alloc needs size % align == 0). */
static void *default_alloc(void *user, size_t size, size_t align) {
    (void)user;
    if (size > SIZE_MAX - align - sizeof(void *)) return NULL;
    void *raw = malloc(size + align + sizeof(void *));
    if (!raw) return NULL;
    uintptr_t p = (uintptr_t)raw + sizeof(void *);
    p = (p + (align - 1)) & ~(uintptr_t)(align - 1);
    ((void **)p)[-1] = raw;
    return (void *)p;
}

static void default_free(void *user, void *ptr) {
    (void)user;
    free(((void **)ptr)[-1]);
}

void cvq__allocator_init(cvq_allocator *a, const cvq_allocator *user) {
    if (user && user->alloc && user->free) {
        *a = *user;
    } else {
        a->alloc = default_alloc;
        a->free = default_free;
        a->user = NULL;
    }
}

void *cvq__alloc(const cvq_allocator *a, size_t size) {
    return a->alloc(a->user, size ? size : 1, CVQ_ALIGN);
}

void *cvq__calloc(const cvq_allocator *a, size_t n, size_t elem) {
    size_t bytes;
    if (!cvq__mul_size(n, elem, &bytes)) return NULL;
    void *p = cvq__alloc(a, bytes);
    if (p) memset(p, 0, bytes ? bytes : 1);
    return p;
}

void cvq__free(const cvq_allocator *a, void *p) {
    if (p) a->free(a->user, p);
}

bool cvq__mul_size(size_t a, size_t b, size_t *out) {
    if (a != 0 && b > SIZE_MAX / a) return false;
    *out = a * b;
    return true;
}

bool cvq__add_size(size_t a, size_t b, size_t *out) {
    if (b > SIZE_MAX - a) return false;
    *out = a + b;
    return true;
}
