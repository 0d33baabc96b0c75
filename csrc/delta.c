/* Deltas: finding changed pages, one-pass gather, validation, and apply. */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "delta_pages.h"
#include "internal.h"
#include "parallel.h"

_Static_assert(sizeof(sc_header) == SC_HEADER_SIZE, "header layout");
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "formats are little-endian");

typedef struct {
    uint64_t *ids, *versions, n, cap;
} page_list;

static sc_status page_list_push(page_list *l, uint64_t id, uint64_t version) {
    if (l->n == l->cap) {
        uint64_t cap = l->cap ? l->cap * 2 : 1024;
        uint64_t *ids = realloc(l->ids, cap * 8);
        if (!ids) return SC_ENOMEM;
        l->ids = ids;
        uint64_t *vs = realloc(l->versions, cap * 8);
        if (!vs) return SC_ENOMEM;
        l->versions = vs;
        l->cap = cap;
    }
    l->ids[l->n] = id;
    l->versions[l->n++] = version;
    return SC_OK;
}

sc_status sc_changed_pages(sc_store *s, uint64_t since, uint64_t until, uint64_t **ids_out,
                           uint64_t **versions_out, uint64_t *n_out) {
    page_list l = {0};
    sc_status st = SC_OK;
    pthread_rwlock_rdlock(&s->chain_lock);
    uint64_t seq = sc__snap_seq(s, until);
    if (!seq) st = SC_ENOSNAP;
    /* group_max skips 64 clean pages per word: the scan follows the changed pages. */
    for (uint64_t g = 0; g < s->n_groups && st == SC_OK; g++) {
        if (atomic_load_explicit(&s->group_max[g], memory_order_acquire) <= since) continue;
        uint64_t end = (g + 1) * 64 < s->n_pages ? (g + 1) * 64 : s->n_pages;
        for (uint64_t p = g * 64; p < end && st == SC_OK; p++) {
            uint64_t v = sc__version_as_of(s, seq, p);
            if (v > since) st = page_list_push(&l, p, v);
        }
    }
    pthread_rwlock_unlock(&s->chain_lock);
    if (st) {
        free(l.ids);
        free(l.versions);
        return st;
    }
    *ids_out = l.ids;
    *versions_out = l.versions;
    *n_out = l.n;
    return SC_OK;
}

void sc_header_seal(sc_header *h, const void *index) {
    h->index_checksum = sc_page_checksum(index, h->n_pages * 24);
    h->header_checksum = sc_page_checksum(h, offsetof(sc_header, header_checksum));
}

typedef struct {
    sc_store *s;
    uint64_t epoch;
    const uint64_t *ids;
    uint64_t *checksums;
    uint8_t *payload;
} gather_job;

static int gather_range(void *ctx, uint64_t begin, uint64_t end) {
    gather_job *j = ctx;
    sc_store *s = j->s;
    sc_status st = SC_OK;
    for (uint64_t i = begin; i < end && st == SC_OK;) {
        /* Lock in batches so snapshot() never waits behind a whole gather. */
        uint64_t stop = i + SC_CHECKSUM_BATCH < end ? i + SC_CHECKSUM_BATCH : end;
        pthread_rwlock_rdlock(&s->chain_lock);
        uint64_t seq = sc__snap_seq(s, j->epoch); /* 0: released under us */
        if (!seq) st = SC_ENOSNAP;
        uint64_t first = i;
        const uint8_t *copied[SC_CHECKSUM_BATCH];
        for (; i < stop && st == SC_OK; i++) {
            uint8_t *dst = j->payload + (i << s->page_shift);
            st = sc__read_page_as_of(s, seq, j->ids[i], dst, NULL);
            copied[i - first] = dst;
        }
        pthread_rwlock_unlock(&s->chain_lock);
        /* Checksummed together while the copies are in cache (several pages side by side). */
        if (st == SC_OK) sc__page_checksums_at(copied, i - first, s->page_size, j->checksums + first);
    }
    return st;
}

sc_status sc_delta_build(sc_store *s, uint64_t since, uint64_t until, uint8_t **buf_out,
                         uint64_t *len_out) {
    if (since > until) return SC_EINVAL;
    uint64_t *ids, *versions, n;
    sc_status st = sc_changed_pages(s, since, until, &ids, &versions, &n);
    if (st) return st;
    uint64_t payload_offset = SC_HEADER_SIZE + n * 24;
    uint64_t total = payload_offset + (n << s->page_shift);
    uint8_t *buf = sc_buffer_alloc(total);
    if (!buf) { free(ids); free(versions); return SC_ENOMEM; }
    sc_header *h = (sc_header *)buf;
    memset(h, 0, sizeof *h);
    memcpy(h->magic, SC_DELTA_MAGIC, 8);
    h->format_version = SC_FORMAT_VERSION;
    h->kind = SC_KIND_DELTA;
    h->page_size = s->page_size;
    h->store_pages = s->n_pages;
    h->base_epoch = since;
    h->target_epoch = until;
    h->n_pages = n;
    h->schema_version = s->schema_version;
    h->payload_bytes = n << s->page_shift;
    memcpy(h->store_uuid, s->uuid, 16);
    uint64_t *out_ids = (uint64_t *)(buf + SC_HEADER_SIZE);
    /* With no changed pages, ids and versions are NULL, and memcpy from NULL is undefined
     * even for 0 bytes (UBSan aborts on it): an empty delta is a valid thing to build. */
    if (n) {
        memcpy(out_ids, ids, n * 8);
        memcpy(out_ids + n, versions, n * 8);
    }
    free(ids);
    free(versions);
    gather_job job = {s, until, out_ids, out_ids + 2 * n, buf + payload_offset};
    st = sc__parallel_for(n, sc__threads_for(n << s->page_shift, 0), gather_range, &job);
    if (st) { sc_buffer_free(buf, total); return st; }
    sc_header_seal(h, out_ids);
    *buf_out = buf;
    *len_out = total;
    return SC_OK;
}

#define SC_MAPPED_BUFFER (2u << 20)
#define SC_BUFFER_CACHE 8
#define SC_BUFFER_CACHE_BYTES (1ull << 30)

/* Freed large buffers are kept (lazily freed with MADV_FREE) for the next buffer of the
 * same rounded size: a commit loop builds deltas of similar sizes, and a fresh mapping
 * costs more in page faults and zeroing than the gather itself. */
static struct {
    pthread_mutex_t lock;
    void *buf[SC_BUFFER_CACHE];
    uint64_t len[SC_BUFFER_CACHE];
    uint64_t n, bytes;
} buffer_cache = {.lock = PTHREAD_MUTEX_INITIALIZER};

static uint64_t mapped_len(uint64_t len) {
    return (len + SC_MAPPED_BUFFER - 1) & ~(uint64_t)(SC_MAPPED_BUFFER - 1);
}

static void *cache_take(uint64_t rounded) {
    void *p = NULL;
    pthread_mutex_lock(&buffer_cache.lock);
    for (uint64_t i = 0; i < buffer_cache.n; i++) {
        if (buffer_cache.len[i] != rounded) continue;
        p = buffer_cache.buf[i];
        buffer_cache.bytes -= rounded;
        buffer_cache.n--;
        buffer_cache.buf[i] = buffer_cache.buf[buffer_cache.n];
        buffer_cache.len[i] = buffer_cache.len[buffer_cache.n];
        break;
    }
    pthread_mutex_unlock(&buffer_cache.lock);
    return p;
}

static bool cache_put(void *p, uint64_t rounded) {
    bool kept = false;
    pthread_mutex_lock(&buffer_cache.lock);
    if (buffer_cache.n < SC_BUFFER_CACHE &&
        buffer_cache.bytes + rounded <= SC_BUFFER_CACHE_BYTES) {
#ifdef MADV_FREE
        madvise(p, rounded, MADV_FREE);
#endif
        buffer_cache.buf[buffer_cache.n] = p;
        buffer_cache.len[buffer_cache.n++] = rounded;
        buffer_cache.bytes += rounded;
        kept = true;
    }
    pthread_mutex_unlock(&buffer_cache.lock);
    return kept;
}

void *sc_buffer_alloc(uint64_t len) {
    if (len < SC_MAPPED_BUFFER) return malloc(len ? len : 1);
    uint64_t rounded = mapped_len(len);
    void *p = cache_take(rounded);
    if (p) return p;
    p = mmap(NULL, rounded, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
#ifdef MADV_HUGEPAGE
    madvise(p, rounded, MADV_HUGEPAGE);
#endif
    return p;
}

void sc_buffer_free(void *buf, uint64_t len) {
    if (!buf) return;
    if (len < SC_MAPPED_BUFFER) {
        free(buf);
        return;
    }
    uint64_t rounded = mapped_len(len);
    if (!cache_put(buf, rounded)) munmap(buf, rounded);
}

static bool valid_page_size(uint32_t ps) {
    return ps >= SC_MIN_PAGE_SIZE && ps <= SC_MAX_PAGE_SIZE && (ps & (ps - 1)) == 0;
}

static sc_status parse_header(const uint8_t *buf, uint64_t len, uint16_t kind, sc_header *h) {
    if (len < SC_HEADER_SIZE) return SC_ECORRUPT;
    memcpy(h, buf, sizeof *h);
    const char *magic = kind == SC_KIND_CHECKPOINT ? SC_CKPT_MAGIC : SC_DELTA_MAGIC;
    if (memcmp(h->magic, magic, 8) != 0) return SC_ECORRUPT;
    if (h->header_checksum != sc_page_checksum(h, offsetof(sc_header, header_checksum)))
        return SC_ECORRUPT;
    /* Checked after the checksum: a flipped version byte is corruption, not a new format. */
    if (h->format_version > SC_FORMAT_VERSION) return SC_EFORMAT;
    if (h->format_version == 0 || h->kind != kind) return SC_ECORRUPT;
    if (h->compression > SC_COMP_LZ4 || !valid_page_size(h->page_size)) return SC_ECORRUPT;
    if (h->base_epoch > h->target_epoch || h->n_pages > h->store_pages) return SC_ECORRUPT;
    /* No store has more pages than this (sc_store_open refuses), and checkpoints are never
     * compressed: anything else claims a store that cannot exist. */
    if (h->store_pages > UINT32_MAX) return SC_ECORRUPT;
    if (kind == SC_KIND_CHECKPOINT && h->compression != SC_COMP_NONE) return SC_ECORRUPT;
    /* Applying moves the store to target_epoch + 1 and later snapshots count on from
     * there; near UINT64_MAX that wraps, the store's epoch falls behind its page versions
     * and snapshots, writes and idempotence all break. No real store gets near 2^62. */
    if (h->target_epoch >= SC_MAX_EPOCH) return SC_ECORRUPT;
    return SC_OK;
}

sc_status sc_delta_parse(const uint8_t *buf, uint64_t len, uint16_t kind, int verify_pages,
                         sc_delta_view *out, uint64_t *bad_page) {
    if ((uintptr_t)buf % 8) return SC_EINVAL; /* caller aligns; u64 arrays are read in place */
    sc_header h;
    sc_status st = parse_header(buf, len, kind, &h);
    if (st) return st;
    uint64_t n = h.n_pages;
    if (n > (len - SC_HEADER_SIZE) / 24) return SC_ECORRUPT;
    uint64_t payload_offset = SC_HEADER_SIZE + n * 24;
    if (h.payload_bytes != len - payload_offset) return SC_ECORRUPT;
    if (h.compression == SC_COMP_NONE && n > UINT64_MAX / h.page_size) return SC_ECORRUPT;
    if (h.compression == SC_COMP_NONE && h.payload_bytes != n * h.page_size) return SC_ECORRUPT;
    const uint64_t *ids = (const uint64_t *)(buf + SC_HEADER_SIZE);
    if (h.index_checksum != sc_page_checksum(ids, n * 24)) return SC_ECORRUPT;
    const uint64_t *versions = ids + n;
    for (uint64_t i = 0; i < n; i++) {
        if (ids[i] >= h.store_pages || (i && ids[i] <= ids[i - 1])) return SC_ECORRUPT;
        if (versions[i] <= h.base_epoch || versions[i] > h.target_epoch) return SC_ECORRUPT;
    }
    *out = (sc_delta_view){
        .header = h,
        .ids = ids,
        .versions = versions,
        .checksums = ids + 2 * n,
        .payload = h.compression == SC_COMP_NONE ? buf + payload_offset : NULL,
        .payload_offset = payload_offset,
        .total_bytes = len,
    };
    if (verify_pages && out->payload) return sc_verify_pages(out, out->payload, bad_page);
    return SC_OK;
}

sc_status sc_verify_pages(const sc_delta_view *v, const uint8_t *payload, uint64_t *bad_page) {
    return sc_verify_page_checksums(payload, v->header.page_size, v->header.n_pages, v->checksums,
                                    0, bad_page);
}

typedef struct {
    sc_store *s;
    const uint64_t *ids;
    const uint8_t *const *sources;
    sc_progress *progress;
    bool stream; /* large: bypass the cache (stream_copy.c) */
} scatter_job;

static int scatter_range(void *ctx, uint64_t begin, uint64_t end) {
    scatter_job *j = ctx;
    /* The restamps before the bytes: pthread_create already orders the writer's restamps
     * before a worker's stores; this fence is for the range the writer copies itself
     * (a pool of long-lived workers would need a release/acquire hand-off instead). */
    if (j->stream) sc__stream_fence();
    for (uint64_t i = begin; i < end;) {
        uint64_t start = i, stop = end - i > 256 ? i + 256 : end;
        for (; i < stop; i++)
            sc__copy_page(j->stream, j->s->data + (j->ids[i] << j->s->page_shift),
                          j->sources[i], j->s->page_size);
        if (j->progress) /* every 256 pages: cheap, and often enough for a progress bar */
            atomic_fetch_add_explicit(&j->progress->done, (stop - start) << j->s->page_shift,
                                      memory_order_relaxed);
    }
    if (j->stream) sc__stream_fence(); /* and the bytes visible before the join */
    return SC_OK;
}

/* Prepares every listed page (COW for snapshots, version, dirty bit), then copies them,
 * in parallel when large. `new_versions[i]` is the version page ids[i] gets. */
sc_status sc__write_pages_from(sc_store *s, const uint64_t *ids, const uint64_t *new_versions,
                               const uint8_t *const *sources, uint64_t n, int threads,
                               sc_progress *progress) {
    sc_prep b;
    sc__prep_init(&b, s);
    sc_status st = SC_OK;
    uint64_t prepared = 0;
    for (; prepared < n; prepared++) {
        st = sc__prep_page(&b, ids[prepared], new_versions[prepared]);
        if (st) break;
    }
    sc__prep_finish(&b);
    sc_store_publish(s);
    if (st) {
        /* Out of memory part way: the pages prepared so far carry their new versions, so
         * they get their new bytes too (a retry would skip them as already applied). */
        scatter_job partial = {s, ids, sources, NULL, false};
        scatter_range(&partial, 0, prepared);
        return st;
    }
    if (progress) atomic_store(&progress->total, n << s->page_shift);
    bool stream = (n << s->page_shift) >= SC_STREAM_MIN_BYTES;
    scatter_job job = {s, ids, sources, progress, stream};
    sc__parallel_for(n, sc__threads_for(n << s->page_shift, threads), scatter_range, &job);
    atomic_fetch_add_explicit(&s->pages_applied, n, memory_order_relaxed);
    return SC_OK;
}

static sc_status check_compatible(const sc_store *s, const sc_header *h) {
    if (h->page_size != s->page_size || h->store_pages != s->n_pages) return SC_EINCOMPAT;
    return SC_OK;
}

sc_status sc_delta_apply(sc_store *s, const sc_delta_view *v, const uint8_t *payload,
                         int allow_gap, uint64_t *pages_written) {
    const sc_header *h = &v->header;
    sc_status st = check_compatible(s, h);
    if (st) return st;
    uint64_t e = atomic_load(&s->epoch);
    if (!allow_gap && h->base_epoch >= e) return SC_EGAP;
    uint64_t n = h->n_pages, k = 0;
    uint64_t *ids = malloc((n ? n : 1) * 8), *vers = malloc((n ? n : 1) * 8);
    const uint8_t **src = malloc((n ? n : 1) * sizeof *src);
    if (!ids || !vers || !src) { st = SC_ENOMEM; goto out; }
    for (uint64_t i = 0, prev = 0; i < n; i++) {
        uint64_t id = sc__read_once(&v->ids[i]), version = sc__read_once(&v->versions[i]);
        if (!sc__index_entry_ok(s, h, i, id, prev, version)) { st = SC_ECORRUPT; goto out; }
        prev = id;
        if (version <= sc__load_version(s, id)) continue; /* idempotence */
        ids[k] = id;
        vers[k] = version;
        src[k++] = payload + i * h->page_size;
    }
    st = sc__write_pages_from(s, ids, vers, src, k, 0, NULL);
    if (st) goto out;
    if (h->target_epoch + 1 > e) atomic_store(&s->epoch, h->target_epoch + 1);
    sc__persist_header(s);
    atomic_fetch_add_explicit(&s->deltas_applied, 1, memory_order_relaxed);
    if (pages_written) *pages_written = k;
out:
    free(ids);
    free(vers);
    free(src);
    return st;
}
