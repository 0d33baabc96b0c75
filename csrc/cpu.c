/* What the CPU offers, checked once: AVX-512 paths (page checksums, streaming copies) are
 * chosen at run time, so one build runs on any x86-64. */
#include "internal.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
bool sc__have_avx512(void) {
    /* Any thread may be first: each computes the same answer. */
    static _Atomic int cached = -1;
    int v = atomic_load_explicit(&cached, memory_order_relaxed);
    if (v < 0) {
        __builtin_cpu_init();
        v = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
        atomic_store_explicit(&cached, v, memory_order_relaxed);
    }
    return v;
}
#else
bool sc__have_avx512(void) { return false; }
#endif
