# C declarations of the statecore core (csrc/statecore.h).
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "statecore.h" nogil:
    ctypedef enum sc_status:
        SC_OK
        SC_EINVAL
        SC_ERANGE
        SC_ENOMEM
        SC_EIO
        SC_EMISMATCH
        SC_EFORMAT
        SC_ECORRUPT
        SC_EGAP
        SC_ENOSNAP
        SC_EINCOMPAT
        SC_EBUSY

    const char *sc_strerror(sc_status st) noexcept

    ctypedef struct sc_store:
        pass

    sc_status sc_store_open(const char *path, uint64_t size, uint32_t page_size, sc_store **out)
    void sc_store_close(sc_store *s)
    sc_status sc_store_sync(sc_store *s)
    uint64_t sc_store_size(const sc_store *s) noexcept
    uint64_t sc_store_n_pages(const sc_store *s) noexcept
    uint32_t sc_store_page_size(const sc_store *s) noexcept
    uint64_t sc_store_epoch(const sc_store *s) noexcept
    const uint8_t *sc_store_data(const sc_store *s) noexcept
    const uint8_t *sc_store_uuid(const sc_store *s) noexcept
    void sc_store_set_uuid(sc_store *s, const uint8_t *uuid) noexcept
    uint64_t sc_store_schema_version(const sc_store *s) noexcept
    void sc_store_set_schema_version(sc_store *s, uint64_t v) noexcept
    uint64_t sc_store_page_version(const sc_store *s, uint64_t page) noexcept
    void sc_store_set_epoch(sc_store *s, uint64_t epoch) noexcept

    enum: SC_STORE_HEADER_BYTES
    ctypedef struct sc_store_header_info:
        uint32_t format_version
        uint32_t page_size
        uint64_t size
        uint64_t epoch
        uint64_t schema_version
        uint8_t uuid[16]
    sc_status sc_store_read_header(const void *head, uint64_t len, sc_store_header_info *out)

    sc_status sc_store_write(sc_store *s, uint64_t offset, const void *src, uint64_t length)
    sc_status sc_store_write_pages(sc_store *s, const uint64_t *ids, uint64_t n, const void *src)
    sc_status sc_store_touch_pages(sc_store *s, const uint64_t *ids, uint64_t n)
    sc_status sc_store_touch_range(sc_store *s, uint64_t offset, uint64_t length)
    sc_status sc_store_touch_rows(sc_store *s, const int64_t *idx, uint64_t n, uint64_t n_rows,
                                  uint64_t base, uint64_t row_bytes, uint64_t *bad)
    sc_status sc_store_write_rows(sc_store *s, const int64_t *idx, uint64_t n, uint64_t n_rows,
                                  uint64_t base, uint64_t row_bytes, const void *src,
                                  uint64_t src_stride, uint64_t *bad)
    sc_status sc_store_read(const sc_store *s, uint64_t offset, void *dst, uint64_t length)

    sc_status sc_snapshot_take(sc_store *s, uint64_t *epoch_out)
    sc_status sc_snapshot_release(sc_store *s, uint64_t epoch)
    sc_status sc_snapshot_set_floor(sc_store *s, uint64_t epoch, uint64_t floor, int *applied)
    sc_status sc_snapshot_read(sc_store *s, uint64_t epoch, uint64_t offset, void *dst, uint64_t length)
    sc_status sc_snapshot_read_pages(sc_store *s, uint64_t epoch, const uint64_t *ids, uint64_t n,
                                     void *dst, uint64_t *versions)

    sc_status sc_changed_pages(sc_store *s, uint64_t since, uint64_t until, uint64_t **ids_out,
                               uint64_t **versions_out, uint64_t *n_out)
    void sc_store_clear_dirty(sc_store *s, uint64_t epoch)
    uint64_t sc_store_dirty_count(const sc_store *s)

    ctypedef struct sc_stats:
        uint64_t epoch
        uint64_t live_snapshots
        uint64_t oldest_snapshot
        uint64_t preserved_pages
        uint64_t preserved_bytes
        uint64_t pages_written
        uint64_t pages_preserved_total
        uint64_t dirty_pages
        uint64_t deltas_applied
        uint64_t pages_applied

    void sc_store_stats(sc_store *s, sc_stats *out)

    void sc_murmur3_128(const void *data, size_t length, uint32_t seed, uint64_t *out)
    uint64_t sc_page_checksum(const void *data, size_t length)

    enum:
        SC_HEADER_SIZE
        SC_FORMAT_VERSION
        SC_KIND_DELTA
        SC_KIND_CHECKPOINT
        SC_COMP_NONE
        SC_COMP_LZ4

    ctypedef struct sc_header:
        char magic[8]
        uint16_t format_version
        uint16_t kind
        uint16_t compression
        uint32_t page_size
        uint64_t store_pages
        uint64_t base_epoch
        uint64_t target_epoch
        uint64_t n_pages
        uint64_t schema_version
        uint64_t payload_bytes
        uint8_t store_uuid[16]
        uint64_t index_checksum
        uint64_t header_checksum

    ctypedef struct sc_delta_view:
        sc_header header
        const uint64_t *ids
        const uint64_t *versions
        const uint64_t *checksums
        const uint8_t *payload
        uint64_t payload_offset
        uint64_t total_bytes

    sc_status sc_delta_build(sc_store *s, uint64_t since, uint64_t until, uint8_t **buf_out,
                             uint64_t *len_out)
    void *sc_buffer_alloc(uint64_t length)
    void sc_buffer_free(void *buf, uint64_t length)
    sc_status sc_delta_parse(const uint8_t *buf, uint64_t length, uint16_t kind, int verify_pages,
                             sc_delta_view *out, uint64_t *bad_page)
    sc_status sc_verify_pages(const sc_delta_view *v, const uint8_t *payload, uint64_t *bad_page)
    void sc_header_seal(sc_header *h, const void *index)
    sc_status sc_delta_apply(sc_store *s, const sc_delta_view *v, const uint8_t *payload,
                             int allow_gap, uint64_t *pages_written)

    ctypedef struct sc_replay_result:
        uint64_t pages_in
        uint64_t pages_written
        uint64_t pages_superseded
        uint64_t pages_skipped

    sc_status sc_replay(sc_store *s, const sc_delta_view *views, const uint8_t *const *payloads,
                        uint64_t k, int allow_gap, int threads, sc_replay_result *out)
    ctypedef struct sc_progress:
        uint64_t done
        uint64_t total

    sc_status sc_checkpoint_save(sc_store *s, uint64_t epoch, int fd, uint64_t *bytes_out,
                                 sc_progress *progress)
    sc_status sc_checkpoint_restore(sc_store *s, const sc_delta_view *v, uint64_t *bad_page,
                                    sc_progress *progress)
    sc_status sc_replay_progress(sc_store *s, const sc_delta_view *views,
                                 const uint8_t *const *payloads, uint64_t k, int allow_gap,
                                 int threads, sc_replay_result *out, sc_progress *progress)


cdef extern from "parallel.h":
    int SC_MAX_THREADS


cdef extern from "delta_pages.h" nogil:
    uint64_t sc_delta_pages_bytes(uint64_t n, uint32_t page_size) noexcept
    sc_status sc_delta_build_pages(sc_store *s, uint64_t since, uint64_t until,
                                   const uint64_t *ids, uint64_t n, uint8_t *buf, uint64_t cap,
                                   uint64_t *len_out)
    void sc_page_checksums(const uint8_t *pages, uint64_t page_size, uint64_t n,
                           uint64_t *out) noexcept
    sc_status sc_verify_page_checksums(const uint8_t *pages, uint64_t page_size, uint64_t n,
                                       const uint64_t *expect, int threads, uint64_t *bad_page)
