/* On-store layout of the keyed-state map and helpers shared by kv.c, kv_heap.c and
 * kv_verify.c. Little-endian, like the rest of the store.
 *
 * Table: linear hashing. There are M + split primary buckets, M = 2^(b0 + level). A key
 * with hash h lives in bucket b = h mod M, or h mod 2M when b < split. Each insert that
 * pushes the average load past 1/2 splits exactly one bucket (the one at `split`), so
 * the table grows by one bucket at a time and no call ever rehashes more than one chain.
 * Primary buckets live in segments: segment 0 holds 2^b0 buckets, segment i >= 1 holds
 * 2^(b0+i-1); a segment is one heap block, reserved when its level begins, and each of
 * its buckets is written when the split that creates it runs (never all at once).
 *
 * Bucket: 128 bytes, 7 slots of (64-bit hash, record offset) and a link to an overflow
 * bucket (a heap block). In a chain, every bucket but the last is full.
 *
 * Heap: blocks of 16-byte granularity with a 16-byte head: size | flags in the first 8
 * bytes. Free blocks carry list links and a footer (their size) for coalescing; blocks
 * are coalesced on free, free lists are segregated by size class (exact 16-byte classes
 * up to 1 KiB, then four classes per power of two). Above `top` lies the never-used
 * wilderness. A record block: [size|flags u64][klen u32][vlen u32][key][value].
 */
#ifndef STATECORE_KV_INTERNAL_H
#define STATECORE_KV_INTERNAL_H

#include <stdbool.h>
#include <string.h>

#include "internal.h" /* sc_store.newest_snap (may tracking allocate?), sc__alloc_fails */
#include "kv.h"

#define KV_MAGIC "SCKVMAP1"
#define KV_FORMAT_VERSION 1u
#define KV_HEADER_BYTES 2560u
#define KV_SLOTS 7u
#define KV_BUCKET_BYTES 128u
#define KV_MIN_B0 4u                 /* at least 16 primary buckets */
#define KV_MAX_BITS 40u              /* at most 2^40 primary buckets */
#define KV_N_SEGMENTS (KV_MAX_BITS + 1u)
#define KV_EXACT_CLASSES 63u         /* block sizes 32, 48, ..., 1024 */
#define KV_N_CLASSES 232u            /* then 4 per power of two up to 2^52 */
#define KV_BITMAP_WORDS 4u
#define KV_MAX_REGION (1ull << 52)
#define KV_BLOCK_HEAD 16u
#define KV_MIN_BLOCK 32u
/* Split when count > 1/2 of the slots of the primary buckets: buckets not yet split in a
 * round hold up to twice the average, and at 1/2 only ~3% of chains overflow (at 3/4,
 * ~20%, each an extra cache miss for every lookup that reaches it). */
#define KV_LOAD_NUM 1u
#define KV_LOAD_DEN 2u

/* block head flags (low 4 bits of the size word) */
#define KV_INUSE 1u
#define KV_PINUSE 2u                 /* the block before this one is in use */
#define KV_KIND_SHIFT 2u
enum { KV_KIND_FREE = 0, KV_KIND_RECORD = 1, KV_KIND_BUCKET = 2, KV_KIND_SEGMENT = 3 };
#define KV_SIZE(w) ((w) & ~(uint64_t)15)
#define KV_KIND(w) ((unsigned)(((w) >> KV_KIND_SHIFT) & 3u))

typedef struct kv_slot {
    uint64_t hash;
    uint64_t rec;                    /* block offset of the record */
} kv_slot;

typedef struct kv_bucket {
    uint32_t count;                  /* live slots, [0, count) */
    uint32_t reserved;
    uint64_t next;                   /* offset of the overflow bucket's body, 0: none */
    kv_slot slot[KV_SLOTS];
} kv_bucket;

typedef struct kv_header {
    char magic[8];
    uint32_t format_version;
    uint32_t header_bytes;
    uint64_t region_size;
    uint32_t b0_log2;                /* fixed at creation */
    uint32_t level;
    uint64_t split;
    uint64_t count;
    uint64_t top;                    /* start of the wilderness */
    uint64_t used_bytes;
    uint64_t overflow_buckets;
    uint64_t splits;
    uint64_t changes;                /* bumped by inserts, deletes, clears */
    uint64_t reserved[4];
    uint64_t nonempty[KV_BITMAP_WORDS];   /* bit c: free_head[c] != 0 */
    uint64_t segments[KV_N_SEGMENTS];     /* block offsets, 0: not allocated */
    uint64_t free_head[KV_N_CLASSES];
} kv_header;

_Static_assert(sizeof(kv_bucket) == KV_BUCKET_BYTES, "bucket layout");
_Static_assert(sizeof(kv_header) <= KV_HEADER_BYTES, "header layout");
_Static_assert(KV_HEADER_BYTES % KV_BUCKET_BYTES == 0, "heap alignment");

/* The before-images a writer-side call keeps so that a failure part-way can restore the
 * region exactly (kv_batch.c explains why and when). Each poke appends the 64-byte lines
 * it covers as one run, before it changes them; a line poked again is saved again, and
 * restoring the runs newest first leaves every line as the call found it. A run of zero
 * lines (the never-used wilderness, where new records go) keeps no bytes. (Lines are
 * 64-byte aligned offsets of the region.) */
#define KV_JOURNAL_LINE 64u
typedef struct kv_run {
    uint64_t line;                   /* first line */
    uint64_t n;                      /* lines */
    bool zero;                       /* all zero: no bytes saved */
} kv_run;
typedef struct kv_journal {
    kv_run *run;
    uint8_t *bytes;                  /* the non-zero runs' content, one after another */
    uint64_t n_runs, cap_runs;
    uint64_t n_lines, cap_lines;     /* lines held in `bytes` */
} kv_journal;

struct sc_kv {
    sc_store *s;
    uint64_t base, len;
    uint64_t epoch;                  /* 0: live */
    uint64_t capacity;               /* keys to size a new table for */
    uint8_t *data;                   /* live: the region's bytes; NULL for views */
    /* views: the header as of the snapshot (a snapshot never changes) */
    bool view_present;
    kv_header view_hdr;
    /* batch puts: bytes the wilderness must keep for items still to come */
    uint64_t reserve;
    /* writer-side calls that could fail part-way: before-images (kv_batch.c). `journal`
     * points at `jbuf` while a call keeps one; the buffers stay for the next call. */
    kv_journal *journal;
    kv_journal jbuf;
    /* Pages touched since the current writer-side call began (kv__begin_write). No
     * snapshot can fall inside one call, so touching such a page again is redundant, and
     * each touch costs an atomic add in the store. A small round-robin cache. */
    uint32_t page_shift;
    uint32_t tc_n, tc_next;
    uint64_t tc[16];
    bool header_touched;             /* the header (changed by most writes) has its own flag */
    /* Validated start of each segment (bit s of seg_ok): segments never move while a map
     * exists, but a live region can change between calls (a delta applied to a replica),
     * so live handles forget them at each call (kv__begin_call); a view fills them once
     * when it opens and only reads them afterwards (views are shared by threads). */
    uint64_t seg_ok;
    uint64_t seg_start[KV_N_SEGMENTS];
};

/* ---- status helpers ---------------------------------------------------------------- */
#define KV_TRY(expr)                      \
    do {                                  \
        int st_ = (expr);                 \
        if (st_ != SC_OK) return st_;     \
    } while (0)

static inline uint64_t kv_round16(uint64_t n) { return (n + 15u) & ~(uint64_t)15; }

static inline bool kv_in_region(const sc_kv *kv, uint64_t off, uint64_t n) {
    return off <= kv->len && n <= kv->len - off;
}

/* Bytes [off, off+n) of the region for reading: a pointer into the live mapping, or for a
 * view a copy in tmp (at least n bytes). NULL on error with *st set. */
static inline const uint8_t *kv_peek(const sc_kv *kv, uint64_t off, uint64_t n, void *tmp,
                                     int *st) {
    if (!kv_in_region(kv, off, n)) {
        *st = SC_ECORRUPT;
        return NULL;
    }
    if (kv->data) return kv->data + off;
    int r = sc_snapshot_read(kv->s, kv->epoch, kv->base + off, tmp, n);
    if (r != SC_OK) {
        *st = r;
        return NULL;
    }
    return (const uint8_t *)tmp;
}

/* Start of any call on a live handle: forget what earlier calls validated. */
static inline void kv__begin_call(sc_kv *kv) {
    if (kv->data) kv->seg_ok = 0;
}

/* Start of a writer-side call: also forget the pages touched by earlier calls. */
static inline void kv__begin_write(sc_kv *kv) {
    kv__begin_call(kv);
    kv->tc_n = 0;
    kv->header_touched = false;
}

static inline bool kv__touched(const sc_kv *kv, uint64_t page) {
    for (uint32_t i = 0; i < kv->tc_n; i++)
        if (kv->tc[i] == page) return true;
    return false;
}

int kv__journal_save(sc_kv *kv, uint64_t off, uint64_t n);

/* Bytes [off, off+n) of the live region for writing: tracked (preserved for snapshots,
 * versioned, marked dirty) before the caller changes them, and saved first when the call
 * keeps a journal. Every change to the region goes through here. */
static inline uint8_t *kv_poke(sc_kv *kv, uint64_t off, uint64_t n, int *st) {
    if (!kv_in_region(kv, off, n) || !n) {
        *st = n ? SC_ECORRUPT : SC_OK;
        return n ? NULL : kv->data + off;
    }
    if (kv->journal) {
        int r = kv__journal_save(kv, off, n);
        if (r != SC_OK) {
            *st = r;
            return NULL;
        }
    }
    uint64_t first = (kv->base + off) >> kv->page_shift;
    uint64_t last = (kv->base + off + n - 1) >> kv->page_shift;
    if (first == last && kv__touched(kv, first)) return kv->data + off;
    int r = sc_store_touch_range(kv->s, kv->base + off, n);
    if (r != SC_OK) {
        *st = r;
        return NULL;
    }
    if (first == last) {
        if (kv->tc_n < 16) kv->tc[kv->tc_n++] = first;
        else kv->tc[kv->tc_next++ & 15] = first;
    }
    return kv->data + off;
}

static inline uint64_t kv_load64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

/* ---- header ------------------------------------------------------------------------ */
int kv__header(const sc_kv *kv, const kv_header **out, int *present);
int kv__check_header(const sc_kv *kv, const kv_header *h);
static inline uint64_t kv__n_buckets(const kv_header *h) {
    return ((uint64_t)1 << (h->b0_log2 + h->level)) + h->split;
}
static inline uint64_t kv__segment_buckets(const kv_header *h, unsigned seg) {
    return (uint64_t)1 << (h->b0_log2 + (seg ? seg - 1 : 0));
}
static inline uint64_t kv__bucket_index(const kv_header *h, uint64_t hash) {
    uint64_t m = (uint64_t)1 << (h->b0_log2 + h->level);
    uint64_t b = hash & (m - 1);
    return b < h->split ? hash & (2 * m - 1) : b;
}
int kv__segment_start(const sc_kv *kv, const kv_header *h, unsigned seg, uint64_t *start);

static inline int kv__bucket_offset(const sc_kv *kv, const kv_header *h, uint64_t b,
                                    uint64_t *off) {
    uint64_t q = b >> h->b0_log2, idx = b;
    unsigned seg = 0;
    if (q) {
        unsigned lg = 63u - (unsigned)__builtin_clzll(q);
        seg = lg + 1;
        idx = b - ((uint64_t)1 << (h->b0_log2 + lg));
    }
    if (seg >= KV_N_SEGMENTS) return SC_ECORRUPT;
    uint64_t start;
    if (kv->seg_ok >> seg & 1) {
        start = kv->seg_start[seg];
    } else {
        int st = kv__segment_start(kv, h, seg, &start);
        if (st != SC_OK) return st;
        if (kv->data) {  /* live: single-threaded by contract; views fill theirs at open */
            sc_kv *w = (sc_kv *)kv;
            w->seg_start[seg] = start;
            w->seg_ok |= 1ull << seg;
        }
    }
    *off = start + idx * KV_BUCKET_BYTES;
    return SC_OK;
}

/* ---- records and buckets --------------------------------------------------------------- */
typedef struct kv_rec {
    uint64_t off, size, klen, vlen;
} kv_rec;
int kv__record(const sc_kv *kv, const kv_header *h, uint64_t off, kv_rec *out);
int kv__overflow(const sc_kv *kv, const kv_header *h, uint64_t body);
static inline uint64_t kv__record_size(uint64_t klen, uint64_t vlen) {
    uint64_t n = kv_round16(KV_BLOCK_HEAD + klen + vlen);
    return n < KV_MIN_BLOCK ? KV_MIN_BLOCK : n;
}
/* The most wilderness a put can take: a new record and an overflow bucket. */
static inline uint64_t kv__put_worst(uint64_t klen, uint64_t vlen) {
    return kv__record_size(klen, vlen) + KV_BLOCK_HEAD + KV_BUCKET_BYTES;
}

typedef struct kv_hit {
    uint64_t bucket;                 /* bucket holding the key; 0: absent */
    uint32_t slot;
    kv_rec rec;
    uint64_t first;                  /* the primary bucket */
    uint64_t last, before_last;      /* chain tail (see kv__find) */
    uint32_t last_count;
} kv_hit;

/* ---- table (kv.c); h is the live header (kv__touch_header before changing it) ----------- */
int kv__writable_header(sc_kv *kv, kv_header **out);
int kv__touch_header(sc_kv *kv);
int kv__find(const sc_kv *kv, const kv_header *h, const uint8_t *key, uint64_t klen,
             uint64_t hash, uint64_t rec, bool to_end, kv_hit *hit);
int kv__put_one(sc_kv *kv, kv_header *h, const uint8_t *key, uint64_t klen, uint64_t hash,
                const uint8_t *val, uint64_t vlen);
int kv__remove(sc_kv *kv, kv_header *h, const kv_hit *hit);
int kv__delete_one(sc_kv *kv, kv_header *h, const uint8_t *key, uint64_t klen, uint64_t hash,
                   int *found);
int kv__grow(sc_kv *kv, kv_header *h);
int kv__set_slot_rec(sc_kv *kv, uint64_t bucket, unsigned slot, uint64_t rec);
void kv__uncreate(sc_kv *kv);

/* ---- all or nothing (kv_batch.c) -------------------------------------------------------- */
/* Between kv__writable_header and the call's first change: keep a journal when a step
 * could fail part-way for any reason but damage (tracking under a live snapshot, or, with
 * may_run_out, room in the heap). `present`: the map was there before the call. */
void kv__write_begin(sc_kv *kv, int present, bool may_run_out);
/* The call's end: after a failure the region is as the call found it (on a sound map).
 * Returns st. */
int kv__write_end(sc_kv *kv, int present, int st);
void kv__journal_free(sc_kv *kv);

/* ---- heap (kv_heap.c); h is the live header, which these touch themselves ---------------- */
/* Allocate a block of at least `bytes` (head included) of the given kind; writes its head. */
int kv__alloc(sc_kv *kv, kv_header *h, uint64_t bytes, unsigned kind, uint64_t *out);
int kv__free(sc_kv *kv, kv_header *h, uint64_t off);
unsigned kv__size_class(uint64_t size);
uint64_t kv__class_min(unsigned c);

/* Read a block head, checking that the block lies in the heap; *word gets size|flags. */
static inline int kv__block_head(const sc_kv *kv, const kv_header *h, uint64_t off,
                                 uint64_t *word) {
    if (off % 16 || off < h->header_bytes || off > h->top || h->top - off < KV_MIN_BLOCK)
        return SC_ECORRUPT;
    uint64_t tmp;
    int st = SC_OK;
    const uint8_t *p = kv_peek(kv, off, 8, &tmp, &st);
    if (!p) return st;
    uint64_t w = kv_load64(p), size = KV_SIZE(w);
    if (size < KV_MIN_BLOCK || size > h->top - off) return SC_ECORRUPT;
    *word = w;
    return SC_OK;
}

#endif
