/* A minimal fork-join helper: split [0, n) into contiguous ranges over a few threads.
 * Bulk copies and checksums are memory-bound, so two to four threads is all that pays. */
#include <pthread.h>
#include <unistd.h>

#include "parallel.h"

typedef struct {
    sc_range_fn fn;
    void *ctx;
    uint64_t begin, end;
    int status;
} job;

static void *run_job(void *arg) {
    job *j = arg;
    j->status = j->fn(j->ctx, j->begin, j->end);
    return NULL;
}

int sc__threads_for(uint64_t bytes, int requested) {
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    int t = requested > 0 ? requested : (int)(cores > 0 ? cores : 1);
    if (t > SC_MAX_THREADS) t = SC_MAX_THREADS;
    /* Below a few MiB a thread costs more to start than it saves. */
    uint64_t by_size = bytes / (4u << 20);
    if (requested <= 0 && (uint64_t)t > by_size) t = by_size ? (int)by_size : 1;
    return t < 1 ? 1 : t;
}

int sc__parallel_for(uint64_t n, int threads, sc_range_fn fn, void *ctx) {
    if (threads <= 1 || n < (uint64_t)threads) return fn(ctx, 0, n);
    job jobs[SC_MAX_THREADS];
    pthread_t tids[SC_MAX_THREADS];
    int started[SC_MAX_THREADS] = {0};
    uint64_t step = n / (uint64_t)threads;
    for (int i = 0; i < threads; i++) {
        jobs[i] = (job){fn, ctx, step * (uint64_t)i, i == threads - 1 ? n : step * (uint64_t)(i + 1), 0};
    }
    for (int i = 1; i < threads; i++)
        started[i] = pthread_create(&tids[i], NULL, run_job, &jobs[i]) == 0;
    run_job(&jobs[0]);
    int status = jobs[0].status;
    for (int i = 1; i < threads; i++) {
        if (started[i]) pthread_join(tids[i], NULL);
        else run_job(&jobs[i]); /* could not start a thread: do its share here */
        if (!status) status = jobs[i].status;
    }
    return status;
}
