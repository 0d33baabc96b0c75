/* Deltas of a given list of pages, built into a caller's buffer, and the per-page
 * checksum of many pages at once. Replication sends a large delta as a sequence of such
 * deltas (each one complete and checksummed on its own), so the primary reuses one
 * bounded buffer and the follower verifies and applies part k while part k+1 is on the
 * wire. Public API, like statecore.h; kept apart from it because only that path uses it. */
#ifndef STATECORE_DELTA_PAGES_H
#define STATECORE_DELTA_PAGES_H

#include "statecore.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Bytes of the uncompressed encoding of a delta carrying n pages: header, index, pages.
 * 0 when that does not fit in 64 bits. */
uint64_t sc_delta_pages_bytes(uint64_t n, uint32_t page_size);

/* Build delta(since, until] of exactly the pages ids[0..n) into buf (8-byte aligned, cap
 * bytes). The ids must be strictly increasing and each page's version as of the live
 * snapshot `until` must lie in (since, until] (sc_changed_pages lists such pages);
 * otherwise SC_EINVAL / SC_ERANGE and nothing useful is in buf. Reads the snapshot like
 * sc_snapshot_read_pages, in batches so snapshot() never waits long behind it. Single
 * threaded: callers build one part while another is sent. *len_out gets the bytes used. */
sc_status sc_delta_build_pages(sc_store *s, uint64_t since, uint64_t until, const uint64_t *ids,
                               uint64_t n, uint8_t *buf, uint64_t cap, uint64_t *len_out);

/* out[i] = sc_page_checksum(pages + i * page_size, page_size) for i < n. */
void sc_page_checksums(const uint8_t *pages, uint64_t page_size, uint64_t n, uint64_t *out);

/* Compare the checksum of each of n pages with expect[i]; SC_ECORRUPT at the first
 * mismatch, with its index in *bad_page (the lowest failing one). threads as in replay:
 * 0 picks by size. */
sc_status sc_verify_page_checksums(const uint8_t *pages, uint64_t page_size, uint64_t n,
                                   const uint64_t *expect, int threads, uint64_t *bad_page);

#ifdef __cplusplus
}
#endif
#endif
