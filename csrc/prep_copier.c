/* A helper thread for a vectorized write's preserving copies.
 *
 * A large write under a live snapshot is mostly copies (each touched page once), but its
 * other part is serial: finding the pages, allocating their preserved nodes, then
 * publishing them and moving the stamps. Copying each batch with two threads and then
 * publishing it left one core idle during every serial stretch. With this helper, batch k
 * is copied while the writer prepares batch k+1; the writer then helps finish batch k's
 * copies (both claim 64 pages at a time) and publishes it.
 *
 * Hand-off: a batch's nodes and counters are set under the mutex, and the helper takes a
 * batch under the mutex and says when it is done with it, so it never claims pages of a
 * batch other than the one it took. Copies are released by the `done` count, which the
 * writer acquires before publishing any node of the batch. */
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>

#include "internal.h"

#define CLAIM 64 /* pages per claim: 256 KiB at 4 KiB, few atomics, little imbalance */

struct sc_copier {
    sc_store *s;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t work, idle;
    /* The current batch: set by the writer under mu. */
    const sc_node *nodes;
    uint64_t n;
    uint64_t generation;
    _Atomic uint64_t next;  /* first unclaimed page */
    _Atomic uint64_t done;  /* pages copied */
    bool active;            /* the helper holds the current batch (under mu) */
    bool quit;
};

static void copy_claimed(sc_copier *c, const sc_node *nodes, uint64_t n) {
    for (;;) {
        uint64_t i = atomic_fetch_add_explicit(&c->next, CLAIM, memory_order_relaxed);
        if (i >= n) return;
        uint64_t end = n - i < CLAIM ? n : i + CLAIM;
        /* The copier works for writes preserving more than 16 MiB, copies nobody reads
         * soon: streamed, which writes each line once instead of first reading it in
         * (about 15-20% faster for a first pass of random writes under a snapshot on this
         * project's machine). No fence before them: the nodes are not published yet. */
        for (uint64_t k = i; k < end; k++) sc__node_fill(c->s, nodes[k], true);
        sc__stream_fence(); /* the copies visible before `done` says so */
        atomic_fetch_add_explicit(&c->done, end - i, memory_order_release);
    }
}

static void *run(void *arg) {
    sc_copier *c = arg;
    uint64_t seen = 0;
    pthread_mutex_lock(&c->mu);
    for (;;) {
        while (!c->quit && c->generation == seen) pthread_cond_wait(&c->work, &c->mu);
        if (c->quit) break;
        seen = c->generation;
        const sc_node *nodes = c->nodes;
        uint64_t n = c->n;
        c->active = true;
        pthread_mutex_unlock(&c->mu);
        copy_claimed(c, nodes, n);
        pthread_mutex_lock(&c->mu);
        c->active = false;
        pthread_cond_signal(&c->idle);
    }
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

sc_copier *sc__copier_start(sc_store *s) {
    /* Measured on two CPUs. One has nothing to overlap with; with more, copying each
     * batch with sc__threads_for's threads (up to four) may well beat two copiers, and
     * that path is left as it was. */
    if (sc__usable_cpus() != 2) return NULL;
    sc_copier *c = sc__alloc_fails() ? NULL : calloc(1, sizeof *c);
    if (!c) return NULL;
    c->s = s;
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->work, NULL);
    pthread_cond_init(&c->idle, NULL);
    if (pthread_create(&c->thread, NULL, run, c) != 0) {
        pthread_cond_destroy(&c->idle);
        pthread_cond_destroy(&c->work);
        pthread_mutex_destroy(&c->mu);
        free(c);
        return NULL;
    }
    return c;
}

void sc__copier_submit(sc_copier *c, const sc_node *nodes, uint64_t n) {
    pthread_mutex_lock(&c->mu);
    while (c->active) pthread_cond_wait(&c->idle, &c->mu); /* still leaving the last batch */
    c->nodes = nodes;
    c->n = n;
    atomic_store_explicit(&c->next, 0, memory_order_relaxed);
    atomic_store_explicit(&c->done, 0, memory_order_relaxed);
    c->generation++;
    pthread_cond_signal(&c->work);
    pthread_mutex_unlock(&c->mu);
}

void sc__copier_finish(sc_copier *c) {
    /* The writer's own nodes and n: the helper does not change them. */
    copy_claimed(c, c->nodes, c->n);
    /* At most the copier's last claim (64 pages) is left: a short wait. */
    while (atomic_load_explicit(&c->done, memory_order_acquire) < c->n) sched_yield();
}

void sc__copier_stop(sc_copier *c) {
    pthread_mutex_lock(&c->mu);
    c->quit = true;
    pthread_cond_signal(&c->work);
    pthread_mutex_unlock(&c->mu);
    pthread_join(c->thread, NULL);
    pthread_cond_destroy(&c->idle);
    pthread_cond_destroy(&c->work);
    pthread_mutex_destroy(&c->mu);
    free(c);
}
