/* Checkpoint files: delta(0, S) laid out on disk with its own magic, written in batches
 * straight from a live snapshot while writers continue. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

#define SAVE_BATCH_BYTES (4u << 20)

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

static sc_status write_payload(sc_store *s, uint64_t epoch, int fd, const uint64_t *ids,
                               uint64_t *checksums, uint64_t n, uint64_t offset,
                               sc_progress *progress) {
    uint64_t per_batch = SAVE_BATCH_BYTES >> s->page_shift;
    if (!per_batch) per_batch = 1;
    uint8_t *buf = malloc(per_batch << s->page_shift);
    if (!buf) return SC_ENOMEM;
    sc_status st = SC_OK;
    for (uint64_t i = 0; i < n && st == SC_OK; i += per_batch) {
        uint64_t m = n - i < per_batch ? n - i : per_batch;
        st = sc_snapshot_read_pages(s, epoch, ids + i, m, buf, NULL);
        for (uint64_t j = 0; j < m && st == SC_OK; j++)
            checksums[i + j] = sc_page_checksum(buf + (j << s->page_shift), s->page_size);
        if (st == SC_OK)
            st = pwrite_all(fd, buf, m << s->page_shift, offset + (i << s->page_shift));
        if (progress) atomic_fetch_add(&progress->done, m << s->page_shift);
    }
    free(buf);
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
