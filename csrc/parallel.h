#ifndef STATECORE_PARALLEL_H
#define STATECORE_PARALLEL_H
#include <stdint.h>

#define SC_MAX_THREADS 8

/* Work on items [begin, end); returns 0 or an sc_status. */
typedef int (*sc_range_fn)(void *ctx, uint64_t begin, uint64_t end);

/* Threads worth using for a bulk job of `bytes` (requested > 0 forces a count). */
int sc__threads_for(uint64_t bytes, int requested);
/* Runs fn over [0, n) split into `threads` ranges; returns the first non-zero status. */
int sc__parallel_for(uint64_t n, int threads, sc_range_fn fn, void *ctx);

#endif
