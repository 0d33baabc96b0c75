/* statecore C core: an mmap'd page store with fork-free copy-on-write snapshots,
 * exact deltas between epochs, and a coalescing replay engine.
 *
 * No Python here. Every function returns an sc_status; sc_strerror() names it.
 *
 * Threading contract:
 *  - "writer-side" calls (write*, touch*, snapshot take/release, apply, replay,
 *    clear_dirty, close) must be serialized by the caller;
 *  - "reader-side" calls (read*, snapshot reads, delta build, checkpoint save)
 *    may run in any number of other threads concurrently with the writer.
 */
#ifndef STATECORE_H
#define STATECORE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum sc_status {
    SC_OK = 0,
    SC_EINVAL,      /* an argument is out of its allowed range */
    SC_ERANGE,      /* offset/length/page id outside the store */
    SC_ENOMEM,      /* allocation or mmap failed */
    SC_EIO,         /* a system call failed; errno holds the reason */
    SC_EMISMATCH,   /* existing file has another size or page size */
    SC_EFORMAT,     /* file or buffer has an unknown format version */
    SC_ECORRUPT,    /* checksum, magic or structure check failed */
    SC_EGAP,        /* delta base is newer than the store's state */
    SC_ENOSNAP,     /* no live snapshot with that epoch */
    SC_EINCOMPAT,   /* delta/checkpoint made for another page size or store size */
    SC_EBUSY,       /* another process holds the store file open for writing */
    SC__COUNT
} sc_status;

const char *sc_strerror(sc_status st);

typedef struct sc_store sc_store;

#define SC_MIN_PAGE_SIZE 512u
#define SC_MAX_PAGE_SIZE (1u << 20)
#define SC_DEFAULT_PAGE_SIZE 4096u

/* ---- store lifecycle ------------------------------------------------- */

/* path NULL: anonymous memory. Otherwise the file is created with mode 0600, or
 * reopened (size 0 means "take the size recorded in the file"). */
sc_status sc_store_open(const char *path, uint64_t size, uint32_t page_size, sc_store **out);
void sc_store_close(sc_store *s);
sc_status sc_store_sync(sc_store *s); /* msync a file-backed store */

uint64_t sc_store_size(const sc_store *s);
uint64_t sc_store_n_pages(const sc_store *s);
uint32_t sc_store_page_size(const sc_store *s);
uint64_t sc_store_epoch(const sc_store *s);
const uint8_t *sc_store_data(const sc_store *s);     /* live bytes, read-only use */
const uint8_t *sc_store_uuid(const sc_store *s);     /* 16 bytes: store identity */
void sc_store_set_uuid(sc_store *s, const uint8_t uuid[16]);
uint64_t sc_store_schema_version(const sc_store *s);
void sc_store_set_schema_version(sc_store *s, uint64_t v);
uint64_t sc_store_page_version(const sc_store *s, uint64_t page);

/* A store file's header, read from the file's first bytes without opening the store (no
 * lock taken, nothing written): what `statecore info` shows and what an open refused for
 * a mismatch is explained with. SC_EFORMAT: no store magic (format_version 0), or
 * another format version (format_version says which); SC_ECORRUPT: too short, checksum or
 * geometry wrong. */
#define SC_STORE_HEADER_BYTES 72u
typedef struct sc_store_header_info {
    uint32_t format_version;
    uint32_t page_size;
    uint64_t size;
    uint64_t epoch;
    uint64_t schema_version;
    uint8_t uuid[16];
} sc_store_header_info;
sc_status sc_store_read_header(const void *head, uint64_t len, sc_store_header_info *out);

/* ---- writes (writer-side) -------------------------------------------- */

sc_status sc_store_write(sc_store *s, uint64_t offset, const void *src, uint64_t len);
sc_status sc_store_write_pages(sc_store *s, const uint64_t *ids, uint64_t n, const void *src);

/* Prepare pages for an in-place modification by the caller (numpy fancy assignment):
 * preserve them for live snapshots, record versions and dirty bits. The caller then
 * writes into sc_store_data() before any other writer-side call. */
sc_status sc_store_touch_pages(sc_store *s, const uint64_t *ids, uint64_t n);
sc_status sc_store_touch_range(sc_store *s, uint64_t offset, uint64_t len);
void sc_store_publish(sc_store *s); /* release fence between touch and modification */
/* Touch the pages under rows idx[i] (negative counts from the end, as in numpy) of an
 * array of n_rows rows of row_bytes bytes starting at byte `base`: StateArray's fancy
 * assignment in one pass. Every index is checked first; on SC_ERANGE *bad is the position
 * of the first bad one and nothing was touched. */
sc_status sc_store_touch_rows(sc_store *s, const int64_t *idx, uint64_t n, uint64_t n_rows,
                              uint64_t base, uint64_t row_bytes, uint64_t *bad);
/* Rows idx of that array take the rows of src (src_stride bytes apart; 0 repeats one row),
 * in index order, so a repeated index ends with its last row, as in numpy. src must not
 * overlap the rows. Indices are checked as above; on any error no byte was written (after
 * SC_ENOMEM some pages may have been prepared, as with sc_store_touch_rows). */
sc_status sc_store_write_rows(sc_store *s, const int64_t *idx, uint64_t n, uint64_t n_rows,
                              uint64_t base, uint64_t row_bytes, const void *src,
                              uint64_t src_stride, uint64_t *bad);

/* ---- reads (reader-side) --------------------------------------------- */

sc_status sc_store_read(const sc_store *s, uint64_t offset, void *dst, uint64_t len);

/* ---- snapshots ------------------------------------------------------- */

sc_status sc_snapshot_take(sc_store *s, uint64_t *epoch_out);       /* writer-side, O(1) */
sc_status sc_snapshot_release(sc_store *s, uint64_t epoch);         /* writer-side */
sc_status sc_snapshot_read(sc_store *s, uint64_t epoch, uint64_t offset, void *dst, uint64_t len);
/* Content and version of each page as of the snapshot. versions may be NULL. */
sc_status sc_snapshot_read_pages(sc_store *s, uint64_t epoch, const uint64_t *ids, uint64_t n,
                                 void *dst, uint64_t *versions);
/* Promise that the snapshot will only be read for pages whose version as of it is above
 * `floor` (0, the default: every page), as a replication primary reading deltas since
 * its followers' epochs does. Writes then skip copying pages at or below the floor of
 * every live snapshot. Raising always applies; the caller must be the snapshot's only
 * reader when it does. Lowering applies only if no write skipped a copy since the floor
 * was raised; *applied says which. Reading a page at or below the floor afterwards may
 * fail or return another epoch's content. */
sc_status sc_snapshot_set_floor(sc_store *s, uint64_t epoch, uint64_t floor, int *applied);

/* ---- dirty tracking -------------------------------------------------- */

/* Pages whose version as of snapshot `until` lies in (since, until]; sorted ids and their
 * versions in malloc'd arrays the caller frees. Cost follows the changed pages plus one
 * scan of a 64-page summary word array. */
sc_status sc_changed_pages(sc_store *s, uint64_t since, uint64_t until, uint64_t **ids_out,
                           uint64_t **versions_out, uint64_t *n_out);
/* Forget dirty bits of pages written at or before `epoch` (after a checkpoint at it). */
void sc_store_clear_dirty(sc_store *s, uint64_t epoch);
uint64_t sc_store_dirty_count(const sc_store *s);

/* ---- statistics ------------------------------------------------------ */

typedef struct sc_stats {
    uint64_t epoch;
    uint64_t live_snapshots;
    uint64_t oldest_snapshot;   /* 0 when none */
    uint64_t preserved_pages;
    uint64_t preserved_bytes;
    uint64_t pages_written;     /* page-writes since open */
    uint64_t pages_preserved_total;
    uint64_t dirty_pages;
    uint64_t deltas_applied;
    uint64_t pages_applied;
} sc_stats;

void sc_store_stats(sc_store *s, sc_stats *out);

/* ---- checksums ------------------------------------------------------- */

/* murmur3 x64 128, seed 0: out[0] is what mmh3.hash64(data, signed=False)[0] returns. */
void sc_murmur3_128(const void *data, size_t len, uint32_t seed, uint64_t out[2]);
uint64_t sc_page_checksum(const void *data, size_t len);

/* ---- deltas and checkpoints (one format, two kinds) ------------------- */

#define SC_DELTA_MAGIC "SCDELTA1"
#define SC_CKPT_MAGIC "SCCKPT01"
#define SC_FORMAT_VERSION 1u
#define SC_HEADER_SIZE 128u
#define SC_MAX_EPOCH (1ull << 62) /* epochs at or past this in a delta are corrupt */

enum sc_kind { SC_KIND_DELTA = 1, SC_KIND_CHECKPOINT = 2 };
enum sc_compression { SC_COMP_NONE = 0, SC_COMP_LZ4 = 1 };

/* Little-endian on disk and on the wire. */
typedef struct sc_header {
    char magic[8];
    uint16_t format_version;
    uint16_t kind;
    uint16_t compression;
    uint16_t reserved0;
    uint32_t page_size;
    uint32_t reserved1;
    uint64_t store_pages;     /* n_pages of the store it came from */
    uint64_t base_epoch;
    uint64_t target_epoch;
    uint64_t n_pages;         /* pages carried */
    uint64_t schema_version;
    uint64_t payload_bytes;   /* bytes after the index: n_pages*page_size when uncompressed */
    uint8_t store_uuid[16];
    uint64_t index_checksum;  /* over ids, versions, checksums */
    uint8_t reserved2[24];
    uint64_t header_checksum; /* over the 120 bytes before it */
} sc_header;

typedef struct sc_delta_view {
    sc_header header;
    const uint64_t *ids;
    const uint64_t *versions;
    const uint64_t *checksums;
    const uint8_t *payload;   /* NULL when compressed */
    uint64_t payload_offset;
    uint64_t total_bytes;
} sc_delta_view;

/* Build delta(since, until) with one gather pass; the caller frees the buffer with
 * sc_buffer_free(buf, len). */
sc_status sc_delta_build(sc_store *s, uint64_t since, uint64_t until, uint8_t **buf_out,
                         uint64_t *len_out);
/* Large buffers come straight from mmap with huge pages advised (a fresh delta is written
 * once, front to back: fewer faults), small ones from malloc. */
void *sc_buffer_alloc(uint64_t len);
void sc_buffer_free(void *buf, uint64_t len);
/* Validate header and index of a buffer of the given kind. With verify_pages, also every
 * page checksum (uncompressed only); *bad_page gets the index of a failing page. */
sc_status sc_delta_parse(const uint8_t *buf, uint64_t len, uint16_t kind, int verify_pages,
                         sc_delta_view *out, uint64_t *bad_page);
sc_status sc_verify_pages(const sc_delta_view *v, const uint8_t *payload, uint64_t *bad_page);
/* Fill header + index checksums; index is the 24*n_pages bytes of ids, versions, checksums. */
void sc_header_seal(sc_header *h, const void *index);

/* Apply a parsed delta: pages newer than the store's are written. allow_gap skips the
 * epoch-gap check. payload must hold n_pages*page_size uncompressed bytes. The view's
 * index is read again from its buffer and checked as it is used: SC_ECORRUPT, with
 * nothing written, when it changed after sc_delta_parse (the same for replay). */
sc_status sc_delta_apply(sc_store *s, const sc_delta_view *v, const uint8_t *payload,
                         int allow_gap, uint64_t *pages_written);

/* Coalesced replay of k parsed deltas, sorted by base epoch by the caller (if that order
 * has a gap, every order has one). */
typedef struct sc_replay_result {
    uint64_t pages_in;        /* pages carried by all deltas */
    uint64_t pages_written;   /* distinct pages written */
    uint64_t pages_superseded;/* carried but overwritten by a later delta */
    uint64_t pages_skipped;   /* not newer than the store's version */
} sc_replay_result;

sc_status sc_replay(sc_store *s, const sc_delta_view *views, const uint8_t *const *payloads,
                    uint64_t k, int allow_gap, int threads, sc_replay_result *out);
/* The same, reporting the bytes written into `progress` (declared below) as it goes. */
struct sc_progress;
sc_status sc_replay_progress(sc_store *s, const sc_delta_view *views,
                             const uint8_t *const *payloads, uint64_t k, int allow_gap,
                             int threads, sc_replay_result *out, struct sc_progress *progress);

/* Progress of a long call, readable from another thread while it runs. */
typedef struct sc_progress {
    _Atomic uint64_t done;
    _Atomic uint64_t total;
} sc_progress;

/* Write a checkpoint of a live snapshot to an open fd (from offset 0), fsync it.
 * progress may be NULL. */
sc_status sc_checkpoint_save(sc_store *s, uint64_t epoch, int fd, uint64_t *bytes_out,
                             sc_progress *progress);
/* Restore a checkpoint parsed without page verification into an empty store (no page ever
 * written, no snapshot): every page is verified as it is copied. On SC_ECORRUPT *bad_page
 * is the first failing entry (UINT64_MAX: the index changed after parsing, nothing was
 * written) and the store is empty again. Moves the epoch past the checkpoint's. progress
 * may be NULL. */
sc_status sc_checkpoint_restore(sc_store *s, const sc_delta_view *v, uint64_t *bad_page,
                                sc_progress *progress);
/* Set the store's epoch (after restoring a checkpoint into a fresh store). */
void sc_store_set_epoch(sc_store *s, uint64_t epoch);

#ifdef __cplusplus
}
#endif
#endif
