/* What the CPU offers, checked once: AVX-512 paths (page checksums, streaming copies) are
 * chosen at run time, so one build runs on any x86-64. */
#include <sched.h>
#include <unistd.h>

#include "internal.h"

int sc__usable_cpus(void) {
    /* The CPUs this process may run on (taskset, cpusets), not all the machine has. */
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set);
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

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
