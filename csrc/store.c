/* Page store: mapping, write paths, page versions, dirty tracking. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

static const char *const status_names[SC__COUNT] = {
    [SC_OK] = "ok",
    [SC_EINVAL] = "invalid argument",
    [SC_ERANGE] = "out of range",
    [SC_ENOMEM] = "out of memory",
    [SC_EIO] = "system call failed",
    [SC_EMISMATCH] = "existing store has another size or page size",
    [SC_EFORMAT] = "unknown format or format version",
    [SC_ECORRUPT] = "corrupt data",
    [SC_EGAP] = "epoch gap",
    [SC_ENOSNAP] = "no live snapshot with that epoch",
    [SC_EINCOMPAT] = "made for another page size or store size",
    [SC_EBUSY] = "store is already open (in this or another process)",
};

const char *sc_strerror(sc_status st) {
    if ((unsigned)st >= SC__COUNT) return "unknown status";
    return status_names[st];
}

static bool valid_page_size(uint32_t ps) {
    return ps >= SC_MIN_PAGE_SIZE && ps <= SC_MAX_PAGE_SIZE && (ps & (ps - 1)) == 0;
}

static uint32_t log2_u32(uint32_t v) {
    uint32_t r = 0;
    while ((1u << r) < v) r++;
    return r;
}

static uint64_t file_header_checksum(const sc_file_header *h) {
    /* Only the immutable fields: epoch and friends change in place and a crash between
     * two stores must not make the file unreadable. */
    sc_file_header tmp;
    memset(&tmp, 0, sizeof tmp);
    memcpy(tmp.magic, h->magic, 8);
    tmp.format_version = h->format_version;
    tmp.page_size = h->page_size;
    tmp.size = h->size;
    memcpy(tmp.uuid, h->uuid, 16);
    return sc_page_checksum(&tmp, sizeof tmp);
}

void sc__persist_header(sc_store *s) {
    if (!s->fh) return;
    s->fh->epoch = atomic_load(&s->epoch);
    s->fh->schema_version = s->schema_version;
    s->fh->dirty_base = s->dirty_base;
    memcpy(s->fh->uuid, s->uuid, 16);
    s->fh->checksum = file_header_checksum(s->fh);
}

static sc_status alloc_tracking(sc_store *s) {
    void *st = mmap(NULL, s->n_pages * 8, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (st == MAP_FAILED) return SC_ENOMEM;
    s->stamps = st;
    atomic_store(&s->seq, 1);
    s->n_groups = (s->n_pages + 63) / 64;
    s->group_max = calloc(s->n_groups, sizeof(uint64_t));
    s->dirty = calloc(s->n_groups, sizeof(uint64_t));
    if (!s->group_max || !s->dirty) return SC_ENOMEM;
    return SC_OK;
}

/* Rebuild the in-memory summaries from the persisted versions of a reopened file. */
static void rebuild_tracking(sc_store *s) {
    for (uint64_t p = 0; p < s->n_pages; p++) {
        uint64_t v = atomic_load_explicit(&s->versions[p], memory_order_relaxed);
        if (!v) continue;
        uint64_t g = p >> 6;
        if (v > s->group_max[g]) s->group_max[g] = v;
        if (v > s->dirty_base) s->dirty[g] |= 1ull << (p & 63);
    }
}

static sc_status open_anonymous(sc_store *s) {
    s->map_len = s->size;
    s->map = mmap(NULL, s->map_len, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (s->map == MAP_FAILED) { s->map = NULL; return SC_ENOMEM; }
    s->data = s->map;
#ifdef MADV_HUGEPAGE
    /* State is dense and large: huge pages cut first-touch faults and TLB misses (numpy
     * asks the same for its big arrays). Snapshot granularity stays our page size. */
    if (s->size >= (4u << 20)) madvise(s->map, s->map_len, MADV_HUGEPAGE);
#endif
    /* mmap rather than calloc: untouched version pages cost no memory. */
    void *v = mmap(NULL, s->n_pages * 8, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (v == MAP_FAILED) return SC_ENOMEM;
    s->versions = v;
    s->versions_owned = true;
    if (getrandom(s->uuid, 16, 0) != 16) return SC_EIO;
    return alloc_tracking(s);
}

/* The checks of a header on its own; the file's length is the caller's. */
static sc_status check_header(const sc_file_header *h) {
    if (memcmp(h->magic, SC_STORE_MAGIC, 8) != 0) return SC_EFORMAT;
    if (h->format_version != SC_FORMAT_VERSION) return SC_EFORMAT;
    if (h->checksum != file_header_checksum(h)) return SC_ECORRUPT;
    if (!valid_page_size(h->page_size) || h->size == 0 || h->size % h->page_size)
        return SC_ECORRUPT;
    return SC_OK;
}

_Static_assert(sizeof(sc_file_header) == SC_STORE_HEADER_BYTES, "store header layout");

sc_status sc_store_read_header(const void *head, uint64_t len, sc_store_header_info *out) {
    if (!head || !out) return SC_EINVAL;
    memset(out, 0, sizeof *out);
    if (len < sizeof(sc_file_header)) return SC_ECORRUPT;
    sc_file_header h;
    memcpy(&h, head, sizeof h); /* the caller's bytes need not be aligned */
    /* 0 without the magic: the caller can tell "not a store" from "another version". */
    out->format_version = memcmp(h.magic, SC_STORE_MAGIC, 8) ? 0 : h.format_version;
    sc_status st = check_header(&h);
    if (st) return st;
    out->page_size = h.page_size;
    out->size = h.size;
    out->epoch = h.epoch;
    out->schema_version = h.schema_version;
    memcpy(out->uuid, h.uuid, 16);
    return SC_OK;
}

static sc_status check_existing(sc_store *s, const sc_file_header *h, uint64_t size,
                                uint32_t page_size, uint64_t file_len) {
    sc_status st = check_header(h);
    if (st) return st;
    if ((size && size != h->size) || (page_size && page_size != h->page_size))
        return SC_EMISMATCH;
    uint64_t n = h->size / h->page_size;
    if (file_len != SC_FILE_HEADER_SIZE + h->size + n * 8) return SC_ECORRUPT;
    s->size = h->size;
    s->page_size = h->page_size;
    return SC_OK;
}

static sc_status open_file(sc_store *s, const char *path, uint64_t size, uint32_t page_size) {
    s->fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (s->fd < 0) return SC_EIO;
    if (flock(s->fd, LOCK_EX | LOCK_NB) != 0) return errno == EWOULDBLOCK ? SC_EBUSY : SC_EIO;
    struct stat st;
    if (fstat(s->fd, &st) != 0) return SC_EIO;
    bool fresh = st.st_size == 0;
    sc_file_header h;
    if (fresh) {
        if (!size) return SC_EINVAL;
        s->size = size;
        s->page_size = page_size ? page_size : SC_DEFAULT_PAGE_SIZE;
        if (s->size % s->page_size) return SC_EINVAL;
    } else {
        if (pread(s->fd, &h, sizeof h, 0) != (ssize_t)sizeof h) return SC_ECORRUPT;
        sc_status st2 = check_existing(s, &h, size, page_size, (uint64_t)st.st_size);
        if (st2) return st2;
    }
    s->n_pages = s->size / s->page_size;
    if (s->n_pages > UINT32_MAX) return SC_EINVAL;
    s->map_len = SC_FILE_HEADER_SIZE + s->size + s->n_pages * 8;
    if (fresh && ftruncate(s->fd, (off_t)s->map_len) != 0) return SC_EIO;
    s->map = mmap(NULL, s->map_len, PROT_READ | PROT_WRITE, MAP_SHARED, s->fd, 0);
    if (s->map == MAP_FAILED) { s->map = NULL; return SC_ENOMEM; }
    s->fh = (sc_file_header *)s->map;
    s->data = s->map + SC_FILE_HEADER_SIZE;
    s->versions = (_Atomic uint64_t *)(s->data + s->size);
    if (fresh) {
        memcpy(s->fh->magic, SC_STORE_MAGIC, 8);
        s->fh->format_version = SC_FORMAT_VERSION;
        s->fh->page_size = s->page_size;
        s->fh->size = s->size;
        if (getrandom(s->uuid, 16, 0) != 16) return SC_EIO;
        atomic_store(&s->epoch, 1);
        sc__persist_header(s);
    } else {
        memcpy(s->uuid, s->fh->uuid, 16);
        atomic_store(&s->epoch, s->fh->epoch ? s->fh->epoch : 1);
        s->schema_version = s->fh->schema_version;
        s->dirty_base = s->fh->dirty_base;
    }
    sc_status st3 = alloc_tracking(s);
    if (st3) return st3;
    if (!fresh) rebuild_tracking(s);
    return SC_OK;
}

sc_status sc_store_open(const char *path, uint64_t size, uint32_t page_size, sc_store **out) {
    *out = NULL;
    if (page_size && !valid_page_size(page_size)) return SC_EINVAL;
    if (!path && (!size || size % (page_size ? page_size : SC_DEFAULT_PAGE_SIZE)))
        return SC_EINVAL;
    sc_store *s = calloc(1, sizeof *s);
    if (!s) return SC_ENOMEM;
    s->fd = -1;
    if (pthread_rwlock_init(&s->chain_lock, NULL) != 0) { free(s); return SC_ENOMEM; }
    atomic_store(&s->epoch, 1);
    sc_status st;
    if (path) {
        st = open_file(s, path, size, page_size);
    } else {
        s->size = size;
        s->page_size = page_size ? page_size : SC_DEFAULT_PAGE_SIZE;
        s->n_pages = size / s->page_size;
        /* Replay packs page rows into 32 bits: 16 TiB at 4 KiB pages. */
        st = s->n_pages > UINT32_MAX ? SC_EINVAL : open_anonymous(s);
    }
    s->page_shift = log2_u32(s->page_size);
    if (st != SC_OK) {
        int saved = errno;
        sc_store_close(s);
        errno = saved;
        return st;
    }
    /* Only after a successful open: a failed one may not know its page size yet (0 on
     * EBUSY, or a fresh file without a size) and the pool divides by it. close() of a
     * failed open sees the calloc'd pool, which is a valid empty one. */
    sc__pool_init(&s->pool, s->page_size);
    *out = s;
    return SC_OK;
}

void sc_store_close(sc_store *s) {
    if (!s) return;
    sc__free_all_preserved(s);
    sc__replay_scratch_free(s);
    free(s->snaps);
    if (s->fh) sc__persist_header(s);
    if (s->map) munmap(s->map, s->map_len);
    if (s->versions_owned && s->versions) munmap((void *)s->versions, s->n_pages * 8);
    if (s->stamps) munmap((void *)s->stamps, s->n_pages * 8);
    free((void *)s->group_max);
    free((void *)s->dirty);
    if (s->fd >= 0) close(s->fd); /* also drops the flock */
    pthread_rwlock_destroy(&s->chain_lock);
    free(s);
}

sc_status sc_store_sync(sc_store *s) {
    if (!s->fh) return SC_OK;
    sc__persist_header(s);
    if (msync(s->map, s->map_len, MS_SYNC) != 0) return SC_EIO;
    return SC_OK;
}

uint64_t sc_store_size(const sc_store *s) { return s->size; }
uint64_t sc_store_n_pages(const sc_store *s) { return s->n_pages; }
uint32_t sc_store_page_size(const sc_store *s) { return s->page_size; }
uint64_t sc_store_epoch(const sc_store *s) { return atomic_load(&s->epoch); }
const uint8_t *sc_store_data(const sc_store *s) { return s->data; }
const uint8_t *sc_store_uuid(const sc_store *s) { return s->uuid; }
uint64_t sc_store_schema_version(const sc_store *s) { return s->schema_version; }

void sc_store_set_uuid(sc_store *s, const uint8_t uuid[16]) {
    memcpy(s->uuid, uuid, 16);
    sc__persist_header(s);
}

void sc_store_set_schema_version(sc_store *s, uint64_t v) {
    s->schema_version = v;
    sc__persist_header(s);
}

void sc_store_set_epoch(sc_store *s, uint64_t epoch) {
    if (epoch > atomic_load(&s->epoch)) atomic_store(&s->epoch, epoch);
    sc__persist_header(s);
}

uint64_t sc_store_page_version(const sc_store *s, uint64_t page) {
    return page < s->n_pages ? sc__load_version(s, page) : 0;
}

void sc_store_publish(sc_store *s) {
    (void)s;
    atomic_thread_fence(memory_order_release);
}


sc_status sc_store_touch_range(sc_store *s, uint64_t offset, uint64_t len) {
    if (!sc__range_ok(s, offset, len)) return SC_ERANGE;
    if (!len) return SC_OK;
    uint64_t first = offset >> s->page_shift, last = (offset + len - 1) >> s->page_shift;
    uint64_t e = atomic_load(&s->epoch);
    if (first == last) { /* the common small write: no batch */
        sc_status st = sc__prepare_page(s, first, e);
        if (st) return st;
    } else {
        sc_prep b;
        sc__prep_init(&b, s);
        sc_status st = SC_OK;
        for (uint64_t p = first; p <= last && st == SC_OK; p++) st = sc__prep_page(&b, p, e);
        sc__prep_finish(&b);
        if (st) return st;
    }
    sc__writer_add(&s->pages_written, last - first + 1);
    sc_store_publish(s);
    return SC_OK;
}

static sc_status touch_pages_in_order(sc_store *s, const uint64_t *ids, uint64_t n) {
    uint64_t e = atomic_load(&s->epoch);
    sc_prep b;
    sc__prep_init(&b, s);
    sc_status st = SC_OK;
    for (uint64_t i = 0; i < n && st == SC_OK; i++) {
        if (i + SC_PREFETCH_AHEAD < n) sc__prefetch_meta(s, ids[i + SC_PREFETCH_AHEAD]);
        st = sc__prep_page(&b, ids[i], e);
    }
    sc__prep_finish(&b);
    return st;
}

sc_status sc_store_touch_pages(sc_store *s, const uint64_t *ids, uint64_t n) {
    uint64_t lo = UINT64_MAX, hi = 0;
    for (uint64_t i = 0; i < n; i++) {
        if (ids[i] >= s->n_pages) return SC_ERANGE;
        lo = ids[i] < lo ? ids[i] : lo;
        hi = ids[i] > hi ? ids[i] : hi;
    }
    sc_status st;
    if (n && sc__prep_worth_sorting(s, n, lo, hi)) {
        for (uint64_t i = 0; i < n; i++) sc__sort_mark(s, ids[i]);
        st = sc__prep_sorted(s, lo, hi, atomic_load(&s->epoch));
    } else {
        st = touch_pages_in_order(s, ids, n);
    }
    if (st) return st;
    sc__writer_add(&s->pages_written, n);
    sc_store_publish(s);
    return SC_OK;
}

sc_status sc_store_write(sc_store *s, uint64_t offset, const void *src, uint64_t len) {
    sc_status st = sc_store_touch_range(s, offset, len);
    if (st) return st;
    memcpy(s->data + offset, src, len);
    return SC_OK;
}

sc_status sc_store_write_pages(sc_store *s, const uint64_t *ids, uint64_t n, const void *src) {
    sc_status st = sc_store_touch_pages(s, ids, n);
    if (st) return st;
    const uint8_t *in = src;
    bool stream = (n << s->page_shift) >= SC_STREAM_MIN_BYTES;
    if (stream) sc__stream_fence();
    for (uint64_t i = 0; i < n; i++)
        sc__copy_page(stream, s->data + (ids[i] << s->page_shift), in + (i << s->page_shift),
                      s->page_size);
    if (stream) sc__stream_fence();
    return SC_OK;
}

sc_status sc_store_read(const sc_store *s, uint64_t offset, void *dst, uint64_t len) {
    if (!sc__range_ok(s, offset, len)) return SC_ERANGE;
    memcpy(dst, s->data + offset, len);
    return SC_OK;
}

void sc_store_clear_dirty(sc_store *s, uint64_t epoch) {
    for (uint64_t g = 0; g < s->n_groups; g++) {
        uint64_t w = atomic_load_explicit(&s->dirty[g], memory_order_relaxed);
        while (w) {
            unsigned b = (unsigned)__builtin_ctzll(w);
            w &= w - 1;
            uint64_t p = (g << 6) + b;
            if (sc__load_version(s, p) <= epoch)
                atomic_fetch_and_explicit(&s->dirty[g], ~(1ull << b), memory_order_relaxed);
        }
    }
    if (epoch > s->dirty_base) s->dirty_base = epoch;
    sc__persist_header(s);
}

uint64_t sc_store_dirty_count(const sc_store *s) {
    uint64_t n = 0;
    for (uint64_t g = 0; g < s->n_groups; g++)
        n += (uint64_t)__builtin_popcountll(atomic_load_explicit(&s->dirty[g], memory_order_relaxed));
    return n;
}

void sc_store_stats(sc_store *s, sc_stats *out) {
    memset(out, 0, sizeof *out);
    pthread_rwlock_rdlock(&s->chain_lock);
    out->live_snapshots = s->n_snaps;
    out->oldest_snapshot = s->n_snaps ? s->snaps[0].epoch : 0;
    pthread_rwlock_unlock(&s->chain_lock);
    out->epoch = atomic_load(&s->epoch);
    out->preserved_pages = atomic_load(&s->preserved_pages);
    out->preserved_bytes = out->preserved_pages * s->page_size;
    out->pages_written = atomic_load(&s->pages_written);
    out->pages_preserved_total = atomic_load(&s->pages_preserved_total);
    out->dirty_pages = sc_store_dirty_count(s);
    out->deltas_applied = atomic_load(&s->deltas_applied);
    out->pages_applied = atomic_load(&s->pages_applied);
}
