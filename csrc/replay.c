/* Coalesced replay: k deltas become one pass that writes each page once, with the
 * newest content, so replay cost follows distinct pages rather than k. */
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "internal.h"

static sc_status check_sequence(const sc_store *s, const sc_delta_view *views, uint64_t k,
                                int allow_gap, uint64_t *reached_out) {
    /* The store holds everything up to epoch-1; each delta must start at or before what
     * the ones before it reached, or pages in between would be missing. */
    uint64_t reached = atomic_load(&s->epoch) - 1;
    for (uint64_t d = 0; d < k; d++) {
        const sc_header *h = &views[d].header;
        if (h->page_size != s->page_size || h->store_pages != s->n_pages) return SC_EINCOMPAT;
        if (!allow_gap && h->base_epoch > reached) return SC_EGAP;
        if (h->target_epoch > reached) reached = h->target_epoch;
    }
    *reached_out = reached;
    return SC_OK;
}

/* The newest copy of one page seen so far: all a page's bookkeeping in one cache line. */
typedef struct {
    uint64_t version;
    uint32_t delta; /* index + 1; 0: not seen */
    uint32_t row;
} winner;

typedef struct {
    winner *win;    /* indexed by page id; all zero between replays */
    uint64_t *distinct;
    uint64_t n_distinct;
} coalesce_state;

/* The winner table lives as long as the store. A fresh one per replay cost a page fault
 * for nearly every page it touched, more than coalescing 100 deltas of 1% of a store;
 * kept, only the entries a replay touched are cleared after it. Lazily mapped: it holds
 * memory only where replays touched it (at most 16 bytes a page, 0.4% at 4 KiB). */
static winner *scratch_table(sc_store *s) {
    if (!s->replay_scratch) {
        void *p = mmap(NULL, s->n_pages * sizeof(winner), PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) return NULL;
        s->replay_scratch = p;
    }
    return s->replay_scratch;
}

void sc__replay_scratch_free(sc_store *s) {
    if (s->replay_scratch) munmap(s->replay_scratch, s->n_pages * sizeof(winner));
    s->replay_scratch = NULL;
}

static void scratch_clear(coalesce_state *c) {
    for (uint64_t i = 0; i < c->n_distinct; i++) c->win[c->distinct[i]] = (winner){0, 0, 0};
}

/* SC_ECORRUPT when an index entry changed after parsing (sc__index_entry_ok): nothing is
 * written yet, and the entries seen so far are in `distinct` for scratch_clear. */
static sc_status coalesce(const sc_store *s, const sc_delta_view *views, uint64_t k,
                          coalesce_state *c, sc_replay_result *r) {
    for (uint64_t d = 0; d < k; d++) {
        const sc_delta_view *v = &views[d];
        for (uint64_t row = 0, prev = 0; row < v->header.n_pages; row++) {
            uint64_t id = sc__read_once(&v->ids[row]);
            uint64_t version = sc__read_once(&v->versions[row]);
            if (!sc__index_entry_ok(s, &v->header, row, id, prev, version)) return SC_ECORRUPT;
            prev = id;
            winner *w = &c->win[id];
            r->pages_in++;
            if (!w->delta) {
                c->distinct[c->n_distinct++] = id;
            } else {
                r->pages_superseded++;
                /* Same version means same bytes; on ties the later delta wins. */
                if (w->version > version) continue;
            }
            *w = (winner){version, (uint32_t)(d + 1), (uint32_t)row};
        }
    }
    return SC_OK;
}

sc_status sc_replay(sc_store *s, const sc_delta_view *views, const uint8_t *const *payloads,
                    uint64_t k, int allow_gap, int threads, sc_replay_result *out) {
    return sc_replay_progress(s, views, payloads, k, allow_gap, threads, out, NULL);
}

sc_status sc_replay_progress(sc_store *s, const sc_delta_view *views,
                             const uint8_t *const *payloads, uint64_t k, int allow_gap,
                             int threads, sc_replay_result *out, sc_progress *progress) {
    memset(out, 0, sizeof *out);
    if (k >= UINT32_MAX) return SC_EINVAL;
    uint64_t reached, total = 0;
    sc_status st = check_sequence(s, views, k, allow_gap, &reached);
    if (st) return st;
    for (uint64_t d = 0; d < k; d++) total += views[d].header.n_pages;
    uint64_t cap = total < s->n_pages ? total : s->n_pages;
    coalesce_state c = {.win = scratch_table(s), .distinct = malloc((cap ? cap : 1) * 8)};
    uint64_t *ids = malloc((cap ? cap : 1) * 8), *vers = malloc((cap ? cap : 1) * 8);
    const uint8_t **src = malloc((cap ? cap : 1) * sizeof *src);
    if (!c.win || !c.distinct || !ids || !vers || !src) {
        st = SC_ENOMEM;
        goto out;
    }
    st = coalesce(s, views, k, &c, out);
    if (st) {
        memset(out, 0, sizeof *out);
        goto out;
    }
    uint64_t m = 0;
    for (uint64_t i = 0; i < c.n_distinct; i++) {
        uint64_t id = c.distinct[i];
        const winner *w = &c.win[id];
        if (w->version <= sc__load_version(s, id)) {
            out->pages_skipped++;
            continue;
        }
        ids[m] = id;
        vers[m] = w->version;
        src[m++] = payloads[w->delta - 1] + (uint64_t)w->row * s->page_size;
    }
    st = sc__write_pages_from(s, ids, vers, src, m, threads, progress);
    if (st) goto out;
    out->pages_written = m;
    if (reached + 1 > atomic_load(&s->epoch)) atomic_store(&s->epoch, reached + 1);
    sc__persist_header(s);
    atomic_fetch_add_explicit(&s->deltas_applied, k, memory_order_relaxed);
out:
    if (c.win && c.distinct) scratch_clear(&c);
    free(c.distinct);
    free(ids);
    free(vers);
    free(src);
    return st;
}
