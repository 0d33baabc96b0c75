/* Deltas of a caller's list of pages, built into a caller's buffer (see delta_pages.h).
 * Only the public API of the store is used: the pages come from sc_snapshot_read_pages. */
#include <stddef.h>
#include <string.h>

#include "delta_pages.h"

#define BATCH 64 /* pages read under one hold of the snapshot lock: 256 KiB at 4 KiB */

uint64_t sc_delta_pages_bytes(uint64_t n, uint32_t page_size) {
    uint64_t per = 24 + (uint64_t)page_size;
    if (n > (UINT64_MAX - SC_HEADER_SIZE) / per) return 0;
    return SC_HEADER_SIZE + n * per;
}

sc_status sc_delta_build_pages(sc_store *s, uint64_t since, uint64_t until, const uint64_t *ids,
                               uint64_t n, uint8_t *buf, uint64_t cap, uint64_t *len_out) {
    uint64_t n_pages = sc_store_n_pages(s);
    uint32_t ps = sc_store_page_size(s);
    if (since > until || n > n_pages || !buf || (uintptr_t)buf % 8) return SC_EINVAL;
    if (n && !ids) return SC_EINVAL;
    uint64_t total = sc_delta_pages_bytes(n, ps);
    if (!total || cap < total) return SC_EINVAL;
    for (uint64_t i = 0; i < n; i++) {
        if (ids[i] >= n_pages) return SC_ERANGE;
        if (i && ids[i] <= ids[i - 1]) return SC_EINVAL;
    }
    sc_header *h = (sc_header *)buf;
    memset(h, 0, sizeof *h);
    memcpy(h->magic, SC_DELTA_MAGIC, 8);
    h->format_version = SC_FORMAT_VERSION;
    h->kind = SC_KIND_DELTA;
    h->compression = SC_COMP_NONE;
    h->page_size = ps;
    h->store_pages = n_pages;
    h->base_epoch = since;
    h->target_epoch = until;
    h->n_pages = n;
    h->schema_version = sc_store_schema_version(s);
    h->payload_bytes = n * (uint64_t)ps;
    memcpy(h->store_uuid, sc_store_uuid(s), 16);
    uint64_t *out_ids = (uint64_t *)(buf + SC_HEADER_SIZE);
    uint64_t *versions = out_ids + n, *sums = out_ids + 2 * n;
    uint8_t *payload = buf + SC_HEADER_SIZE + n * 24;
    if (n) memcpy(out_ids, ids, n * 8); /* memcpy from NULL is undefined even for 0 bytes */
    /* Read a batch, then checksum it while it is still in cache. */
    for (uint64_t i = 0; i < n; i += BATCH) {
        uint64_t k = n - i < BATCH ? n - i : BATCH;
        uint8_t *dst = payload + i * ps;
        sc_status st = sc_snapshot_read_pages(s, until, ids + i, k, dst, versions + i);
        if (st) return st;
        for (uint64_t j = i; j < i + k; j++)
            if (versions[j] <= since || versions[j] > until) return SC_EINVAL;
        sc_page_checksums(dst, ps, k, sums + i);
    }
    sc_header_seal(h, out_ids);
    *len_out = total;
    return SC_OK;
}
