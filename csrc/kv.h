/* statecore keyed state: a hash table of variable-size keys and values that lives in a
 * region of a page store, so snapshots, deltas, checkpoints and replication carry it.
 *
 * Layout of the region (all offsets below are relative to the region's start):
 *   [header 2560 B][heap .......................................... wilderness]
 * The header holds the table geometry and the allocator's state; bucket segments,
 * overflow buckets and records are blocks of the heap. See kv_internal.h.
 *
 * Every modification goes through sc_store_touch_range before the bytes change, so it is
 * tracked like any other store write. Writer-side calls (put, delete, clear, create, the
 * batch puts/deletes) must be serialized with the store's other writer-side calls; read
 * calls on a live region must not run concurrently with them either (the table moves
 * entries while it grows). Views over a snapshot (snap_epoch != 0) are read-only and may
 * be used from any number of threads.
 *
 * Nothing here trusts the region's bytes: every offset, length and count read from it is
 * bounds-checked, and a damaged structure returns SC_ECORRUPT (never a crash).
 *
 * A writer-side call that fails leaves the region's bytes as it found them (SC_KV_FULL,
 * SC_ENOMEM while a live snapshot needs preserving copies, anything else), with one
 * exception: damage (SC_ECORRUPT) that a call running without a journal finds part-way,
 * after it changed the map. Page versions and dirty bits may have moved meanwhile.
 */
#ifndef STATECORE_KV_H
#define STATECORE_KV_H

#include <stddef.h>
#include <stdint.h>

#include "statecore.h"

#ifdef __cplusplus
extern "C" {
#endif

#define SC_KV_MAX_KEY 65535u          /* bytes */
#define SC_KV_MAX_VALUE (1u << 30)    /* bytes */
#define SC_KV_MIN_REGION 8192u        /* smallest region a map fits in */

/* KV calls return an sc_status or one of these. */
enum {
    SC_KV_FULL = 64,        /* no free block large enough: nothing was written */
    SC_KV_NOT_EMPTY = 65,   /* create: the region holds data but no KV header */
    SC_KV_READONLY = 66,    /* a write through a snapshot view */
    SC_KV_MISMATCH = 67,    /* the region holds a map made for another region length */
};
const char *sc_kv_strerror(int st);

typedef struct sc_kv sc_kv;
typedef struct sc_kv_buf {
    const void *ptr;
    uint64_t len;
} sc_kv_buf;

/* A handle on the region [base, base+len) of store s (both multiples of the page size).
 * snap_epoch 0: the live store; otherwise a live snapshot's epoch (a read-only view).
 * capacity: keys to size the table for when a write first creates the map (0: small).
 * Opening never writes. SC_KV_MISMATCH: the region holds a map made for another len
 * (sc_kv_recorded_size says which). */
int sc_kv_open(sc_store *s, uint64_t base, uint64_t len, uint64_t snap_epoch,
               uint64_t capacity, sc_kv **out);
void sc_kv_close(sc_kv *kv);
/* The region length recorded in the map header at base (of the live store, or of the
 * snapshot at snap_epoch): what a handle must be opened with; 0 when no map header is
 * there. */
int sc_kv_recorded_size(sc_store *s, uint64_t base, uint64_t snap_epoch, uint64_t *len);

/* *present = 1 when the region holds a valid map header, 0 when it holds none (the map
 * is empty and the first write creates it). A damaged header is SC_ECORRUPT. */
int sc_kv_probe(sc_kv *kv, int *present);
/* Write a fresh header (writer-side). SC_KV_NOT_EMPTY unless every page of the region
 * is zero; SC_EINVAL if one is present already. Writes are also preceded by it. */
int sc_kv_create(sc_kv *kv);
/* Forget every key in O(capacity at creation): a fresh header and initial table. */
int sc_kv_clear(sc_kv *kv);

/* murmur3 x64-128 of the key with seed 0, first 64 bits (mmh3.hash64(key)[0], unsigned). */
uint64_t sc_kv_hash(const void *key, uint64_t len);

/* Lookup: *found, and where the value lies (region offset and length). */
int sc_kv_get(sc_kv *kv, const void *key, uint64_t klen, uint64_t *val_off, uint64_t *vlen,
              int *found);
/* Copy region bytes [off, off+len) (values found by get/scan) to dst. */
int sc_kv_read(sc_kv *kv, uint64_t off, void *dst, uint64_t len);

/* Insert or overwrite. Either the map holds key -> value afterwards, or (an error) the map
 * is unchanged. */
int sc_kv_put(sc_kv *kv, const void *key, uint64_t klen, const void *val, uint64_t vlen);
int sc_kv_delete(sc_kv *kv, const void *key, uint64_t klen, int *found);

/* Batches. get_many: vlen[i] = UINT64_MAX for a missing key. put_many is all or nothing:
 * on an error the map is as before (but see damage above) and *failed_at names the item
 * that failed. Repeated keys: the last value wins. delete_many ignores missing keys. */
int sc_kv_get_many(sc_kv *kv, const sc_kv_buf *keys, uint64_t n, uint64_t *val_off,
                   uint64_t *vlen);
/* Copy the values get_many found: for each i with dst[i] != NULL, region bytes
 * [off[i], off[i]+len[i]) to dst[i] (each range is checked against the region first). On
 * an error *failed_at names the item (the ones before it are copied). */
int sc_kv_read_many(sc_kv *kv, const uint64_t *off, const uint64_t *len, void *const *dst,
                    uint64_t n, uint64_t *failed_at);
int sc_kv_put_many(sc_kv *kv, const sc_kv_buf *keys, const sc_kv_buf *vals, uint64_t n,
                   uint64_t *failed_at);
int sc_kv_delete_many(sc_kv *kv, const sc_kv_buf *keys, uint64_t n, uint64_t *deleted);

/* Iteration: start with cursor {0, 0}; each call fills up to max entries and advances the
 * cursor; done when *n_out < max. A cursor is only valid while no key is inserted or
 * deleted (see sc_kv_stats.changes); overwrites keep it valid. */
typedef struct sc_kv_cursor {
    uint64_t bucket;
    uint64_t pos;
} sc_kv_cursor;
typedef struct sc_kv_entry {
    uint64_t key_off, klen, val_off, vlen;
} sc_kv_entry;
int sc_kv_scan(sc_kv *kv, sc_kv_cursor *cursor, sc_kv_entry *out, uint64_t max,
               uint64_t *n_out);

typedef struct sc_kv_stats {
    uint64_t present;          /* 0: no header yet (an empty map) */
    uint64_t count;            /* keys */
    uint64_t changes;          /* inserts + deletes + clears so far (iterator validity) */
    uint64_t buckets;          /* primary buckets */
    uint64_t initial_buckets;
    uint64_t level, split;     /* linear hashing state */
    uint64_t splits;           /* bucket splits so far */
    uint64_t overflow_buckets;
    uint64_t slots_per_bucket;
    uint64_t region_bytes, header_bytes;
    uint64_t used_bytes;       /* in allocated blocks (records, buckets, segments) */
    uint64_t free_bytes;       /* in free blocks below the wilderness */
    uint64_t wilderness_bytes; /* never allocated, above `top` */
} sc_kv_stats;
int sc_kv_stat(sc_kv *kv, sc_kv_stats *out);

/* Check every structure: header, each bucket chain, each record (and that its key hashes
 * to the bucket it is in), the count, every heap block and every free list. On failure
 * returns SC_ECORRUPT with a description of the first problem in msg. */
int sc_kv_verify(sc_kv *kv, char *msg, size_t msg_len);

#ifdef __cplusplus
}
#endif
#endif
