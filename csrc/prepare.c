/* Getting pages ready for a write. Order matters for lock-free snapshot readers: preserve
 * the old content and publish it, then publish the new stamp and version, and only then
 * (after sc_store_publish) may the caller modify the bytes.
 *
 * Vectorized writes prepare many pages at once. With a live snapshot most of their time is
 * the preserving copies, so a batch queues the pages that need one, copies them (a few
 * threads together, or, once a write fills a batch, the copier thread of prep_copier.c
 * while the writer fills the next), and only then publishes each node and restamps its
 * page: the order above still holds page by page. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "parallel.h"

#define BATCH_BYTES (16u << 20) /* copies queued before a flush: enough for two threads */

static void restamp(sc_store *s, uint64_t p, uint64_t seq, uint64_t new_version) {
    /* Release: a reader that sees the new stamp also sees the node published before it
     * (free on x86; weakly ordered CPUs need it). */
    atomic_store_explicit(&s->stamps[p], seq, memory_order_release);
    /* Release: a reader that sees the new version also sees the new stamp. */
    atomic_store_explicit(&s->versions[p], new_version, memory_order_release);
    uint64_t g = p >> 6;
    if (new_version > atomic_load_explicit(&s->group_max[g], memory_order_relaxed))
        atomic_store_explicit(&s->group_max[g], new_version, memory_order_release);
    if (new_version > s->dirty_base) sc__writer_set_bits(&s->dirty[g], 1ull << (p & 63));
}

/* Every live snapshot promised not to read a page this old (sc_snapshot_set_floor). The
 * skip is counted, then the floor read again behind a full fence: a snapshot lowering its
 * floor meanwhile either sees the count move (and keeps its floor) or is seen here. */
static bool copy_skippable(sc_store *s, uint64_t version) {
    uint64_t floor = atomic_load_explicit(&s->preserve_floor, memory_order_relaxed);
    if (!floor || version > floor) return false; /* floor 0: some snapshot reads every page */
    sc__writer_add(&s->floor_skips, 1);
    atomic_thread_fence(memory_order_seq_cst);
    floor = atomic_load_explicit(&s->preserve_floor, memory_order_relaxed);
    return floor && version <= floor;
}

/* A live snapshot still reads the page's current content. */
static bool needs_preserving(sc_store *s, uint64_t stamp, uint64_t seq, uint64_t version) {
    return stamp != seq && s->newest_snap && stamp <= s->newest_snap &&
           !copy_skippable(s, version);
}

sc_status sc__prepare_page(sc_store *s, uint64_t p, uint64_t new_version) {
    uint64_t seq = atomic_load_explicit(&s->seq, memory_order_relaxed);
    uint64_t stamp = atomic_load_explicit(&s->stamps[p], memory_order_relaxed);
    uint64_t v = atomic_load_explicit(&s->versions[p], memory_order_relaxed);
    if (stamp == seq && v == new_version) return SC_OK; /* already written since the last snapshot */
    if (needs_preserving(s, stamp, seq, v)) {
        sc_node n = sc__node_new(s, p, v, stamp);
        if (!n) return SC_ENOMEM;
        memcpy(sc__node_content(s, n), s->data + (p << s->page_shift), s->page_size);
        sc__node_publish(s, n);
    }
    restamp(s, p, seq, new_version);
    return SC_OK;
}

void sc__prep_init(sc_prep *b, sc_store *s) {
    memset(b, 0, sizeof *b);
    b->s = s;
}

typedef struct {
    sc_store *s;
    const sc_node *nodes;
    bool stream;
} copy_job;

static int copy_range(void *ctx, uint64_t begin, uint64_t end) {
    copy_job *j = ctx;
    for (uint64_t k = begin; k < end; k++) sc__node_fill(j->s, j->nodes[k], j->stream);
    if (j->stream) sc__stream_fence(); /* the copies visible before the join says done */
    return SC_OK;
}

static void publish(sc_store *s, const sc_node *nodes, const uint64_t *new_versions,
                    uint64_t n) {
    uint64_t seq = atomic_load_explicit(&s->seq, memory_order_relaxed);
    for (uint64_t k = 0; k < n; k++) {
        uint64_t p = sc__chunk_of(&s->pool, nodes[k])->page[sc__slot_of(&s->pool, nodes[k])];
        sc__node_publish(s, nodes[k]);
        restamp(s, p, seq, new_versions[k]);
        s->queued[p >> 6] &= ~(1ull << (p & 63));
    }
}

/* The batch, copied here and now (a few threads when large), then published. */
static void flush(sc_prep *b) {
    sc_store *s = b->s;
    if (!b->n) return;
    copy_job job = {s, b->nodes, (b->n << s->page_shift) >= SC_STREAM_MIN_BYTES};
    sc__parallel_for(b->n, sc__threads_for(b->n << s->page_shift, 0), copy_range, &job);
    publish(s, b->nodes, b->new_versions, b->n);
    b->n = 0;
}

static void finish_flight(sc_prep *b) {
    if (!b->flight_n) return;
    sc__copier_finish(b->copier);
    publish(b->s, b->flight_nodes, b->flight_versions, b->flight_n);
    b->flight_n = 0;
}

/* The second batch buffers and the copier thread, both or neither, tried once. */
static bool start_copier(sc_prep *b) {
    if (b->copier_tried) return b->copier != NULL;
    b->copier_tried = true;
    sc_node *nodes = sc__alloc_fails() ? NULL : malloc(b->cap * sizeof *nodes);
    uint64_t *versions = sc__alloc_fails() ? NULL : malloc(b->cap * sizeof *versions);
    sc_copier *c = nodes && versions ? sc__copier_start(b->s) : NULL;
    if (!c) {
        free(nodes);
        free(versions);
        return false;
    }
    b->flight_nodes = nodes;
    b->flight_versions = versions;
    b->copier = c;
    return true;
}

/* A full batch (or the last one) goes to the copier, and the writer fills the other
 * buffer meanwhile; without a copier it is copied and published in place. The batch
 * before it is published only once the copier has the new one, so that neither thread
 * waits through the other's serial work. */
static void hand_off(sc_prep *b) {
    if (!start_copier(b)) {
        flush(b);
        return;
    }
    if (b->flight_n) sc__copier_finish(b->copier);
    sc_node *done_nodes = b->flight_nodes;
    uint64_t *done_versions = b->flight_versions, done_n = b->flight_n;
    b->flight_nodes = b->nodes;
    b->flight_versions = b->new_versions;
    b->flight_n = b->n;
    b->flight_first = b->first;
    sc__copier_submit(b->copier, b->flight_nodes, b->flight_n);
    publish(b->s, done_nodes, done_versions, done_n);
    b->nodes = done_nodes;
    b->new_versions = done_versions;
    b->n = 0;
}

static sc_status batch_arrays(sc_prep *b) {
    if (b->cap) return SC_OK;
    uint64_t cap = BATCH_BYTES >> b->s->page_shift;
    b->nodes = sc__alloc_fails() ? NULL : malloc((cap ? cap : 1) * sizeof *b->nodes);
    b->new_versions =
        sc__alloc_fails() ? NULL : malloc((cap ? cap : 1) * sizeof *b->new_versions);
    if (!b->nodes || !b->new_versions) return SC_ENOMEM;
    b->cap = cap ? cap : 1;
    return SC_OK;
}

static sc_status queue(sc_prep *b, uint64_t p, uint64_t version, uint64_t stamp,
                       uint64_t new_version) {
    sc_store *s = b->s;
    if (batch_arrays(b)) return SC_ENOMEM;
    sc_node n = sc__node_new(s, p, version, stamp);
    if (!n) return SC_ENOMEM;
    if (!b->n) b->first = p;
    b->nodes[b->n] = n;
    b->new_versions[b->n++] = new_version;
    s->queued[p >> 6] |= 1ull << (p & 63);
    if (b->n == b->cap) hand_off(b);
    return SC_OK;
}

sc_status sc__prep_page(sc_prep *b, uint64_t p, uint64_t new_version) {
    sc_store *s = b->s;
    uint64_t seq = atomic_load_explicit(&s->seq, memory_order_relaxed);
    uint64_t stamp = atomic_load_explicit(&s->stamps[p], memory_order_relaxed);
    uint64_t v = atomic_load_explicit(&s->versions[p], memory_order_relaxed);
    if (stamp == seq && v == new_version) return SC_OK;
    /* Queued already: its copy and restamp are pending, and nothing may restamp it before
     * its node is published. Callers give a page one version per batch (the open epoch,
     * or a delta's distinct ids), so there is nothing to add. */
    if (s->queued && (s->queued[p >> 6] & (1ull << (p & 63)))) return SC_OK;
    if (!needs_preserving(s, stamp, seq, v)) {
        restamp(s, p, seq, new_version);
        return SC_OK;
    }
    return queue(b, p, v, stamp, new_version);
}

sc_status sc__prep_finish(sc_prep *b) {
    if (b->copier) {
        if (b->n) hand_off(b);
        finish_flight(b);
        sc__copier_stop(b->copier);
    } else {
        flush(b);
    }
    free(b->nodes);
    free(b->new_versions);
    free(b->flight_nodes);
    free(b->flight_versions);
    memset(b, 0, sizeof *b);
    return SC_OK;
}

/* Only under a live snapshot (otherwise nothing is copied), for at least 1024 pages or
 * rows, and with no more than 4 bitmap words to scan per page or row. */
bool sc__prep_worth_sorting(const sc_store *s, uint64_t n, uint64_t first, uint64_t last) {
    return s->sort_bits && s->newest_snap && n >= 1024 && ((last - first) >> 6) <= 4 * n;
}

/* Marked pages not written since the newest snapshot: the most that preparing them can
 * copy. Not lowered by the preserve floor, which a snapshot may lower meanwhile. */
uint64_t sc__sort_count_copies(const sc_store *s, uint64_t lo, uint64_t hi) {
    uint64_t seq = atomic_load_explicit(&s->seq, memory_order_relaxed), n = 0;
    for (uint64_t g = lo >> 6; g <= hi >> 6; g++) {
        for (uint64_t w = s->sort_bits[g]; w; w &= w - 1) {
            uint64_t p = (g << 6) + (uint64_t)__builtin_ctzll(w);
            n += atomic_load_explicit(&s->stamps[p], memory_order_relaxed) != seq;
        }
    }
    return n;
}

void sc__sort_clear(sc_store *s, uint64_t lo, uint64_t hi) {
    memset(&s->sort_bits[lo >> 6], 0, ((hi >> 6) - (lo >> 6) + 1) * sizeof *s->sort_bits);
}

/* Preserving copies in address order run at nearly the speed of one long copy: the
 * hardware prefetchers follow the source from page to page, and its page-table walks hit
 * the cache. In the order random writes come (random pages) the same copies took about
 * 1.5x as long on this project's machine. Marking is a bit per page, so the order costs
 * one pass over the marked range's bitmap words. */
sc_status sc__prep_marked(sc_prep *b, uint64_t lo, uint64_t hi, uint64_t new_version) {
    sc_store *s = b->s;
    sc_status st = SC_OK;
    for (uint64_t g = lo >> 6; g <= hi >> 6; g++) {
        uint64_t w = s->sort_bits[g];
        if (!w) continue;
        s->sort_bits[g] = 0; /* cleared even after a failure: the scratch stays zero */
        while (w && st == SC_OK) {
            st = sc__prep_page(b, (g << 6) + (uint64_t)__builtin_ctzll(w), new_version);
            w &= w - 1;
        }
    }
    return st;
}

sc_status sc__prep_sorted(sc_store *s, uint64_t lo, uint64_t hi, uint64_t new_version) {
    sc_prep b;
    sc__prep_init(&b, s);
    sc_status st = sc__prep_marked(&b, lo, hi, new_version);
    sc_status finished = sc__prep_finish(&b);
    return st ? st : finished;
}

sc_status sc__prep_reserve(sc_prep *b, uint64_t pages) {
    if (batch_arrays(b)) return SC_ENOMEM;
    return sc__pool_reserve(&b->s->pool, pages) ? SC_OK : SC_ENOMEM;
}

uint64_t sc__prep_window_shift(const sc_store *s) {
    uint64_t shift = 0;
    while (((uint64_t)2 << shift) <= (BATCH_BYTES >> s->page_shift)) shift++;
    return shift > 6 ? shift : 6;
}

void sc__prep_push(sc_prep *b) {
    if (b->n) hand_off(b);
}

uint64_t sc__prep_ready_below(const sc_prep *b, uint64_t scanned_below) {
    uint64_t ready = scanned_below;
    if (b->flight_n && b->flight_first < ready) ready = b->flight_first;
    if (b->n && b->first < ready) ready = b->first;
    return ready;
}
