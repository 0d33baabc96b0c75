/* Internal layout of the store; shared by the core's translation units only. */
#ifndef STATECORE_INTERNAL_H
#define STATECORE_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <string.h>

#include "statecore.h"

/* A preserved page: the old content of one page, kept for the live snapshots whose
 * sequence number S satisfies stamp <= S < until, where until is the stamp of the content
 * that replaced it (snapshot.c derives it from the chain). Named by a 32-bit id (0: none); its
 * content is a slot of the store's page pool and its fields live in arrays beside that
 * slot's chunk (pool.c). Chains are newest first. `version` is the content's epoch (what
 * deltas carry); stamps are local write sequence numbers (what snapshots see). */
typedef uint32_t sc_node;

#define SC_NODE_META_BYTES (2 * 8 + 3 * 4) /* version, stamp; page, two links */

typedef struct sc_chunk {
    uint8_t *base;                 /* chunk_size bytes of page slots */
    struct sc_chunk *prev, *next;  /* in the pool's list of chunks with free slots */
    uint32_t id;
    uint32_t free_head;            /* 1 + first free slot, chained through next_owned */
    uint32_t live;
    uint32_t carved;               /* slots handed out at least once (bump allocation) */
    bool listed;
    uint64_t *version, *stamp;
    uint32_t *page;
    uint32_t *next_owned;          /* list of the snapshot that answers for the node */
    _Atomic uint32_t *next_in_page;
} sc_chunk;

/* Page-sized slots for preserved copies, and their nodes (pool.c). */
typedef struct sc_pool {
    uint32_t page_size, page_shift;
    uint32_t slot_shift;     /* log2 of slots per chunk */
    uint32_t leaf_shift;     /* log2 of chunks per directory leaf */
    uint32_t max_chunks, next_id;
    uint64_t chunk_size;
    uint64_t chunks;
    sc_chunk ***dir;         /* chunk id -> chunk, in leaves that never move */
    sc_chunk *partial;       /* chunks with a free slot */
    /* Empty chunks, lazily freed (MADV_FREE): the next snapshot reuses them without
     * faulting and zeroing fresh memory, and the kernel reclaims them under pressure. */
    sc_chunk **empty;
    uint64_t n_empty, cap_empty;
    uint64_t spare;          /* free slots in partial and empty chunks */
} sc_pool;

static inline sc_chunk *sc__chunk_of(const sc_pool *p, sc_node n) {
    uint32_t id = (n - 1) >> p->slot_shift;
    return p->dir[id >> p->leaf_shift][id & ((1u << p->leaf_shift) - 1)];
}

static inline uint32_t sc__slot_of(const sc_pool *p, sc_node n) {
    return (n - 1) & ((1u << p->slot_shift) - 1);
}

static inline uint8_t *sc__node_data(const sc_chunk *c, const sc_pool *p, uint32_t slot) {
    return c->base + ((uint64_t)slot << p->page_shift);
}

typedef struct sc_snap {
    uint64_t epoch;  /* the epoch it closed: how callers name it */
    uint64_t seq;    /* the write sequence it closed: what it reads by */
    sc_node owned;   /* first node of the list it answers for */
    uint64_t floor;  /* reads only pages whose version is above this (0: every page) */
    uint64_t skips_at_floor; /* floor_skips when the floor was raised */
} sc_snap;

/* File layout of a path-backed store: [header 4096][data size][versions 8*n_pages]. */
#define SC_FILE_HEADER_SIZE 4096u
#define SC_STORE_MAGIC "SCSTORE1"

typedef struct sc_file_header {
    char magic[8];
    uint32_t format_version;
    uint32_t page_size;
    uint64_t size;
    uint64_t epoch;
    uint64_t schema_version;
    uint64_t dirty_base;
    uint8_t uuid[16];
    uint64_t checksum; /* over the fields above */
} sc_file_header;

struct sc_store {
    uint8_t *map;
    size_t map_len;
    int fd;
    sc_file_header *fh;          /* NULL for anonymous stores */

    uint8_t *data;
    uint64_t size;
    uint64_t n_pages;
    uint32_t page_size;
    uint32_t page_shift;

    _Atomic uint64_t *versions;  /* epoch of each page's content (deltas, idempotence) */
    bool versions_owned;         /* malloc'd (anonymous) rather than mapped */
    /* Local write sequence of each page's last write. Equal to the version on a store
     * that only writes; different on a replica, whose page versions come from the
     * primary's deltas and may be older than a local snapshot taken before they arrived.
     * Snapshots read by stamp, deltas by version. In memory only: no snapshot outlives
     * the process, so a reopened store starts at zero. */
    _Atomic uint64_t *stamps;
    _Atomic uint64_t seq;        /* the open write sequence; a snapshot closes it */
    _Atomic uint64_t *group_max; /* newest version in each group of 64 pages */
    _Atomic uint64_t *dirty;     /* bit per page: written after dirty_base */
    uint64_t n_groups;
    uint64_t dirty_base;

    _Atomic uint64_t epoch;
    uint64_t schema_version;
    uint8_t uuid[16];

    /* Snapshots: sorted by epoch. Mutated under chain_lock (write), which also keeps
     * readers from walking a chain while nodes are freed. */
    pthread_rwlock_t chain_lock;
    sc_snap *snaps;
    uint64_t n_snaps;
    uint64_t cap_snaps;
    uint64_t newest_snap;        /* sequence of the newest live snapshot; 0 when none */
    /* Lowest floor of the live snapshots: a page at or below it needs no copy (see
     * sc_snapshot_set_floor), and the copies skipped that way, counted. */
    _Atomic uint64_t preserve_floor;
    _Atomic uint64_t floor_skips;
    _Atomic sc_node *preserved;  /* per-page chain heads; allocated on first snapshot */
    uint64_t *queued;            /* bit per page: in a prepare batch, copy pending */
    uint64_t *sort_bits;         /* bit per page: sc__prep_sorted's scratch, zero between */
    sc_pool pool;
    void *replay_scratch;        /* replay.c's per-page table, kept between replays */

    _Atomic uint64_t preserved_pages;
    _Atomic uint64_t pages_written;
    _Atomic uint64_t pages_preserved_total;
    _Atomic uint64_t deltas_applied;
    _Atomic uint64_t pages_applied;
};

/* replay.c */
void sc__replay_scratch_free(sc_store *s);

/* store.c */
void sc__persist_header(sc_store *s);
static inline bool sc__range_ok(const sc_store *s, uint64_t offset, uint64_t len) {
    return offset <= s->size && len <= s->size - offset;
}

/* prepare.c: getting pages ready for a write (preserve, then restamp). One page at a
 * time, or many through a batch that makes the preserving copies with a few threads. */
sc_status sc__prepare_page(sc_store *s, uint64_t page, uint64_t new_version);

/* prep_copier.c: a helper thread that copies a batch's preserved pages while the writer
 * prepares the next batch; the writer helps finish each batch before publishing it. */
typedef struct sc_copier sc_copier;
sc_copier *sc__copier_start(sc_store *s); /* NULL: no thread (not 2 CPUs, or it failed) */
void sc__copier_submit(sc_copier *c, const sc_node *nodes, uint64_t n);
void sc__copier_finish(sc_copier *c);     /* returns once every page of the batch is copied */
void sc__copier_stop(sc_copier *c);

typedef struct sc_prep {
    sc_store *s;
    sc_node *nodes;          /* preserved, copy pending, not yet published */
    uint64_t *new_versions;  /* what each queued page's version becomes */
    uint64_t n, cap;
    /* The previous full batch, being copied by the copier (made at the first full one). */
    sc_node *flight_nodes;
    uint64_t *flight_versions;
    uint64_t flight_n;
    sc_copier *copier;
    bool copier_tried;       /* one attempt per prepare: buffers and thread, or neither */
    uint64_t first, flight_first; /* first page of the batch, of the flight (sorted: lowest) */
} sc_prep;

void sc__prep_init(sc_prep *b, sc_store *s);
sc_status sc__prep_page(sc_prep *b, uint64_t page, uint64_t new_version);
sc_status sc__prep_finish(sc_prep *b); /* copies, publishes, restamps; always frees */

/* Many scattered pages, prepared in address order: mark each (any order, repeats fine),
 * then prepare the marked pages of [lo, hi]. Needs s->sort_bits (allocated with the first
 * snapshot), which is left clear: every mark is taken by sc__prep_marked or
 * sc__sort_clear. Ranges given to these start and end on 64-page (bitmap word) bounds,
 * or at the ends of the marked span. */
static inline void sc__sort_mark(sc_store *s, uint64_t p) {
    s->sort_bits[p >> 6] |= 1ull << (p & 63);
}
/* Enough pages, densely enough spread over [first, last], for address order to pay. */
bool sc__prep_worth_sorting(const sc_store *s, uint64_t n, uint64_t first, uint64_t last);
uint64_t sc__sort_count_copies(const sc_store *s, uint64_t lo, uint64_t hi);
void sc__sort_clear(sc_store *s, uint64_t lo, uint64_t hi);
sc_status sc__prep_marked(sc_prep *b, uint64_t lo, uint64_t hi, uint64_t new_version);
/* The marked pages of [lo, hi] as one batch: sc__prep_marked, then sc__prep_finish. */
sc_status sc__prep_sorted(sc_store *s, uint64_t lo, uint64_t hi, uint64_t new_version);
/* Room for `pages` preserved copies made ahead, so that preparing that many pages cannot
 * fail; SC_ENOMEM changes nothing. */
sc_status sc__prep_reserve(sc_prep *b, uint64_t pages);
/* log2 of the pages in an address window: one batch's worth (16 MiB), but at least a
 * bitmap word's 64 pages (several batches at the largest page sizes). */
uint64_t sc__prep_window_shift(const sc_store *s);
/* Hands the pages queued so far to be copied, as a full batch would be. */
void sc__prep_push(sc_prep *b);
/* Pages are prepared below this page id (pages queued in address order, the caller has
 * passed every page below `scanned_below`): their new bytes may be written. */
uint64_t sc__prep_ready_below(const sc_prep *b, uint64_t scanned_below);

/* rows.c, rows_windows.c: rows of an array in the store written by index. */
typedef struct sc_rows {
    const int64_t *idx;     /* row indices, negative ones counting from the end */
    int64_t n_rows;
    uint64_t base, row_bytes;
    const uint8_t *src;     /* row i's bytes at src + i * src_stride */
    uint64_t src_stride;
} sc_rows;

/* A row index from Python's convention (negative counts from the end), already checked. */
static inline uint64_t sc__row_of(int64_t i, int64_t n_rows) {
    return i < 0 ? (uint64_t)(i + n_rows) : (uint64_t)i;
}

static inline void sc__copy_row(uint8_t *dst, const uint8_t *src, uint64_t row_bytes) {
    if (row_bytes == 8) memcpy(dst, src, 8); /* the common int64/float64 case, inlined */
    else memcpy(dst, src, row_bytes);
}

/* Marks pages [first, last] of one row in bits (whose word 0 is page word `word0`),
 * skipping the page the previous row ended on, as the unsorted path counts page writes;
 * counts the pages marked. */
static inline void sc__mark_row(uint64_t *bits, uint64_t word0, uint64_t first, uint64_t last,
                                uint64_t *last_page, uint64_t *touched) {
    for (uint64_t p = first; p <= last; p++) {
        if (p == *last_page) continue;
        bits[(p >> 6) - word0] |= 1ull << (p & 63);
        *last_page = p;
        (*touched)++;
    }
}

/* n checked rows (n < 2^32) touching pages [first, last], under a live snapshot. */
sc_status sc__write_rows_sorted(sc_store *s, const sc_rows *rows, uint64_t n, uint64_t first,
                                uint64_t last);

/* Random page ids miss the cache on every page's stamp and version, one miss after another:
 * a writer walking a list of pages asks for those of a page this many ahead. */
#define SC_PREFETCH_AHEAD 16
static inline void sc__prefetch_meta(const sc_store *s, uint64_t p) {
    __builtin_prefetch((const void *)&s->stamps[p], 1);
    __builtin_prefetch((const void *)&s->versions[p], 1);
}

/* page_checksums.c: out[i] = sc_page_checksum(p[i], len), several pages side by side. */
#define SC_CHECKSUM_BATCH 64 /* pages per call that keeps the lanes full and stays in cache */
void sc__page_checksums_at(const uint8_t *const *p, uint64_t n, uint64_t len, uint64_t *out);

/* Fault injection for the C tests (csrc built with -DSC_FAULT_INJECTION, as
 * run_sanitized.sh does): the allocations of a write under a snapshot (batch buffers, the
 * copier, pool chunks) count sc_test_allocs_left down, and the one that finds it at 0
 * fails; -1, the default, fails none. Nothing of this is in any other build. */
#ifdef SC_FAULT_INJECTION
extern _Atomic long sc_test_allocs_left;
bool sc__alloc_fails(void);
#else
static inline bool sc__alloc_fails(void) { return false; }
#endif

/* cpu.c */
bool sc__have_avx512(void); /* AVX-512 F and DQ, checked once */
int sc__usable_cpus(void);  /* CPUs this process may run on */

/* stream_copy.c: whole-page copies that bypass the cache, for bulk writes of pages
 * nobody reads soon. Fence before a run (new stamps visible before new bytes) and after. */
#define SC_STREAM_MIN_BYTES (4u << 20) /* below this, the copy may well be read again soon */
typedef enum { SC_COPY_PLAIN, SC_COPY_SSE2, SC_COPY_AVX512 } sc_copy_impl;
void sc__stream_fence(void);
void sc__stream_page(uint8_t *dst, const uint8_t *src, uint64_t len); /* the best one here */
/* A given implementation (falls back to SSE2 without AVX-512): for the C tests. */
void sc__stream_page_using(sc_copy_impl impl, uint8_t *dst, const uint8_t *src, uint64_t len);
static inline void sc__copy_page(bool stream, uint8_t *dst, const uint8_t *src, uint64_t len) {
    if (stream) sc__stream_page(dst, src, len);
    else memcpy(dst, src, len);
}

/* pool.c */
void sc__pool_init(sc_pool *p, uint32_t page_size);
sc_node sc__pool_alloc(sc_pool *p); /* 0: out of memory or ids */
void sc__pool_free(sc_pool *p, sc_node n);
bool sc__pool_reserve(sc_pool *p, uint64_t n); /* n allocations that cannot fail, or false */
void sc__pool_destroy(sc_pool *p);

/* snapshot.c */
/* A preserved page in three steps, so that a batch can copy in parallel: a node with its
 * fields set, the copy into its content, then publication on the page's chain (after
 * which snapshot readers may use it). */
sc_node sc__node_new(sc_store *s, uint64_t page, uint64_t version, uint64_t stamp);
uint8_t *sc__node_content(sc_store *s, sc_node n);
/* Copy its page's live content into it; `stream`: with streaming stores, after which the
 * caller fences (sc__stream_fence) before anyone is told the copy is done. */
void sc__node_fill(sc_store *s, sc_node n, bool stream);
void sc__node_publish(sc_store *s, sc_node n);
/* Content and version of `page` as of the snapshot with sequence `seq`; chain_lock held. */
sc_status sc__read_page_as_of(sc_store *s, uint64_t seq, uint64_t page, uint8_t *dst,
                              uint64_t *version);
uint64_t sc__version_as_of(sc_store *s, uint64_t seq, uint64_t page);
/* Sequence number of the live snapshot that closed `epoch`, or 0; chain_lock held. */
uint64_t sc__snap_seq(const sc_store *s, uint64_t epoch);
void sc__free_all_preserved(sc_store *s);

/* delta.c */
sc_status sc__write_pages_from(sc_store *s, const uint64_t *ids, const uint64_t *new_versions,
                               const uint8_t *const *sources, uint64_t n, int threads,
                               sc_progress *progress);

/* little helpers */
static inline uint64_t sc__load_version(const sc_store *s, uint64_t p) {
    return atomic_load_explicit(&s->versions[p], memory_order_acquire);
}

/* The index of a parsed view (ids, versions) lies in the caller's buffer, which
 * sc_delta_parse checked but which may have changed since: a writable buffer decoded
 * without a copy, a checkpoint file changed under its mapping. Whoever writes the store by
 * it reads each entry once (volatile: the compiler may not read it again later) and checks
 * it again as the parser did, before anything is written: a page of this store, after
 * the entry before it, with a version in (base, target]. A few compares a page. */
static inline uint64_t sc__read_once(const uint64_t *p) {
    return *(const volatile uint64_t *)p;
}

static inline bool sc__index_entry_ok(const sc_store *s, const sc_header *h, uint64_t i,
                                      uint64_t id, uint64_t prev_id, uint64_t version) {
    return id < s->n_pages && (i == 0 || id > prev_id) && version > h->base_epoch &&
           version <= h->target_epoch;
}

/* Counters and bitmap words that only the (serialized) writer modifies: a relaxed load and
 * store instead of a locked read-modify-write. On x86 a locked instruction also drains the
 * store buffer, and right after a page copy that buffer is full: the lock cost more than
 * the copy. Readers in other threads still load these atomically. */
static inline void sc__writer_add(_Atomic uint64_t *c, uint64_t d) {
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + d,
                          memory_order_relaxed);
}

static inline void sc__writer_set_bits(_Atomic uint64_t *w, uint64_t bits) {
    uint64_t old = atomic_load_explicit(w, memory_order_relaxed);
    if ((old & bits) != bits) atomic_store_explicit(w, old | bits, memory_order_relaxed);
}

static inline uint64_t sc__load_stamp(const sc_store *s, uint64_t p) {
    return atomic_load_explicit(&s->stamps[p], memory_order_acquire);
}

#endif
