/* Batch calls: one crossing into C for many keys.
 *
 * Lookups are software-pipelined: the key bytes of item i + 3D, the bucket of item i + 2D
 * and the record of item i + D are prefetched while item i is resolved, so a batch keeps
 * several cache misses in flight instead of paying them one after another. put_many also
 * prefetches, one item ahead, the bytes an in-place overwrite will write.
 *
 * put_many is all or nothing. When the wilderness alone has room for the worst case of
 * every item (a new record plus an overflow bucket each), nothing can run out of room and
 * the batch runs without bookkeeping; the table's growth meanwhile may only take
 * wilderness the remaining items do not need (sc_kv.reserve). Otherwise each item is
 * logged (new record; replaced record, whose old block is freed only at the end; old
 * value bytes of an in-place rewrite) and a failure rolls the map back.
 */
#include <stdlib.h>

#include "kv_internal.h"

#define PF_DIST 5u
#define PF_RING 16u /* > 3 * PF_DIST */
#define PF_VALUE_BYTES 4096u /* at most this much of a value is prefetched */

enum { UNDO_NEW = 1, UNDO_REPLACED = 2, UNDO_IN_PLACE = 3 };

/* ---- prefetching (live regions only) --------------------------------------------------- */
/* Both lines of the bucket. (Prefetches beyond what the core has fill buffers for stall
 * instead of helping: values and overflow heads are not prefetched.) */
static inline void prefetch_bucket(const sc_kv *kv, const kv_header *h, uint64_t hash) {
    uint64_t off;
    if (kv__bucket_offset(kv, h, kv__bucket_index(h, hash), &off) != SC_OK) return;
    __builtin_prefetch(kv->data + off);
    __builtin_prefetch(kv->data + off + 64);
}

/* The bucket is in cache by now: prefetch the record a matching slot names, and the
 * overflow bucket the chain continues in (with its block head). */
static inline void prefetch_record(const sc_kv *kv, const kv_header *h, uint64_t hash) {
    uint64_t off;
    if (kv__bucket_offset(kv, h, kv__bucket_index(h, hash), &off) != SC_OK) return;
    const kv_bucket *bk = (const kv_bucket *)(kv->data + off);
    uint32_t n = bk->count < KV_SLOTS ? bk->count : KV_SLOTS;
    for (uint32_t i = 0; i < n; i++)
        if (bk->slot[i].hash == hash && bk->slot[i].rec < h->top)
            __builtin_prefetch(kv->data + bk->slot[i].rec);
    uint64_t next = bk->next;
    if (next >= KV_BLOCK_HEAD && next < h->top && h->top - next >= KV_BUCKET_BYTES)
        __builtin_prefetch(kv->data + next);
}

/* put_many, one item ahead of resolving it (its bucket and record are in cache by now):
 * when the primary bucket names a record with this hash whose block holds the new value,
 * the value will most likely be rewritten in place there, so prefetch the lines it lands
 * on for writing. Without this, the copy of a 1 KiB value waits on each line in turn
 * (perf: overwrites in place of 1 KiB values ran 7-22% faster with it). */
static inline void prefetch_value_dest(const sc_kv *kv, const kv_header *h, uint64_t hash,
                                       uint64_t klen, uint64_t vlen) {
    uint64_t off;
    if (vlen <= 64 || kv__bucket_offset(kv, h, kv__bucket_index(h, hash), &off) != SC_OK)
        return;
    const kv_bucket *bk = (const kv_bucket *)(kv->data + off);
    uint32_t n = bk->count < KV_SLOTS ? bk->count : KV_SLOTS;
    uint64_t span = KV_BLOCK_HEAD + klen + (vlen < PF_VALUE_BYTES ? vlen : PF_VALUE_BYTES);
    for (uint32_t i = 0; i < n; i++) {
        uint64_t rec = bk->slot[i].rec;
        if (bk->slot[i].hash != hash) continue;
        if (rec < h->header_bytes || rec >= h->top || h->top - rec < span ||
            KV_SIZE(kv_load64(kv->data + rec)) < kv__record_size(klen, vlen))
            return;
        const uint8_t *p = kv->data + rec;
        for (uint64_t at = 64 - ((uintptr_t)p & 63); at < span; at += 64)
            __builtin_prefetch(p + at, 1);
        return;
    }
}

static int check_lengths(const sc_kv_buf *keys, const sc_kv_buf *vals, uint64_t n,
                         uint64_t *bad) {
    for (uint64_t i = 0; i < n; i++) {
        if (keys[i].len > SC_KV_MAX_KEY || (keys[i].len && !keys[i].ptr) ||
            (vals && (vals[i].len > SC_KV_MAX_VALUE || (vals[i].len && !vals[i].ptr)))) {
            *bad = i;
            return SC_EINVAL;
        }
    }
    return SC_OK;
}

/* ---- get_many -------------------------------------------------------------------------------- */
int sc_kv_get_many(sc_kv *kv, const sc_kv_buf *keys, uint64_t n, uint64_t *val_off,
                   uint64_t *vlen) {
    uint64_t bad;
    for (uint64_t i = 0; i < n; i++) vlen[i] = UINT64_MAX;
    KV_TRY(check_lengths(keys, NULL, n, &bad));
    const kv_header *h;
    int present;
    kv__begin_call(kv);
    KV_TRY(kv__header(kv, &h, &present));
    if (!present) return SC_OK;
    uint64_t ring[PF_RING];
    bool live = kv->data != NULL;
    /* Stage at i: prefetch key i; hash key i-D and prefetch its bucket; prefetch the
     * record of key i-2D; resolve key i-3D. */
    for (uint64_t i = 0; i < n + 3 * PF_DIST; i++) {
        if (i < n && live) __builtin_prefetch(keys[i].ptr);
        if (i >= PF_DIST && i - PF_DIST < n) {
            uint64_t j = i - PF_DIST;
            ring[j % PF_RING] = sc_kv_hash(keys[j].ptr, keys[j].len);
            if (live) prefetch_bucket(kv, h, ring[j % PF_RING]);
        }
        if (live && i >= 2 * PF_DIST && i - 2 * PF_DIST < n)
            prefetch_record(kv, h, ring[(i - 2 * PF_DIST) % PF_RING]);
        if (i < 3 * PF_DIST || i - 3 * PF_DIST >= n) continue;
        uint64_t j = i - 3 * PF_DIST;
        kv_hit hit;
        KV_TRY(kv__find(kv, h, keys[j].ptr, keys[j].len, ring[j % PF_RING], 0, false, &hit));
        if (hit.bucket) {
            val_off[j] = hit.rec.off + KV_BLOCK_HEAD + keys[j].len;
            vlen[j] = hit.rec.vlen;
        }
    }
    return SC_OK;
}

/* ---- read_many ------------------------------------------------------------------------------- */
/* A plain loop of copies: the copies are independent, so the core overlaps the misses of
 * the next values with the current copy by itself (software prefetching of the value bytes
 * a few items ahead measured no faster, 1 KiB values at 1M and 10M keys). */
int sc_kv_read_many(sc_kv *kv, const uint64_t *off, const uint64_t *len, void *const *dst,
                    uint64_t n, uint64_t *failed_at) {
    *failed_at = n;
    for (uint64_t i = 0; i < n; i++) {
        if (!dst[i]) continue;
        int st = sc_kv_read(kv, off[i], dst[i], len[i]);
        if (st != SC_OK) {
            *failed_at = i;
            return st;
        }
    }
    return SC_OK;
}

/* ---- the undo log ------------------------------------------------------------------------------ */
int kv__undo_new(kv_undo *log, uint64_t rec) {
    if (log->n == log->cap) return SC_ENOMEM;
    log->e[log->n++] = (kv_undo_entry){UNDO_NEW, rec, 0, 0};
    return SC_OK;
}

int kv__undo_replaced(kv_undo *log, uint64_t rec_new, uint64_t rec_old) {
    if (log->n == log->cap) return SC_ENOMEM;
    log->e[log->n++] = (kv_undo_entry){UNDO_REPLACED, rec_new, rec_old, 0};
    return SC_OK;
}

/* Called before the record is rewritten: keeps its old value length and bytes. */
int kv__undo_in_place(const sc_kv *kv, kv_undo *log, const kv_rec *rec) {
    if (log->n == log->cap) return SC_ENOMEM;
    if (rec->vlen > log->arena_cap - log->used) {
        uint64_t cap = log->arena_cap ? log->arena_cap : 4096;
        while (cap - log->used < rec->vlen) cap *= 2;
        uint8_t *grown = realloc(log->arena, cap);
        if (!grown) return SC_ENOMEM;
        log->arena = grown;
        log->arena_cap = cap;
    }
    KV_TRY(sc_kv_read((sc_kv *)kv, rec->off + KV_BLOCK_HEAD + rec->klen, log->arena + log->used,
                      rec->vlen));
    log->e[log->n++] = (kv_undo_entry){UNDO_IN_PLACE, rec->off, rec->vlen, log->used};
    log->used += rec->vlen;
    return SC_OK;
}

static int find_record_slot(sc_kv *kv, const kv_header *h, uint64_t rec, bool to_end,
                            kv_hit *hit) {
    kv_rec r;
    KV_TRY(kv__record(kv, h, rec, &r));
    uint64_t hash = sc_kv_hash(kv->data + r.off + KV_BLOCK_HEAD, r.klen);
    KV_TRY(kv__find(kv, h, NULL, 0, hash, rec, to_end, hit));
    return hit->bucket ? SC_OK : SC_ECORRUPT;
}

static int undo_one(sc_kv *kv, kv_header *h, const kv_undo *log, const kv_undo_entry *e) {
    kv_hit hit;
    int st = SC_OK;
    switch (e->kind) {
    case UNDO_NEW:
        KV_TRY(find_record_slot(kv, h, e->rec_new, true, &hit));
        return kv__remove(kv, h, &hit);
    case UNDO_REPLACED:
        KV_TRY(find_record_slot(kv, h, e->rec_new, false, &hit));
        KV_TRY(kv__set_slot_rec(kv, hit.bucket, hit.slot, e->rec_old));
        return kv__free(kv, h, e->rec_new);
    case UNDO_IN_PLACE: {
        kv_rec r;
        KV_TRY(kv__record(kv, h, e->rec_new, &r));
        if (KV_BLOCK_HEAD + r.klen + e->rec_old > r.size) return SC_ECORRUPT;
        uint8_t *p = kv_poke(kv, r.off + 12, 4 + r.klen + e->rec_old, &st);
        if (!p) return st;
        uint32_t v32 = (uint32_t)e->rec_old;
        memcpy(p, &v32, 4);
        if (e->rec_old) memcpy(p + 4 + r.klen, log->arena + e->saved, e->rec_old);
        return SC_OK;
    }
    default:
        return SC_ECORRUPT;
    }
}

/* ---- put_many --------------------------------------------------------------------------------- */
int sc_kv_put_many(sc_kv *kv, const sc_kv_buf *keys, const sc_kv_buf *vals, uint64_t n,
                   uint64_t *failed_at) {
    *failed_at = n;
    KV_TRY(check_lengths(keys, vals, n, failed_at));
    if (!n) return kv->data ? SC_OK : SC_KV_READONLY;
    kv_header *h;
    KV_TRY(kv__writable_header(kv, &h));

    uint64_t worst = 0, room = kv->len - h->top;
    for (uint64_t i = 0; i < n && worst <= room; i++)
        worst += kv__record_size(keys[i].len, vals[i].len) + KV_BLOCK_HEAD + KV_BUCKET_BYTES;
    bool logged = worst > room;
    kv_undo log = {0};
    if (logged) {
        log.e = malloc(n * sizeof *log.e);
        if (!log.e) return SC_ENOMEM;
        log.cap = n;
    }
    kv->reserve = logged ? 0 : worst;

    uint64_t ring[PF_RING];
    int st = SC_OK;
    for (uint64_t i = 0; i < n + 3 * PF_DIST; i++) {
        if (i < n) __builtin_prefetch(keys[i].ptr);
        if (i >= PF_DIST && i - PF_DIST < n) {
            uint64_t j = i - PF_DIST;
            ring[j % PF_RING] = sc_kv_hash(keys[j].ptr, keys[j].len);
            prefetch_bucket(kv, h, ring[j % PF_RING]);
        }
        if (i >= 2 * PF_DIST && i - 2 * PF_DIST < n)
            prefetch_record(kv, h, ring[(i - 2 * PF_DIST) % PF_RING]);
        if (i >= 3 * PF_DIST - 1 && i - (3 * PF_DIST - 1) < n) {
            uint64_t q = i - (3 * PF_DIST - 1);
            prefetch_value_dest(kv, h, ring[q % PF_RING], keys[q].len, vals[q].len);
        }
        if (i < 3 * PF_DIST) continue;
        uint64_t j = i - 3 * PF_DIST;
        st = kv__put_one(kv, h, keys[j].ptr, keys[j].len, ring[j % PF_RING], vals[j].ptr,
                         vals[j].len, logged ? &log : NULL);
        if (st != SC_OK) {
            *failed_at = j;
            break;
        }
        if (!logged)
            kv->reserve -= kv__record_size(keys[j].len, vals[j].len) + KV_BLOCK_HEAD +
                           KV_BUCKET_BYTES;
    }
    kv->reserve = 0;
    if (logged) {
        for (uint64_t k = log.n; k-- > 0;) {
            int ust = st != SC_OK ? undo_one(kv, h, &log, &log.e[k])
                      : log.e[k].kind == UNDO_REPLACED ? kv__free(kv, h, log.e[k].rec_old)
                                                        : SC_OK;
            if (ust != SC_OK && st == SC_OK) st = ust;
            if (ust != SC_OK) break;
        }
        free(log.e);
        free(log.arena);
    }
    return st;
}

/* ---- delete_many ------------------------------------------------------------------------------- */
int sc_kv_delete_many(sc_kv *kv, const sc_kv_buf *keys, uint64_t n, uint64_t *deleted) {
    uint64_t bad;
    *deleted = 0;
    KV_TRY(check_lengths(keys, NULL, n, &bad));
    if (!kv->data) return SC_KV_READONLY;
    const kv_header *ro;
    int present;
    KV_TRY(kv__header(kv, &ro, &present));
    if (!present || !n) return SC_OK;
    kv_header *h;
    KV_TRY(kv__writable_header(kv, &h));
    uint64_t ring[PF_RING];
    for (uint64_t i = 0; i < n + 2 * PF_DIST; i++) {
        if (i < n) __builtin_prefetch(keys[i].ptr);
        if (i >= PF_DIST && i - PF_DIST < n) {
            uint64_t j = i - PF_DIST;
            ring[j % PF_RING] = sc_kv_hash(keys[j].ptr, keys[j].len);
            prefetch_bucket(kv, h, ring[j % PF_RING]);
        }
        if (i < 2 * PF_DIST) continue;
        uint64_t j = i - 2 * PF_DIST;
        int found;
        KV_TRY(kv__delete_one(kv, h, keys[j].ptr, keys[j].len, ring[j % PF_RING], &found));
        *deleted += (uint64_t)found;
    }
    return SC_OK;
}
