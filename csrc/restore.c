/* Restoring a checkpoint into an empty store. Each page is copied and its copy checked
 * against its checksum in the same pass, while it is still in cache: the file's bytes are read once
 * instead of twice (verify, then copy). Copies land before the whole file is proven, so a
 * failure wipes them: the store is empty again, exactly as before the call. */
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "internal.h"
#include "parallel.h"

typedef struct {
    sc_store *s;
    const sc_delta_view *v;
    const uint64_t *ids; /* the view's page ids, read once and checked (sc__read_once) */
    _Atomic uint64_t first_bad; /* lowest failing entry seen so far; UINT64_MAX: none */
    sc_progress *progress;
} restore_job;

static bool store_is_empty(const sc_store *s) {
    if (s->n_snaps) return false;
    for (uint64_t g = 0; g < s->n_groups; g++)
        if (atomic_load_explicit(&s->group_max[g], memory_order_relaxed)) return false;
    return true;
}

static void note_bad(restore_job *j, uint64_t i) {
    uint64_t seen = atomic_load_explicit(&j->first_bad, memory_order_relaxed);
    while (i < seen && !atomic_compare_exchange_weak_explicit(
                           &j->first_bad, &seen, i, memory_order_relaxed, memory_order_relaxed)) {
    }
}

static int restore_range(void *ctx, uint64_t begin, uint64_t end) {
    restore_job *j = ctx;
    sc_store *s = j->s;
    const uint8_t *copied[SC_CHECKSUM_BATCH];
    uint64_t sums[SC_CHECKSUM_BATCH];
    for (uint64_t i = begin; i < end;) {
        /* Another thread failed below us: nothing here can be the first bad page. */
        if (atomic_load_explicit(&j->first_bad, memory_order_relaxed) < i) return SC_ECORRUPT;
        uint64_t k = end - i < SC_CHECKSUM_BATCH ? end - i : SC_CHECKSUM_BATCH;
        /* Copy, then check the copies (in cache, several side by side): what is verified
         * is what stays, even if the file under the mapping changed meanwhile. */
        for (uint64_t m = 0; m < k; m++) {
            uint8_t *dst = s->data + (j->ids[i + m] << s->page_shift);
            memcpy(dst, j->v->payload + ((i + m) << s->page_shift), s->page_size);
            copied[m] = dst;
        }
        sc__page_checksums_at(copied, k, s->page_size, sums);
        for (uint64_t m = 0; m < k; m++) {
            if (sums[m] != j->v->checksums[i + m]) {
                note_bad(j, i + m);
                return SC_ECORRUPT;
            }
        }
        i += k;
        if (j->progress)
            atomic_fetch_add_explicit(&j->progress->done, k << s->page_shift,
                                      memory_order_relaxed);
    }
    return SC_OK;
}

/* Back to all zeroes, the content of an empty store. Anonymous memory is handed back to
 * the kernel instead of being written over. */
static void wipe(sc_store *s, const uint64_t *ids, uint64_t n) {
    if (s->fd < 0 && madvise(s->data, s->size, MADV_DONTNEED) == 0) return;
    for (uint64_t i = 0; i < n; i++) memset(s->data + (ids[i] << s->page_shift), 0, s->page_size);
}

sc_status sc_checkpoint_restore(sc_store *s, const sc_delta_view *v, uint64_t *bad_page,
                                sc_progress *progress) {
    const sc_header *h = &v->header;
    if (h->kind != SC_KIND_CHECKPOINT || !v->payload) return SC_EINVAL;
    if (h->page_size != s->page_size || h->store_pages != s->n_pages) return SC_EINCOMPAT;
    if (!store_is_empty(s)) return SC_EINVAL;
    uint64_t n = h->n_pages;
    if (bad_page) *bad_page = UINT64_MAX;
    /* The index is in the caller's mapping of the file: taken (and checked again) before
     * anything is written, so the copy, a wipe and the restamps all use the same pages. */
    uint64_t *index = malloc((n ? n : 1) * 16), *ids = index, *versions = index + n;
    if (!index) return SC_ENOMEM;
    for (uint64_t i = 0; i < n; i++) {
        ids[i] = sc__read_once(&v->ids[i]);
        versions[i] = sc__read_once(&v->versions[i]);
        if (!sc__index_entry_ok(s, h, i, ids[i], i ? ids[i - 1] : 0, versions[i])) {
            free(index);
            return SC_ECORRUPT;
        }
    }
    if (progress) atomic_store(&progress->total, n << s->page_shift);
    restore_job job = {s, v, ids, UINT64_MAX, progress};
    int st = sc__parallel_for(n, sc__threads_for(n << s->page_shift, 0), restore_range, &job);
    if (st) {
        wipe(s, ids, n);
        free(index);
        if (bad_page) *bad_page = atomic_load(&job.first_bad);
        return (sc_status)st;
    }
    /* Cannot fail: with no snapshot alive nothing needs a preserved copy. */
    for (uint64_t i = 0; i < n; i++) (void)sc__prepare_page(s, ids[i], versions[i]);
    free(index);
    sc_store_publish(s);
    if (progress) atomic_store(&progress->done, n << s->page_shift);
    atomic_fetch_add_explicit(&s->pages_applied, n, memory_order_relaxed);
    atomic_fetch_add_explicit(&s->deltas_applied, 1, memory_order_relaxed);
    if (h->target_epoch + 1 > atomic_load(&s->epoch)) atomic_store(&s->epoch, h->target_epoch + 1);
    sc__persist_header(s);
    return SC_OK;
}
