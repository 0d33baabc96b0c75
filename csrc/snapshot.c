/* Fork-free copy-on-write snapshots.
 *
 * Every write stamps its page with the store's open write sequence; a snapshot closes
 * the sequence (and the epoch) and reads a page live while the page's stamp is not newer
 * than the snapshot's sequence. The first write after a snapshot to such a page first
 * copies the old content into a preserved node covering [old stamp, write sequence),
 * publishes it on the page's chain, and only then restamps and modifies the page. A
 * reader that copied a live page re-checks the stamp afterwards (seqlock style): if it
 * moved, the copy may be torn and the reader takes the preserved node instead, which is
 * guaranteed to be published by then.
 *
 * Stamps rather than page versions decide what a snapshot sees: on a replica, versions
 * come from the primary and a delta applied after a local snapshot may carry versions
 * older than that snapshot's epoch.
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static sc_snap *find_snap(const sc_store *s, uint64_t epoch) {
    uint64_t lo = 0, hi = s->n_snaps;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        if (s->snaps[mid].epoch < epoch) lo = mid + 1;
        else hi = mid;
    }
    return lo < s->n_snaps && s->snaps[lo].epoch == epoch ? &s->snaps[lo] : NULL;
}

uint64_t sc__snap_seq(const sc_store *s, uint64_t epoch) {
    const sc_snap *snap = find_snap(s, epoch);
    return snap ? snap->seq : 0;
}

/* Newest live snapshot whose sequence lies in [stamp, until), or NULL. */
static sc_snap *snap_needing(const sc_store *s, uint64_t stamp, uint64_t until) {
    for (uint64_t i = s->n_snaps; i-- > 0;) {
        uint64_t q = s->snaps[i].seq;
        if (q < until && q >= stamp) return &s->snaps[i];
        if (q < stamp) break;
    }
    return NULL;
}

/* Under chain_lock (write). Without live snapshots nothing is preserved anyway. */
static void update_preserve_floor(sc_store *s) {
    uint64_t lowest = s->n_snaps ? UINT64_MAX : 0;
    for (uint64_t i = 0; i < s->n_snaps; i++)
        if (s->snaps[i].floor < lowest) lowest = s->snaps[i].floor;
    atomic_store(&s->preserve_floor, lowest);
}

sc_status sc_snapshot_take(sc_store *s, uint64_t *epoch_out) {
    if (!s->preserved) {
        /* Lazily: stores that never snapshot pay nothing; calloc of this size maps
         * zero pages, so untouched chains cost no memory either. */
        s->preserved = calloc(s->n_pages, sizeof *s->preserved);
        s->queued = calloc(s->n_groups, sizeof *s->queued);
        s->sort_bits = calloc(s->n_groups, sizeof *s->sort_bits);
        if (!s->preserved || !s->queued || !s->sort_bits) {
            free((void *)s->preserved);
            free(s->queued);
            free(s->sort_bits);
            s->preserved = NULL;
            s->queued = NULL;
            s->sort_bits = NULL;
            return SC_ENOMEM;
        }
    }
    pthread_rwlock_wrlock(&s->chain_lock);
    if (s->n_snaps == s->cap_snaps) {
        uint64_t cap = s->cap_snaps ? s->cap_snaps * 2 : 8;
        sc_snap *grown = realloc(s->snaps, cap * sizeof *grown);
        if (!grown) { pthread_rwlock_unlock(&s->chain_lock); return SC_ENOMEM; }
        s->snaps = grown;
        s->cap_snaps = cap;
    }
    uint64_t e = atomic_load(&s->epoch), q = atomic_load(&s->seq);
    s->snaps[s->n_snaps++] = (sc_snap){.epoch = e, .seq = q, .owned = 0};
    s->newest_snap = q;
    atomic_store(&s->preserve_floor, 0); /* the new snapshot reads every page */
    atomic_store(&s->seq, q + 1);
    atomic_store(&s->epoch, e + 1);
    pthread_rwlock_unlock(&s->chain_lock);
    sc__persist_header(s);
    *epoch_out = e;
    return SC_OK;
}

/* Lowering is the mirror image of the writer's skip (prepare.c, copy_skippable): publish
 * the lower floor, full fence, then look for skips since the floor was raised. Either the
 * writer sees the lower floor and copies, or this sees its skip and puts the floor back:
 * never a page the snapshot reads with its copy skipped. */
static bool lower_floor(sc_store *s, sc_snap *snap, uint64_t floor) {
    uint64_t raised = snap->floor;
    snap->floor = floor;
    update_preserve_floor(s);
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load(&s->floor_skips) == snap->skips_at_floor) return true;
    snap->floor = raised;
    update_preserve_floor(s);
    return false;
}

sc_status sc_snapshot_set_floor(sc_store *s, uint64_t epoch, uint64_t floor, int *applied) {
    pthread_rwlock_wrlock(&s->chain_lock);
    sc_snap *snap = find_snap(s, epoch);
    if (!snap) { pthread_rwlock_unlock(&s->chain_lock); return SC_ENOSNAP; }
    bool ok = true;
    if (floor >= snap->floor) {
        /* Counted from the first raise: a skip under any floor since then may be a page
         * a later, lower floor reads. */
        if (!snap->floor) snap->skips_at_floor = atomic_load(&s->floor_skips);
        snap->floor = floor;
        update_preserve_floor(s);
    } else {
        ok = lower_floor(s, snap, floor);
    }
    pthread_rwlock_unlock(&s->chain_lock);
    *applied = ok;
    return SC_OK;
}

sc_node sc__node_new(sc_store *s, uint64_t page, uint64_t version, uint64_t stamp) {
    sc_pool *p = &s->pool;
    sc_node n = sc__pool_alloc(p);
    if (!n) return 0;
    sc_chunk *c = sc__chunk_of(p, n);
    uint32_t i = sc__slot_of(p, n);
    c->page[i] = (uint32_t)page; /* sc_store_open caps stores at 2^32 pages */
    c->version[i] = version;
    c->stamp[i] = stamp;
    return n;
}

uint8_t *sc__node_content(sc_store *s, sc_node n) {
    return sc__node_data(sc__chunk_of(&s->pool, n), &s->pool, sc__slot_of(&s->pool, n));
}

void sc__node_fill(sc_store *s, sc_node n, bool stream) {
    const sc_pool *p = &s->pool;
    sc_chunk *c = sc__chunk_of(p, n);
    uint32_t i = sc__slot_of(p, n);
    sc__copy_page(stream, sc__node_data(c, p, i),
                  s->data + ((uint64_t)c->page[i] << s->page_shift), s->page_size);
}

void sc__node_publish(sc_store *s, sc_node n) {
    sc_chunk *c = sc__chunk_of(&s->pool, n);
    uint32_t i = sc__slot_of(&s->pool, n);
    uint64_t page = c->page[i];
    /* Relaxed: the node is not published until the release store below (a plain
     * assignment to an _Atomic field would be a full barrier, as costly as the copy). */
    atomic_store_explicit(&c->next_in_page[i],
                          atomic_load_explicit(&s->preserved[page], memory_order_relaxed),
                          memory_order_relaxed);
    /* The newest snapshot is the one that needs it (stamp <= newest < now). */
    sc_snap *owner = &s->snaps[s->n_snaps - 1];
    c->next_owned[i] = owner->owned;
    owner->owned = n;
    atomic_store_explicit(&s->preserved[page], n, memory_order_release);
    sc__writer_add(&s->preserved_pages, 1);
    sc__writer_add(&s->pages_preserved_total, 1);
}

/* Where a node's content stops being the page's: the stamp of the content that replaced
 * it, which is the next newer node's, or the live page's when the node heads its chain.
 * Derived rather than stored (8 bytes a node). Contents between that were never
 * preserved, or freed since, can sit in between and make this later than the write that
 * actually replaced the node; but no live snapshot can fall in that gap: each of those
 * contents was dropped because no live snapshot read it, and later snapshots are newer
 * than all of them. So "a live snapshot in [stamp, until)" has the same answer. */
static uint64_t node_until(const sc_store *s, sc_node node) {
    const sc_pool *p = &s->pool;
    uint64_t page = sc__chunk_of(p, node)->page[sc__slot_of(p, node)];
    sc_node newer = 0;
    for (sc_node cur = atomic_load_explicit(&s->preserved[page], memory_order_relaxed);
         cur != node;) {
        newer = cur;
        cur = atomic_load_explicit(&sc__chunk_of(p, cur)->next_in_page[sc__slot_of(p, cur)],
                                   memory_order_relaxed);
    }
    if (!newer) return atomic_load_explicit(&s->stamps[page], memory_order_relaxed);
    return sc__chunk_of(p, newer)->stamp[sc__slot_of(p, newer)];
}

static void unlink_and_free(sc_store *s, sc_node node) {
    sc_pool *p = &s->pool;
    sc_chunk *c = sc__chunk_of(p, node);
    uint32_t i = sc__slot_of(p, node);
    _Atomic sc_node *link = &s->preserved[c->page[i]];
    for (sc_node cur = atomic_load(link); cur; cur = atomic_load(link)) {
        sc_chunk *cc = sc__chunk_of(p, cur);
        uint32_t ci = sc__slot_of(p, cur);
        if (cur == node) {
            atomic_store(link, atomic_load(&c->next_in_page[i]));
            break;
        }
        link = &cc->next_in_page[ci];
    }
    sc__pool_free(p, node);
    sc__writer_add(&s->preserved_pages, (uint64_t)-1);
}

sc_status sc_snapshot_release(sc_store *s, uint64_t epoch) {
    pthread_rwlock_wrlock(&s->chain_lock);
    sc_snap *snap = find_snap(s, epoch);
    if (!snap) { pthread_rwlock_unlock(&s->chain_lock); return SC_ENOSNAP; }
    sc_node owned = snap->owned;
    uint64_t idx = (uint64_t)(snap - s->snaps);
    memmove(snap, snap + 1, (s->n_snaps - idx - 1) * sizeof *snap);
    s->n_snaps--;
    s->newest_snap = s->n_snaps ? s->snaps[s->n_snaps - 1].seq : 0;
    update_preserve_floor(s);
    /* Hand each node to another live snapshot that still reads it, or free it. */
    sc_pool *p = &s->pool;
    while (owned) {
        sc_chunk *c = sc__chunk_of(p, owned);
        uint32_t i = sc__slot_of(p, owned);
        sc_node next = c->next_owned[i];
        sc_snap *heir = snap_needing(s, c->stamp[i], node_until(s, owned));
        if (heir) {
            c->next_owned[i] = heir->owned;
            heir->owned = owned;
        } else {
            unlink_and_free(s, owned);
        }
        owned = next;
    }
    pthread_rwlock_unlock(&s->chain_lock);
    return SC_OK;
}

void sc__free_all_preserved(sc_store *s) {
    sc_pool *p = &s->pool;
    for (uint64_t k = 0; k < s->n_snaps; k++) {
        for (sc_node n = s->snaps[k].owned; n;) {
            sc_node next = sc__chunk_of(p, n)->next_owned[sc__slot_of(p, n)];
            sc__pool_free(p, n);
            n = next;
        }
    }
    s->n_snaps = 0;
    s->newest_snap = 0;
    free((void *)s->preserved);
    s->preserved = NULL;
    free(s->queued);
    s->queued = NULL;
    free(s->sort_bits);
    s->sort_bits = NULL;
    sc__pool_destroy(p);
    atomic_store(&s->preserved_pages, 0);
}

/* The preserved node a snapshot at sequence `seq` reads for `page` (0: none), and where
 * its fields are. */
typedef struct {
    sc_chunk *c;
    uint32_t i;
} node_ref;

static node_ref node_as_of(sc_store *s, uint64_t seq, uint64_t page) {
    const sc_pool *p = &s->pool;
    for (sc_node n = atomic_load_explicit(&s->preserved[page], memory_order_acquire); n;) {
        node_ref r = {sc__chunk_of(p, n), sc__slot_of(p, n)};
        if (r.c->stamp[r.i] <= seq) return r;
        n = atomic_load_explicit(&r.c->next_in_page[r.i], memory_order_acquire);
    }
    return (node_ref){NULL, 0};
}

sc_status sc__read_page_as_of(sc_store *s, uint64_t seq, uint64_t page, uint8_t *dst,
                              uint64_t *version) {
    uint64_t st1 = sc__load_stamp(s, page);
    if (st1 <= seq) {
        uint64_t v = sc__load_version(s, page);
        memcpy(dst, s->data + (page << s->page_shift), s->page_size);
        atomic_thread_fence(memory_order_acquire);
        if (atomic_load_explicit(&s->stamps[page], memory_order_acquire) == st1) {
            if (version) *version = v;
            return SC_OK;
        }
        /* A writer moved the page while we copied: its old content is preserved. */
    }
    node_ref n = node_as_of(s, seq, page);
    /* No node while the snapshot is live cannot happen: report, never return wrong bytes. */
    if (!n.c) return SC_ECORRUPT;
    memcpy(dst, sc__node_data(n.c, &s->pool, n.i), s->page_size);
    if (version) *version = n.c->version[n.i];
    return SC_OK;
}

uint64_t sc__version_as_of(sc_store *s, uint64_t seq, uint64_t page) {
    uint64_t st1 = sc__load_stamp(s, page);
    if (st1 <= seq) {
        uint64_t v = sc__load_version(s, page);
        if (atomic_load_explicit(&s->stamps[page], memory_order_acquire) == st1) return v;
    }
    node_ref n = node_as_of(s, seq, page);
    return n.c ? n.c->version[n.i] : 0;
}

/* Pages listed in ascending but scattered order: the hardware prefetcher stops at each
 * page boundary, so every page would start with a run of misses. Ask for a page's lines
 * (and its stamp) a little before it is copied. */
static void prefetch_page(const sc_store *s, uint64_t page) {
    const uint8_t *p = s->data + (page << s->page_shift);
    for (uint64_t off = 0; off < s->page_size; off += 64) __builtin_prefetch(p + off);
    __builtin_prefetch((const void *)&s->stamps[page]);
}

sc_status sc_snapshot_read_pages(sc_store *s, uint64_t epoch, const uint64_t *ids, uint64_t n,
                                 void *dst, uint64_t *versions) {
    for (uint64_t i = 0; i < n; i++)
        if (ids[i] >= s->n_pages) return SC_ERANGE;
    pthread_rwlock_rdlock(&s->chain_lock);
    uint64_t seq = sc__snap_seq(s, epoch);
    sc_status st = seq ? SC_OK : SC_ENOSNAP;
    uint8_t *out = dst;
    for (uint64_t i = 0; i < n && st == SC_OK; i++) {
        if (i + 2 < n) prefetch_page(s, ids[i + 2]);
        st = sc__read_page_as_of(s, seq, ids[i], out + (i << s->page_shift),
                                 versions ? &versions[i] : NULL);
    }
    pthread_rwlock_unlock(&s->chain_lock);
    return st;
}

sc_status sc_snapshot_read(sc_store *s, uint64_t epoch, uint64_t offset, void *dst, uint64_t len) {
    if (offset > s->size || len > s->size - offset) return SC_ERANGE;
    if (!len) {
        pthread_rwlock_rdlock(&s->chain_lock);
        uint64_t seq = sc__snap_seq(s, epoch);
        pthread_rwlock_unlock(&s->chain_lock);
        return seq ? SC_OK : SC_ENOSNAP;
    }
    uint8_t *page_buf = malloc(s->page_size);
    if (!page_buf) return SC_ENOMEM;
    uint8_t *out = dst;
    sc_status st = SC_OK;
    uint64_t pos = offset, end = offset + len;
    while (pos < end && st == SC_OK) {
        uint64_t page = pos >> s->page_shift;
        uint64_t in_page = pos & (s->page_size - 1);
        uint64_t take = s->page_size - in_page;
        if (take > end - pos) take = end - pos;
        /* Lock per page: a long read must not hold off snapshot() or release(). */
        bool whole = take == s->page_size;
        pthread_rwlock_rdlock(&s->chain_lock);
        uint64_t seq = sc__snap_seq(s, epoch);
        if (!seq) st = SC_ENOSNAP;
        else st = sc__read_page_as_of(s, seq, page, whole ? out : page_buf, NULL);
        pthread_rwlock_unlock(&s->chain_lock);
        if (st == SC_OK && !whole) memcpy(out, page_buf + in_page, take);
        out += take;
        pos += take;
    }
    free(page_buf);
    return st;
}
