/* C-level tests of the statecore core, meant to run under AddressSanitizer + UBSan
 * (csrc/tests/run_sanitized.sh). No framework: each test is a function; CHECK records a
 * failure with file:line and carries on; REQUIRE also returns from the test.
 *
 * The last line printed is "N passed, M failed" (counts of test functions); the exit
 * status is non-zero when anything failed. Optional argv[1]: PRNG seed.
 */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "internal.h" /* sc__stream_page_using */
#include "statecore.h"

/* ---- tiny harness ---------------------------------------------------- */

static uint64_t g_seed = 0x5eed5eedULL;
static char g_tmpdir[PATH_MAX / 2]; /* leaves room for a file name below it */

#define CHECK_ST(expr, want) CHECK_STATUS(expr, want, sc_strerror)

/* splitmix64: deterministic and good enough to pick pages and bytes. */
static uint64_t rng_next(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}
static uint64_t g_rng;
static uint64_t rnd(void) { return rng_next(&g_rng); }
static uint64_t rnd_below(uint64_t n) { return n ? rnd() % n : 0; }
static void fill_random(uint64_t *state, void *dst, size_t n) {
    uint8_t *p = dst;
    while (n) {
        uint64_t r = rng_next(state);
        size_t k = n < 8 ? n : 8;
        memcpy(p, &r, k);
        p += k;
        n -= k;
    }
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) { perror("malloc"); exit(2); }
    return p;
}
static void *xcalloc(size_t n, size_t k) {
    void *p = calloc(n ? n : 1, k ? k : 1);
    if (!p) { perror("calloc"); exit(2); }
    return p;
}

static void tmp_path(char *out, const char *name) {
    snprintf(out, PATH_MAX, "%s/%s", g_tmpdir, name);
}

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb; (void)flag; (void)ftw;
    return remove(path);
}

/* ---- a reference model of a store ------------------------------------ */

#define MAX_SNAPS 16

typedef struct {
    uint64_t epoch;
    uint8_t *bytes;     /* the store's bytes when it was taken */
    uint64_t *ver;      /* page versions when it was taken */
    int live;
} model_snap;

typedef struct {
    sc_store *s;
    uint64_t size, n, ps;
    uint8_t *bytes;     /* what the live store must hold */
    uint64_t *ver;      /* what each page's version must be */
    model_snap snaps[MAX_SNAPS];
    int n_snaps;
    uint8_t *scratch;   /* one store-sized buffer for reads */
} model;

static int model_open(model *m, uint64_t n_pages, uint32_t ps) {
    memset(m, 0, sizeof *m);
    sc_status st = sc_store_open(NULL, n_pages * ps, ps, &m->s);
    CHECK_ST(st, SC_OK);
    if (st) return -1;
    m->n = n_pages;
    m->ps = ps;
    m->size = n_pages * ps;
    m->bytes = xcalloc(m->size, 1);
    m->ver = xcalloc(n_pages, 8);
    m->scratch = xmalloc(m->size);
    return 0;
}

static void model_close(model *m) {
    sc_store_close(m->s);
    for (int i = 0; i < m->n_snaps; i++) {
        free(m->snaps[i].bytes);
        free(m->snaps[i].ver);
    }
    free(m->bytes);
    free(m->ver);
    free(m->scratch);
    memset(m, 0, sizeof *m);
}

static void model_mark(model *m, uint64_t first, uint64_t last) {
    uint64_t e = sc_store_epoch(m->s);
    for (uint64_t p = first; p <= last; p++) m->ver[p] = e;
}

/* One random write through one of the three write paths, mirrored in the model. */
static void model_random_write(model *m) {
    uint64_t kind = rnd_below(3);
    if (kind == 0) { /* byte range, possibly unaligned and spanning pages */
        uint64_t off = rnd_below(m->size);
        uint64_t len = 1 + rnd_below(3 * m->ps);
        if (len > m->size - off) len = m->size - off;
        uint8_t *src = xmalloc(len);
        fill_random(&g_rng, src, len);
        CHECK_ST(sc_store_write(m->s, off, src, len), SC_OK);
        memcpy(m->bytes + off, src, len);
        model_mark(m, off / m->ps, (off + len - 1) / m->ps);
        free(src);
    } else if (kind == 1) { /* write_pages with distinct ids */
        uint64_t k = 1 + rnd_below(4), ids[4];
        for (uint64_t i = 0; i < k; i++) {
        again:
            ids[i] = rnd_below(m->n);
            for (uint64_t j = 0; j < i; j++)
                if (ids[j] == ids[i]) goto again;
        }
        uint8_t *src = xmalloc(k * m->ps);
        fill_random(&g_rng, src, k * m->ps);
        CHECK_ST(sc_store_write_pages(m->s, ids, k, src), SC_OK);
        for (uint64_t i = 0; i < k; i++) {
            memcpy(m->bytes + ids[i] * m->ps, src + i * m->ps, m->ps);
            model_mark(m, ids[i], ids[i]);
        }
        free(src);
    } else { /* touch then modify in place, the numpy fancy-assignment path */
        uint64_t p = rnd_below(m->n);
        CHECK_ST(sc_store_touch_pages(m->s, &p, 1), SC_OK);
        uint8_t *live = (uint8_t *)sc_store_data(m->s) + p * m->ps;
        uint64_t at = rnd_below(m->ps);
        live[at] ^= 0xA5;
        m->bytes[p * m->ps + at] ^= 0xA5;
        model_mark(m, p, p);
    }
}

static int model_snapshot(model *m) {
    if (m->n_snaps == MAX_SNAPS) return -1;
    model_snap *sn = &m->snaps[m->n_snaps];
    sc_status st = sc_snapshot_take(m->s, &sn->epoch);
    CHECK_ST(st, SC_OK);
    if (st) return -1;
    sn->bytes = xmalloc(m->size);
    memcpy(sn->bytes, m->bytes, m->size);
    sn->ver = xmalloc(m->n * 8);
    memcpy(sn->ver, m->ver, m->n * 8);
    sn->live = 1;
    return m->n_snaps++;
}

static void model_release(model *m, int i) {
    CHECK_ST(sc_snapshot_release(m->s, m->snaps[i].epoch), SC_OK);
    m->snaps[i].live = 0;
}

static void model_check_live(model *m) {
    CHECK_ST(sc_store_read(m->s, 0, m->scratch, m->size), SC_OK);
    CHECK(memcmp(m->scratch, m->bytes, m->size) == 0);
    CHECK(memcmp(sc_store_data(m->s), m->bytes, m->size) == 0);
    for (uint64_t p = 0; p < m->n; p++) CHECK_EQ_U64(sc_store_page_version(m->s, p), m->ver[p]);
}

/* Whole, partial and per-page reads of snapshot i all give the bytes it was taken with. */
static void model_check_snap(model *m, int i) {
    model_snap *sn = &m->snaps[i];
    memset(m->scratch, 0xEE, m->size);
    CHECK_ST(sc_snapshot_read(m->s, sn->epoch, 0, m->scratch, m->size), SC_OK);
    CHECK(memcmp(m->scratch, sn->bytes, m->size) == 0);
    for (int r = 0; r < 4; r++) {
        uint64_t off = rnd_below(m->size), len = rnd_below(m->size - off + 1);
        CHECK_ST(sc_snapshot_read(m->s, sn->epoch, off, m->scratch, len), SC_OK);
        CHECK(memcmp(m->scratch, sn->bytes + off, len) == 0);
    }
    uint64_t ids[3] = {rnd_below(m->n), rnd_below(m->n), m->n - 1}, vers[3];
    CHECK_ST(sc_snapshot_read_pages(m->s, sn->epoch, ids, 3, m->scratch, vers), SC_OK);
    for (int k = 0; k < 3; k++) {
        CHECK(memcmp(m->scratch + k * m->ps, sn->bytes + ids[k] * m->ps, m->ps) == 0);
        CHECK_EQ_U64(vers[k], sn->ver[ids[k]]);
    }
}

static uint64_t stats_preserved(sc_store *s) {
    sc_stats st;
    sc_store_stats(s, &st);
    return st.preserved_pages;
}

/* Build delta(since, until) and parse it in place; returns the buffer (caller frees). */
static uint8_t *build_parsed(sc_store *s, uint64_t since, uint64_t until, sc_delta_view *v,
                             uint64_t *len) {
    uint8_t *buf = NULL;
    sc_status st = sc_delta_build(s, since, until, &buf, len);
    CHECK_ST(st, SC_OK);
    if (st) return NULL;
    uint64_t bad = UINT64_MAX;
    st = sc_delta_parse(buf, *len, SC_KIND_DELTA, 1, v, &bad);
    CHECK_ST(st, SC_OK);
    if (st) { sc_buffer_free(buf, *len); return NULL; }
    return buf;
}

/* ---- tests ----------------------------------------------------------- */

static void test_strerror(void) {
    for (int i = 0; i < SC__COUNT; i++) {
        const char *m = sc_strerror((sc_status)i);
        CHECK(m != NULL && m[0] != '\0');
        CHECK(strcmp(m, "unknown status") != 0);
    }
    CHECK(strcmp(sc_strerror(SC__COUNT), "unknown status") == 0);
    CHECK(strcmp(sc_strerror((sc_status)-1), "unknown status") == 0);
}

static void test_open_anonymous(void) {
    sc_store *s = NULL;
    CHECK_ST(sc_store_open(NULL, 16 * 4096, 4096, &s), SC_OK);
    REQUIRE(s);
    CHECK_EQ_U64(sc_store_size(s), 65536);
    CHECK_EQ_U64(sc_store_n_pages(s), 16);
    CHECK_EQ_U64(sc_store_page_size(s), 4096);
    CHECK_EQ_U64(sc_store_epoch(s), 1);
    CHECK_EQ_U64(sc_store_dirty_count(s), 0);
    CHECK_EQ_U64(sc_store_page_version(s, 0), 0);
    CHECK_EQ_U64(sc_store_page_version(s, 16), 0); /* out of range reads as 0 */
    const uint8_t *d = sc_store_data(s);
    int zero = 1;
    for (uint64_t i = 0; i < 65536; i++) zero &= d[i] == 0;
    CHECK(zero);
    sc_stats st;
    sc_store_stats(s, &st);
    CHECK_EQ_U64(st.epoch, 1);
    CHECK_EQ_U64(st.live_snapshots, 0);
    CHECK_EQ_U64(st.preserved_pages, 0);
    CHECK_EQ_U64(st.pages_written, 0);
    sc_store_set_schema_version(s, 42);
    CHECK_EQ_U64(sc_store_schema_version(s), 42);
    sc_store_close(s);

    /* page_size 0 means the default; the extreme valid page sizes work. */
    CHECK_ST(sc_store_open(NULL, 8 * 4096, 0, &s), SC_OK);
    REQUIRE(s);
    CHECK_EQ_U64(sc_store_page_size(s), SC_DEFAULT_PAGE_SIZE);
    sc_store_close(s);
    CHECK_ST(sc_store_open(NULL, 512, SC_MIN_PAGE_SIZE, &s), SC_OK);
    REQUIRE(s);
    CHECK_EQ_U64(sc_store_n_pages(s), 1);
    sc_store_close(s);
    CHECK_ST(sc_store_open(NULL, 2ull * SC_MAX_PAGE_SIZE, SC_MAX_PAGE_SIZE, &s), SC_OK);
    REQUIRE(s);
    CHECK_EQ_U64(sc_store_n_pages(s), 2);
    uint8_t b = 7;
    CHECK_ST(sc_store_write(s, 2ull * SC_MAX_PAGE_SIZE - 1, &b, 1), SC_OK);
    CHECK_EQ_U64(sc_store_page_version(s, 1), 1);
    sc_store_close(s);

    /* Two anonymous stores get different identities. */
    sc_store *a = NULL, *c = NULL;
    CHECK_ST(sc_store_open(NULL, 4096, 0, &a), SC_OK);
    CHECK_ST(sc_store_open(NULL, 4096, 0, &c), SC_OK);
    REQUIRE(a && c);
    CHECK(memcmp(sc_store_uuid(a), sc_store_uuid(c), 16) != 0);
    sc_store_close(a);
    sc_store_close(c);
}

static void test_open_invalid(void) {
    static const uint32_t bad_ps[] = {1, 2, 256, 511, 513, 1000, 3000, 4095, 4097,
                                      2u << 20, 3u << 20, UINT32_MAX, 0x80000000u};
    char path[PATH_MAX];
    tmp_path(path, "invalid.sc");
    for (size_t i = 0; i < sizeof bad_ps / sizeof bad_ps[0]; i++) {
        sc_store *s = (sc_store *)(uintptr_t)1;
        CHECK_ST(sc_store_open(NULL, 1u << 22, bad_ps[i], &s), SC_EINVAL);
        CHECK(s == NULL);
        s = (sc_store *)(uintptr_t)1;
        CHECK_ST(sc_store_open(path, 1u << 22, bad_ps[i], &s), SC_EINVAL);
        CHECK(s == NULL);
    }
    static const struct { uint64_t size; uint32_t ps; } bad_sizes[] = {
        {0, 0}, {0, 4096}, {1, 0}, {4095, 4096}, {4097, 4096}, {1000, 512}, {8192 + 512, 4096},
        {UINT64_MAX, 0}, {UINT64_MAX, 512},
        {UINT64_MAX & ~(uint64_t)4095, 4096},   /* far more than 2^32 pages */
        {1ull << 44, 4096},                     /* exactly 2^32 pages: one too many */
        {1ull << 41, 512},
    };
    for (size_t i = 0; i < sizeof bad_sizes / sizeof bad_sizes[0]; i++) {
        sc_store *s = (sc_store *)(uintptr_t)1;
        CHECK_ST(sc_store_open(NULL, bad_sizes[i].size, bad_sizes[i].ps, &s), SC_EINVAL);
        CHECK(s == NULL);
        /* A fresh file must reject the same sizes before growing to them. */
        s = (sc_store *)(uintptr_t)1;
        CHECK_ST(sc_store_open(path, bad_sizes[i].size, bad_sizes[i].ps, &s), SC_EINVAL);
        CHECK(s == NULL);
        struct stat stt;
        if (stat(path, &stt) == 0) CHECK_EQ_U64((uint64_t)stt.st_size, 0);
    }
    unlink(path);
    /* A path in a directory that does not exist. */
    char missing[PATH_MAX];
    tmp_path(missing, "no/such/dir/store.sc");
    sc_store *s = (sc_store *)(uintptr_t)1;
    CHECK_ST(sc_store_open(missing, 4096, 0, &s), SC_EIO);
    CHECK(s == NULL);
}

static void test_open_file(void) {
    char path[PATH_MAX];
    tmp_path(path, "store.sc");
    const uint64_t size = 16 * 4096;
    sc_store *s = NULL;
    CHECK_ST(sc_store_open(path, size, 4096, &s), SC_OK);
    REQUIRE(s);
    struct stat stt;
    CHECK(stat(path, &stt) == 0);
    CHECK_EQ_U64(stt.st_mode & 0777, 0600);
    CHECK_EQ_U64((uint64_t)stt.st_size, 4096 + size + 16 * 8);
    CHECK_EQ_U64(sc_store_epoch(s), 1);

    uint8_t *pattern = xmalloc(size);
    fill_random(&g_rng, pattern, size);
    CHECK_ST(sc_store_write(s, 0, pattern, size / 2), SC_OK);        /* epoch 1 */
    uint64_t e1;
    CHECK_ST(sc_snapshot_take(s, &e1), SC_OK);
    CHECK_EQ_U64(e1, 1);
    CHECK_ST(sc_store_write(s, size / 2 + 100, pattern + size / 2 + 100, 5000), SC_OK); /* 2 */
    CHECK_ST(sc_snapshot_release(s, e1), SC_OK);
    sc_store_set_schema_version(s, 9);
    uint8_t uuid[16];
    memcpy(uuid, sc_store_uuid(s), 16);
    uint64_t vers[16];
    for (int p = 0; p < 16; p++) vers[p] = sc_store_page_version(s, p);
    uint64_t dirty = sc_store_dirty_count(s);
    CHECK_EQ_U64(dirty, 8 + 2);

    /* While it is open, nobody else may open it, whatever the arguments. */
    sc_store *other = (sc_store *)(uintptr_t)1;
    CHECK_ST(sc_store_open(path, 0, 0, &other), SC_EBUSY);
    CHECK(other == NULL);
    CHECK_ST(sc_store_open(path, size, 4096, &other), SC_EBUSY);
    CHECK_ST(sc_store_sync(s), SC_OK);
    sc_store_close(s);

    /* Reopen from the file alone: contents, epoch, versions, identity all kept. */
    CHECK_ST(sc_store_open(path, 0, 0, &s), SC_OK);
    REQUIRE(s);
    CHECK_EQ_U64(sc_store_size(s), size);
    CHECK_EQ_U64(sc_store_page_size(s), 4096);
    CHECK_EQ_U64(sc_store_epoch(s), 2);
    CHECK_EQ_U64(sc_store_schema_version(s), 9);
    CHECK(memcmp(sc_store_uuid(s), uuid, 16) == 0);
    CHECK(memcmp(sc_store_data(s), pattern, size / 2) == 0);
    CHECK(memcmp(sc_store_data(s) + size / 2 + 100, pattern + size / 2 + 100, 5000) == 0);
    for (int p = 0; p < 16; p++) CHECK_EQ_U64(sc_store_page_version(s, p), vers[p]);
    CHECK_EQ_U64(sc_store_dirty_count(s), dirty);
    /* The rebuilt summaries answer changed-page queries. */
    uint64_t e2, *ids = NULL, *vs = NULL, n = 0;
    CHECK_ST(sc_snapshot_take(s, &e2), SC_OK);
    CHECK_EQ_U64(e2, 2);
    CHECK_ST(sc_changed_pages(s, 1, e2, &ids, &vs, &n), SC_OK);
    CHECK_EQ_U64(n, 2);
    if (n == 2) {
        CHECK_EQ_U64(ids[0], 8);
        CHECK_EQ_U64(ids[1], 9);
        CHECK_EQ_U64(vs[0], 2);
    }
    free(ids);
    free(vs);
    sc_store_close(s); /* with a live snapshot: close frees it */

    /* Reopen with matching explicit geometry; epoch went up by the snapshot. */
    CHECK_ST(sc_store_open(path, size, 4096, &s), SC_OK);
    REQUIRE(s);
    CHECK_EQ_U64(sc_store_epoch(s), 3);
    sc_store_close(s);

    /* Mismatched geometry against an existing file. */
    s = (sc_store *)(uintptr_t)1;
    CHECK_ST(sc_store_open(path, 2 * size, 4096, &s), SC_EMISMATCH);
    CHECK(s == NULL);
    CHECK_ST(sc_store_open(path, size / 2, 0, &s), SC_EMISMATCH);
    CHECK_ST(sc_store_open(path, size, 8192, &s), SC_EMISMATCH);
    CHECK_ST(sc_store_open(path, 0, 512, &s), SC_EMISMATCH);
    CHECK_ST(sc_store_open(path, 0, 1000, &s), SC_EINVAL);
    /* ... and none of that damaged it. */
    CHECK_ST(sc_store_open(path, 0, 0, &s), SC_OK);
    REQUIRE(s);
    CHECK(memcmp(sc_store_data(s), pattern, size / 2) == 0);
    sc_store_close(s);

    /* Its header, read without opening it; then damaged, cut short, another version. */
    uint8_t head[SC_STORE_HEADER_BYTES];
    int hfd = open(path, O_RDONLY);
    CHECK(hfd >= 0 && read(hfd, head, sizeof head) == (ssize_t)sizeof head);
    if (hfd >= 0) close(hfd);
    sc_store_header_info info;
    CHECK_ST(sc_store_read_header(head, sizeof head, &info), SC_OK);
    CHECK_EQ_U64(info.size, size);
    CHECK_EQ_U64(info.page_size, 4096);
    CHECK_EQ_U64(info.epoch, 3);
    CHECK_EQ_U64(info.format_version, SC_FORMAT_VERSION);
    CHECK_ST(sc_store_read_header(head, sizeof head - 1, &info), SC_ECORRUPT);
    CHECK_ST(sc_store_read_header(NULL, 0, &info), SC_EINVAL);
    head[20] ^= 1; /* inside size: the checksum no longer matches */
    CHECK_ST(sc_store_read_header(head, sizeof head, &info), SC_ECORRUPT);
    head[20] ^= 1;
    head[8] = SC_FORMAT_VERSION + 1;
    CHECK_ST(sc_store_read_header(head, sizeof head, &info), SC_EFORMAT);
    CHECK_EQ_U64(info.format_version, SC_FORMAT_VERSION + 1);
    head[0] ^= 0xff; /* no magic: format_version 0 says "not a store" */
    CHECK_ST(sc_store_read_header(head, sizeof head, &info), SC_EFORMAT);
    CHECK_EQ_U64(info.format_version, 0);

    /* A file cut short is corrupt, not silently remapped. */
    CHECK(truncate(path, (off_t)(4096 + size + 16 * 8 - 8)) == 0);
    CHECK_ST(sc_store_open(path, 0, 0, &s), SC_ECORRUPT);
    CHECK(s == NULL);
    unlink(path);

    /* Something that is not a store at all. */
    char junk[PATH_MAX];
    tmp_path(junk, "junk.sc");
    int fd = open(junk, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    CHECK(fd >= 0);
    if (fd >= 0) {
        CHECK(write(fd, pattern, 8192) == 8192);
        close(fd);
    }
    CHECK_ST(sc_store_open(junk, 0, 0, &s), SC_EFORMAT);
    CHECK(s == NULL);
    unlink(junk);

    /* A fresh file needs a size. */
    CHECK_ST(sc_store_open(path, 0, 4096, &s), SC_EINVAL);
    CHECK(s == NULL);
    /* ... after which the empty file it left can still become a store. */
    CHECK_ST(sc_store_open(path, 4096, 512, &s), SC_OK);
    REQUIRE(s);
    CHECK_EQ_U64(sc_store_n_pages(s), 8);
    sc_store_close(s);
    unlink(path);
    free(pattern);
}

static void test_bounds(void) {
    const uint64_t size = 16 * 4096;
    sc_store *s = NULL;
    CHECK_ST(sc_store_open(NULL, size, 4096, &s), SC_OK);
    REQUIRE(s);
    uint8_t *buf = xcalloc(size, 1), *out = xcalloc(size, 1);
    fill_random(&g_rng, buf, size);
    static const struct { uint64_t off, len; } bad[] = {
        {65536, 1}, {65535, 2}, {65537, 0}, {UINT64_MAX, 0}, {UINT64_MAX, 1},
        {1, UINT64_MAX}, {0, UINT64_MAX}, {65536 - 8, 16},
        {UINT64_MAX - 3, 8},          /* offset + len wraps to 4 */
        {8, UINT64_MAX - 7},          /* offset + len wraps to 0 */
        {4096, UINT64_MAX - 4095},    /* wraps to exactly 0 */
        {1ull << 63, 1ull << 63},
        {0, 65537},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK_ST(sc_store_write(s, bad[i].off, buf, bad[i].len), SC_ERANGE);
        CHECK_ST(sc_store_read(s, bad[i].off, out, bad[i].len), SC_ERANGE);
        CHECK_ST(sc_store_touch_range(s, bad[i].off, bad[i].len), SC_ERANGE);
    }
    sc_stats st;
    sc_store_stats(s, &st);
    CHECK_EQ_U64(st.pages_written, 0);
    CHECK_EQ_U64(st.dirty_pages, 0);
    for (uint64_t p = 0; p < 16; p++) CHECK_EQ_U64(sc_store_page_version(s, p), 0);

    /* Edges that are allowed. */
    CHECK_ST(sc_store_write(s, size - 1, buf, 1), SC_OK);
    CHECK_ST(sc_store_write(s, size, buf, 0), SC_OK);
    CHECK_ST(sc_store_read(s, size, out, 0), SC_OK);
    CHECK_ST(sc_store_read(s, 0, out, size), SC_OK);
    CHECK_EQ_U64(sc_store_page_version(s, 15), 1);
    CHECK_EQ_U64(sc_store_dirty_count(s), 1);

    /* A write across three pages versions exactly those pages. */
    CHECK_ST(sc_store_write(s, 4096 + 4000, buf, 4096 + 200), SC_OK);
    for (uint64_t p = 0; p < 16; p++)
        CHECK_EQ_U64(sc_store_page_version(s, p), (p >= 1 && p <= 3) || p == 15 ? 1 : 0);
    CHECK_ST(sc_store_read(s, 4096 + 4000, out, 4096 + 200), SC_OK);
    CHECK(memcmp(out, buf, 4096 + 200) == 0);
    sc_store_stats(s, &st);
    CHECK_EQ_U64(st.pages_written, 1 + 3);
    CHECK_EQ_U64(st.dirty_pages, 4);

    /* Snapshot reads have the same bounds. */
    uint64_t e;
    CHECK_ST(sc_snapshot_take(s, &e), SC_OK);
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        CHECK_ST(sc_snapshot_read(s, e, bad[i].off, out, bad[i].len), SC_ERANGE);
    CHECK_ST(sc_snapshot_read(s, e, size, out, 0), SC_OK);
    CHECK_ST(sc_snapshot_read(s, e + 1, 0, out, 0), SC_ENOSNAP);
    CHECK_ST(sc_snapshot_release(s, e), SC_OK);
    free(buf);
    free(out);
    sc_store_close(s);
}

static void test_write_pages(void) {
    const uint32_t ps = 1024;
    sc_store *s = NULL;
    CHECK_ST(sc_store_open(NULL, 16 * ps, ps, &s), SC_OK);
    REQUIRE(s);
    uint8_t *src = xmalloc(4 * ps), *before = xmalloc(16 * ps), *scratch = xmalloc(3 * ps);
    fill_random(&g_rng, src, 4 * ps);
    uint64_t ids[3] = {3, 0, 15};
    CHECK_ST(sc_store_write_pages(s, ids, 3, src), SC_OK);
    const uint8_t *d = sc_store_data(s);
    CHECK(memcmp(d + 3 * ps, src, ps) == 0);
    CHECK(memcmp(d + 0 * ps, src + ps, ps) == 0);
    CHECK(memcmp(d + 15 * ps, src + 2 * ps, ps) == 0);
    for (uint64_t p = 0; p < 16; p++)
        CHECK_EQ_U64(sc_store_page_version(s, p), p == 0 || p == 3 || p == 15);
    CHECK_ST(sc_store_write_pages(s, ids, 0, src), SC_OK);

    /* One bad id anywhere in the list: nothing is written, nothing is versioned. */
    memcpy(before, d, 16 * ps);
    uint64_t e;
    CHECK_ST(sc_snapshot_take(s, &e), SC_OK); /* writes would now also preserve pages */
    static const uint64_t bad_lists[][3] = {
        {1, 2, 16}, {16, 1, 2}, {1, UINT64_MAX, 2}, {1, 1ull << 52, 2}, {1, 2, 1ull << 63},
    };
    for (size_t i = 0; i < sizeof bad_lists / sizeof bad_lists[0]; i++) {
        CHECK_ST(sc_store_write_pages(s, bad_lists[i], 3, src), SC_ERANGE);
        CHECK_ST(sc_store_touch_pages(s, bad_lists[i], 3), SC_ERANGE);
        CHECK_ST(sc_snapshot_read_pages(s, e, bad_lists[i], 3, scratch, NULL), SC_ERANGE);
    }
    CHECK(memcmp(d, before, 16 * ps) == 0);
    for (uint64_t p = 0; p < 16; p++)
        CHECK_EQ_U64(sc_store_page_version(s, p), p == 0 || p == 3 || p == 15);
    CHECK_EQ_U64(stats_preserved(s), 0);
    sc_stats st;
    sc_store_stats(s, &st);
    CHECK_EQ_U64(st.pages_written, 3);

    /* touch_range + in-place modification: the snapshot keeps the old bytes. */
    CHECK_ST(sc_store_touch_range(s, 5 * ps + 10, 2 * ps), SC_OK); /* pages 5..7 */
    CHECK_EQ_U64(stats_preserved(s), 3);
    memset((uint8_t *)sc_store_data(s) + 5 * ps + 10, 0x77, 2 * ps);
    CHECK_ST(sc_snapshot_read(s, e, 0, before + 0, 16 * ps), SC_OK);
    for (uint64_t i = 0; i < 2 * ps; i++)
        if (before[5 * ps + 10 + i] != 0) { CHECK(!"snapshot saw an in-place write"); break; }
    CHECK_ST(sc_snapshot_release(s, e), SC_OK);
    CHECK_EQ_U64(stats_preserved(s), 0);
    free(src);
    free(before);
    free(scratch);
    sc_store_close(s);
}

#ifdef SC_FAULT_INJECTION
typedef sc_status (*store_write_fn)(sc_store *s, const void *ctx);

/* One write into a store holding `before`, under a snapshot, with allocation k failing for
 * k = 0, 1, ... until the write no longer reaches k: it reports SC_ENOMEM and writes
 * nothing or (an optional allocation) succeeds without it; the snapshot keeps `before`,
 * the same write then succeeds and leaves `after`, and nothing leaks (ASan's leak check
 * at exit). Returns how many of the writes failed; *reached: how many allocations. */
static long write_under_alloc_failures(uint32_t ps, uint64_t size, const uint8_t *before,
                                       const uint8_t *after, store_write_fn write,
                                       const void *ctx, long *reached) {
    uint8_t *seen = xmalloc(size);
    bool injected = true;
    long failures = 0;
    long k = 0;
    for (; k < 1000 && injected; k++) {
        sc_store *s = NULL;
        CHECK_ST(sc_store_open(NULL, size, ps, &s), SC_OK);
        if (!s) break; /* counted by the check above */
        CHECK_ST(sc_store_write(s, 0, before, size), SC_OK);
        uint64_t e = 0;
        CHECK_ST(sc_snapshot_take(s, &e), SC_OK);
        atomic_store(&sc_test_allocs_left, k);
        sc_status st = write(s, ctx);
        injected = atomic_exchange(&sc_test_allocs_left, -1) < 0; /* allocation k failed */
        CHECK(st == SC_OK || (st == SC_ENOMEM && injected));
        failures += st != SC_OK;
        CHECK(memcmp(sc_store_data(s), st == SC_OK ? after : before, size) == 0);
        if (st != SC_OK) CHECK_ST(write(s, ctx), SC_OK);
        CHECK(memcmp(sc_store_data(s), after, size) == 0);
        CHECK_ST(sc_snapshot_read(s, e, 0, seen, size), SC_OK);
        CHECK(memcmp(seen, before, size) == 0);
        CHECK_ST(sc_snapshot_release(s, e), SC_OK);
        sc_store_close(s);
    }
    CHECK(!injected); /* reached a k the write no longer gets to */
    free(seen);
    *reached = k - 1;
    return failures;
}

typedef struct {
    const uint64_t *ids;
    uint64_t n;
    const uint8_t *src;
} pages_write;

static sc_status write_all_pages(sc_store *s, const void *ctx) {
    const pages_write *w = ctx;
    return sc_store_write_pages(s, w->ids, w->n, w->src);
}
#endif

/* Each allocation a large write under a snapshot makes (batch buffers, the copier thread,
 * pool chunks) failing in turn (write_under_alloc_failures). */
static void test_write_alloc_failures(void) {
#ifdef SC_FAULT_INJECTION
    const uint32_t ps = 4096;
    const uint64_t n = (40u << 20) / ps, size = n * ps; /* over two copier batches */
    uint8_t *before = xmalloc(size), *after = xmalloc(size);
    uint64_t *ids = xmalloc(n * sizeof *ids);
    for (uint64_t i = 0; i < n; i++) ids[i] = i;
    fill_random(&g_rng, before, size);
    fill_random(&g_rng, after, size);
    pages_write w = {ids, n, after};
    long reached = 0;
    /* the batch buffers and pool chunks at least */
    CHECK(write_under_alloc_failures(ps, size, before, after, write_all_pages, &w, &reached) > 3);
    free(before);
    free(after);
    free(ids);
#endif
}

/* Reference for sc_store_write_rows: the rows written one by one, in order. */
static void write_rows_by_hand(uint8_t *mem, const int64_t *idx, uint64_t n, int64_t n_rows,
                               uint64_t base, uint64_t row_bytes, const uint8_t *src,
                               uint64_t stride) {
    for (uint64_t i = 0; i < n; i++) {
        uint64_t row = (uint64_t)(idx[i] < 0 ? idx[i] + n_rows : idx[i]);
        memcpy(mem + base + row * row_bytes, src + i * stride, row_bytes);
    }
}

/* StateArray's fancy assignment: without a live snapshot each row is written right after
 * its pages are prepared; with one, all pages first. Same bytes and versions either way,
 * repeats end with their last row, a bad index writes nothing, the snapshot keeps its bytes. */
static void test_write_rows(void) {
    const uint32_t ps = 512;
    const uint64_t size = 64 * ps, base = 500, row_bytes = 24; /* rows straddle pages */
    const int64_t n_rows = (int64_t)((size - base) / row_bytes);
    sc_store *s = NULL;
    CHECK_ST(sc_store_open(NULL, size, ps, &s), SC_OK);
    REQUIRE(s);
    uint8_t *want = xmalloc(size), *src = xmalloc(200 * row_bytes), *seen = xmalloc(size);
    memset(want, 0, size);
    int64_t idx[200];
    uint64_t bad = 0, e = 0;
    for (int round = 0; round < 4; round++) {
        bool snapshot = round >= 2; /* rounds 0-1 fused, 2-3 prepare-then-write */
        if (snapshot) CHECK_ST(sc_snapshot_take(s, &e), SC_OK);
        memcpy(seen, want, size); /* the state a snapshot taken now must keep */
        for (int i = 0; i < 200; i++) {
            int64_t r = (int64_t)(rng_next(&g_rng) % (uint64_t)n_rows);
            idx[i] = i % 7 == 0 ? r - n_rows : i % 11 == 0 && i ? idx[i - 1] : r;
        }
        fill_random(&g_rng, src, 200 * row_bytes);
        uint64_t stride = round % 2 ? 0 : row_bytes; /* odd rounds: one row for all */
        CHECK_ST(sc_store_write_rows(s, idx, 200, (uint64_t)n_rows, base, row_bytes, src,
                                     stride, &bad), SC_OK);
        write_rows_by_hand(want, idx, 200, n_rows, base, row_bytes, src, stride);
        CHECK(memcmp(sc_store_data(s), want, size) == 0);
        uint64_t epoch = sc_store_epoch(s);
        for (int i = 0; i < 200; i++) {
            uint64_t start = base + (uint64_t)(idx[i] < 0 ? idx[i] + n_rows : idx[i]) * row_bytes;
            CHECK_EQ_U64(sc_store_page_version(s, start / ps), epoch);
            CHECK_EQ_U64(sc_store_page_version(s, (start + row_bytes - 1) / ps), epoch);
        }
        if (snapshot) {
            uint8_t *old = xmalloc(size);
            CHECK_ST(sc_snapshot_read(s, e, 0, old, size), SC_OK);
            CHECK(memcmp(old, seen, size) == 0);
            free(old);
            CHECK_ST(sc_snapshot_release(s, e), SC_OK);
        }
    }
    /* One bad index anywhere, either path: nothing written, *bad names it. */
    int64_t bad_idx[3] = {1, n_rows, 2};
    for (int snapshot = 0; snapshot < 2; snapshot++) {
        if (snapshot) CHECK_ST(sc_snapshot_take(s, &e), SC_OK);
        uint64_t v1 = sc_store_page_version(s, (base + row_bytes) / ps);
        CHECK_ST(sc_store_write_rows(s, bad_idx, 3, (uint64_t)n_rows, base, row_bytes, src,
                                     row_bytes, &bad), SC_ERANGE);
        CHECK_EQ_U64(bad, 1);
        bad_idx[1] = -n_rows - 1;
        CHECK(memcmp(sc_store_data(s), want, size) == 0);
        CHECK_EQ_U64(sc_store_page_version(s, (base + row_bytes) / ps), v1);
        if (snapshot) CHECK_ST(sc_snapshot_release(s, e), SC_OK);
    }
    CHECK_ST(sc_store_write_rows(s, idx, 1, (uint64_t)n_rows, size - 8, row_bytes, src, 0, &bad),
             SC_EINVAL); /* the rows run past the store */
    free(want);
    free(src);
    free(seen);
    sc_store_close(s);
}

/* Many rows under a live snapshot (rows.c's sorted path): pages marked, copied in address
 * order one window (16 MiB here) at a time, each window's rows written once it is
 * published. Rows straddle pages and windows, repeat (the last wins) and count from the
 * end; the result equals the rows written one by one, the snapshot keeps its bytes, and
 * each touched page is preserved once. */
#define SORTED_ROWS 20000
static void sorted_rows_setup(int64_t *idx, int64_t n_rows, uint64_t base, uint64_t row_bytes,
                              uint64_t window) {
    int64_t straddler = (int64_t)((window - base) / row_bytes); /* crosses the first window end */
    for (int i = 0; i < SORTED_ROWS; i++) {
        int64_t r = (int64_t)rnd_below((uint64_t)n_rows);
        idx[i] = i % 7 == 0 ? r - n_rows : i % 13 == 0 ? idx[rnd_below((uint64_t)i)] : r;
    }
    idx[5] = straddler;
    idx[SORTED_ROWS - 1] = straddler; /* the same row again, last */
}

static uint64_t distinct_pages(const int64_t *idx, int64_t n_rows, uint64_t base,
                               uint64_t row_bytes, uint32_t ps, uint64_t n_pages) {
    uint8_t *seen = xmalloc(n_pages);
    memset(seen, 0, n_pages);
    uint64_t n = 0;
    for (int i = 0; i < SORTED_ROWS; i++) {
        uint64_t start = base + (uint64_t)(idx[i] < 0 ? idx[i] + n_rows : idx[i]) * row_bytes;
        for (uint64_t p = start / ps; p <= (start + row_bytes - 1) / ps; p++) n += !seen[p]++;
    }
    free(seen);
    return n;
}

static void test_write_rows_sorted(void) {
    const uint32_t ps = 4096;
    const uint64_t size = 40u << 20, base = 4000, row_bytes = 24, window = 16u << 20;
    const int64_t n_rows = (int64_t)((size - base) / row_bytes);
    static int64_t idx[SORTED_ROWS];
    uint8_t *want = xmalloc(size), *before = xmalloc(size), *seen = xmalloc(size);
    uint8_t *src = xmalloc(SORTED_ROWS * row_bytes);
    sc_store *s = NULL;
    CHECK_ST(sc_store_open(NULL, size, ps, &s), SC_OK);
    REQUIRE(s);
    fill_random(&g_rng, want, size);
    CHECK_ST(sc_store_write(s, 0, want, size), SC_OK);
    uint64_t bad = 0, e = 0;
    for (int round = 0; round < 3; round++) {
        if (round < 2) CHECK_ST(sc_snapshot_take(s, &e), SC_OK); /* round 2: same snapshot */
        memcpy(before, want, size);
        sorted_rows_setup(idx, n_rows, base, row_bytes, window);
        fill_random(&g_rng, src, SORTED_ROWS * row_bytes);
        sc_stats st0, st1;
        sc_store_stats(s, &st0);
        CHECK_ST(sc_store_write_rows(s, idx, SORTED_ROWS, (uint64_t)n_rows, base, row_bytes, src,
                                     row_bytes, &bad), SC_OK);
        write_rows_by_hand(want, idx, SORTED_ROWS, n_rows, base, row_bytes, src, row_bytes);
        CHECK(memcmp(sc_store_data(s), want, size) == 0);
        sc_store_stats(s, &st1);
        if (round < 2)
            CHECK_EQ_U64(st1.pages_preserved_total - st0.pages_preserved_total,
                         distinct_pages(idx, n_rows, base, row_bytes, ps, size / ps));
        CHECK_ST(sc_snapshot_read(s, e, 0, seen, size), SC_OK);
        if (round < 2) CHECK(memcmp(seen, before, size) == 0);
        if (round == 1) CHECK_ST(sc_snapshot_release(s, e - 1), SC_OK); /* round 0's */
    }
    CHECK_ST(sc_snapshot_release(s, e), SC_OK);
    sc_store_close(s);
    free(want);
    free(before);
    free(seen);
    free(src);
}

#ifdef SC_FAULT_INJECTION
typedef struct {
    const int64_t *idx;
    int64_t n_rows;
    uint64_t base, row_bytes;
    const uint8_t *src;
} rows_write;

static sc_status write_sorted_rows(sc_store *s, const void *ctx) {
    const rows_write *w = ctx;
    uint64_t bad = 0;
    return sc_store_write_rows(s, w->idx, SORTED_ROWS, (uint64_t)w->n_rows, w->base,
                               w->row_bytes, w->src, w->row_bytes, &bad);
}
#endif

/* The sorted path's allocations (its groups, marks, batch, reserved copies) failing in
 * turn (write_under_alloc_failures). */
static void test_write_rows_sorted_alloc_failures(void) {
#ifdef SC_FAULT_INJECTION
    const uint32_t ps = 4096;
    const uint64_t size = 40u << 20, base = 4000, row_bytes = 24;
    const int64_t n_rows = (int64_t)((size - base) / row_bytes);
    static int64_t idx[SORTED_ROWS];
    uint8_t *start = xmalloc(size), *want = xmalloc(size);
    uint8_t *src = xmalloc(SORTED_ROWS * row_bytes);
    fill_random(&g_rng, start, size);
    fill_random(&g_rng, src, SORTED_ROWS * row_bytes);
    sorted_rows_setup(idx, n_rows, base, row_bytes, 16u << 20);
    memcpy(want, start, size);
    write_rows_by_hand(want, idx, SORTED_ROWS, n_rows, base, row_bytes, src, row_bytes);
    rows_write w = {idx, n_rows, base, row_bytes, src};
    /* A failure on the sorted way falls back to the batch-by-batch one, which gets the
     * memory once the one injected failure has passed: few writes fail, but every
     * allocation of both ways (groups, marks, batches, copies, copier) fails once. */
    long reached = 0;
    write_under_alloc_failures(ps, size, start, want, write_sorted_rows, &w, &reached);
    CHECK(reached >= 6);
    free(start);
    free(want);
    free(src);
#endif
}

#ifdef SC_FAULT_INJECTION
static bool all_zero(const uint64_t *words, uint64_t n) {
    for (uint64_t i = 0; i < n; i++)
        if (words[i]) return false;
    return true;
}
#endif

/* The sorted way itself (without write_rows' fallback), each allocation failing in turn:
 * a failed write leaves bytes, versions and preserved pages as they were and its scratch
 * bitmaps clear. And a second write under the same snapshot reserves nothing more: its
 * pages were copied by the first. */
static void test_write_rows_sorted_direct(void) {
#ifdef SC_FAULT_INJECTION
    const uint32_t ps = 4096;
    const uint64_t size = 40u << 20, base = 4000, row_bytes = 24, n_pages = size / ps;
    const int64_t n_rows = (int64_t)((size - base) / row_bytes);
    static int64_t idx[SORTED_ROWS];
    uint8_t *start = xmalloc(size), *src = xmalloc(SORTED_ROWS * row_bytes);
    uint64_t *versions = xmalloc(n_pages * sizeof *versions);
    fill_random(&g_rng, start, size);
    fill_random(&g_rng, src, SORTED_ROWS * row_bytes);
    sorted_rows_setup(idx, n_rows, base, row_bytes, 16u << 20);
    sc_rows rows = {idx, n_rows, base, row_bytes, src, row_bytes};
    uint64_t first = base / ps, last = n_pages - 1;
    bool injected = true;
    long failures = 0;
    for (long k = 0; k < 1000 && injected; k++) {
        sc_store *s = NULL;
        CHECK_ST(sc_store_open(NULL, size, ps, &s), SC_OK);
        if (!s) break;
        CHECK_ST(sc_store_write(s, 0, start, size), SC_OK);
        uint64_t e = 0;
        CHECK_ST(sc_snapshot_take(s, &e), SC_OK);
        for (uint64_t p = 0; p < n_pages; p++) versions[p] = sc_store_page_version(s, p);
        atomic_store(&sc_test_allocs_left, k);
        sc_status st = sc__write_rows_sorted(s, &rows, SORTED_ROWS, first, last);
        injected = atomic_exchange(&sc_test_allocs_left, -1) < 0;
        CHECK(st == SC_OK || (st == SC_ENOMEM && injected));
        CHECK(all_zero(s->sort_bits, s->n_groups) && all_zero(s->queued, s->n_groups));
        if (st != SC_OK) {
            failures++;
            CHECK(memcmp(sc_store_data(s), start, size) == 0);
            for (uint64_t p = 0; p < n_pages; p++)
                CHECK_EQ_U64(sc_store_page_version(s, p), versions[p]);
            CHECK_EQ_U64(atomic_load(&s->preserved_pages), 0);
        } else {
            uint64_t chunks = s->pool.chunks;
            CHECK_ST(sc__write_rows_sorted(s, &rows, SORTED_ROWS, first, last), SC_OK);
            CHECK_EQ_U64(s->pool.chunks, chunks);
        }
        CHECK_ST(sc_snapshot_release(s, e), SC_OK);
        sc_store_close(s);
    }
    CHECK(!injected);
    CHECK(failures >= 6); /* groups, counts, marks, batch buffers, pool chunks */
    free(start);
    free(src);
    free(versions);
#endif
}

/* Bulk writes and applies of 4 MiB or more take the streaming-store copy (stream_copy.c),
 * and a write preserving several batches copies them on the copier thread
 * (prep_copier.c): same bytes, versions and snapshot behaviour as the ordinary paths,
 * from an unaligned source too. */
static void test_streamed_writes(void) {
    const uint32_t ps = 4096;
    /* 39 MiB: above SC_STREAM_MIN_BYTES (4 MiB), the apply runs on two threads, and the
     * preserving copies fill more than two 16 MiB batches (the copier thread runs) */
    const uint64_t n_pages = 12288, n = 10000;
    sc_store *s = NULL, *r = NULL;
    CHECK_ST(sc_store_open(NULL, n_pages * ps, ps, &s), SC_OK);
    CHECK_ST(sc_store_open(NULL, n_pages * ps, ps, &r), SC_OK);
    REQUIRE(s && r);
    uint8_t *src = xmalloc(n * ps + 1), *before = xmalloc(n_pages * ps);
    fill_random(&g_rng, src, n * ps + 1);
    memcpy(before, sc_store_data(s), n_pages * ps);
    /* Distinct random ids: a partial Fisher-Yates shuffle of all pages. */
    uint64_t *all = xmalloc(n_pages * 8);
    for (uint64_t p = 0; p < n_pages; p++) all[p] = p;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t j = i + rnd_below(n_pages - i), t = all[i];
        all[i] = all[j];
        all[j] = t;
    }
    uint64_t e;
    CHECK_ST(sc_snapshot_take(s, &e), SC_OK);
    CHECK_ST(sc_store_write_pages(s, all, n, src + 1), SC_OK); /* unaligned source */
    const uint8_t *d = sc_store_data(s);
    for (uint64_t i = 0; i < n; i++) {
        if (memcmp(d + all[i] * ps, src + 1 + i * ps, ps) != 0) {
            CHECK(!"streamed write_pages: page differs from its source");
            break;
        }
        CHECK_EQ_U64(sc_store_page_version(s, all[i]), e + 1);
    }
    uint8_t *old = xmalloc(n_pages * ps);
    CHECK_ST(sc_snapshot_read(s, e, 0, old, n_pages * ps), SC_OK);
    CHECK(memcmp(old, before, n_pages * ps) == 0);
    CHECK_EQ_U64(stats_preserved(s), n);
    CHECK_ST(sc_snapshot_release(s, e), SC_OK);

    /* The same pages applied to another store as one delta. */
    uint64_t e2, len, written = 0;
    CHECK_ST(sc_snapshot_take(s, &e2), SC_OK);
    sc_delta_view v;
    uint8_t *buf = build_parsed(s, 0, e2, &v, &len);
    REQUIRE(buf);
    CHECK_ST(sc_delta_apply(r, &v, v.payload, 0, &written), SC_OK);
    CHECK_EQ_U64(written, n);
    CHECK(memcmp(sc_store_data(r), sc_store_data(s), n_pages * ps) == 0);
    CHECK_ST(sc_snapshot_release(s, e2), SC_OK);
    sc_buffer_free(buf, len); /* large: mmap'd (sc_buffer_alloc) */
    free(all);
    free(src);
    free(before);
    free(old);
    sc_store_close(s);
    sc_store_close(r);
}

/* Each streaming-copy implementation (whichever the CPU runs is the only one the store
 * uses here) copies every page size exactly, from any source alignment, and writes
 * nothing past the page. */
static void test_stream_copy_impls(void) {
    static const sc_copy_impl impls[] = {SC_COPY_PLAIN, SC_COPY_SSE2, SC_COPY_AVX512};
    const uint64_t max = 1u << 20;
    uint8_t *src = xmalloc(max + 64), *dst = NULL;
    REQUIRE(posix_memalign((void **)&dst, 4096, max + 64) == 0);
    fill_random(&g_rng, src, max + 64);
    for (size_t k = 0; k < sizeof impls / sizeof impls[0]; k++) {
        for (uint64_t len = 512; len <= max; len <<= 1) {
            for (uint64_t off = 0; off < 64; off += 13) {
                memset(dst, 0xA5, len + 64);
                sc__stream_page_using(impls[k], dst, src + off, len);
                sc__stream_fence();
                CHECK(memcmp(dst, src + off, len) == 0);
                for (uint64_t i = len; i < len + 64; i++)
                    if (dst[i] != 0xA5) { CHECK(!"copy wrote past the page"); break; }
            }
        }
    }
    free(src);
    free(dst);
}

/* Whole-store write_pages in random order, each round under a fresh snapshot (up to three
 * live, the oldest released each round so pool slots are reused), while two threads read
 * random pages of the live snapshots and check every word: the copier thread's copies
 * (prep_copier.c) must be complete and visible before a node is published. */
#define PIPE_PAGES 12288u
#define PIPE_LIVE 3

typedef struct {
    sc_store *s;
    _Atomic uint64_t epoch[PIPE_LIVE], round[PIPE_LIVE];
    _Atomic int stop;
    _Atomic long bad, reads;
} pipe_ctx;

static void pipe_fill(uint64_t *w, uint64_t round, uint64_t page, uint32_t ps) {
    for (uint32_t i = 0; i < ps / 8; i++) w[i] = (round << 40) | (page << 12) | i;
}

static void *pipe_reader(void *arg) {
    pipe_ctx *c = arg;
    const uint32_t ps = 4096;
    uint64_t ids[16], rng = (uintptr_t)ids; /* each thread its own sequence */
    uint64_t *buf = xmalloc(16 * ps), *want = xmalloc(ps);
    while (!atomic_load(&c->stop)) {
        int k = (int)(rng_next(&rng) % PIPE_LIVE);
        uint64_t ep = atomic_load(&c->epoch[k]), round = atomic_load(&c->round[k]);
        if (!ep) continue;
        for (int i = 0; i < 16; i++) ids[i] = rng_next(&rng) % PIPE_PAGES;
        sc_status st = sc_snapshot_read_pages(c->s, ep, ids, 16, buf, NULL);
        if (st == SC_ENOSNAP || atomic_load(&c->epoch[k]) != ep) continue; /* released */
        if (st) { atomic_fetch_add(&c->bad, 1); continue; }
        for (int i = 0; i < 16; i++) {
            pipe_fill(want, round, ids[i], ps);
            if (memcmp(want, buf + i * (ps / 8), ps) != 0) atomic_fetch_add(&c->bad, 1);
        }
        atomic_fetch_add(&c->reads, 1);
    }
    free(buf);
    free(want);
    return NULL;
}

static void test_pipelined_write_readers(void) {
    const uint32_t ps = 4096;
    static pipe_ctx c;
    memset(&c, 0, sizeof c);
    CHECK_ST(sc_store_open(NULL, (uint64_t)PIPE_PAGES * ps, ps, &c.s), SC_OK);
    REQUIRE(c.s);
    uint64_t *src = xmalloc((uint64_t)PIPE_PAGES * ps), *ids = xmalloc(PIPE_PAGES * 8);
    for (uint64_t p = 0; p < PIPE_PAGES; p++) pipe_fill(src + p * (ps / 8), 0, p, ps);
    CHECK_ST(sc_store_write(c.s, 0, src, (uint64_t)PIPE_PAGES * ps), SC_OK);
    pthread_t t[2];
    for (int i = 0; i < 2; i++) REQUIRE(pthread_create(&t[i], NULL, pipe_reader, &c) == 0);
    for (uint64_t r = 0; r < 8; r++) {
        int k = (int)(r % PIPE_LIVE);
        uint64_t old = atomic_load(&c.epoch[k]), e;
        atomic_store(&c.epoch[k], 0);
        if (old) CHECK_ST(sc_snapshot_release(c.s, old), SC_OK);
        CHECK_ST(sc_snapshot_take(c.s, &e), SC_OK);
        atomic_store(&c.round[k], r);
        atomic_store(&c.epoch[k], e);
        for (uint64_t i = 0; i < PIPE_PAGES; i++) ids[i] = i;
        for (uint64_t i = PIPE_PAGES - 1; i > 0; i--) {
            uint64_t j = rnd_below(i + 1), x = ids[i];
            ids[i] = ids[j];
            ids[j] = x;
        }
        for (uint64_t i = 0; i < PIPE_PAGES; i++)
            pipe_fill(src + i * (ps / 8), r + 1, ids[i], ps);
        CHECK_ST(sc_store_write_pages(c.s, ids, PIPE_PAGES, src), SC_OK);
    }
    atomic_store(&c.stop, 1);
    for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
    CHECK_EQ_U64((uint64_t)atomic_load(&c.bad), 0);
    CHECK(atomic_load(&c.reads) > 0);
    free(src);
    free(ids);
    sc_store_close(c.s);
}

static void test_snapshot_basic(void) {
    model m;
    if (model_open(&m, 32, 512)) return;
    for (int i = 0; i < 40; i++) model_random_write(&m);
    int a = model_snapshot(&m);
    REQUIRE(a == 0);
    CHECK_EQ_U64(m.snaps[a].epoch, 1);
    CHECK_EQ_U64(sc_store_epoch(m.s), 2);
    CHECK_EQ_U64(stats_preserved(m.s), 0); /* O(1): nothing copied at take */
    for (int i = 0; i < 200; i++) {
        model_random_write(&m);
        if (i % 25 == 0) model_check_snap(&m, a);
    }
    model_check_snap(&m, a);
    model_check_live(&m);

    /* At most one preserved copy per page per live snapshot. */
    uint64_t pres = stats_preserved(m.s), changed = 0;
    for (uint64_t p = 0; p < m.n; p++) changed += m.ver[p] > m.snaps[a].epoch;
    CHECK_EQ_U64(pres, changed);
    sc_stats st;
    sc_store_stats(m.s, &st);
    CHECK_EQ_U64(st.live_snapshots, 1);
    CHECK_EQ_U64(st.oldest_snapshot, 1);
    CHECK_EQ_U64(st.preserved_bytes, pres * 512);

    /* Unknown epochs. */
    uint8_t tmp[512];
    uint64_t id0 = 0;
    CHECK_ST(sc_snapshot_read(m.s, 2, 0, tmp, 16), SC_ENOSNAP);
    CHECK_ST(sc_snapshot_read(m.s, 0, 0, tmp, 16), SC_ENOSNAP);
    CHECK_ST(sc_snapshot_read_pages(m.s, 2, &id0, 1, tmp, NULL), SC_ENOSNAP);
    CHECK_ST(sc_snapshot_release(m.s, 2), SC_ENOSNAP);
    CHECK_ST(sc_snapshot_release(m.s, UINT64_MAX), SC_ENOSNAP);

    model_release(&m, a);
    CHECK_EQ_U64(stats_preserved(m.s), 0);
    CHECK_ST(sc_snapshot_read(m.s, 1, 0, tmp, 16), SC_ENOSNAP);
    CHECK_ST(sc_snapshot_release(m.s, 1), SC_ENOSNAP);
    sc_store_stats(m.s, &st);
    CHECK_EQ_U64(st.live_snapshots, 0);
    CHECK_EQ_U64(st.oldest_snapshot, 0);
    model_check_live(&m);
    model_close(&m);
}

/* Several live snapshots released in every order, with writes between releases. */
static void test_snapshot_release_orders(void) {
    enum { K = 4 };
    int perm[K] = {0, 1, 2, 3};
    int orders = 0;
    for (;;) {
        model m;
        if (model_open(&m, 70, 512)) return; /* 70: two 64-page groups, one partial */
        for (int k = 0; k < K; k++) {
            for (int i = 0; i < 25; i++) model_random_write(&m);
            /* Rewrite the same pages in several epochs: chains of several nodes. */
            uint8_t b = (uint8_t)k;
            CHECK_ST(sc_store_write(m.s, 0, &b, 1), SC_OK);
            m.bytes[0] = b;
            model_mark(&m, 0, 0);
            CHECK(model_snapshot(&m) == k);
        }
        for (int i = 0; i < 60; i++) model_random_write(&m);
        for (int k = 0; k < K; k++) model_check_snap(&m, k);
        for (int r = 0; r < K; r++) {
            model_release(&m, perm[r]);
            for (int i = 0; i < 10; i++) model_random_write(&m);
            for (int k = 0; k < K; k++)
                if (m.snaps[k].live) model_check_snap(&m, k);
            /* Released snapshot memory goes away unless a live one still needs it. */
            uint64_t need = 0;
            for (uint64_t p = 0; p < m.n; p++) {
                /* Distinct old versions some live snapshot reads from a preserved copy. */
                uint64_t seen[K];
                int ns = 0;
                for (int k = 0; k < K; k++) {
                    if (!m.snaps[k].live || m.snaps[k].ver[p] == m.ver[p]) continue;
                    int dup = 0;
                    for (int j = 0; j < ns; j++) dup |= seen[j] == m.snaps[k].ver[p];
                    if (!dup) seen[ns++] = m.snaps[k].ver[p];
                }
                need += (uint64_t)ns;
            }
            CHECK_EQ_U64(stats_preserved(m.s), need);
        }
        CHECK_EQ_U64(stats_preserved(m.s), 0);
        sc_stats st;
        sc_store_stats(m.s, &st);
        CHECK_EQ_U64(st.preserved_bytes, 0);
        CHECK_EQ_U64(st.live_snapshots, 0);
        model_check_live(&m);
        model_close(&m);
        orders++;
        /* next permutation */
        int i = K - 2;
        while (i >= 0 && perm[i] > perm[i + 1]) i--;
        if (i < 0) break;
        int j = K - 1;
        while (perm[j] < perm[i]) j--;
        int t = perm[i]; perm[i] = perm[j]; perm[j] = t;
        for (int lo = i + 1, hi = K - 1; lo < hi; lo++, hi--) {
            t = perm[lo]; perm[lo] = perm[hi]; perm[hi] = t;
        }
    }
    CHECK_EQ_U64(orders, 24);
}

/* sc_changed_pages, page versions and dirty bits against a brute-force model. */
static void test_changed_pages(void) {
    model m;
    if (model_open(&m, 200, 512)) return; /* 200 pages: 4 groups, the last partial */
    for (int round = 0; round < 10; round++) {
        int writes = (int)rnd_below(30);
        for (int i = 0; i < writes; i++) model_random_write(&m);
        if (round % 3 == 1) { /* group edges */
            static const uint64_t edge[] = {0, 63, 64, 127, 128, 191, 192, 199};
            uint64_t p = edge[rnd_below(8)];
            uint8_t b = (uint8_t)round;
            CHECK_ST(sc_store_write(m.s, p * 512 + 511, &b, 1), SC_OK);
            m.bytes[p * 512 + 511] = b;
            model_mark(&m, p, p);
        }
        if (model_snapshot(&m) < 0) break;
        if (round == 6) model_release(&m, 2); /* gaps in the live list */
        for (int k = 0; k < m.n_snaps; k++) {
            model_snap *sn = &m.snaps[k];
            if (!sn->live) continue;
            uint64_t sinces[] = {0, 1, sn->epoch / 2, sn->epoch - 1, sn->epoch, sn->epoch + 5,
                                 UINT64_MAX};
            for (size_t j = 0; j < sizeof sinces / sizeof sinces[0]; j++) {
                uint64_t since = sinces[j];
                uint64_t *ids = NULL, *vs = NULL, n = 0;
                CHECK_ST(sc_changed_pages(m.s, since, sn->epoch, &ids, &vs, &n), SC_OK);
                uint64_t want = 0;
                for (uint64_t p = 0; p < m.n; p++) {
                    if (sn->ver[p] <= since) continue;
                    if (want < n) {
                        CHECK_EQ_U64(ids[want], p);
                        CHECK_EQ_U64(vs[want], sn->ver[p]);
                    }
                    want++;
                }
                CHECK_EQ_U64(n, want);
                free(ids);
                free(vs);
            }
        }
        model_check_live(&m);
        uint64_t dirty = 0;
        for (uint64_t p = 0; p < m.n; p++) dirty += m.ver[p] > 0;
        CHECK_EQ_U64(sc_store_dirty_count(m.s), dirty);
    }
    uint64_t *ids, *vs, n;
    CHECK_ST(sc_changed_pages(m.s, 0, 12345, &ids, &vs, &n), SC_ENOSNAP);
    CHECK_ST(sc_changed_pages(m.s, 0, m.snaps[2].epoch, &ids, &vs, &n), SC_ENOSNAP);

    /* clear_dirty(E) forgets pages written at or before E only. */
    uint64_t cut = m.snaps[4].epoch;
    sc_store_clear_dirty(m.s, cut);
    uint64_t dirty = 0;
    for (uint64_t p = 0; p < m.n; p++) dirty += m.ver[p] > cut;
    CHECK_EQ_U64(sc_store_dirty_count(m.s), dirty);
    for (int i = 0; i < 10; i++) model_random_write(&m);
    dirty = 0;
    for (uint64_t p = 0; p < m.n; p++) dirty += m.ver[p] > cut;
    CHECK_EQ_U64(sc_store_dirty_count(m.s), dirty);
    model_close(&m);
}

static void test_delta_roundtrip(void) {
    model a;
    if (model_open(&a, 100, 512)) return;
    sc_store *b = NULL;
    CHECK_ST(sc_store_open(NULL, a.size, 512, &b), SC_OK);
    REQUIRE(b);
    sc_store_set_schema_version(a.s, 3);
    for (int i = 0; i < 40; i++) model_random_write(&a);
    int s1 = model_snapshot(&a);
    for (int i = 0; i < 20; i++) model_random_write(&a); /* after s1: must not leak into it */

    sc_delta_view v;
    uint64_t len, written = 0;
    uint8_t *d1 = build_parsed(a.s, 0, a.snaps[s1].epoch, &v, &len);
    REQUIRE(d1);
    uint64_t changed = 0;
    for (uint64_t p = 0; p < a.n; p++) changed += a.snaps[s1].ver[p] > 0;
    CHECK_EQ_U64(v.header.n_pages, changed);
    CHECK_EQ_U64(v.header.base_epoch, 0);
    CHECK_EQ_U64(v.header.target_epoch, a.snaps[s1].epoch);
    CHECK_EQ_U64(v.header.page_size, 512);
    CHECK_EQ_U64(v.header.store_pages, 100);
    CHECK_EQ_U64(v.header.schema_version, 3);
    CHECK_EQ_U64(v.header.kind, SC_KIND_DELTA);
    CHECK_EQ_U64(v.header.compression, SC_COMP_NONE);
    CHECK(memcmp(v.header.magic, SC_DELTA_MAGIC, 8) == 0);
    CHECK(memcmp(v.header.store_uuid, sc_store_uuid(a.s), 16) == 0);
    CHECK_EQ_U64(len, SC_HEADER_SIZE + changed * 24 + changed * 512);
    CHECK_EQ_U64(v.total_bytes, len);
    CHECK(v.payload == d1 + v.payload_offset);

    CHECK_ST(sc_delta_apply(b, &v, v.payload, 0, &written), SC_OK);
    CHECK_EQ_U64(written, changed);
    CHECK(memcmp(sc_store_data(b), a.snaps[s1].bytes, a.size) == 0);
    CHECK_EQ_U64(sc_store_epoch(b), a.snaps[s1].epoch + 1);
    for (uint64_t p = 0; p < a.n; p++)
        CHECK_EQ_U64(sc_store_page_version(b, p), a.snaps[s1].ver[p]);
    /* Idempotent: again changes nothing. */
    CHECK_ST(sc_delta_apply(b, &v, v.payload, 0, &written), SC_OK);
    CHECK_EQ_U64(written, 0);
    CHECK(memcmp(sc_store_data(b), a.snaps[s1].bytes, a.size) == 0);
    CHECK_EQ_U64(sc_store_epoch(b), a.snaps[s1].epoch + 1);

    /* The next delta carries exactly the pages written after s1. */
    int s2 = model_snapshot(&a);
    sc_delta_view v2;
    uint64_t len2;
    uint8_t *d2 = build_parsed(a.s, a.snaps[s1].epoch, a.snaps[s2].epoch, &v2, &len2);
    REQUIRE(d2);
    uint64_t changed2 = 0;
    for (uint64_t p = 0; p < a.n; p++) changed2 += a.snaps[s2].ver[p] > a.snaps[s1].epoch;
    CHECK_EQ_U64(v2.header.n_pages, changed2);
    CHECK_ST(sc_delta_apply(b, &v2, v2.payload, 0, &written), SC_OK);
    CHECK_EQ_U64(written, changed2);
    CHECK(memcmp(sc_store_data(b), a.snaps[s2].bytes, a.size) == 0);
    /* An older delta applied late changes nothing. */
    CHECK_ST(sc_delta_apply(b, &v, v.payload, 0, &written), SC_OK);
    CHECK_EQ_U64(written, 0);
    CHECK(memcmp(sc_store_data(b), a.snaps[s2].bytes, a.size) == 0);
    sc_stats st;
    sc_store_stats(b, &st);
    CHECK_EQ_U64(st.deltas_applied, 4);
    CHECK_EQ_U64(st.pages_applied, changed + changed2);

    /* Gap: b is at s2+1; a delta starting at s3 >= s2+1 is refused and changes nothing. */
    for (int i = 0; i < 10; i++) model_random_write(&a);
    int s3 = model_snapshot(&a);
    for (int i = 0; i < 10; i++) model_random_write(&a);
    int s4 = model_snapshot(&a);
    sc_delta_view v4;
    uint64_t len4;
    uint8_t *d4 = build_parsed(a.s, a.snaps[s3].epoch, a.snaps[s4].epoch, &v4, &len4);
    REQUIRE(d4);
    uint64_t epoch_b = sc_store_epoch(b);
    CHECK(a.snaps[s3].epoch >= epoch_b);
    CHECK_ST(sc_delta_apply(b, &v4, v4.payload, 0, &written), SC_EGAP);
    CHECK(memcmp(sc_store_data(b), a.snaps[s2].bytes, a.size) == 0);
    CHECK_EQ_U64(sc_store_epoch(b), epoch_b);
    /* allow_gap lets a caller who knows better apply it anyway. */
    CHECK_ST(sc_delta_apply(b, &v4, v4.payload, 1, &written), SC_OK);
    CHECK_EQ_U64(sc_store_epoch(b), a.snaps[s4].epoch + 1);

    /* An empty delta: since == until. */
    sc_delta_view v0;
    uint64_t len0;
    uint8_t *d0 = build_parsed(a.s, a.snaps[s4].epoch, a.snaps[s4].epoch, &v0, &len0);
    if (d0) {
        CHECK_EQ_U64(v0.header.n_pages, 0);
        CHECK_EQ_U64(len0, SC_HEADER_SIZE);
        CHECK_ST(sc_delta_apply(b, &v0, v0.payload, 0, &written), SC_OK);
        CHECK_EQ_U64(written, 0);
        free(d0);
    }

    /* Argument and parse errors. */
    uint8_t *junk = NULL;
    uint64_t junk_len;
    CHECK_ST(sc_delta_build(a.s, a.snaps[s2].epoch, a.snaps[s1].epoch, &junk, &junk_len),
             SC_EINVAL);
    CHECK_ST(sc_delta_build(a.s, 0, 999, &junk, &junk_len), SC_ENOSNAP);
    sc_delta_view bad;
    uint64_t bad_page = UINT64_MAX;
    CHECK_ST(sc_delta_parse(d1, len, SC_KIND_CHECKPOINT, 1, &bad, &bad_page), SC_ECORRUPT);
    CHECK_ST(sc_delta_parse(d1, len - 1, SC_KIND_DELTA, 1, &bad, &bad_page), SC_ECORRUPT);
    CHECK_ST(sc_delta_parse(d1, SC_HEADER_SIZE - 1, SC_KIND_DELTA, 1, &bad, &bad_page),
             SC_ECORRUPT);
    /* Unaligned buffers are refused rather than read misaligned. */
    uint8_t *shifted = xmalloc(len + 8);
    memcpy(shifted + 1, d1, len);
    CHECK_ST(sc_delta_parse(shifted + 1, len, SC_KIND_DELTA, 1, &bad, &bad_page), SC_EINVAL);
    free(shifted);
    /* A flipped payload byte in page row 3 is found, and named, only with verify_pages. */
    if (v.header.n_pages > 3) {
        d1[v.payload_offset + 3 * 512 + 100] ^= 1;
        CHECK_ST(sc_delta_parse(d1, len, SC_KIND_DELTA, 0, &bad, &bad_page), SC_OK);
        CHECK_ST(sc_delta_parse(d1, len, SC_KIND_DELTA, 1, &bad, &bad_page), SC_ECORRUPT);
        CHECK_EQ_U64(bad_page, 3);
        CHECK_ST(sc_verify_pages(&bad, bad.payload, &bad_page), SC_ECORRUPT);
        d1[v.payload_offset + 3 * 512 + 100] ^= 1;
    }
    /* A future format version is reported as such (checksum resealed). */
    sc_header *h = (sc_header *)d1;
    h->format_version = SC_FORMAT_VERSION + 1;
    sc_header_seal(h, d1 + SC_HEADER_SIZE);
    CHECK_ST(sc_delta_parse(d1, len, SC_KIND_DELTA, 1, &bad, &bad_page), SC_EFORMAT);
    h->format_version = SC_FORMAT_VERSION;
    sc_header_seal(h, d1 + SC_HEADER_SIZE);
    CHECK_ST(sc_delta_parse(d1, len, SC_KIND_DELTA, 1, &bad, &bad_page), SC_OK);
    /* A target epoch of UINT64_MAX, with every version inside the range and all checksums
     * valid, is refused: applying it would need the store at epoch UINT64_MAX + 1. */
    {
        uint64_t n = h->n_pages, *ids = (uint64_t *)(d1 + SC_HEADER_SIZE);
        uint64_t keep_target = h->target_epoch, *keep_vers = xmalloc(n * 8 + 8);
        memcpy(keep_vers, ids + n, n * 8);
        h->target_epoch = UINT64_MAX;
        for (uint64_t i = 0; i < n; i++) ids[n + i] = UINT64_MAX;
        sc_header_seal(h, ids);
        CHECK_ST(sc_delta_parse(d1, len, SC_KIND_DELTA, 1, &bad, &bad_page), SC_ECORRUPT);
        h->target_epoch = SC_MAX_EPOCH; /* the first epoch refused as implausible */
        for (uint64_t i = 0; i < n; i++) ids[n + i] = SC_MAX_EPOCH;
        sc_header_seal(h, ids);
        CHECK_ST(sc_delta_parse(d1, len, SC_KIND_DELTA, 1, &bad, &bad_page), SC_ECORRUPT);
        h->target_epoch = SC_MAX_EPOCH - 1; /* the largest target accepted */
        for (uint64_t i = 0; i < n; i++) ids[n + i] = SC_MAX_EPOCH - 1;
        sc_header_seal(h, ids);
        CHECK_ST(sc_delta_parse(d1, len, SC_KIND_DELTA, 1, &bad, &bad_page), SC_OK);
        h->target_epoch = keep_target;
        memcpy(ids + n, keep_vers, n * 8);
        sc_header_seal(h, ids);
        CHECK_ST(sc_delta_parse(d1, len, SC_KIND_DELTA, 1, &bad, &bad_page), SC_OK);
        free(keep_vers);
    }
    /* Unsorted ids with a resealed index are still rejected. */
    if (v.header.n_pages > 2) {
        uint64_t *ids = (uint64_t *)(d1 + SC_HEADER_SIZE);
        uint64_t t = ids[0]; ids[0] = ids[1]; ids[1] = t;
        sc_header_seal(h, ids);
        CHECK_ST(sc_delta_parse(d1, len, SC_KIND_DELTA, 0, &bad, &bad_page), SC_ECORRUPT);
    }

    free(d1);
    free(d2);
    free(d4);
    sc_store_close(b);
    model_close(&a);
}

static void test_delta_incompatible(void) {
    model a;
    if (model_open(&a, 64, 512)) return;
    for (int i = 0; i < 20; i++) model_random_write(&a);
    int s1 = model_snapshot(&a);
    sc_delta_view v;
    uint64_t len, written = 77;
    uint8_t *d = build_parsed(a.s, 0, a.snaps[s1].epoch, &v, &len);
    REQUIRE(d);
    static const struct { uint64_t size; uint32_t ps; } other[] = {
        {64 * 512, 1024},  /* same size, other page size */
        {64 * 512, 4096},
        {128 * 512, 512},  /* same page size, other store size */
        {32 * 512, 512},
    };
    for (size_t i = 0; i < sizeof other / sizeof other[0]; i++) {
        sc_store *b = NULL;
        CHECK_ST(sc_store_open(NULL, other[i].size, other[i].ps, &b), SC_OK);
        if (!b) continue;
        CHECK_ST(sc_delta_apply(b, &v, v.payload, 0, &written), SC_EINCOMPAT);
        CHECK_ST(sc_delta_apply(b, &v, v.payload, 1, &written), SC_EINCOMPAT);
        sc_replay_result r;
        const uint8_t *pl = v.payload;
        CHECK_ST(sc_replay(b, &v, &pl, 1, 0, 0, &r), SC_EINCOMPAT);
        CHECK_EQ_U64(sc_store_epoch(b), 1);
        CHECK_EQ_U64(sc_store_dirty_count(b), 0);
        sc_stats st;
        sc_store_stats(b, &st);
        CHECK_EQ_U64(st.deltas_applied, 0);
        sc_store_close(b);
    }
    free(d);
    model_close(&a);
}

/* Replaying k deltas at once equals applying them one after another. */
static void test_replay(void) {
    enum { K = 6 };
    model a;
    if (model_open(&a, 150, 512)) return;
    int snaps[K];
    for (int k = 0; k < K; k++) {
        for (int i = 0; i < 30; i++) model_random_write(&a);
        snaps[k] = model_snapshot(&a);
    }
    sc_delta_view views[K];
    uint8_t *bufs[K];
    const uint8_t *payloads[K];
    uint64_t pages_in = 0;
    for (int k = 0; k < K; k++) {
        uint64_t since = k ? a.snaps[snaps[k - 1]].epoch : 0, len;
        bufs[k] = build_parsed(a.s, since, a.snaps[snaps[k]].epoch, &views[k], &len);
        REQUIRE(bufs[k]);
        payloads[k] = views[k].payload;
        pages_in += views[k].header.n_pages;
    }
    const model_snap *last = &a.snaps[snaps[K - 1]];
    uint64_t distinct = 0;
    for (uint64_t p = 0; p < a.n; p++) distinct += last->ver[p] > 0;

    sc_store *seq = NULL;
    CHECK_ST(sc_store_open(NULL, a.size, 512, &seq), SC_OK);
    REQUIRE(seq);
    for (int k = 0; k < K; k++) CHECK_ST(sc_delta_apply(seq, &views[k], payloads[k], 0, NULL), SC_OK);
    CHECK(memcmp(sc_store_data(seq), last->bytes, a.size) == 0);

    for (int threads = 0; threads <= 3; threads++) {
        sc_store *rep = NULL;
        CHECK_ST(sc_store_open(NULL, a.size, 512, &rep), SC_OK);
        if (!rep) continue;
        sc_replay_result r;
        CHECK_ST(sc_replay(rep, views, payloads, K, 0, threads, &r), SC_OK);
        CHECK(memcmp(sc_store_data(rep), sc_store_data(seq), a.size) == 0);
        CHECK_EQ_U64(sc_store_epoch(rep), sc_store_epoch(seq));
        for (uint64_t p = 0; p < a.n; p++)
            CHECK_EQ_U64(sc_store_page_version(rep, p), sc_store_page_version(seq, p));
        CHECK_EQ_U64(r.pages_in, pages_in);
        CHECK_EQ_U64(r.pages_written, distinct);
        CHECK_EQ_U64(r.pages_superseded, pages_in - distinct);
        CHECK_EQ_U64(r.pages_skipped, 0);
        /* Replaying it all again is a no-op. */
        CHECK_ST(sc_replay(rep, views, payloads, K, 0, threads, &r), SC_OK);
        CHECK_EQ_U64(r.pages_written, 0);
        CHECK_EQ_U64(r.pages_skipped, distinct);
        CHECK(memcmp(sc_store_data(rep), last->bytes, a.size) == 0);
        sc_store_close(rep);
    }

    /* Part sequential, then the rest replayed, gives the same state. */
    sc_store *mix = NULL;
    CHECK_ST(sc_store_open(NULL, a.size, 512, &mix), SC_OK);
    if (mix) {
        sc_replay_result r;
        CHECK_ST(sc_delta_apply(mix, &views[0], payloads[0], 0, NULL), SC_OK);
        CHECK_ST(sc_delta_apply(mix, &views[1], payloads[1], 0, NULL), SC_OK);
        CHECK_ST(sc_replay(mix, views + 1, payloads + 1, K - 1, 0, 2, &r), SC_OK);
        CHECK(memcmp(sc_store_data(mix), last->bytes, a.size) == 0);
        CHECK_EQ_U64(sc_store_epoch(mix), last->epoch + 1);
        sc_store_close(mix);
    }

    /* A hole in the sequence is a gap and changes nothing; allow_gap overrides. */
    sc_store *gap = NULL;
    CHECK_ST(sc_store_open(NULL, a.size, 512, &gap), SC_OK);
    if (gap) {
        sc_delta_view pair[2] = {views[0], views[2]};
        const uint8_t *pp[2] = {payloads[0], payloads[2]};
        sc_replay_result r;
        CHECK_ST(sc_replay(gap, pair, pp, 2, 0, 0, &r), SC_EGAP);
        CHECK_EQ_U64(sc_store_epoch(gap), 1);
        CHECK_EQ_U64(sc_store_dirty_count(gap), 0);
        CHECK_ST(sc_replay(gap, views + 1, payloads + 1, K - 1, 0, 0, &r), SC_EGAP);
        CHECK_ST(sc_replay(gap, pair, pp, 2, 1, 0, &r), SC_OK);
        CHECK_EQ_U64(sc_store_epoch(gap), views[2].header.target_epoch + 1);
        /* k == 0 is fine. */
        CHECK_ST(sc_replay(gap, views, payloads, 0, 0, 0, &r), SC_OK);
        CHECK_EQ_U64(r.pages_in, 0);
        sc_store_close(gap);
    }

    /* Replay into a replica that holds a live snapshot keeps that snapshot exact. */
    sc_store *snapd = NULL;
    CHECK_ST(sc_store_open(NULL, a.size, 512, &snapd), SC_OK);
    if (snapd) {
        sc_replay_result r;
        uint64_t e;
        CHECK_ST(sc_delta_apply(snapd, &views[0], payloads[0], 0, NULL), SC_OK);
        CHECK_ST(sc_snapshot_take(snapd, &e), SC_OK);
        CHECK_ST(sc_replay(snapd, views + 1, payloads + 1, K - 1, 0, 0, &r), SC_OK);
        CHECK(memcmp(sc_store_data(snapd), last->bytes, a.size) == 0);
        uint8_t *old = xmalloc(a.size);
        CHECK_ST(sc_snapshot_read(snapd, e, 0, old, a.size), SC_OK);
        CHECK(memcmp(old, a.snaps[snaps[0]].bytes, a.size) == 0);
        free(old);
        /* Exactly the primary's state, versions included (snapshots read by local write
         * stamps, so the replica keeps the versions the deltas carry)... */
        for (uint64_t p = 0; p < a.n; p++)
            CHECK_EQ_U64(sc_store_page_version(snapd, p), last->ver[p]);
        /* ... while its own snapshot still reports the versions it was taken with. */
        uint64_t *ids = NULL, *vs = NULL, n = 0, want = 0;
        CHECK_ST(sc_changed_pages(snapd, 0, e, &ids, &vs, &n), SC_OK);
        for (uint64_t p = 0; p < a.n; p++) {
            if (!a.snaps[snaps[0]].ver[p]) continue;
            if (want < n) {
                CHECK_EQ_U64(ids[want], p);
                CHECK_EQ_U64(vs[want], a.snaps[snaps[0]].ver[p]);
            }
            want++;
        }
        CHECK_EQ_U64(n, want);
        free(ids);
        free(vs);
        CHECK_ST(sc_snapshot_release(snapd, e), SC_OK);
        CHECK_EQ_U64(stats_preserved(snapd), 0);
        sc_store_close(snapd);
    }

    for (int k = 0; k < K; k++) free(bufs[k]);
    sc_store_close(seq);
    model_close(&a);
}

static uint8_t *read_file(const char *path, uint64_t *len) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return NULL;
    struct stat st;
    if (fstat(fd, &st) != 0) { close(fd); return NULL; }
    *len = (uint64_t)st.st_size;
    uint8_t *buf = xmalloc(*len); /* malloc: 8-aligned, exact size for ASan */
    uint64_t got = 0;
    while (got < *len) {
        ssize_t r = read(fd, buf + got, *len - got);
        if (r <= 0) { free(buf); close(fd); return NULL; }
        got += (uint64_t)r;
    }
    close(fd);
    return buf;
}

/* Snapshot e of s saved to a new file `name` in the test directory (its path into `path`). */
static sc_status save_to_file(sc_store *s, uint64_t e, const char *name, char *path) {
    tmp_path(path, name);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) return SC_EIO;
    sc_status st = sc_checkpoint_save(s, e, fd, NULL, NULL);
    close(fd);
    return st;
}

/* A checkpoint file of a snapshot, parsed (every checksum verified) and compared with
 * `want`, the snapshot's bytes: every page of the store is in it. */
static void check_checkpoint_file(const char *path, const uint8_t *want, uint64_t n,
                                  uint32_t ps) {
    uint64_t len = 0;
    uint8_t *buf = read_file(path, &len);
    REQUIRE(buf);
    sc_delta_view v;
    uint64_t bad = UINT64_MAX;
    CHECK_ST(sc_delta_parse(buf, len, SC_KIND_CHECKPOINT, 1, &v, &bad), SC_OK);
    CHECK_EQ_U64(v.header.n_pages, n);
    for (uint64_t i = 0; i < v.header.n_pages && i < n; i++) {
        CHECK_EQ_U64(v.ids[i], i);
        if (memcmp(v.payload + i * ps, want + i * ps, ps) != 0) {
            CHECK(!"a saved page differs from the snapshot's");
            break;
        }
    }
    free(buf);
}

/* A save whose batches interleave live pages with pages the snapshot reads from preserved
 * copies (written from a staging buffer in the same pwritev): with every other page
 * rewritten after the snapshot, an 8 MiB batch is more pieces than one pwritev takes. */
static void checkpoint_staged_with(uint32_t ps, uint64_t n) {
    const uint64_t size = n * ps;
    sc_store *s = NULL;
    CHECK_ST(sc_store_open(NULL, size, ps, &s), SC_OK);
    REQUIRE(s);
    uint8_t *before = xmalloc(size), *page = xmalloc(ps);
    fill_random(&g_rng, before, size);
    CHECK_ST(sc_store_write(s, 0, before, size), SC_OK);
    uint64_t e = 0;
    CHECK_ST(sc_snapshot_take(s, &e), SC_OK);
    for (uint64_t p = 0; p < n; p += 2) {
        fill_random(&g_rng, page, ps);
        CHECK_ST(sc_store_write(s, p * ps, page, ps), SC_OK);
    }
    char path[PATH_MAX];
    CHECK_ST(save_to_file(s, e, "staged.sc", path), SC_OK);
    check_checkpoint_file(path, before, n, ps);
    free(before);
    free(page);
    sc_store_close(s);
}

static void test_checkpoint_staged(void) {
    checkpoint_staged_with(512, 40000);     /* 16,384 pages a batch: 16 pwritev calls */
    checkpoint_staged_with(4096, 5000);     /* three batches, the last one partial */
    checkpoint_staged_with(1u << 20, 20);   /* 8 pages a batch */
}

typedef struct {
    sc_store *s;
    uint32_t ps;
    uint64_t n, seed;
    uint64_t release_epoch, release_after; /* release_after 0: the writer never releases */
    atomic_bool stop;
} save_race;

/* The writer thread, while the main thread saves: rewrites random pages, and (writer-side,
 * so here) releases the snapshot after release_after writes when asked to. */
static void *rewrite_pages(void *arg) {
    save_race *r = arg;
    uint8_t *page = xmalloc(r->ps);
    for (uint64_t i = 1; !atomic_load(&r->stop); i++) {
        fill_random(&r->seed, page, r->ps);
        if (sc_store_write(r->s, rng_next(&r->seed) % r->n * r->ps, page, r->ps)) break;
        if (i == r->release_after) sc_snapshot_release(r->s, r->release_epoch);
    }
    free(page);
    return NULL;
}

/* Saves while a writer thread rewrites random pages (live pages moving mid-save take the
 * redo path), and one whose snapshot the writer releases mid-save: that save either
 * finishes first, with the snapshot's bytes, or reports SC_ENOSNAP. */
static void test_checkpoint_under_writer(void) {
    const uint32_t ps = 4096;
    const uint64_t n = 6000, size = n * ps;
    for (int release = 0; release < 2; release++) {
        sc_store *s = NULL;
        CHECK_ST(sc_store_open(NULL, size, ps, &s), SC_OK);
        REQUIRE(s);
        uint8_t *want = xmalloc(size);
        fill_random(&g_rng, want, size);
        CHECK_ST(sc_store_write(s, 0, want, size), SC_OK);
        uint64_t e = 0;
        CHECK_ST(sc_snapshot_take(s, &e), SC_OK);
        save_race r = {.s = s, .ps = ps, .n = n, .seed = g_rng + 7, .release_epoch = e,
                       .release_after = release ? 500 : 0};
        atomic_init(&r.stop, false);
        pthread_t writer;
        REQUIRE(pthread_create(&writer, NULL, rewrite_pages, &r) == 0);
        char path[PATH_MAX];
        sc_status st = save_to_file(s, e, "under-writer.sc", path);
        atomic_store(&r.stop, true);
        pthread_join(writer, NULL);
        CHECK(st == SC_OK || (release && st == SC_ENOSNAP));
        if (st == SC_OK) check_checkpoint_file(path, want, n, ps);
        if (!release) CHECK_ST(sc_snapshot_release(s, e), SC_OK);
        free(want);
        sc_store_close(s);
    }
}

static void test_checkpoint(void) {
    model a;
    if (model_open(&a, 90, 1024)) return;
    sc_store_set_schema_version(a.s, 5);
    for (int i = 0; i < 40; i++) model_random_write(&a);
    int s = model_snapshot(&a);
    for (int i = 0; i < 40; i++) model_random_write(&a); /* writers keep going */
    const model_snap *sn = &a.snaps[s];

    char path[PATH_MAX];
    tmp_path(path, "ckpt.sc");
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    REQUIRE(fd >= 0);
    /* Stale longer content in the file must not survive the save. */
    uint8_t *junk = xmalloc(1u << 18);
    memset(junk, 0xCD, 1u << 18);
    CHECK(write(fd, junk, 1u << 18) == (ssize_t)(1u << 18));
    free(junk);
    uint64_t bytes = 0;
    sc_progress prog = {0, 0};
    CHECK_ST(sc_checkpoint_save(a.s, sn->epoch, fd, &bytes, &prog), SC_OK);
    /* Progress ends at the payload it announced: every page of the checkpoint. */
    CHECK(atomic_load(&prog.total) > 0);
    CHECK_EQ_U64(atomic_load(&prog.done), atomic_load(&prog.total));
    CHECK_ST(sc_checkpoint_save(a.s, sn->epoch + 1000, fd, NULL, NULL), SC_ENOSNAP);
    close(fd);

    uint64_t len = 0;
    uint8_t *buf = read_file(path, &len);
    REQUIRE(buf);
    CHECK_EQ_U64(len, bytes);
    sc_delta_view v;
    uint64_t bad = UINT64_MAX;
    CHECK_ST(sc_delta_parse(buf, len, SC_KIND_CHECKPOINT, 1, &v, &bad), SC_OK);
    CHECK_ST(sc_delta_parse(buf, len, SC_KIND_DELTA, 1, &v, &bad), SC_ECORRUPT);
    CHECK_ST(sc_delta_parse(buf, len, SC_KIND_CHECKPOINT, 1, &v, &bad), SC_OK);
    uint64_t changed = 0;
    for (uint64_t p = 0; p < a.n; p++) changed += sn->ver[p] > 0;
    CHECK(memcmp(v.header.magic, SC_CKPT_MAGIC, 8) == 0);
    CHECK_EQ_U64(v.header.kind, SC_KIND_CHECKPOINT);
    CHECK_EQ_U64(v.header.base_epoch, 0);
    CHECK_EQ_U64(v.header.target_epoch, sn->epoch);
    CHECK_EQ_U64(v.header.n_pages, changed);
    CHECK_EQ_U64(v.header.schema_version, 5);
    CHECK_EQ_U64(v.header.store_pages, 90);
    CHECK(memcmp(v.header.store_uuid, sc_store_uuid(a.s), 16) == 0);
    for (uint64_t i = 0; i < v.header.n_pages; i++) {
        CHECK_EQ_U64(v.versions[i], sn->ver[v.ids[i]]);
        CHECK(memcmp(v.payload + i * 1024, sn->bytes + v.ids[i] * 1024, 1024) == 0);
        CHECK_EQ_U64(v.checksums[i], sc_page_checksum(sn->bytes + v.ids[i] * 1024, 1024));
    }

    /* Restore into a fresh store: the bytes of the snapshot, and its epoch. */
    sc_store *b = NULL;
    CHECK_ST(sc_store_open(NULL, a.size, 1024, &b), SC_OK);
    REQUIRE(b);
    uint64_t written = 0;
    CHECK_ST(sc_delta_apply(b, &v, v.payload, 0, &written), SC_OK);
    CHECK_EQ_U64(written, changed);
    sc_store_set_epoch(b, sn->epoch + 1);
    CHECK_EQ_U64(sc_store_epoch(b), sn->epoch + 1);
    sc_store_set_epoch(b, 1); /* never goes back */
    CHECK_EQ_U64(sc_store_epoch(b), sn->epoch + 1);
    CHECK(memcmp(sc_store_data(b), sn->bytes, a.size) == 0);
    /* sc_checkpoint_restore wants an empty store. */
    CHECK_ST(sc_checkpoint_restore(b, &v, &bad, NULL), SC_EINVAL);
    sc_store_close(b);

    /* Restore, verifying as it copies: a bad last page leaves the store empty ... */
    CHECK_ST(sc_store_open(NULL, a.size, 1024, &b), SC_OK);
    REQUIRE(b);
    CHECK_ST(sc_delta_parse(buf, len, SC_KIND_CHECKPOINT, 0, &v, &bad), SC_OK);
    buf[len - 1] ^= 0x04;
    CHECK_ST(sc_checkpoint_restore(b, &v, &bad, NULL), SC_ECORRUPT);
    CHECK_EQ_U64(bad, v.header.n_pages - 1);
    buf[len - 1] ^= 0x04;
    uint8_t *zeros = calloc(1, a.size);
    REQUIRE(zeros);
    CHECK(memcmp(sc_store_data(b), zeros, a.size) == 0);
    CHECK_EQ_U64(sc_store_epoch(b), 1);
    CHECK_EQ_U64(sc_store_dirty_count(b), 0);
    free(zeros);
    /* ... so the good one restores into it afterwards, with versions and epoch. */
    prog = (sc_progress){0, 0};
    CHECK_ST(sc_checkpoint_restore(b, &v, &bad, &prog), SC_OK);
    CHECK_EQ_U64(atomic_load(&prog.done), atomic_load(&prog.total));
    CHECK(memcmp(sc_store_data(b), sn->bytes, a.size) == 0);
    CHECK_EQ_U64(sc_store_epoch(b), sn->epoch + 1);
    for (uint64_t p = 0; p < a.n; p++) CHECK_EQ_U64(sc_store_page_version(b, p), sn->ver[p]);
    sc_store_close(b);

    /* Truncated anywhere, or one bit off anywhere: refused. */
    for (uint64_t cut = 0; cut < len; cut += 1 + len / 37)
        CHECK_ST(sc_delta_parse(buf, cut, SC_KIND_CHECKPOINT, 1, &v, &bad), SC_ECORRUPT);
    for (uint64_t at = 0; at < len; at += 1 + len / 53) {
        buf[at] ^= 0x10;
        sc_status st = sc_delta_parse(buf, len, SC_KIND_CHECKPOINT, 1, &v, &bad);
        CHECK(st == SC_ECORRUPT || st == SC_EFORMAT);
        buf[at] ^= 0x10;
    }
    /* An empty store checkpoints to a bare header. */
    sc_store *e = NULL;
    CHECK_ST(sc_store_open(NULL, 8 * 512, 512, &e), SC_OK);
    if (e) {
        uint64_t ee;
        CHECK_ST(sc_snapshot_take(e, &ee), SC_OK);
        fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
        CHECK(fd >= 0);
        CHECK_ST(sc_checkpoint_save(e, ee, fd, &bytes, NULL), SC_OK);
        CHECK_EQ_U64(bytes, SC_HEADER_SIZE);
        close(fd);
        uint8_t *eb = read_file(path, &len);
        CHECK(eb != NULL);
        if (eb) {
            CHECK_ST(sc_delta_parse(eb, len, SC_KIND_CHECKPOINT, 1, &v, &bad), SC_OK);
            CHECK_EQ_U64(v.header.n_pages, 0);
            free(eb);
        }
        sc_store_close(e);
    }
    unlink(path);
    free(buf);
    model_close(&a);
}

/* A floored snapshot keeps only pages above its floor; lowering is refused once a write
 * skipped a copy, and what the floor still covers reads intact. */
static void test_snapshot_floor(void) {
    const uint64_t n = 16, ps = 4096;
    sc_store *s = NULL;
    CHECK_ST(sc_store_open(NULL, n * ps, ps, &s), SC_OK);
    REQUIRE(s);
    uint8_t *page = xmalloc(ps), *got = xmalloc(ps);
    uint64_t e, versions[16];
    for (uint64_t p = 0; p < n; p++) { /* page p at version p + 1 */
        memset(page, (int)(p + 1), ps);
        CHECK_ST(sc_store_write(s, p * ps, page, ps), SC_OK);
        versions[p] = p + 1; /* a fresh store opens epoch 1; each snapshot closes one */
        CHECK_ST(sc_snapshot_take(s, &e), SC_OK);
        CHECK_ST(sc_snapshot_release(s, e), SC_OK);
    }
    CHECK_ST(sc_snapshot_take(s, &e), SC_OK);
    int applied = 0;
    CHECK_ST(sc_snapshot_set_floor(s, e, versions[n - 1], &applied), SC_OK);
    CHECK(applied);
    CHECK_ST(sc_snapshot_set_floor(s, e, versions[7], &applied), SC_OK); /* nothing written */
    CHECK(applied);
    CHECK_ST(sc_snapshot_set_floor(s, e + 1, 0, &applied), SC_ENOSNAP);
    memset(page, 0xEE, ps);
    for (uint64_t p = 0; p < n; p++) CHECK_ST(sc_store_write(s, p * ps, page, ps), SC_OK);
    sc_stats st;
    sc_store_stats(s, &st);
    CHECK_EQ_U64(st.preserved_pages, n - 8); /* pages 8..15 are above the floor */
    CHECK_ST(sc_snapshot_set_floor(s, e, 0, &applied), SC_OK);
    CHECK(!applied);
    for (uint64_t p = 8; p < n; p++) {
        CHECK_ST(sc_snapshot_read(s, e, p * ps, got, ps), SC_OK);
        CHECK(got[0] == p + 1 && got[ps - 1] == p + 1);
    }
    CHECK_ST(sc_snapshot_release(s, e), SC_OK);
    free(page);
    free(got);
    sc_store_close(s);
}

/* Large enough for two restore threads: the first bad entry is reported even when the
 * other thread fails first on a later one. */
static void test_restore_first_bad(void) {
    const uint64_t n = 4096, ps = 4096;
    sc_store *a = NULL, *b = NULL;
    CHECK_ST(sc_store_open(NULL, n * ps, ps, &a), SC_OK);
    REQUIRE(a);
    uint8_t *page = xmalloc(ps);
    for (uint64_t p = 0; p < n; p++) {
        memset(page, (int)(p * 7 + 1), ps);
        CHECK_ST(sc_store_write(a, p * ps, page, ps), SC_OK);
    }
    free(page);
    uint64_t e;
    CHECK_ST(sc_snapshot_take(a, &e), SC_OK);
    char path[PATH_MAX];
    CHECK_ST(save_to_file(a, e, "restore.sc", path), SC_OK);
    uint64_t len = 0;
    uint8_t *buf = read_file(path, &len);
    REQUIRE(buf);
    sc_delta_view v;
    uint64_t bad = 0;
    CHECK_ST(sc_delta_parse(buf, len, SC_KIND_CHECKPOINT, 0, &v, &bad), SC_OK);
    buf[v.payload_offset + 3000 * ps] ^= 1;
    buf[v.payload_offset + 1000 * ps + 17] ^= 1;
    CHECK_ST(sc_store_open(NULL, n * ps, ps, &b), SC_OK);
    REQUIRE(b);
    CHECK_ST(sc_checkpoint_restore(b, &v, &bad, NULL), SC_ECORRUPT);
    CHECK_EQ_U64(bad, 1000);
    sc_store_close(b);
    sc_store_close(a);
    unlink(path);
    free(buf);
}

/* A parsed view's index lies in the caller's buffer and may change after parsing (a
 * writable buffer decoded without a copy, a checkpoint file changed under its mapping).
 * Apply, replay and restore check each entry again as they use it: SC_ECORRUPT and nothing
 * written, never a write outside the store (ASan would catch one here). */
typedef struct { int which; uint64_t value; } index_edit; /* which: 0 last id, 1 last version */

static void edit_index(uint8_t *buf, const sc_delta_view *v, index_edit e, uint64_t *saved) {
    uint64_t n = v->header.n_pages;
    uint64_t *at = (uint64_t *)(buf + SC_HEADER_SIZE) + e.which * n + n - 1;
    if (saved) *saved = *at;
    *at = e.value;
}

static void check_untouched(sc_store *s) {
    CHECK_EQ_U64(sc_store_epoch(s), 1);
    CHECK_EQ_U64(sc_store_dirty_count(s), 0);
    uint64_t nonzero = 0, n = sc_store_n_pages(s);
    for (uint64_t p = 0; p < n; p++) nonzero += sc_store_page_version(s, p) != 0;
    CHECK_EQ_U64(nonzero, 0);
    const uint8_t *data = sc_store_data(s);
    for (uint64_t i = 0; i < sc_store_size(s); i++)
        if (data[i]) { CHECK(!"a refused call wrote the store"); break; }
}

static void test_index_changed_after_parse(void) {
    model a;
    if (model_open(&a, 64, 512)) return;
    for (int i = 0; i < 30; i++) model_random_write(&a);
    int s1 = model_snapshot(&a);
    for (int i = 0; i < 30; i++) model_random_write(&a);
    int s2 = model_snapshot(&a);
    sc_delta_view v[2];
    uint64_t len[2];
    uint8_t *d[2];
    d[0] = build_parsed(a.s, 0, a.snaps[s1].epoch, &v[0], &len[0]);
    d[1] = build_parsed(a.s, a.snaps[s1].epoch, a.snaps[s2].epoch, &v[1], &len[1]);
    REQUIRE(d[0] && d[1]);
    REQUIRE(v[1].header.n_pages >= 2);
    const uint64_t *ids1 = (const uint64_t *)(d[1] + SC_HEADER_SIZE);
    const index_edit edits[] = {
        {0, a.n},                              /* one past the store's pages */
        {0, UINT64_MAX >> 3},                  /* far past: the shift would wrap */
        {0, ids1[0]},                          /* an earlier page again (out of order) */
        {1, v[1].header.base_epoch},           /* version at the base */
        {1, v[1].header.target_epoch + 1},     /* version past the target */
    };
    const uint8_t *payloads[2] = {v[0].payload, v[1].payload};
    for (size_t i = 0; i < sizeof edits / sizeof edits[0]; i++) {
        sc_store *b = NULL;
        CHECK_ST(sc_store_open(NULL, a.size, 512, &b), SC_OK);
        if (!b) continue;
        uint64_t saved, written = 77;
        edit_index(d[1], &v[1], edits[i], &saved);
        CHECK_ST(sc_delta_apply(b, &v[1], v[1].payload, 1, &written), SC_ECORRUPT);
        CHECK_EQ_U64(written, 77);
        check_untouched(b);
        /* Replay: the first delta's pages are coalesced before the bad entry is seen. */
        sc_replay_result r;
        CHECK_ST(sc_replay(b, v, payloads, 2, 0, 0, &r), SC_ECORRUPT);
        CHECK_EQ_U64(r.pages_written, 0);
        check_untouched(b);
        edit_index(d[1], &v[1], (index_edit){edits[i].which, saved}, NULL);
        /* Put back: both work, and the failed replay left no stale winners behind. */
        CHECK_ST(sc_replay(b, v, payloads, 2, 0, 0, &r), SC_OK);
        CHECK(memcmp(sc_store_data(b), a.snaps[s2].bytes, a.size) == 0);
        sc_store_close(b);
        CHECK_ST(sc_store_open(NULL, a.size, 512, &b), SC_OK);
        if (!b) continue;
        CHECK_ST(sc_delta_apply(b, &v[0], v[0].payload, 0, NULL), SC_OK);
        CHECK_ST(sc_delta_apply(b, &v[1], v[1].payload, 0, NULL), SC_OK);
        CHECK(memcmp(sc_store_data(b), a.snaps[s2].bytes, a.size) == 0);
        sc_store_close(b);
    }

    /* Restore of a checkpoint whose index changes after it was parsed. */
    char path[PATH_MAX];
    CHECK_ST(save_to_file(a.s, a.snaps[s2].epoch, "index-changed.sc", path), SC_OK);
    uint64_t clen = 0, bad = 0;
    uint8_t *ck = read_file(path, &clen);
    REQUIRE(ck);
    sc_delta_view cv;
    CHECK_ST(sc_delta_parse(ck, clen, SC_KIND_CHECKPOINT, 0, &cv, &bad), SC_OK);
    REQUIRE(cv.header.n_pages >= 2);
    const uint64_t *cids = (const uint64_t *)(ck + SC_HEADER_SIZE);
    const index_edit ck_edits[] = {{0, a.n}, {0, UINT64_MAX >> 3}, {0, cids[0]}, {1, 0},
                                   {1, cv.header.target_epoch + 1}};
    for (size_t i = 0; i < sizeof ck_edits / sizeof ck_edits[0]; i++) {
        sc_store *b = NULL;
        CHECK_ST(sc_store_open(NULL, a.size, 512, &b), SC_OK);
        if (!b) continue;
        uint64_t saved;
        edit_index(ck, &cv, ck_edits[i], &saved);
        bad = 0;
        CHECK_ST(sc_checkpoint_restore(b, &cv, &bad, NULL), SC_ECORRUPT);
        CHECK_EQ_U64(bad, UINT64_MAX);
        check_untouched(b);
        edit_index(ck, &cv, (index_edit){ck_edits[i].which, saved}, NULL);
        CHECK_ST(sc_checkpoint_restore(b, &cv, &bad, NULL), SC_OK);
        CHECK(memcmp(sc_store_data(b), a.snaps[s2].bytes, a.size) == 0);
        sc_store_close(b);
    }
    unlink(path);
    free(ck);
    sc_buffer_free(d[0], len[0]);
    sc_buffer_free(d[1], len[1]);
    model_close(&a);
}

static void test_murmur3(void) {
    static const struct {
        const char *data;
        size_t len;
        uint64_t h0[2], h42[2];
    } vec[] = {
        {"", 0, {0ULL, 0ULL}, {17305828677633410339ULL, 15060430851467758521ULL}},
        {"a", 1, {9607679276477937801ULL, 16624257681780017498ULL},
         {2892890568104748720ULL, 2732500323686427413ULL}},
        {"abc", 3, {13012657714217449575ULL, 4297124817637354834ULL},
         {974194376405153750ULL, 8435366532673256752ULL}},
        {"hello", 5, {14688674573012802306ULL, 6565844092913065241ULL},
         {14175277504640544520ULL, 2536855305735617658ULL}},
        {"The quick brown fox jumps over the lazy dog", 43,
         {16378391709484522348ULL, 8809951995912426311ULL},
         {8362568317626209751ULL, 14147052128672177295ULL}},
    };
    for (size_t i = 0; i < sizeof vec / sizeof vec[0]; i++) {
        uint64_t h[2];
        sc_murmur3_128(vec[i].data, vec[i].len, 0, h);
        CHECK_EQ_U64(h[0], vec[i].h0[0]);
        CHECK_EQ_U64(h[1], vec[i].h0[1]);
        sc_murmur3_128(vec[i].data, vec[i].len, 42, h);
        CHECK_EQ_U64(h[0], vec[i].h42[0]);
        CHECK_EQ_U64(h[1], vec[i].h42[1]);
        CHECK_EQ_U64(sc_page_checksum(vec[i].data, vec[i].len), vec[i].h0[0]);
    }
    /* bytes(range(n)): every tail length around one and two 16-byte blocks. */
    static const struct { size_t len; uint64_t h0[2], h42[2]; } ramp[] = {
        {15, {5125964547706398185ULL, 14809082345965387241ULL},
         {14664557731775219013ULL, 11208524477591749596ULL}},
        {16, {4920504430128807728ULL, 12362491299644827717ULL},
         {5959944899498794537ULL, 4345230118764027456ULL}},
        {17, {6662781046685680142ULL, 13933858433357490212ULL},
         {10306761101289366011ULL, 6425427861743198060ULL}},
        {31, {377690909827715220ULL, 11449727981967135888ULL},
         {6900886986209544328ULL, 3761355361289409259ULL}},
        {32, {14298242870731034639ULL, 2019031476393414993ULL},
         {3867552915316407825ULL, 17708483917931514729ULL}},
        {33, {9025539228862924306ULL, 6173450423443563275ULL},
         {15461724071722349150ULL, 12629608017954289096ULL}},
    };
    uint8_t bytes[64], shifted[65];
    for (int i = 0; i < 64; i++) bytes[i] = (uint8_t)i;
    for (size_t i = 0; i < sizeof ramp / sizeof ramp[0]; i++) {
        uint64_t h[2];
        sc_murmur3_128(bytes, ramp[i].len, 0, h);
        CHECK_EQ_U64(h[0], ramp[i].h0[0]);
        CHECK_EQ_U64(h[1], ramp[i].h0[1]);
        sc_murmur3_128(bytes, ramp[i].len, 42, h);
        CHECK_EQ_U64(h[0], ramp[i].h42[0]);
        CHECK_EQ_U64(h[1], ramp[i].h42[1]);
        /* Unaligned input hashes the same. */
        memcpy(shifted + 1, bytes, ramp[i].len);
        CHECK_EQ_U64(sc_page_checksum(shifted + 1, ramp[i].len), ramp[i].h0[0]);
    }
    /* Whole pages: bytes((i*7+3) & 0xff for i in range(4096)) and bytes(512). */
    uint8_t *page = xmalloc(4096);
    for (int i = 0; i < 4096; i++) page[i] = (uint8_t)((i * 7 + 3) & 0xff);
    CHECK_EQ_U64(sc_page_checksum(page, 4096), 5017780507276567736ULL);
    uint64_t h[2];
    sc_murmur3_128(page, 4096, 0, h);
    CHECK_EQ_U64(h[1], 9104744751579250076ULL);
    memset(page, 0, 512);
    CHECK_EQ_U64(sc_page_checksum(page, 512), 10089542297659474612ULL);
    sc_murmur3_128("x", 1, 0xffffffffu, h);
    CHECK_EQ_U64(h[0], 8575934398336103627ULL);
    CHECK_EQ_U64(h[1], 3921495344467740885ULL);
    free(page);
}

/* ---- concurrency: a writer hammers pages while readers read a live snapshot ---- */

typedef struct {
    sc_store *s;
    uint64_t snap, size, ps, n;
    const uint8_t *expect;          /* the store's bytes when snap was taken */
    atomic_int writer_running;
    atomic_int readers_done;
    atomic_ulong writes, snapshots, reads, mismatches, errors;
    uint8_t *live;                  /* writer's model of the live bytes */
} race_ctx;

static void *race_writer(void *arg) {
    race_ctx *c = arg;
    uint64_t rng = g_seed ^ 0xabcdefULL;
    uint8_t *page = xmalloc(c->ps);
    uint64_t ring[3] = {0}, nring = 0;
    atomic_store(&c->writer_running, 1);
    /* Bounded: stops when the readers are done, or after a cap in case they hang. */
    for (uint64_t i = 0; atomic_load(&c->readers_done) < 2 && i < 50000000; i++) {
        uint64_t p = rng_next(&rng) % c->n;
        uint8_t val = (uint8_t)rng_next(&rng);
        sc_status st;
        if (i & 1) { /* whole page of one value: any tearing shows as a mix */
            memset(page, val, c->ps);
            st = sc_store_write(c->s, p * c->ps, page, c->ps);
            memcpy(c->live + p * c->ps, page, c->ps);
        } else { /* a short write across a page boundary */
            uint64_t off = p * c->ps + c->ps - 8;
            uint64_t len = off + 16 <= c->size ? 16 : c->size - off;
            memset(page, val, len);
            st = sc_store_write(c->s, off, page, len);
            memcpy(c->live + off, page, len);
        }
        if (st) atomic_fetch_add(&c->errors, 1);
        atomic_fetch_add_explicit(&c->writes, 1, memory_order_relaxed);
        if (i % 128 == 127) { /* churn other snapshots: take, and release the oldest */
            uint64_t e;
            if (sc_snapshot_take(c->s, &e) != SC_OK) atomic_fetch_add(&c->errors, 1);
            if (nring == 3) {
                if (sc_snapshot_release(c->s, ring[0]) != SC_OK) atomic_fetch_add(&c->errors, 1);
                ring[0] = ring[1];
                ring[1] = ring[2];
                nring--;
            }
            ring[nring++] = e;
            atomic_fetch_add(&c->snapshots, 1);
        }
        if (i % 64 == 0) sched_yield();
    }
    for (uint64_t i = 0; i < nring; i++)
        if (sc_snapshot_release(c->s, ring[i]) != SC_OK) atomic_fetch_add(&c->errors, 1);
    free(page);
    return NULL;
}

static void wait_for_writer(race_ctx *c) {
    while (!atomic_load(&c->writer_running)) sched_yield();
}

static void *race_reader(void *arg) {
    race_ctx *c = arg;
    uint64_t rng = g_seed ^ 0x1234ULL;
    uint8_t *buf = xmalloc(c->size);
    wait_for_writer(c);
    for (int iter = 0; iter < 120; iter++) {
        if (sc_snapshot_read(c->s, c->snap, 0, buf, c->size) != SC_OK) {
            atomic_fetch_add(&c->errors, 1);
        } else if (memcmp(buf, c->expect, c->size) != 0) {
            if (atomic_fetch_add(&c->mismatches, 1) == 0) {
                for (uint64_t p = 0; p < c->n; p++)
                    if (memcmp(buf + p * c->ps, c->expect + p * c->ps, c->ps))
                        fprintf(stderr, "torn or wrong snapshot page %" PRIu64 "\n", p);
            }
        }
        /* Unaligned partial reads and per-page reads. */
        for (int k = 0; k < 16; k++) {
            uint64_t off = rng_next(&rng) % c->size;
            uint64_t len = rng_next(&rng) % (3 * c->ps);
            if (len > c->size - off) len = c->size - off;
            if (sc_snapshot_read(c->s, c->snap, off, buf, len) != SC_OK)
                atomic_fetch_add(&c->errors, 1);
            else if (memcmp(buf, c->expect + off, len) != 0)
                atomic_fetch_add(&c->mismatches, 1);
            uint64_t ids[2] = {rng_next(&rng) % c->n, rng_next(&rng) % c->n};
            if (sc_snapshot_read_pages(c->s, c->snap, ids, 2, buf, NULL) != SC_OK)
                atomic_fetch_add(&c->errors, 1);
            else if (memcmp(buf, c->expect + ids[0] * c->ps, c->ps) != 0 ||
                     memcmp(buf + c->ps, c->expect + ids[1] * c->ps, c->ps) != 0)
                atomic_fetch_add(&c->mismatches, 1);
        }
        atomic_fetch_add(&c->reads, 1);
    }
    free(buf);
    atomic_fetch_add(&c->readers_done, 1);
    return NULL;
}

/* Reader-side delta build and checkpoint-style gather from the same live snapshot. */
static void *race_delta_reader(void *arg) {
    race_ctx *c = arg;
    wait_for_writer(c);
    for (int iter = 0; iter < 40; iter++) {
        uint8_t *buf = NULL;
        uint64_t len;
        if (sc_delta_build(c->s, 0, c->snap, &buf, &len) != SC_OK) {
            atomic_fetch_add(&c->errors, 1);
            continue;
        }
        sc_delta_view v;
        uint64_t bad;
        if (sc_delta_parse(buf, len, SC_KIND_DELTA, 1, &v, &bad) != SC_OK) {
            atomic_fetch_add(&c->errors, 1);
        } else {
            uint64_t row = 0;
            for (uint64_t p = 0; p < c->n; p++) {
                const uint8_t *want = c->expect + p * c->ps;
                if (row < v.header.n_pages && v.ids[row] == p) {
                    if (memcmp(v.payload + row * c->ps, want, c->ps))
                        atomic_fetch_add(&c->mismatches, 1);
                    row++;
                } else {
                    for (uint64_t b = 0; b < c->ps; b++)
                        if (want[b]) { atomic_fetch_add(&c->mismatches, 1); break; }
                }
            }
        }
        free(buf);
    }
    atomic_fetch_add(&c->readers_done, 1);
    return NULL;
}

static void test_threaded_snapshot(void) {
    const uint64_t n = 256, ps = 4096;
    race_ctx c;
    memset(&c, 0, sizeof c);
    c.n = n;
    c.ps = ps;
    c.size = n * ps;
    CHECK_ST(sc_store_open(NULL, c.size, (uint32_t)ps, &c.s), SC_OK);
    REQUIRE(c.s);
    uint8_t *init = xmalloc(c.size);
    fill_random(&g_rng, init, c.size);
    /* Leave some pages never written, so the delta also skips pages. */
    for (uint64_t p = 0; p < n; p += 5) memset(init + p * ps, 0, ps);
    for (uint64_t p = 0; p < n; p++)
        if (p % 5) CHECK_ST(sc_store_write(c.s, p * ps, init + p * ps, ps), SC_OK);
    c.live = xmalloc(c.size);
    memcpy(c.live, sc_store_data(c.s), c.size);
    uint8_t *expect = xmalloc(c.size);
    memcpy(expect, sc_store_data(c.s), c.size); /* the copy taken at snapshot time */
    CHECK_ST(sc_snapshot_take(c.s, &c.snap), SC_OK);
    c.expect = expect;

    pthread_t w, r1, r2;
    REQUIRE(pthread_create(&w, NULL, race_writer, &c) == 0);
    int ok1 = pthread_create(&r1, NULL, race_reader, &c) == 0;
    int ok2 = pthread_create(&r2, NULL, race_delta_reader, &c) == 0;
    if (!ok1) atomic_fetch_add(&c.readers_done, 1);
    if (!ok2) atomic_fetch_add(&c.readers_done, 1);
    if (ok1) pthread_join(r1, NULL);
    if (ok2) pthread_join(r2, NULL);
    pthread_join(w, NULL);
    CHECK(ok1 && ok2);

    CHECK_EQ_U64(atomic_load(&c.mismatches), 0);
    CHECK_EQ_U64(atomic_load(&c.errors), 0);
    CHECK(atomic_load(&c.writes) > 200); /* the writer really ran alongside */
    CHECK(atomic_load(&c.snapshots) > 0);
    uint8_t *now = xmalloc(c.size);
    CHECK_ST(sc_snapshot_read(c.s, c.snap, 0, now, c.size), SC_OK);
    CHECK(memcmp(now, expect, c.size) == 0);
    CHECK(memcmp(sc_store_data(c.s), c.live, c.size) == 0);
    sc_stats st;
    sc_store_stats(c.s, &st);
    CHECK_EQ_U64(st.live_snapshots, 1);
    CHECK(st.preserved_pages <= n); /* one copy per page for the one live snapshot */
    CHECK_ST(sc_snapshot_release(c.s, c.snap), SC_OK);
    CHECK_EQ_U64(stats_preserved(c.s), 0);
    if (getenv("SC_TEST_VERBOSE"))
        fprintf(stderr, "threaded: %lu writes, %lu snapshots, %lu full reads\n",
                (unsigned long)atomic_load(&c.writes), (unsigned long)atomic_load(&c.snapshots),
                (unsigned long)atomic_load(&c.reads));
    free(now);
    free(init);
    free(expect);
    free(c.live);
    sc_store_close(c.s);
}

/* A torn read can only happen while a page moves from "read live" to "read preserved",
 * which for one snapshot happens once per page. So: many rounds, each with a fresh
 * snapshot, in which the reader is already copying a few large hot pages when the writer
 * first writes them. The main thread is the (only) writer-side caller. */
typedef struct {
    sc_store *s;
    uint64_t ps, hot, rounds;    /* rounds: at most; min_rounds: at least */
    uint64_t min_rounds;
    atomic_ulong last_round;     /* set by the writer before it ends that round's writes */
    uint64_t snap_epoch[2];
    uint8_t *expect[2];          /* hot pages when the round's snapshot was taken */
    atomic_ulong published;      /* round whose snapshot is ready */
    atomic_ulong reader_at;      /* round the reader is reading */
    atomic_ulong writes_done;    /* round whose writes are finished */
    atomic_ulong reader_done;    /* round the reader has finished */
    atomic_ulong reads, tears, errors;
} flip_ctx;

static void spin_until(atomic_ulong *v, uint64_t want) {
    /* Yield soon: on a loaded machine the other side may be waiting for this core. */
    for (unsigned i = 0; atomic_load(v) < want; i++)
        if (i % 16 == 15) sched_yield();
}

static void *flip_reader(void *arg) {
    flip_ctx *c = arg;
    uint8_t *buf = xmalloc(c->ps);
    for (uint64_t g = 1; g <= atomic_load(&c->last_round); g++) {
        spin_until(&c->published, g);
        uint64_t slot = g & 1, e = c->snap_epoch[slot];
        atomic_store(&c->reader_at, g);
        int last;
        do {
            last = atomic_load(&c->writes_done) >= g; /* one full pass after the writes */
            for (uint64_t p = 0; p < c->hot; p++) {
                if (sc_snapshot_read_pages(c->s, e, &p, 1, buf, NULL) != SC_OK)
                    atomic_fetch_add(&c->errors, 1);
                else if (memcmp(buf, c->expect[slot] + p * c->ps, c->ps) != 0)
                    atomic_fetch_add(&c->tears, 1);
                atomic_fetch_add_explicit(&c->reads, 1, memory_order_relaxed);
            }
        } while (!last);
        atomic_store(&c->reader_done, g);
    }
    free(buf);
    return NULL;
}

static void test_threaded_page_transitions(void) {
    flip_ctx c;
    memset(&c, 0, sizeof c);
    c.ps = 64 * 1024; /* large pages: a long copy is a wide window */
    c.hot = 2;
    /* With the stamp re-check removed, 3-20% of rounds show a torn page: 300 rounds are
     * plenty; more while they fit in the time budget (a loaded CI box is slow at this). */
    c.rounds = 1500;
    c.min_rounds = 300;
    atomic_store(&c.last_round, c.rounds);
    struct timespec t0, now;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    CHECK_ST(sc_store_open(NULL, 4 * c.ps, (uint32_t)c.ps, &c.s), SC_OK);
    REQUIRE(c.s);
    c.expect[0] = xmalloc(c.hot * c.ps);
    c.expect[1] = xmalloc(c.hot * c.ps);
    uint8_t *page = xmalloc(c.ps);
    pthread_t r;
    REQUIRE(pthread_create(&r, NULL, flip_reader, &c) == 0);
    uint64_t done = 0;
    for (uint64_t g = 1; done == 0; g++) {
        uint64_t slot = g & 1;
        CHECK_ST(sc_snapshot_take(c.s, &c.snap_epoch[slot]), SC_OK);
        memcpy(c.expect[slot], sc_store_data(c.s), c.hot * c.ps);
        atomic_store(&c.published, g);
        spin_until(&c.reader_at, g);
        for (uint64_t p = 0; p < c.hot; p++) {
            memset(page, (int)((g * 7 + p + 1) & 0xff), c.ps);
            CHECK_ST(sc_store_write(c.s, p * c.ps, page, c.ps), SC_OK);
        }
        clock_gettime(CLOCK_MONOTONIC, &now);
        double secs = (double)(now.tv_sec - t0.tv_sec) + (double)(now.tv_nsec - t0.tv_nsec) / 1e9;
        if (g >= c.rounds || (g >= c.min_rounds && secs > 1.5)) {
            atomic_store(&c.last_round, g); /* before writes_done: the reader stops after g */
            done = g;
        }
        atomic_store(&c.writes_done, g);
        spin_until(&c.reader_done, g);
        CHECK_ST(sc_snapshot_release(c.s, c.snap_epoch[slot]), SC_OK);
    }
    c.rounds = done;
    pthread_join(r, NULL);
    CHECK_EQ_U64(atomic_load(&c.tears), 0);
    CHECK_EQ_U64(atomic_load(&c.errors), 0);
    CHECK(c.rounds >= c.min_rounds);
    CHECK(atomic_load(&c.reads) >= c.rounds * c.hot);
    CHECK_EQ_U64(stats_preserved(c.s), 0);
    if (getenv("SC_TEST_VERBOSE"))
        fprintf(stderr, "transitions: %lu rounds, %lu page reads, %lu torn\n",
                (unsigned long)c.rounds, (unsigned long)atomic_load(&c.reads),
                (unsigned long)atomic_load(&c.tears));
    free(page);
    free(c.expect[0]);
    free(c.expect[1]);
    sc_store_close(c.s);
}

/* ---- main ------------------------------------------------------------ */

typedef struct { const char *name; void (*fn)(void); } test_case;

static const test_case tests[] = {
    {"strerror", test_strerror},
    {"open_anonymous", test_open_anonymous},
    {"open_invalid", test_open_invalid},
    {"open_file", test_open_file},
    {"bounds", test_bounds},
    {"write_pages", test_write_pages},
    {"write_rows", test_write_rows},
    {"write_rows_sorted", test_write_rows_sorted},
    {"write_rows_sorted_alloc_failures", test_write_rows_sorted_alloc_failures},
    {"write_rows_sorted_direct", test_write_rows_sorted_direct},
    {"write_alloc_failures", test_write_alloc_failures},
    {"checkpoint_staged", test_checkpoint_staged},
    {"checkpoint_under_writer", test_checkpoint_under_writer},
    {"streamed_writes", test_streamed_writes},
    {"stream_copy_impls", test_stream_copy_impls},
    {"pipelined_write_readers", test_pipelined_write_readers},
    {"snapshot_basic", test_snapshot_basic},
    {"snapshot_release_orders", test_snapshot_release_orders},
    {"changed_pages", test_changed_pages},
    {"delta_roundtrip", test_delta_roundtrip},
    {"delta_incompatible", test_delta_incompatible},
    {"replay", test_replay},
    {"checkpoint", test_checkpoint},
    {"restore_first_bad", test_restore_first_bad},
    {"index_changed_after_parse", test_index_changed_after_parse},
    {"snapshot_floor", test_snapshot_floor},
    {"murmur3", test_murmur3},
    {"threaded_snapshot", test_threaded_snapshot},
    {"threaded_page_transitions", test_threaded_page_transitions},
};

int main(int argc, char **argv) {
    if (argc > 1) g_seed = strtoull(argv[1], NULL, 0);
    const char *base = getenv("TMPDIR");
    snprintf(g_tmpdir, sizeof g_tmpdir, "%s/statecore-test-XXXXXX",
             base && *base ? base : "/tmp");
    if (!mkdtemp(g_tmpdir)) {
        perror("mkdtemp");
        return 2;
    }
    int passed = 0, failed = 0;
    for (size_t i = 0; i < sizeof tests / sizeof tests[0]; i++) {
        g_rng = g_seed + i * 0x1000193ULL; /* each test reproducible on its own */
        long before = g_failures;
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        tests[i].fn();
        clock_gettime(CLOCK_MONOTONIC, &t1);
        if (getenv("SC_TEST_VERBOSE"))
            fprintf(stderr, "%-28s %6.3fs\n", tests[i].name,
                    (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9);
        if (g_failures == before) {
            passed++;
        } else {
            failed++;
            fprintf(stderr, "FAIL %s (%ld checks)\n", tests[i].name, g_failures - before);
        }
    }
    nftw(g_tmpdir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
