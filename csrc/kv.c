/* Keyed state: handles, the header, lookups, single-key writes and the incremental
 * growth of the table (linear hashing, one bucket split at a time; see kv_internal.h).
 * Batches are in kv_batch.c, the consistency checker in kv_verify.c. */
#include <stdlib.h>

#include "kv_internal.h"

const char *sc_kv_strerror(int st) {
    switch (st) {
    case SC_KV_FULL: return "no room left in the key-value region";
    case SC_KV_NOT_EMPTY: return "the region holds data but no key-value header";
    case SC_KV_READONLY: return "read-only view";
    case SC_KV_MISMATCH: return "the region holds a key-value map made for another region size";
    default: return sc_strerror((sc_status)st);
    }
}

uint64_t sc_kv_hash(const void *key, uint64_t len) {
    uint64_t h[2];
    sc_murmur3_128(key, (size_t)len, 0, h);
    return h[0];
}

/* ---- header ------------------------------------------------------------------------ */
/* A region length a map could have been made for at kv->base of this store. */
static bool plausible_region(const sc_kv *kv, uint64_t len) {
    uint64_t ps = sc_store_page_size(kv->s), size = sc_store_size(kv->s);
    return len % ps == 0 && len >= SC_KV_MIN_REGION && len <= KV_MAX_REGION &&
           len <= size - kv->base;
}

int kv__check_header(const sc_kv *kv, const kv_header *h) {
    if (h->format_version != KV_FORMAT_VERSION) return SC_EFORMAT;
    if (h->header_bytes != KV_HEADER_BYTES) return SC_ECORRUPT;
    /* A map made for another region length is opened with the wrong size= (a caller's
     * mistake, not damage), unless no region could have that length. */
    if (h->region_size != kv->len)
        return plausible_region(kv, h->region_size) ? SC_KV_MISMATCH : SC_ECORRUPT;
    if (h->b0_log2 < KV_MIN_B0 || h->b0_log2 > KV_MAX_BITS) return SC_ECORRUPT;
    if (h->level > KV_MAX_BITS - h->b0_log2) return SC_ECORRUPT;
    if (h->split >= (uint64_t)1 << (h->b0_log2 + h->level)) return SC_ECORRUPT;
    if (h->b0_log2 + h->level == KV_MAX_BITS && h->split) return SC_ECORRUPT;
    if (h->top < h->header_bytes || h->top > kv->len || h->top % 16) return SC_ECORRUPT;
    if (!h->segments[0]) return SC_ECORRUPT;
    return SC_OK;
}

static const char zero8[8];

static int classify_header(const sc_kv *kv, const kv_header *h, int *present) {
    if (memcmp(h->magic, KV_MAGIC, 8) == 0) {
        *present = 1;
        return kv__check_header(kv, h);
    }
    *present = 0;
    /* An all-zero magic: no map yet. Another map format version: not ours to read.
     * Anything else: other data (or a map whose magic was damaged); never a map. */
    if (memcmp(h->magic, zero8, 8) == 0) return SC_OK;
    return memcmp(h->magic, KV_MAGIC, 6) == 0 ? SC_EFORMAT : SC_KV_NOT_EMPTY;
}

int kv__header(const sc_kv *kv, const kv_header **out, int *present) {
    if (!kv->data) {
        *out = &kv->view_hdr;
        *present = kv->view_present;
        return SC_OK;
    }
    const kv_header *h = (const kv_header *)kv->data;
    *out = h;
    return classify_header(kv, h, present);
}

int sc_kv_probe(sc_kv *kv, int *present) {
    const kv_header *h;
    if (!kv->data) {
        *present = 0;
        return classify_header(kv, &kv->view_hdr, present);
    }
    return kv__header(kv, &h, present);
}

int kv__segment_start(const sc_kv *kv, const kv_header *h, unsigned seg, uint64_t *start) {
    uint64_t blk = h->segments[seg], w;
    if (!blk) return SC_ECORRUPT;
    KV_TRY(kv__block_head(kv, h, blk, &w));
    if (!(w & KV_INUSE) || KV_KIND(w) != KV_KIND_SEGMENT) return SC_ECORRUPT;
    uint64_t s = (blk + KV_BLOCK_HEAD + KV_BUCKET_BYTES - 1) & ~(uint64_t)(KV_BUCKET_BYTES - 1);
    uint64_t nb = kv__segment_buckets(h, seg);
    if (s - blk > KV_SIZE(w) || nb > (KV_SIZE(w) - (s - blk)) / KV_BUCKET_BYTES)
        return SC_ECORRUPT;
    *start = s;
    return SC_OK;
}

int kv__record(const sc_kv *kv, const kv_header *h, uint64_t off, kv_rec *out) {
    if (off % 16 || off < h->header_bytes || off > h->top || h->top - off < KV_MIN_BLOCK)
        return SC_ECORRUPT;
    uint64_t tmp[2];
    int st = SC_OK;
    const uint8_t *p = kv_peek(kv, off, 16, tmp, &st);
    if (!p) return st;
    uint64_t w = kv_load64(p), size = KV_SIZE(w);
    uint32_t lens[2];
    memcpy(lens, p + 8, 8);
    if (!(w & KV_INUSE) || KV_KIND(w) != KV_KIND_RECORD || size > h->top - off ||
        lens[0] > SC_KV_MAX_KEY || lens[1] > SC_KV_MAX_VALUE ||
        KV_BLOCK_HEAD + (uint64_t)lens[0] + lens[1] > size)
        return SC_ECORRUPT;
    out->off = off;
    out->size = size;
    out->klen = lens[0];
    out->vlen = lens[1];
    return SC_OK;
}

int kv__overflow(const sc_kv *kv, const kv_header *h, uint64_t body) {
    uint64_t w;
    if (body < KV_BLOCK_HEAD) return SC_ECORRUPT;
    KV_TRY(kv__block_head(kv, h, body - KV_BLOCK_HEAD, &w));
    if (!(w & KV_INUSE) || KV_KIND(w) != KV_KIND_BUCKET ||
        KV_SIZE(w) < KV_BLOCK_HEAD + KV_BUCKET_BYTES)
        return SC_ECORRUPT;
    return SC_OK;
}

/* ---- handles --------------------------------------------------------------------------- */
int sc_kv_open(sc_store *s, uint64_t base, uint64_t len, uint64_t snap_epoch,
               uint64_t capacity, sc_kv **out) {
    *out = NULL;
    uint64_t ps = sc_store_page_size(s), size = sc_store_size(s);
    if (base % ps || len % ps || base > size || len > size - base) return SC_EINVAL;
    if (len < SC_KV_MIN_REGION || len > KV_MAX_REGION) return SC_EINVAL;
    sc_kv *kv = calloc(1, sizeof *kv);
    if (!kv) return SC_ENOMEM;
    kv->s = s;
    kv->base = base;
    kv->len = len;
    kv->epoch = snap_epoch;
    kv->capacity = capacity;
    while (((uint64_t)1 << kv->page_shift) < ps) kv->page_shift++;
    if (!snap_epoch) {
        kv->data = (uint8_t *)sc_store_data(s) + base;
        /* A map made for another region length is refused now; any other problem of the
         * header waits for the calls (verify() describes it). */
        int present;
        if (classify_header(kv, (const kv_header *)kv->data, &present) == SC_KV_MISMATCH) {
            free(kv);
            return SC_KV_MISMATCH;
        }
    } else {
        /* A snapshot never changes: read its header once. */
        int st = sc_snapshot_read(s, snap_epoch, base, &kv->view_hdr, sizeof kv->view_hdr);
        int present = 0;
        if (st == SC_OK) st = classify_header(kv, &kv->view_hdr, &present);
        if (st != SC_OK) {
            free(kv);
            return st;
        }
        kv->view_present = present;
        if (present) {
            uint64_t start;
            for (unsigned seg = 0; seg < KV_N_SEGMENTS; seg++) {
                if (!kv->view_hdr.segments[seg]) continue;
                if (kv__segment_start(kv, &kv->view_hdr, seg, &start) != SC_OK) continue;
                kv->seg_start[seg] = start;
                kv->seg_ok |= 1ull << seg;
            }
        }
    }
    *out = kv;
    return SC_OK;
}

void sc_kv_close(sc_kv *kv) {
    if (!kv) return;
    kv__journal_free(kv);
    free(kv);
}

int sc_kv_recorded_size(sc_store *s, uint64_t base, uint64_t snap_epoch, uint64_t *len) {
    *len = 0;
    uint64_t size = sc_store_size(s);
    kv_header h;
    if (base > size || size - base < sizeof h) return SC_EINVAL;
    if (snap_epoch) KV_TRY(sc_snapshot_read(s, snap_epoch, base, &h, sizeof h));
    else memcpy(&h, (const uint8_t *)sc_store_data(s) + base, sizeof h);
    if (memcmp(h.magic, KV_MAGIC, 8) == 0) *len = h.region_size;
    return SC_OK;
}

int sc_kv_read(sc_kv *kv, uint64_t off, void *dst, uint64_t len) {
    if (!kv_in_region(kv, off, len)) return SC_ERANGE;
    if (!len) return SC_OK;
    if (kv->data) {
        memcpy(dst, kv->data + off, len);
        return SC_OK;
    }
    return sc_snapshot_read(kv->s, kv->epoch, kv->base + off, dst, len);
}

/* ---- creating ------------------------------------------------------------------------------ */
static bool page_is_zero(const uint8_t *p, uint64_t n) {
    return p[0] == 0 && memcmp(p, p + 1, n - 1) == 0;
}

static unsigned b0_for(uint64_t capacity) {
    /* Enough primary buckets for `capacity` keys at the split load (1/2 of 7 slots). */
    uint64_t want = (capacity * KV_LOAD_DEN + KV_SLOTS * KV_LOAD_NUM - 1) / (KV_SLOTS * KV_LOAD_NUM);
    unsigned b0 = KV_MIN_B0;
    while (b0 < KV_MAX_BITS && ((uint64_t)1 << b0) < want) b0++;
    return b0;
}

/* Write a fresh header and initial segment. zero_buckets: the segment's bytes may hold
 * old data (clear) rather than the zeroes of a never-written region (create). */
static int init_map(sc_kv *kv, bool zero_buckets) {
    if (kv->capacity > kv->len) return SC_KV_FULL;
    unsigned b0 = b0_for(kv->capacity);
    uint64_t nb = (uint64_t)1 << b0;
    uint64_t seg_bytes = KV_BLOCK_HEAD + KV_BUCKET_BYTES - 16 + nb * KV_BUCKET_BYTES;
    if (seg_bytes > kv->len - KV_HEADER_BYTES) return SC_KV_FULL;
    int st = SC_OK;
    kv_header *h = (kv_header *)kv_poke(kv, 0, KV_HEADER_BYTES, &st);
    if (!h) return st;
    uint64_t changes = memcmp(h->magic, KV_MAGIC, 8) == 0 ? h->changes + 1 : 0;
    memset(h, 0, KV_HEADER_BYTES);
    h->format_version = KV_FORMAT_VERSION;
    h->header_bytes = KV_HEADER_BYTES;
    h->region_size = kv->len;
    h->b0_log2 = b0;
    h->top = KV_HEADER_BYTES;
    h->changes = changes;
    uint64_t blk;
    KV_TRY(kv__alloc(kv, h, seg_bytes, KV_KIND_SEGMENT, &blk));
    h->segments[0] = blk;
    if (zero_buckets) {
        uint64_t start;
        KV_TRY(kv__segment_start(kv, h, 0, &start));
        uint8_t *p = kv_poke(kv, start, nb * KV_BUCKET_BYTES, &st);
        if (!p) return st;
        memset(p, 0, nb * KV_BUCKET_BYTES);
    }
    memcpy(h->magic, KV_MAGIC, 8);  /* last: a half-made header reads as "no map" */
    return SC_OK;
}

int sc_kv_create(sc_kv *kv) {
    if (!kv->data) return SC_KV_READONLY;
    kv__begin_write(kv);
    int present;
    const kv_header *h;
    KV_TRY(kv__header(kv, &h, &present));
    if (present) return SC_EINVAL;
    /* Only never-written pages are known to be zero; check the others' bytes. */
    uint64_t ps = sc_store_page_size(kv->s), first = kv->base / ps;
    for (uint64_t i = 0; i < kv->len / ps; i++)
        if (sc_store_page_version(kv->s, first + i) && !page_is_zero(kv->data + i * ps, ps))
            return SC_KV_NOT_EMPTY;
    /* Taken away again only now that the region is known to be all zero: the pages it
     * zeroes may hold data that is not a map's. A header half made would make the region
     * refuse writes. */
    int st = init_map(kv, false);
    if (st != SC_OK) kv__uncreate(kv);
    return st;
}

/* A writer-side call that created the map and then failed leaves the region as it found
 * it: all zero (sc_kv_create checked). So every page that is not zero now was written by
 * this call, and is tracked already: zero it again. */
void kv__uncreate(sc_kv *kv) {
    uint64_t ps = sc_store_page_size(kv->s), first = kv->base / ps;
    for (uint64_t i = 0; i < kv->len / ps; i++)
        if (sc_store_page_version(kv->s, first + i) && !page_is_zero(kv->data + i * ps, ps))
            memset(kv->data + i * ps, 0, ps);
    kv->seg_ok = 0;
}

int sc_kv_clear(sc_kv *kv) {
    if (!kv->data) return SC_KV_READONLY;
    kv__begin_write(kv);
    int present;
    const kv_header *h;
    KV_TRY(kv__header(kv, &h, &present));
    if (!present) return SC_OK;
    uint64_t keep = kv->capacity;
    /* The table is sized as it was first created. */
    kv->capacity = ((uint64_t)1 << h->b0_log2) * KV_SLOTS * KV_LOAD_NUM / KV_LOAD_DEN;
    /* Without a journal, a failure after the header is rewritten would leave a region
     * with data and no map, which refuses every write. */
    kv__write_begin(kv, present, false);
    int st = init_map(kv, true);
    kv->capacity = keep;
    return kv__write_end(kv, present, st);
}

/* The live header for a writer-side call; creates the map on first use. Not yet touched:
 * callers touch it (kv__touch_header) before they change it, so a call that only rewrites
 * a value in place leaves the header's page clean. */
int kv__writable_header(sc_kv *kv, kv_header **out) {
    if (!kv->data) return SC_KV_READONLY;
    kv__begin_write(kv);
    int present;
    const kv_header *h;
    KV_TRY(kv__header(kv, &h, &present));
    if (!present) KV_TRY(sc_kv_create(kv));
    *out = (kv_header *)kv->data;
    return SC_OK;
}

int kv__touch_header(sc_kv *kv) {
    if (kv->header_touched) return SC_OK;
    int st = SC_OK;
    if (!kv_poke(kv, 0, sizeof(kv_header), &st)) return st;
    kv->header_touched = true;
    return SC_OK;
}

/* ---- lookups ---------------------------------------------------------------------------------- */
static int key_equal(const sc_kv *kv, uint64_t off, const uint8_t *key, uint64_t klen, bool *eq) {
    if (!kv_in_region(kv, off, klen)) return SC_ECORRUPT;
    if (kv->data) {
        const uint8_t *a = kv->data + off;
        if (klen <= 16) {  /* the common short key: no call into libc */
            uint64_t x = 0, y = 0, d = 0;
            uint64_t head = klen < 8 ? klen : 8;
            memcpy(&x, a, head);
            memcpy(&y, key, head);
            d = x ^ y;
            if (klen > 8) {
                x = y = 0;
                memcpy(&x, a + 8, klen - 8);
                memcpy(&y, key + 8, klen - 8);
                d |= x ^ y;
            }
            *eq = d == 0;
            return SC_OK;
        }
        *eq = memcmp(a, key, klen) == 0;
        return SC_OK;
    }
    uint8_t buf[512];
    for (uint64_t done = 0; done < klen;) {
        uint64_t n = klen - done < sizeof buf ? klen - done : sizeof buf;
        KV_TRY(sc_snapshot_read(kv->s, kv->epoch, kv->base + off + done, buf, n));
        if (memcmp(buf, key + done, n) != 0) {
            *eq = false;
            return SC_OK;
        }
        done += n;
    }
    *eq = true;
    return SC_OK;
}

static inline uint64_t chain_limit(const sc_kv *kv) { return kv->len / KV_BUCKET_BYTES + 1; }

/* Read the bucket at off and check its shape. */
static inline const kv_bucket *read_bucket(const sc_kv *kv, uint64_t off, kv_bucket *tmp,
                                           int *st) {
    const kv_bucket *bk = (const kv_bucket *)kv_peek(kv, off, sizeof *tmp, tmp, st);
    if (bk && (bk->count > KV_SLOTS || (bk->next && bk->count != KV_SLOTS))) {
        *st = SC_ECORRUPT;
        return NULL;
    }
    return bk;
}

/* Find key (or, with rec != 0, the slot that points at record `rec`). With to_end the
 * walk always reaches the chain's end, so the tail fields are filled; they are also
 * filled whenever the key is absent. */
int kv__find(const sc_kv *kv, const kv_header *h, const uint8_t *key, uint64_t klen,
             uint64_t hash, uint64_t rec, bool to_end, kv_hit *hit) {
    uint64_t off;
    KV_TRY(kv__bucket_offset(kv, h, kv__bucket_index(h, hash), &off));
    /* Both lines of the bucket in parallel rather than one after the other. */
    if (kv->data) __builtin_prefetch(kv->data + off + 64);
    hit->bucket = 0;
    hit->first = off;
    uint64_t prev = 0, limit = chain_limit(kv);
    for (uint64_t steps = 0;; steps++) {
        if (steps > limit) return SC_ECORRUPT;
        kv_bucket tmp;
        int st = SC_OK;
        const kv_bucket *bk = read_bucket(kv, off, &tmp, &st);
        if (!bk) return st;
        uint32_t n = bk->count;
        uint64_t next = bk->next;
        for (uint32_t i = 0; i < n && !hit->bucket; i++) {
            if (bk->slot[i].hash != hash) continue;
            if (rec) {
                if (bk->slot[i].rec != rec) continue;
                KV_TRY(kv__record(kv, h, rec, &hit->rec));
            } else {
                kv_rec r;
                bool eq = false;
                KV_TRY(kv__record(kv, h, bk->slot[i].rec, &r));
                if (r.klen != klen) continue;
                KV_TRY(key_equal(kv, r.off + KV_BLOCK_HEAD, key, klen, &eq));
                if (!eq) continue;
                hit->rec = r;
            }
            hit->bucket = off;
            hit->slot = i;
            if (!to_end) return SC_OK;
        }
        if (!next) {
            hit->last = off;
            hit->last_count = n;
            hit->before_last = prev;
            return SC_OK;
        }
        KV_TRY(kv__overflow(kv, h, next));
        prev = off;
        off = next;
    }
}

int sc_kv_get(sc_kv *kv, const void *key, uint64_t klen, uint64_t *val_off, uint64_t *vlen,
              int *found) {
    *found = 0;
    kv__begin_call(kv);
    if (klen > SC_KV_MAX_KEY || (klen && !key)) return SC_EINVAL;
    const kv_header *h;
    int present;
    KV_TRY(kv__header(kv, &h, &present));
    if (!present) return SC_OK;
    kv_hit hit;
    KV_TRY(kv__find(kv, h, key, klen, sc_kv_hash(key, klen), 0, false, &hit));
    if (hit.bucket) {
        *found = 1;
        *val_off = hit.rec.off + KV_BLOCK_HEAD + klen;
        *vlen = hit.rec.vlen;
        /* The caller copies the value next: start its next line now. */
        if (kv->data && hit.rec.size > 64) __builtin_prefetch(kv->data + hit.rec.off + 64);
    }
    return SC_OK;
}

/* ---- growth ------------------------------------------------------------------------------------ */
#define SPLIT_STACK 64u  /* entries gathered on the stack; longer chains use the heap */
/* split_one did not start, and nothing changed: no room for the level's next segment (or
 * no level left), or no memory to gather a long chain in. The table grows later. */
#define SPLIT_LATER (-1)

/* Lay out n entries over the chain first, ovf[0..n_ovf): full buckets, then the rest. */
static int write_chain(sc_kv *kv, uint64_t first, const uint64_t *ovf, uint64_t n_ovf,
                       const kv_slot *e, uint64_t n) {
    for (uint64_t j = 0; j <= n_ovf; j++) {
        int st = SC_OK;
        uint64_t off = j ? ovf[j - 1] : first;
        kv_bucket *bk = (kv_bucket *)kv_poke(kv, off, sizeof *bk, &st);
        if (!bk) return st;
        uint64_t take = n - j * KV_SLOTS < KV_SLOTS ? n - j * KV_SLOTS : KV_SLOTS;
        memset(bk, 0, sizeof *bk);
        bk->count = (uint32_t)take;
        bk->next = j < n_ovf ? ovf[j] : 0;
        memcpy(bk->slot, e + j * KV_SLOTS, take * sizeof *e);
    }
    return SC_OK;
}

static uint64_t overflow_needed(uint64_t n) { return n <= KV_SLOTS ? 0 : (n - 1) / KV_SLOTS; }

/* The entries and overflow buckets of the chain being split, gathered before anything
 * changes. */
typedef struct chain {
    kv_slot *e;
    uint64_t *ovf;
    uint64_t n, n_ovf, cap_e, cap_o;
    kv_slot stack_e[SPLIT_STACK];
    uint64_t stack_o[SPLIT_STACK / KV_SLOTS + 1];
} chain;

static void chain_free(chain *c) {
    if (c->e != c->stack_e) free(c->e);
    if (c->ovf != c->stack_o) free(c->ovf);
}

/* Room for one more bucket of the chain. */
static int chain_reserve(chain *c) {
    if (c->n + KV_SLOTS <= c->cap_e && c->n_ovf + 1 <= c->cap_o) return SC_OK;
    uint64_t ne = c->cap_e * 4, no = c->cap_o * 4;
    kv_slot *e = sc__alloc_fails() ? NULL : malloc(ne * sizeof *e);
    uint64_t *ovf = sc__alloc_fails() ? NULL : malloc(no * sizeof *ovf);
    if (!e || !ovf) {
        free(e);
        free(ovf);
        return SC_ENOMEM;
    }
    memcpy(e, c->e, c->n * sizeof *e);
    memcpy(ovf, c->ovf, c->n_ovf * sizeof *ovf);
    chain_free(c);
    c->e = e, c->ovf = ovf, c->cap_e = ne, c->cap_o = no;
    return SC_OK;
}

/* Chain s (starting at off) of a table of m buckets being split. */
static int gather_chain(const sc_kv *kv, const kv_header *h, uint64_t off, uint64_t m,
                        uint64_t s, chain *c) {
    c->e = c->stack_e, c->ovf = c->stack_o, c->n = c->n_ovf = 0;
    c->cap_e = SPLIT_STACK, c->cap_o = SPLIT_STACK / KV_SLOTS + 1;
    uint64_t limit = chain_limit(kv);
    for (uint64_t steps = 0; off; steps++) {
        kv_bucket tmp;
        int st = SC_OK;
        const kv_bucket *bk = read_bucket(kv, off, &tmp, &st);
        if (!bk) return st;
        if (steps > limit) return SC_ECORRUPT;
        KV_TRY(chain_reserve(c));
        for (uint32_t i = 0; i < bk->count; i++) {
            if ((bk->slot[i].hash & (m - 1)) != s) return SC_ECORRUPT;
            c->e[c->n++] = bk->slot[i];
        }
        uint64_t next = bk->next;
        if (next) {
            KV_TRY(kv__overflow(kv, h, next));
            c->ovf[c->n_ovf++] = next;
        }
        off = next;
    }
    return SC_OK;
}

/* The split proper, chain `split` gathered: bucket split + m (in the next level's
 * segment, reserved at the level's first split) takes the entries whose hash has bit m.
 * The two chains never need more overflow buckets than the one chain had. */
static int move_half(sc_kv *kv, kv_header *h, chain *c, uint64_t m, uint64_t s_off) {
    uint64_t s = h->split, t_off;
    unsigned seg = h->level + 1;
    KV_TRY(kv__touch_header(kv));
    if (!h->segments[seg]) {
        if (s) return SC_ECORRUPT;
        uint64_t blk;
        int st = kv__alloc(kv, h, KV_BLOCK_HEAD + KV_BUCKET_BYTES - 16 + m * KV_BUCKET_BYTES,
                           KV_KIND_SEGMENT, &blk);
        if (st == SC_KV_FULL) return SPLIT_LATER;
        KV_TRY(st);
        h->segments[seg] = blk;
    }
    KV_TRY(kv__bucket_offset(kv, h, s + m, &t_off));
    /* Partition: entries that stay, then entries that move (order within a chain is free). */
    uint64_t a = 0;
    for (uint64_t i = 0; i < c->n; i++) {
        if (c->e[i].hash & m) continue;
        kv_slot t = c->e[a];
        c->e[a++] = c->e[i];
        c->e[i] = t;
    }
    uint64_t na = overflow_needed(a), nb = overflow_needed(c->n - a);
    if (na + nb > c->n_ovf) return SC_ECORRUPT;
    KV_TRY(write_chain(kv, s_off, c->ovf, na, c->e, a));
    KV_TRY(write_chain(kv, t_off, c->ovf + na, nb, c->e + a, c->n - a));
    for (uint64_t j = na + nb; j < c->n_ovf; j++) {
        KV_TRY(kv__free(kv, h, c->ovf[j] - KV_BLOCK_HEAD));
        h->overflow_buckets--;
    }
    h->splits++;
    if (++h->split == m) {
        h->split = 0;
        h->level++;
    }
    return SC_OK;
}

/* Split bucket `split` into itself and split + 2^(b0+level). The entries' stored hashes
 * decide; no record is read. A split allocates nothing in the region but, once per
 * level, the next segment. */
static int split_one(sc_kv *kv, kv_header *h) {
    unsigned bits = h->b0_log2 + h->level;
    if (bits >= KV_MAX_BITS) return SPLIT_LATER;
    uint64_t m = (uint64_t)1 << bits, s_off;
    KV_TRY(kv__bucket_offset(kv, h, h->split, &s_off));
    chain c;
    int st = gather_chain(kv, h, s_off, m, h->split, &c);
    if (st == SC_ENOMEM) st = SPLIT_LATER; /* the region is untouched so far */
    else if (st == SC_OK) st = move_half(kv, h, &c, m, s_off);
    chain_free(&c);
    return st;
}

/* After an insert: keep the load at or under 1/2, one split per insert (two while catching
 * up after a batch that could not grow). A split that cannot start is not an error (an
 * insert that succeeded must not fail for it): the table grows later, when it can. */
int kv__grow(sc_kv *kv, kv_header *h) {
    for (int i = 0; i < 2; i++) {
        uint64_t slots = kv__n_buckets(h) * KV_SLOTS;
        if (h->count * KV_LOAD_DEN <= slots * KV_LOAD_NUM) return SC_OK;
        int st = split_one(kv, h);
        if (st == SPLIT_LATER) return SC_OK;
        KV_TRY(st);
    }
    return SC_OK;
}

/* ---- single-key writes -------------------------------------------------------------------------- */
static int write_record(sc_kv *kv, uint64_t rec, const uint8_t *key, uint64_t klen,
                        const uint8_t *val, uint64_t vlen) {
    int st = SC_OK;
    uint8_t *p = kv_poke(kv, rec + 8, 8 + klen + vlen, &st);
    if (!p) return st;
    uint32_t lens[2] = {(uint32_t)klen, (uint32_t)vlen};
    memcpy(p, lens, 8);
    if (klen) memcpy(p + 8, key, klen);
    if (vlen) memcpy(p + 8 + klen, val, vlen);
    return SC_OK;
}

int kv__set_slot_rec(sc_kv *kv, uint64_t bucket, unsigned slot, uint64_t rec) {
    int st = SC_OK;
    uint64_t at = bucket + offsetof(kv_bucket, slot) + slot * sizeof(kv_slot) + 8;
    uint8_t *p = kv_poke(kv, at, 8, &st);
    if (!p) return st;
    memcpy(p, &rec, 8);
    return SC_OK;
}

/* A value is rewritten in place when the record's block still fits it without wasting
 * more than a quarter of the block: the common "update a counter/session" case then
 * dirties only the record's page. */
static bool fits_in_place(uint64_t block, uint64_t need) {
    return need <= block && block - need <= (block / 4 > 32 ? block / 4 : 32);
}

int kv__put_one(sc_kv *kv, kv_header *h, const uint8_t *key, uint64_t klen, uint64_t hash,
                const uint8_t *val, uint64_t vlen) {
    kv_hit hit;
    KV_TRY(kv__find(kv, h, key, klen, hash, 0, false, &hit));
    uint64_t need = kv__record_size(klen, vlen), rec;
    int st = SC_OK;
    if (hit.bucket) {
        if (fits_in_place(hit.rec.size, need)) {
            uint8_t *p = kv_poke(kv, hit.rec.off + 12, 4 + klen + vlen, &st);
            if (!p) return st;
            uint32_t v32 = (uint32_t)vlen;
            memcpy(p, &v32, 4);
            if (vlen) memcpy(p + 4 + klen, val, vlen);
            return SC_OK;
        }
        KV_TRY(kv__touch_header(kv));
        KV_TRY(kv__alloc(kv, h, need, KV_KIND_RECORD, &rec));
        if ((st = write_record(kv, rec, key, klen, val, vlen)) != SC_OK ||
            (st = kv__set_slot_rec(kv, hit.bucket, hit.slot, rec)) != SC_OK) {
            kv__free(kv, h, rec);
            return st;
        }
        return kv__free(kv, h, hit.rec.off);
    }

    KV_TRY(kv__touch_header(kv));
    KV_TRY(kv__alloc(kv, h, need, KV_KIND_RECORD, &rec));
    uint64_t target = hit.last;
    uint32_t idx = hit.last_count;
    if (idx == KV_SLOTS) {
        uint64_t blk;
        st = kv__alloc(kv, h, KV_BLOCK_HEAD + KV_BUCKET_BYTES, KV_KIND_BUCKET, &blk);
        if (st != SC_OK) {
            kv__free(kv, h, rec);
            return st;
        }
        kv_bucket *nb = (kv_bucket *)kv_poke(kv, blk + KV_BLOCK_HEAD, sizeof *nb, &st);
        uint64_t *link = nb ? (uint64_t *)kv_poke(kv, hit.last + 8, 8, &st) : NULL;
        if (!link) {
            kv__free(kv, h, blk);
            kv__free(kv, h, rec);
            return st;
        }
        memset(nb, 0, sizeof *nb);
        *link = blk + KV_BLOCK_HEAD;
        h->overflow_buckets++;
        target = blk + KV_BLOCK_HEAD;
        idx = 0;
    }
    KV_TRY(write_record(kv, rec, key, klen, val, vlen));
    kv_bucket *bk = (kv_bucket *)kv_poke(kv, target, sizeof *bk, &st);
    if (!bk) return st;
    bk->slot[idx].hash = hash;
    bk->slot[idx].rec = rec;
    bk->count = idx + 1;
    h->count++;
    h->changes++;
    return kv__grow(kv, h);
}

/* Remove the entry `hit` found (walked to the chain's end): the chain's last entry fills
 * the hole, and an overflow bucket left empty is unlinked and freed. */
int kv__remove(sc_kv *kv, kv_header *h, const kv_hit *hit) {
    int st = SC_OK;
    KV_TRY(kv__touch_header(kv));
    kv_bucket *last = (kv_bucket *)kv_poke(kv, hit->last, sizeof *last, &st);
    if (!last) return st;
    if (!hit->last_count) return SC_ECORRUPT;
    uint32_t li = hit->last_count - 1;
    if (hit->bucket != hit->last || hit->slot != li) {
        kv_slot *hole = (kv_slot *)kv_poke(kv, hit->bucket + offsetof(kv_bucket, slot) +
                                                   hit->slot * sizeof(kv_slot),
                                           sizeof(kv_slot), &st);
        if (!hole) return st;
        *hole = last->slot[li];
    }
    last->count = li;
    if (!li && hit->last != hit->first) {
        uint64_t *link = (uint64_t *)kv_poke(kv, hit->before_last + 8, 8, &st);
        if (!link) return st;
        *link = 0;
        KV_TRY(kv__free(kv, h, hit->last - KV_BLOCK_HEAD));
        h->overflow_buckets--;
    }
    h->count--;
    h->changes++;
    return kv__free(kv, h, hit->rec.off);
}

int kv__delete_one(sc_kv *kv, kv_header *h, const uint8_t *key, uint64_t klen, uint64_t hash,
                   int *found) {
    kv_hit hit;
    KV_TRY(kv__find(kv, h, key, klen, hash, 0, true, &hit));
    *found = hit.bucket != 0;
    return hit.bucket ? kv__remove(kv, h, &hit) : SC_OK;
}

int sc_kv_put(sc_kv *kv, const void *key, uint64_t klen, const void *val, uint64_t vlen) {
    if (klen > SC_KV_MAX_KEY || vlen > SC_KV_MAX_VALUE || (klen && !key) || (vlen && !val))
        return SC_EINVAL;
    if (!kv->data) return SC_KV_READONLY;
    const kv_header *ro;
    int present;
    KV_TRY(kv__header(kv, &ro, &present));
    kv_header *h;
    KV_TRY(kv__writable_header(kv, &h));
    /* With room for the worst case nothing runs out of it (growth waits for room). */
    kv__write_begin(kv, present, kv__put_worst(klen, vlen) > kv->len - h->top);
    int st = kv__put_one(kv, h, key, klen, sc_kv_hash(key, klen), val, vlen);
    return kv__write_end(kv, present, st);
}

int sc_kv_delete(sc_kv *kv, const void *key, uint64_t klen, int *found) {
    *found = 0;
    if (klen > SC_KV_MAX_KEY || (klen && !key)) return SC_EINVAL;
    if (!kv->data) return SC_KV_READONLY;
    const kv_header *ro;
    int present;
    KV_TRY(kv__header(kv, &ro, &present));
    if (!present) return SC_OK;
    kv_header *h;
    KV_TRY(kv__writable_header(kv, &h));
    kv__write_begin(kv, present, false);
    int st = kv__delete_one(kv, h, key, klen, sc_kv_hash(key, klen), found);
    return kv__write_end(kv, present, st);
}

/* ---- iteration and statistics ---------------------------------------------------------------------- */
int sc_kv_scan(sc_kv *kv, sc_kv_cursor *cur, sc_kv_entry *out, uint64_t max, uint64_t *n_out) {
    *n_out = 0;
    kv__begin_call(kv);
    const kv_header *h;
    int present;
    KV_TRY(kv__header(kv, &h, &present));
    if (!present) return SC_OK;
    uint64_t nb = kv__n_buckets(h), got = 0, limit = chain_limit(kv);
    while (cur->bucket < nb && got < max) {
        uint64_t off, pos = 0;
        KV_TRY(kv__bucket_offset(kv, h, cur->bucket, &off));
        for (uint64_t steps = 0; off && got < max; steps++) {
            kv_bucket tmp;
            int st = SC_OK;
            const kv_bucket *bk = read_bucket(kv, off, &tmp, &st);
            if (!bk) return st;
            if (steps > limit) return SC_ECORRUPT;
            for (uint32_t i = 0; i < bk->count && got < max; i++, pos++) {
                if (pos < cur->pos) continue;
                kv_rec r;
                KV_TRY(kv__record(kv, h, bk->slot[i].rec, &r));
                out[got].key_off = r.off + KV_BLOCK_HEAD;
                out[got].klen = r.klen;
                out[got].val_off = r.off + KV_BLOCK_HEAD + r.klen;
                out[got].vlen = r.vlen;
                got++;
                cur->pos = pos + 1;
            }
            if (got == max) break;
            if (bk->next) KV_TRY(kv__overflow(kv, h, bk->next));
            off = bk->next;
        }
        if (got == max && off) break;  /* resume inside this chain */
        cur->bucket++;
        cur->pos = 0;
    }
    *n_out = got;
    return SC_OK;
}

int sc_kv_stat(sc_kv *kv, sc_kv_stats *out) {
    memset(out, 0, sizeof *out);
    out->slots_per_bucket = KV_SLOTS;
    out->region_bytes = kv->len;
    const kv_header *h;
    int present;
    KV_TRY(kv__header(kv, &h, &present));
    if (!present) {
        out->wilderness_bytes = kv->len;
        return SC_OK;
    }
    out->present = 1;
    out->count = h->count;
    out->changes = h->changes;
    out->buckets = kv__n_buckets(h);
    out->initial_buckets = (uint64_t)1 << h->b0_log2;
    out->level = h->level;
    out->split = h->split;
    out->splits = h->splits;
    out->overflow_buckets = h->overflow_buckets;
    out->header_bytes = h->header_bytes;
    out->used_bytes = h->used_bytes;
    uint64_t heap = h->top - h->header_bytes;
    out->free_bytes = heap > h->used_bytes ? heap - h->used_bytes : 0;
    out->wilderness_bytes = kv->len - h->top;
    return SC_OK;
}
