/* sc_kv_verify: a full consistency check of a map, for tests, tools and recovery checks.
 * Walks the heap block by block, every free list, and every bucket chain; cross-checks
 * counts (records, overflow buckets, segments, used bytes) and that each record's key
 * hashes to the bucket it is in. Cost: one pass over the region plus sorting the record
 * offsets. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "kv_internal.h"

typedef struct vctx {
    sc_kv *kv;
    const kv_header *h;
    char *msg;
    size_t msg_len;
    uint64_t *recs;     /* record offsets referenced by slots */
    uint64_t n_recs, cap_recs;
    uint64_t *ovfs;     /* overflow bucket bodies referenced by chains */
    uint64_t n_ovfs, cap_ovfs;
} vctx;

static int fail(vctx *c, const char *fmt, ...) {
    if (c->msg && c->msg_len) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(c->msg, c->msg_len, fmt, ap);
        va_end(ap);
    }
    return SC_ECORRUPT;
}

static int push(uint64_t **arr, uint64_t *n, uint64_t *cap, uint64_t v) {
    if (*n == *cap) {
        uint64_t nc = *cap ? *cap * 2 : 1024;
        uint64_t *g = realloc(*arr, nc * sizeof *g);
        if (!g) return SC_ENOMEM;
        *arr = g;
        *cap = nc;
    }
    (*arr)[(*n)++] = v;
    return SC_OK;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int read_u64(vctx *c, uint64_t off, uint64_t *v) {
    return sc_kv_read(c->kv, off, v, 8) == SC_OK ? SC_OK
                                                 : fail(c, "offset %llu outside the region",
                                                        (unsigned long long)off);
}

typedef struct heap_counts {
    uint64_t records, buckets, segments, free_blocks, used;
} heap_counts;

static int walk_heap(vctx *c, heap_counts *hc) {
    const kv_header *h = c->h;
    bool prev_used = true;
    uint64_t off = h->header_bytes;
    while (off < h->top) {
        uint64_t w;
        if (kv__block_head(c->kv, h, off, &w) != SC_OK)
            return fail(c, "heap: bad block head at %llu", (unsigned long long)off);
        uint64_t size = KV_SIZE(w);
        if (!!(w & KV_PINUSE) != prev_used)
            return fail(c, "heap: block at %llu has a wrong previous-in-use bit",
                        (unsigned long long)off);
        if (w & KV_INUSE) {
            unsigned k = KV_KIND(w);
            if (k == KV_KIND_RECORD) hc->records++;
            else if (k == KV_KIND_BUCKET) hc->buckets++;
            else if (k == KV_KIND_SEGMENT) hc->segments++;
            else return fail(c, "heap: used block at %llu has no kind", (unsigned long long)off);
            hc->used += size;
        } else {
            uint64_t foot;
            if (!prev_used)
                return fail(c, "heap: adjacent free blocks at %llu", (unsigned long long)off);
            if (KV_KIND(w) != KV_KIND_FREE)
                return fail(c, "heap: free block at %llu has a kind", (unsigned long long)off);
            KV_TRY(read_u64(c, off + size - 8, &foot));
            if (foot != size)
                return fail(c, "heap: free block at %llu has footer %llu, size %llu",
                            (unsigned long long)off, (unsigned long long)foot,
                            (unsigned long long)size);
            hc->free_blocks++;
        }
        prev_used = (w & KV_INUSE) != 0;
        off += size;
    }
    if (off != h->top) return fail(c, "heap: blocks overrun top");
    if (!prev_used) return fail(c, "heap: a free block borders the wilderness");
    if (hc->used != h->used_bytes)
        return fail(c, "heap: %llu bytes in use, header says %llu", (unsigned long long)hc->used,
                    (unsigned long long)h->used_bytes);
    return SC_OK;
}

static int walk_free_lists(vctx *c, uint64_t free_blocks) {
    const kv_header *h = c->h;
    uint64_t seen = 0;
    for (unsigned cl = 0; cl < KV_N_CLASSES; cl++) {
        bool bit = (h->nonempty[cl >> 6] >> (cl & 63)) & 1;
        if (bit != (h->free_head[cl] != 0))
            return fail(c, "free list %u: bitmap disagrees with its head", cl);
        uint64_t prev = 0;
        for (uint64_t off = h->free_head[cl]; off;) {
            uint64_t w, back, next;
            if (++seen > free_blocks)
                return fail(c, "free lists hold more blocks than the heap (a cycle?)");
            if (kv__block_head(c->kv, h, off, &w) != SC_OK || w & KV_INUSE ||
                kv__size_class(KV_SIZE(w)) != cl)
                return fail(c, "free list %u: bad block %llu", cl, (unsigned long long)off);
            KV_TRY(read_u64(c, off + 8, &next));
            KV_TRY(read_u64(c, off + 16, &back));
            if (back != prev) return fail(c, "free list %u: broken back link at %llu", cl,
                                          (unsigned long long)off);
            prev = off;
            off = next;
        }
    }
    if (seen != free_blocks)
        return fail(c, "%llu free blocks in the heap, %llu on free lists",
                    (unsigned long long)free_blocks, (unsigned long long)seen);
    return SC_OK;
}

static int check_segments(vctx *c, uint64_t segment_blocks) {
    const kv_header *h = c->h;
    uint64_t n = 0;
    for (unsigned s = 0; s < KV_N_SEGMENTS; s++) {
        bool needed = s <= h->level || (s == h->level + 1 && h->split);
        bool allowed = s <= h->level + 1;
        uint64_t start;
        if (!h->segments[s]) {
            if (needed) return fail(c, "segment %u missing", s);
            continue;
        }
        if (!allowed) return fail(c, "segment %u allocated beyond the table", s);
        if (kv__segment_start(c->kv, h, s, &start) != SC_OK)
            return fail(c, "segment %u: bad block", s);
        n++;
    }
    if (n != segment_blocks)
        return fail(c, "%llu segments in the header, %llu segment blocks in the heap",
                    (unsigned long long)n, (unsigned long long)segment_blocks);
    return SC_OK;
}

static int check_entry(vctx *c, uint64_t b, const kv_slot *e, uint8_t **keybuf,
                       uint64_t *keycap) {
    const kv_header *h = c->h;
    kv_rec r;
    if (kv__bucket_index(h, e->hash) != b)
        return fail(c, "bucket %llu holds a hash that belongs to bucket %llu",
                    (unsigned long long)b, (unsigned long long)kv__bucket_index(h, e->hash));
    if (kv__record(c->kv, h, e->rec, &r) != SC_OK)
        return fail(c, "bucket %llu: bad record %llu", (unsigned long long)b,
                    (unsigned long long)e->rec);
    if (r.klen > *keycap) {
        uint8_t *g = realloc(*keybuf, r.klen);
        if (!g) return SC_ENOMEM;
        *keybuf = g;
        *keycap = r.klen;
    }
    KV_TRY(sc_kv_read(c->kv, r.off + KV_BLOCK_HEAD, *keybuf, r.klen));
    if (sc_kv_hash(*keybuf, r.klen) != e->hash)
        return fail(c, "record %llu: key does not hash to its slot's hash",
                    (unsigned long long)r.off);
    return push(&c->recs, &c->n_recs, &c->cap_recs, e->rec);
}

static int walk_buckets(vctx *c) {
    const kv_header *h = c->h;
    uint64_t nb = kv__n_buckets(h), limit = c->kv->len / KV_BUCKET_BYTES + 1;
    uint8_t *keybuf = NULL;
    uint64_t keycap = 0;
    int st = SC_OK;
    for (uint64_t b = 0; b < nb && st == SC_OK; b++) {
        uint64_t off;
        if (kv__bucket_offset(c->kv, h, b, &off) != SC_OK) {
            st = fail(c, "bucket %llu: bad segment", (unsigned long long)b);
            break;
        }
        for (uint64_t steps = 0; off && st == SC_OK; steps++) {
            kv_bucket bk;
            if (steps > limit) { st = fail(c, "bucket %llu: chain loops", (unsigned long long)b); break; }
            if ((st = sc_kv_read(c->kv, off, &bk, sizeof bk)) != SC_OK) break;
            if (bk.count > KV_SLOTS || (bk.next && bk.count != KV_SLOTS)) {
                st = fail(c, "bucket %llu: bad count %u", (unsigned long long)b, bk.count);
                break;
            }
            for (uint32_t i = 0; i < bk.count && st == SC_OK; i++)
                st = check_entry(c, b, &bk.slot[i], &keybuf, &keycap);
            if (st != SC_OK) break;
            if (bk.next) {
                if (kv__overflow(c->kv, h, bk.next) != SC_OK) {
                    st = fail(c, "bucket %llu: bad overflow link %llu", (unsigned long long)b,
                              (unsigned long long)bk.next);
                    break;
                }
                st = push(&c->ovfs, &c->n_ovfs, &c->cap_ovfs, bk.next);
            }
            off = bk.next;
        }
    }
    free(keybuf);
    return st;
}

/* Distinct offsets; also catches one record (or overflow bucket) reached twice. */
static int all_distinct(vctx *c, uint64_t *arr, uint64_t n, const char *what) {
    if (n < 2) return SC_OK;
    qsort(arr, n, sizeof *arr, cmp_u64);
    for (uint64_t i = 1; i < n; i++)
        if (arr[i] == arr[i - 1])
            return fail(c, "%s %llu is referenced twice", what, (unsigned long long)arr[i]);
    return SC_OK;
}

/* Equal keys in one map: compare the keys of records whose hashes are equal. */
static int no_duplicate_keys(vctx *c) {
    /* Each record's key must find that very record. */
    const kv_header *h = c->h;
    uint8_t *key = NULL;
    uint64_t cap = 0;
    int st = SC_OK;
    for (uint64_t i = 0; i < c->n_recs && st == SC_OK; i++) {
        kv_rec r;
        kv_hit hit;
        if ((st = kv__record(c->kv, h, c->recs[i], &r)) != SC_OK) break;
        if (r.klen > cap) {
            uint8_t *g = realloc(key, r.klen);
            if (!g) { st = SC_ENOMEM; break; }
            key = g;
            cap = r.klen;
        }
        if ((st = sc_kv_read(c->kv, r.off + KV_BLOCK_HEAD, key, r.klen)) != SC_OK) break;
        if ((st = kv__find(c->kv, h, key, r.klen, sc_kv_hash(key, r.klen), 0, false, &hit)) !=
            SC_OK)
            break;
        if (hit.rec.off != r.off)
            st = fail(c, "records %llu and %llu hold the same key",
                      (unsigned long long)hit.rec.off, (unsigned long long)r.off);
    }
    free(key);
    return st;
}

int sc_kv_verify(sc_kv *kv, char *msg, size_t msg_len) {
    if (msg && msg_len) msg[0] = 0;
    const kv_header *h;
    int present;
    vctx c = {.kv = kv, .msg = msg, .msg_len = msg_len};
    kv__begin_call(kv);
    int st = kv__header(kv, &h, &present);
    if (st != SC_OK) {
        int damaged = fail(&c, "header: %s", sc_kv_strerror(st));
        return st == SC_KV_MISMATCH ? st : damaged;  /* opened with the wrong size */
    }
    if (!present) return SC_OK;
    c.h = h;
    heap_counts hc = {0};
    if ((st = walk_heap(&c, &hc)) != SC_OK) goto out;
    if ((st = walk_free_lists(&c, hc.free_blocks)) != SC_OK) goto out;
    if ((st = check_segments(&c, hc.segments)) != SC_OK) goto out;
    if ((st = walk_buckets(&c)) != SC_OK) goto out;
    if (c.n_recs != h->count) {
        st = fail(&c, "%llu entries in the table, header count %llu",
                  (unsigned long long)c.n_recs, (unsigned long long)h->count);
        goto out;
    }
    if (c.n_recs != hc.records) {
        st = fail(&c, "%llu entries, %llu record blocks in the heap (leak)",
                  (unsigned long long)c.n_recs, (unsigned long long)hc.records);
        goto out;
    }
    if (c.n_ovfs != hc.buckets || c.n_ovfs != h->overflow_buckets) {
        st = fail(&c, "%llu overflow buckets linked, %llu in the heap, header says %llu",
                  (unsigned long long)c.n_ovfs, (unsigned long long)hc.buckets,
                  (unsigned long long)h->overflow_buckets);
        goto out;
    }
    if ((st = all_distinct(&c, c.ovfs, c.n_ovfs, "overflow bucket")) != SC_OK) goto out;
    if ((st = all_distinct(&c, c.recs, c.n_recs, "record")) != SC_OK) goto out;
    st = no_duplicate_keys(&c);
out:
    free(c.recs);
    free(c.ovfs);
    return st;
}
