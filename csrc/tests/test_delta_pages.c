/* C tests of delta_pages.h: the batch page checksum against sc_page_checksum, batch
 * verification, and deltas of a page list built into a caller's buffer (what replication
 * sends as PART frames). Run under AddressSanitizer + UBSan by run_sanitized.sh.
 * Prints "N passed, M failed"; exits non-zero on any failure. Optional argv[1]: seed. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "delta_pages.h"
#include "harness.h"

static uint64_t g_rng = 0x5eedULL;

#define CHECK_ST(expr, want) CHECK_STATUS(expr, want, sc_strerror)

static uint64_t rnd(void) { /* splitmix64 */
    uint64_t z = (g_rng += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static void fill(uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++) p[i] = (uint8_t)rnd();
}

/* Every page size the formats allow (and odd lengths, which take the one-page path),
 * every count around the 4- and 8-page groups, unaligned starts: the same as one by one. */
static void test_batch_checksums(void) {
    static const uint64_t lens[] = {16, 48, 100, 512, 1024, 4096, 65536, 1u << 20};
    for (size_t li = 0; li < sizeof lens / sizeof lens[0]; li++) {
        uint64_t len = lens[li], max_n = len >= (1u << 20) ? 9 : 19;
        uint8_t *buf = malloc(max_n * len + 1);
        uint64_t *got = malloc(max_n * 8);
        REQUIRE(buf && got);
        fill(buf, max_n * len + 1);
        for (uint64_t n = 0; n <= max_n; n++) {
            const uint8_t *base = buf + (n & 1); /* odd n: every page starts unaligned */
            sc_page_checksums(base, len, n, got);
            for (uint64_t i = 0; i < n; i++)
                CHECK(got[i] == sc_page_checksum(base + i * len, len));
        }
        free(buf);
        free(got);
    }
    /* A known value (tests/test_delta.py pins the same one against mmh3). */
    uint8_t page[4096];
    for (int i = 0; i < 4096; i++) page[i] = (uint8_t)(i * 7 + 3);
    uint64_t one[9];
    uint8_t *pages = malloc(9 * 4096);
    REQUIRE(pages);
    for (int i = 0; i < 9; i++) memcpy(pages + i * 4096, page, 4096);
    sc_page_checksums(pages, 4096, 9, one);
    for (int i = 0; i < 9; i++) CHECK(one[i] == sc_page_checksum(page, 4096));
    free(pages);
}

static void test_verify(void) {
    const uint64_t ps = 4096, n = 1000; /* 4 MiB: two threads where allowed */
    uint8_t *buf = malloc(n * ps);
    uint64_t *sums = malloc(n * 8);
    REQUIRE(buf && sums);
    fill(buf, n * ps);
    sc_page_checksums(buf, ps, n, sums);
    uint64_t bad = 12345;
    for (int threads = 0; threads <= 3; threads++) {
        CHECK_ST(sc_verify_page_checksums(buf, ps, n, sums, threads, &bad), SC_OK);
        CHECK(bad == 12345); /* untouched on success */
    }
    CHECK_ST(sc_verify_page_checksums(buf, ps, 0, sums, 0, &bad), SC_OK);
    buf[900 * ps + 17] ^= 1;
    buf[901 * ps] ^= 0x80;
    for (int threads = 0; threads <= 3; threads++) {
        bad = 0;
        CHECK_ST(sc_verify_page_checksums(buf, ps, n, sums, threads, &bad), SC_ECORRUPT);
        CHECK(bad == 900);
    }
    buf[3 * ps + ps - 1] ^= 4; /* the lowest failing page is reported, whichever thread */
    CHECK_ST(sc_verify_page_checksums(buf, ps, n, sums, 2, &bad), SC_ECORRUPT);
    CHECK(bad == 3);
    CHECK_ST(sc_verify_page_checksums(buf, ps, n, sums, 2, NULL), SC_ECORRUPT);
    free(buf);
    free(sums);
}

static uint8_t *aligned_buffer(uint64_t len) {
    void *p = NULL;
    return posix_memalign(&p, 64, len ? len : 8) == 0 ? p : NULL;
}

/* delta(since, until] of a page list, in parts: each part parses and verifies, together
 * they are exactly sc_delta_build's pages, and applied to an empty store they rebuild the
 * snapshot, even while the source store is written after the snapshot. */
static void test_build_pages(void) {
    const uint32_t ps = 1024;
    const uint64_t n_pages = 100;
    sc_store *s = NULL, *r = NULL;
    CHECK_ST(sc_store_open(NULL, n_pages * ps, ps, &s), SC_OK);
    CHECK_ST(sc_store_open(NULL, n_pages * ps, ps, &r), SC_OK);
    REQUIRE(s && r);
    uint8_t *page = malloc(ps), *want = malloc(n_pages * ps);
    REQUIRE(page && want);
    for (int round = 0; round < 3; round++) {
        for (int w = 0; w < 40; w++) {
            fill(page, ps);
            CHECK_ST(sc_store_write(s, (rnd() % n_pages) * ps, page, ps), SC_OK);
        }
        uint64_t e0 = 0;
        CHECK_ST(sc_snapshot_take(s, &e0), SC_OK);
    }
    uint64_t until = 0;
    CHECK_ST(sc_snapshot_take(s, &until), SC_OK);
    memcpy(want, sc_store_data(s), n_pages * ps);
    /* Writes after the snapshot: the parts must still carry the snapshot's bytes. */
    for (int w = 0; w < 30; w++) {
        fill(page, ps);
        CHECK_ST(sc_store_write(s, (rnd() % n_pages) * ps, page, ps), SC_OK);
    }
    uint64_t *ids = NULL, *vers = NULL, n = 0;
    CHECK_ST(sc_changed_pages(s, 0, until, &ids, &vers, &n), SC_OK);
    REQUIRE(n > 10);
    uint8_t *whole = NULL;
    uint64_t whole_len = 0;
    CHECK_ST(sc_delta_build(s, 0, until, &whole, &whole_len), SC_OK);
    sc_delta_view wv;
    uint64_t bad = 0;
    CHECK_ST(sc_delta_parse(whole, whole_len, SC_KIND_DELTA, 1, &wv, &bad), SC_OK);

    const uint64_t per = 7;
    uint64_t cap = sc_delta_pages_bytes(per, ps);
    CHECK(cap == SC_HEADER_SIZE + per * (24 + ps));
    uint8_t *buf = aligned_buffer(cap);
    REQUIRE(buf);
    for (uint64_t first = 0; first < n; first += per) {
        uint64_t k = n - first < per ? n - first : per, used = 0;
        CHECK_ST(sc_delta_build_pages(s, 0, until, ids + first, k, buf, cap, &used), SC_OK);
        CHECK(used == sc_delta_pages_bytes(k, ps));
        sc_delta_view v;
        CHECK_ST(sc_delta_parse(buf, used, SC_KIND_DELTA, 1, &v, &bad), SC_OK);
        CHECK(v.header.base_epoch == 0 && v.header.target_epoch == until);
        CHECK(v.header.n_pages == k && v.header.store_pages == n_pages);
        CHECK(memcmp(v.header.store_uuid, sc_store_uuid(s), 16) == 0);
        for (uint64_t i = 0; i < k; i++) {
            CHECK(v.ids[i] == wv.ids[first + i]);
            CHECK(v.versions[i] == wv.versions[first + i]);
            CHECK(v.checksums[i] == wv.checksums[first + i]);
            CHECK(memcmp(v.payload + i * ps, wv.payload + (first + i) * ps, ps) == 0);
        }
        uint64_t written = 0;
        CHECK_ST(sc_delta_apply(r, &v, v.payload, 0, &written), SC_OK);
        CHECK(written == k);
    }
    CHECK(memcmp(sc_store_data(r), want, n_pages * ps) == 0);

    /* Refusals: nothing from outside the rules is built. */
    uint64_t used = 0;
    CHECK_ST(sc_delta_build_pages(s, until + 1, until, ids, 1, buf, cap, &used), SC_EINVAL);
    CHECK_ST(sc_delta_build_pages(s, 0, until, ids, per, buf, cap - 1, &used), SC_EINVAL);
    CHECK_ST(sc_delta_build_pages(s, 0, until, ids, per, buf + 4, cap - 8, &used), SC_EINVAL);
    CHECK_ST(sc_delta_build_pages(s, 0, until, ids, 1, NULL, cap, &used), SC_EINVAL);
    CHECK_ST(sc_delta_build_pages(s, 0, until, NULL, 1, buf, cap, &used), SC_EINVAL);
    uint64_t pair[2] = {ids[1], ids[0]}; /* not increasing */
    CHECK_ST(sc_delta_build_pages(s, 0, until, pair, 2, buf, cap, &used), SC_EINVAL);
    pair[0] = ids[0];
    pair[1] = ids[0];
    CHECK_ST(sc_delta_build_pages(s, 0, until, pair, 2, buf, cap, &used), SC_EINVAL);
    uint64_t far = n_pages;
    CHECK_ST(sc_delta_build_pages(s, 0, until, &far, 1, buf, cap, &used), SC_ERANGE);
    /* A page not changed in (since, until]: not a page of that delta. */
    CHECK_ST(sc_delta_build_pages(s, vers[0], until, ids, 1, buf, cap, &used), SC_EINVAL);
    CHECK_ST(sc_delta_build_pages(s, 0, until + 1000, ids, 1, buf, cap, &used), SC_ENOSNAP);
    /* No pages: a bare header, still a valid delta. */
    CHECK_ST(sc_delta_build_pages(s, 0, until, NULL, 0, buf, cap, &used), SC_OK);
    CHECK(used == SC_HEADER_SIZE);
    sc_delta_view v0;
    CHECK_ST(sc_delta_parse(buf, used, SC_KIND_DELTA, 1, &v0, &bad), SC_OK);
    CHECK(v0.header.n_pages == 0);
    CHECK_ST(sc_snapshot_release(s, until), SC_OK);
    CHECK_ST(sc_delta_build_pages(s, 0, until, ids, 1, buf, cap, &used), SC_ENOSNAP);

    free(buf);
    sc_buffer_free(whole, whole_len);
    free(ids);
    free(vers);
    free(page);
    free(want);
    sc_store_close(s);
    sc_store_close(r);
}

typedef struct { const char *name; void (*fn)(void); } test_case;

static const test_case tests[] = {
    {"batch_checksums", test_batch_checksums},
    {"verify", test_verify},
    {"build_pages", test_build_pages},
};

int main(int argc, char **argv) {
    uint64_t seed = argc > 1 ? strtoull(argv[1], NULL, 0) : 0x5eedULL;
    int passed = 0, failed = 0;
    for (size_t i = 0; i < sizeof tests / sizeof tests[0]; i++) {
        g_rng = seed + i * 0x1000193ULL;
        long before = g_failures;
        tests[i].fn();
        if (g_failures == before) {
            passed++;
        } else {
            failed++;
            fprintf(stderr, "FAIL %s (%ld checks)\n", tests[i].name, g_failures - before);
        }
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
