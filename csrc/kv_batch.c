/* Batch calls: one crossing into C for many keys.
 *
 * Lookups are software-pipelined: the key bytes of item i + 3D, the bucket of item i + 2D
 * and the record of item i + D are prefetched while item i is resolved, so a batch keeps
 * several cache misses in flight instead of paying them one after another. put_many also
 * prefetches, one item ahead, the bytes an in-place overwrite will write.
 *
 * put_many is all or nothing. When the wilderness alone has room for the worst case of
 * every item (a new record plus an overflow bucket each), nothing can run out of room:
 * the table's growth meanwhile may only take wilderness the remaining items do not need
 * (sc_kv.reserve), and a split that cannot get memory waits (kv__grow). While no snapshot
 * is live, tracking a write allocates nothing either (only a preserving copy does), so
 * such a batch can fail only on a map that was damaged before it, and it runs without
 * bookkeeping: the fast path. Otherwise the call keeps a journal of before-images and a
 * failure restores them: a batch that may run out of room, and every writer-side call
 * (single ones too) while a snapshot is live, when the first write to each page needs
 * memory for its copy and may get SC_ENOMEM part-way.
 *
 * Why before-images rather than undoing each item: undoing items (removing the new
 * records, putting the old values back) leaves what the batch did to the allocator and
 * the table in place: the buckets it split, the segments it reserved, and records freed
 * below those segments instead of back into the wilderness, so a later put that fit
 * before could fail. The journal restores the region's bytes exactly, allocator and table
 * state included, with no code that has to know how each structure changed: every change
 * goes through kv_poke, which saves the 64-byte lines it covers before it changes them.
 * The wilderness is restored too (new records go there): the region's bytes, not only the
 * map, are as before. A map the call created is taken away instead (kv__uncreate). The
 * journal costs 24 bytes per poke, and 64 per line a poke covers unless they were all
 * zero (never used).
 *
 * Damage (SC_ECORRUPT) found part-way through a batch on the fast path is the one failure
 * that leaves the items before it applied: undoing it would take before-images of all the
 * fast path writes, and keeping them made batches of inserts and of in-place overwrites
 * 20-40% slower (64 B and 1 KiB values). verify() says where the damage is.
 */
#include <stdlib.h>

#include "kv_internal.h"

#define PF_DIST 5u
#define PF_RING 16u /* > 3 * PF_DIST */
#define PF_VALUE_BYTES 4096u /* at most this much of a value is prefetched */

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

/* ---- the journal ------------------------------------------------------------------------------ */
/* Journal buffers a handle keeps between calls, in bytes: enough for a batch of 10,000
 * overwrites of 1 KiB values. */
#define JOURNAL_KEEP (16u << 20)

/* Room for `more` after `n` of `size` bytes each, doubling. */
static int grow(void **arr, uint64_t *cap, uint64_t n, uint64_t more, uint64_t size) {
    if (*cap - n >= more) return SC_OK;
    uint64_t want = *cap ? *cap * 2 : 256;
    while (want - n < more) want *= 2;
    void *p = sc__alloc_fails() ? NULL : realloc(*arr, want * size);
    if (!p) return SC_ENOMEM;
    *arr = p;
    *cap = want;
    return SC_OK;
}

static bool is_zero(const uint8_t *p, uint64_t n) {
    return p[0] == 0 && memcmp(p, p + 1, n - 1) == 0;
}

/* No record of the lines saved already: a line poked again is saved again (a bucket is
 * poked by every insert into it), which costs less than looking each line up, and
 * restoring the newest run first ends with the oldest image of every line. */
int kv__journal_save(sc_kv *kv, uint64_t off, uint64_t n) {
    kv_journal *j = kv->journal;
    uint64_t first = off / KV_JOURNAL_LINE, lines = (off + n - 1) / KV_JOURNAL_LINE - first + 1;
    const uint8_t *p = kv->data + first * KV_JOURNAL_LINE;
    bool zero = is_zero(p, lines * KV_JOURNAL_LINE);
    KV_TRY(grow((void **)&j->run, &j->cap_runs, j->n_runs, 1, sizeof *j->run));
    if (!zero) {
        KV_TRY(grow((void **)&j->bytes, &j->cap_lines, j->n_lines, lines, KV_JOURNAL_LINE));
        memcpy(j->bytes + j->n_lines * KV_JOURNAL_LINE, p, lines * KV_JOURNAL_LINE);
        j->n_lines += lines;
    }
    j->run[j->n_runs++] = (kv_run){first, lines, zero};
    return SC_OK;
}

/* Put the saved lines back, newest run first. Only lines that differ are written: a line
 * that differs from an image saved during the call was changed after that save, through a
 * poke that tracked its page (a line never crosses a page: the region starts on a page
 * boundary and pages are at least 512 bytes); a line saved by a poke whose tracking then
 * failed did not change, and its page may be untracked. */
static void journal_restore(sc_kv *kv, const kv_journal *j) {
    static const uint8_t zeros[KV_JOURNAL_LINE];
    const uint8_t *was = j->bytes + j->n_lines * KV_JOURNAL_LINE;
    for (uint64_t r = j->n_runs; r-- > 0;) {
        const kv_run *run = &j->run[r];
        if (!run->zero) was -= run->n * KV_JOURNAL_LINE;
        for (uint64_t i = 0; i < run->n; i++) {
            uint8_t *p = kv->data + (run->line + i) * KV_JOURNAL_LINE;
            const uint8_t *img = run->zero ? zeros : was + i * KV_JOURNAL_LINE;
            if (memcmp(p, img, KV_JOURNAL_LINE) != 0) memcpy(p, img, KV_JOURNAL_LINE);
        }
    }
    kv->seg_ok = 0;  /* segments the call made are gone */
}

/* Buffers freed here grow again from nothing, with a page fault every 4 KiB of the next
 * call's journal: batches of overwrites under a snapshot ran 10-15% slower for it. */
static void journal_release(kv_journal *j, uint64_t keep) {
    if (j->cap_runs * sizeof *j->run + j->cap_lines * KV_JOURNAL_LINE > keep) {
        free(j->run);
        free(j->bytes);
        j->run = NULL;
        j->bytes = NULL;
        j->cap_runs = j->cap_lines = 0;
    }
    j->n_runs = j->n_lines = 0;
}

void kv__write_begin(sc_kv *kv, int present, bool may_run_out) {
    /* A map the call creates needs none: kv__uncreate takes it away. */
    if (!present || !(may_run_out || kv->s->newest_snap)) return;
    kv->journal = &kv->jbuf;
}

int kv__write_end(sc_kv *kv, int present, int st) {
    if (kv->journal) {
        if (st != SC_OK) journal_restore(kv, kv->journal);
        journal_release(kv->journal, JOURNAL_KEEP);
        kv->journal = NULL;
    } else if (st != SC_OK && !present) {
        kv__uncreate(kv);
    }
    return st;
}

void kv__journal_free(sc_kv *kv) { journal_release(&kv->jbuf, 0); }

/* ---- put_many --------------------------------------------------------------------------------- */
int sc_kv_put_many(sc_kv *kv, const sc_kv_buf *keys, const sc_kv_buf *vals, uint64_t n,
                   uint64_t *failed_at) {
    *failed_at = n;
    KV_TRY(check_lengths(keys, vals, n, failed_at));
    if (!kv->data) return SC_KV_READONLY;
    if (!n) return SC_OK;
    const kv_header *ro;
    int present;
    KV_TRY(kv__header(kv, &ro, &present));
    kv_header *h;
    KV_TRY(kv__writable_header(kv, &h));

    uint64_t worst = 0, room = kv->len - h->top;
    for (uint64_t i = 0; i < n && worst <= room; i++)
        worst += kv__put_worst(keys[i].len, vals[i].len);
    bool may_run_out = worst > room;
    kv__write_begin(kv, present, may_run_out);
    kv->reserve = may_run_out ? 0 : worst;

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
                         vals[j].len);
        if (st != SC_OK) {
            *failed_at = j;
            break;
        }
        if (!may_run_out) kv->reserve -= kv__put_worst(keys[j].len, vals[j].len);
    }
    kv->reserve = 0;
    return kv__write_end(kv, present, st);
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
    kv__write_begin(kv, present, false);
    uint64_t ring[PF_RING];
    int st = SC_OK;
    for (uint64_t i = 0; i < n + 2 * PF_DIST && st == SC_OK; i++) {
        if (i < n) __builtin_prefetch(keys[i].ptr);
        if (i >= PF_DIST && i - PF_DIST < n) {
            uint64_t j = i - PF_DIST;
            ring[j % PF_RING] = sc_kv_hash(keys[j].ptr, keys[j].len);
            prefetch_bucket(kv, h, ring[j % PF_RING]);
        }
        if (i < 2 * PF_DIST) continue;
        uint64_t j = i - 2 * PF_DIST;
        int found = 0;
        st = kv__delete_one(kv, h, keys[j].ptr, keys[j].len, ring[j % PF_RING], &found);
        if (st == SC_OK) *deleted += (uint64_t)found;
    }
    return kv__write_end(kv, present, st);
}
