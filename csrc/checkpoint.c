/* Checkpoint files: delta(0, S) laid out on disk with its own magic, written in batches
 * straight from a live snapshot while writers continue. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "internal.h"
#include "parallel.h"

#define SAVE_BATCH_BYTES (8u << 20) /* two checksum threads' worth (parallel.c) */
#define STAGE_HOLD_BYTES (256u << 10) /* copied per hold of the chain lock (snapshot() waits) */

static sc_status pwrite_all(int fd, const void *buf, uint64_t len, uint64_t off) {
    const uint8_t *p = buf;
    while (len) {
        ssize_t w = pwrite(fd, p, len, (off_t)off);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return SC_EIO;
        p += w;
        len -= (uint64_t)w;
        off += (uint64_t)w;
    }
    return SC_OK;
}

/* Saving reads pages live, without copying them first: the checksum is computed from the
 * store's memory and pwritev copies straight from it. A page whose stamp already says the
 * snapshot must not read it live is copied from its preserved node into a staging buffer
 * (a bounded copy per hold of the chain lock, which is never held across I/O: snapshot()
 * takes it) and written from there in the same pwritev. A page
 * whose stamp moved while we read it (seqlock, as in snapshot.c) is redone on its own.
 * The live path needs no lock because the caller holds the snapshot for the whole save
 * (and a release under us is caught by the fallbacks). */
typedef struct {
    sc_store *s;
    uint64_t seq;
    const uint64_t *ids;
    uint64_t *sums;
    uint64_t *stamps;
} live_job;

static int checksum_live(void *ctx, uint64_t begin, uint64_t end) {
    live_job *j = ctx;
    sc_store *s = j->s;
    const uint8_t *pages[SC_CHECKSUM_BATCH];
    uint64_t at[SC_CHECKSUM_BATCH], sums[SC_CHECKSUM_BATCH];
    for (uint64_t k = begin; k < end;) {
        /* The pages the snapshot may read live, checksummed several side by side. */
        uint64_t m = 0;
        for (; k < end && m < SC_CHECKSUM_BATCH; k++) {
            j->stamps[k] = sc__load_stamp(s, j->ids[k]);
            if (j->stamps[k] > j->seq) continue; /* redone from its preserved copy */
            pages[m] = s->data + (j->ids[k] << s->page_shift);
            at[m++] = k;
        }
        sc__page_checksums_at(pages, m, s->page_size, sums);
        for (uint64_t q = 0; q < m; q++) j->sums[at[q]] = sums[q];
    }
    return SC_OK;
}

/* Start writing a batch back to disk now rather than at the final fsync, so the disk
 * works while the next batches are checksummed and copied. Advisory: on a file system
 * without it nothing changes, and the final fsync reports any I/O error. */
static void start_writeback(int fd, uint64_t off, uint64_t len) {
#ifdef SYNC_FILE_RANGE_WRITE
    (void)sync_file_range(fd, (off64_t)off, (off64_t)len, SYNC_FILE_RANGE_WRITE);
#else
    (void)fd, (void)off, (void)len;
#endif
}

/* The batch's pages that the snapshot reads from preserved nodes, copied into `staging`
 * in batch order, then checksummed there. */
static sc_status stage_preserved(sc_store *s, uint64_t epoch, uint64_t seq, const uint64_t *ids,
                                 uint64_t m, const uint64_t *stamps, uint8_t *staging,
                                 uint64_t *sums) {
    uint64_t n = 0, per_hold = STAGE_HOLD_BYTES >> s->page_shift;
    if (!per_hold) per_hold = 1;
    sc_status st = SC_OK;
    for (uint64_t k = 0; k < m && st == SC_OK;) {
        /* A bounded copy per hold of the lock: snapshot() waits for it. */
        uint64_t end = n + per_hold;
        pthread_rwlock_rdlock(&s->chain_lock);
        /* Released meanwhile: its nodes may be gone, and an older one's would be read. */
        if (sc__snap_seq(s, epoch) != seq) st = SC_ENOSNAP;
        for (; k < m && n < end && st == SC_OK; k++)
            if (stamps[k] > seq)
                st = sc__read_page_as_of(s, seq, ids[k], staging + (n++ << s->page_shift), NULL);
        pthread_rwlock_unlock(&s->chain_lock);
    }
    const uint8_t *staged[SC_CHECKSUM_BATCH];
    uint64_t at[SC_CHECKSUM_BATCH], got[SC_CHECKSUM_BATCH], q = 0;
    n = 0;
    for (uint64_t k = 0; k < m && st == SC_OK; k++) {
        if (stamps[k] <= seq) continue;
        staged[q] = staging + (n++ << s->page_shift);
        at[q++] = k;
        if (q == SC_CHECKSUM_BATCH) {
            sc__page_checksums_at(staged, q, s->page_size, got);
            for (uint64_t i = 0; i < q; i++) sums[at[i]] = got[i];
            q = 0;
        }
    }
    if (st == SC_OK && q) {
        sc__page_checksums_at(staged, q, s->page_size, got);
        for (uint64_t i = 0; i < q; i++) sums[at[i]] = got[i];
    }
    return st;
}

static sc_status pwritev_all(int fd, struct iovec *iov, int n, uint64_t off) {
    while (n) {
        ssize_t w = pwritev(fd, iov, n, (off_t)off);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return SC_EIO;
        off += (uint64_t)w;
        while (n && (size_t)w >= iov->iov_len) { /* drop what was written */
            w -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n) {
            iov->iov_base = (uint8_t *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
    return SC_OK;
}

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

/* The batch, in file order: live pages straight from the store (runs of neighbours as
 * one piece), preserved ones from `staging` (or, without one, live too, to be redone),
 * as few pwritev calls as IOV_MAX allows. */
static sc_status write_batch(sc_store *s, int fd, const uint64_t *ids, uint64_t m,
                             const uint64_t *stamps, uint64_t seq, const uint8_t *staging,
                             uint64_t file_off) {
    struct iovec iov[IOV_MAX];
    int n = 0;
    uint64_t staged = 0;  /* pages taken from staging so far */
    uint64_t pending = 0; /* bytes in iov[0..n) */
    for (uint64_t k = 0; k < m; k++) {
        const uint8_t *src = stamps[k] <= seq || !staging
                                 ? s->data + (ids[k] << s->page_shift)
                                 : staging + (staged++ << s->page_shift);
        if (n && (const uint8_t *)iov[n - 1].iov_base + iov[n - 1].iov_len == src) {
            iov[n - 1].iov_len += s->page_size;
        } else {
            if (n == IOV_MAX) {
                sc_status st = pwritev_all(fd, iov, n, file_off);
                if (st) return st;
                file_off += pending;
                n = 0;
                pending = 0;
            }
            iov[n++] = (struct iovec){(void *)src, s->page_size};
        }
        pending += s->page_size;
    }
    return n ? pwritev_all(fd, iov, n, file_off) : SC_OK;
}

static sc_status redo_page(sc_store *s, uint64_t epoch, uint64_t page, uint8_t *tmp,
                           uint64_t *sum, int fd, uint64_t off) {
    pthread_rwlock_rdlock(&s->chain_lock);
    uint64_t seq = sc__snap_seq(s, epoch);
    sc_status st = seq ? sc__read_page_as_of(s, seq, page, tmp, NULL) : SC_ENOSNAP;
    pthread_rwlock_unlock(&s->chain_lock);
    if (st) return st;
    *sum = sc_page_checksum(tmp, s->page_size);
    return pwrite_all(fd, tmp, s->page_size, off);
}

static sc_status write_payload(sc_store *s, uint64_t epoch, int fd, const uint64_t *ids,
                               uint64_t *checksums, uint64_t n, uint64_t offset,
                               sc_progress *progress) {
    uint64_t per_batch = SAVE_BATCH_BYTES >> s->page_shift;
    if (!per_batch) per_batch = 1;
    uint64_t *stamps = malloc(per_batch * 8);
    uint8_t *tmp = malloc(s->page_size);
    uint8_t *staging = NULL; /* made for the first batch with preserved pages, if it can be */
    bool staging_tried = false;
    sc_status st = stamps && tmp ? SC_OK : SC_ENOMEM;
    pthread_rwlock_rdlock(&s->chain_lock);
    uint64_t seq = sc__snap_seq(s, epoch);
    pthread_rwlock_unlock(&s->chain_lock);
    if (!seq && st == SC_OK) st = SC_ENOSNAP;
    for (uint64_t i = 0; i < n && st == SC_OK; i += per_batch) {
        uint64_t m = n - i < per_batch ? n - i : per_batch;
        live_job job = {s, seq, ids + i, checksums + i, stamps};
        sc__parallel_for(m, sc__threads_for(m << s->page_shift, 0), checksum_live, &job);
        bool staged = false;
        for (uint64_t k = 0; k < m && !staged; k++) staged = stamps[k] > seq;
        if (staged && !staging_tried) {
            staging_tried = true;
            staging = malloc(per_batch << s->page_shift);
        }
        staged = staged && staging; /* without a buffer, such pages take the redo path */
        if (staged) st = stage_preserved(s, epoch, seq, ids + i, m, stamps, staging, checksums + i);
        if (st == SC_OK)
            st = write_batch(s, fd, ids + i, m, stamps, seq, staged ? staging : NULL,
                             offset + (i << s->page_shift));
        if (st == SC_OK) start_writeback(fd, offset + (i << s->page_shift), m << s->page_shift);
        atomic_thread_fence(memory_order_acquire);
        for (uint64_t k = 0; k < m && st == SC_OK; k++) {
            /* Staged pages are final; a live one whose stamp moved since is redone. */
            if (stamps[k] > seq ? staged : sc__load_stamp(s, ids[i + k]) == stamps[k]) continue;
            st = redo_page(s, epoch, ids[i + k], tmp, &checksums[i + k], fd,
                           offset + ((i + k) << s->page_shift));
        }
        if (progress) atomic_fetch_add(&progress->done, m << s->page_shift);
    }
    free(stamps);
    free(tmp);
    free(staging);
    return st;
}

sc_status sc_checkpoint_save(sc_store *s, uint64_t epoch, int fd, uint64_t *bytes_out,
                             sc_progress *progress) {
    uint64_t *ids, *versions, n;
    sc_status st = sc_changed_pages(s, 0, epoch, &ids, &versions, &n);
    if (st) return st;
    uint64_t *index = malloc((n ? n : 1) * 24);
    if (!index) { free(ids); free(versions); return SC_ENOMEM; }
    /* An empty store has no changed pages: ids and versions are NULL then, and memcpy
     * from NULL is undefined even for 0 bytes. */
    if (n) {
        memcpy(index, ids, n * 8);
        memcpy(index + n, versions, n * 8);
    }
    free(ids);
    free(versions);
    uint64_t payload_offset = SC_HEADER_SIZE + n * 24;
    if (progress) atomic_store(&progress->total, n << s->page_shift);
    st = write_payload(s, epoch, fd, index, index + 2 * n, n, payload_offset, progress);
    sc_header h;
    memset(&h, 0, sizeof h);
    memcpy(h.magic, SC_CKPT_MAGIC, 8);
    h.format_version = SC_FORMAT_VERSION;
    h.kind = SC_KIND_CHECKPOINT;
    h.page_size = s->page_size;
    h.store_pages = s->n_pages;
    h.base_epoch = 0;
    h.target_epoch = epoch;
    h.n_pages = n;
    h.schema_version = s->schema_version;
    h.payload_bytes = n << s->page_shift;
    memcpy(h.store_uuid, s->uuid, 16);
    sc_header_seal(&h, index);
    /* The header goes last: a file cut short anywhere fails its checks on load. */
    if (st == SC_OK) st = pwrite_all(fd, index, n * 24, SC_HEADER_SIZE);
    if (st == SC_OK && ftruncate(fd, (off_t)(payload_offset + h.payload_bytes)) != 0) st = SC_EIO;
    if (st == SC_OK) st = pwrite_all(fd, &h, sizeof h, 0);
    if (st == SC_OK && fsync(fd) != 0) st = SC_EIO;
    free(index);
    if (st == SC_OK && bytes_out) *bytes_out = payload_offset + h.payload_bytes;
    return st;
}
