/* C-level tests of the keyed-state map (csrc/kv*.c), meant for AddressSanitizer + UBSan.
 * A random model test against a reference array, snapshot views, full-store atomicity
 * (single and batch puts), byte-flip fuzzing of a map's region (must never crash), and
 * (built with -DSC_FAULT_INJECTION) every allocation of a writer-side call failing in
 * turn, which must leave the store's bytes as they were.
 * Last line: "N passed, M failed"; non-zero exit on failure. Optional argv[1]: seed. */
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "harness.h"
#include "internal.h" /* sc_test_allocs_left */
#include "kv.h"
#include "statecore.h"

static uint64_t g_rng = 0x6b76u;

#define CHECK_ST(expr, want) CHECK_STATUS(expr, want, sc_kv_strerror)

static uint64_t rnd(void) {
    uint64_t z = (g_rng += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}
static uint64_t below(uint64_t n) { return n ? rnd() % n : 0; }

static void verify_ok(sc_kv *kv) {
    char msg[256];
    int st = sc_kv_verify(kv, msg, sizeof msg);
    if (st != SC_OK) fprintf(stderr, "verify: %s\n", msg);
    CHECK_ST(st, SC_OK);
}

/* ---- reference model -------------------------------------------------------------------- */
#define NKEYS 3000
typedef struct model {
    uint8_t present[NKEYS];
    uint32_t vlen[NKEYS];
    uint8_t *val[NKEYS];
} model;

static uint64_t key_of(int id, uint8_t *buf) {
    /* distinct keys of lengths 4..40, and the empty key for id 0 */
    if (!id) return 0;
    uint64_t n = 4 + (uint64_t)(id * 7) % 37;
    for (uint64_t i = 0; i < n; i++) buf[i] = (uint8_t)(id * 31 + i * 17 + (id >> 8));
    memcpy(buf, &id, 4);
    return n;
}

static void make_value(uint8_t *buf, uint32_t n) {
    for (uint32_t i = 0; i < n; i++) buf[i] = (uint8_t)rnd();
}

static void model_set(model *m, int id, const uint8_t *v, uint32_t n) {
    free(m->val[id]);
    m->val[id] = malloc(n ? n : 1);
    memcpy(m->val[id], v, n);
    m->vlen[id] = n;
    m->present[id] = 1;
}

static void model_free(model *m) {
    for (int i = 0; i < NKEYS; i++) free(m->val[i]);
}

static uint64_t model_count(const model *m) {
    uint64_t n = 0;
    for (int i = 0; i < NKEYS; i++) n += m->present[i];
    return n;
}

static void check_all(sc_kv *kv, const model *m) {
    uint8_t key[64], buf[2048];
    for (int id = 0; id < NKEYS; id++) {
        uint64_t kl = key_of(id, key), off = 0, vl = 0;
        int found = -1;
        CHECK_ST(sc_kv_get(kv, key, kl, &off, &vl, &found), SC_OK);
        CHECK(found == m->present[id]);
        if (found && m->present[id]) {
            CHECK(vl == m->vlen[id]);
            if (vl == m->vlen[id] && vl <= sizeof buf) {
                CHECK_ST(sc_kv_read(kv, off, buf, vl), SC_OK);
                CHECK(memcmp(buf, m->val[id], vl) == 0);
            }
        }
    }
    /* the batch path (live handles and snapshot views): get_many, then read_many */
    {
        enum { B = 300 };
        static uint8_t kbuf[B][64], vbuf[B][1536];
        sc_kv_buf ks[B];
        uint64_t offs[B], lens[B], failed;
        void *dst[B];
        for (int first = 0; first < NKEYS; first += B) {
            int nb = NKEYS - first < B ? NKEYS - first : B;
            for (int i = 0; i < nb; i++) {
                ks[i].len = key_of(first + i, kbuf[i]);
                ks[i].ptr = kbuf[i];
            }
            CHECK_ST(sc_kv_get_many(kv, ks, (uint64_t)nb, offs, lens), SC_OK);
            for (int i = 0; i < nb; i++) {
                CHECK((lens[i] != UINT64_MAX) == m->present[first + i]);
                dst[i] = lens[i] != UINT64_MAX && lens[i] <= sizeof vbuf[i] ? vbuf[i] : NULL;
            }
            CHECK_ST(sc_kv_read_many(kv, offs, lens, dst, (uint64_t)nb, &failed), SC_OK);
            for (int i = 0; i < nb; i++)
                if (dst[i] && lens[i] == m->vlen[first + i])
                    CHECK(memcmp(dst[i], m->val[first + i], lens[i]) == 0);
        }
    }
    sc_kv_stats s;
    CHECK_ST(sc_kv_stat(kv, &s), SC_OK);
    CHECK(s.count == model_count(m));
    /* iteration visits each key once */
    sc_kv_cursor cur = {0, 0};
    sc_kv_entry ent[37];
    uint64_t n, total = 0;
    do {
        CHECK_ST(sc_kv_scan(kv, &cur, ent, 37, &n), SC_OK);
        total += n;
    } while (n == 37);
    CHECK(total == s.count);
}

static void test_model(void) {
    sc_store *s;
    REQUIRE(sc_store_open(NULL, 4u << 20, 4096, &s) == SC_OK);
    sc_kv *kv;
    REQUIRE(sc_kv_open(s, 0, 4u << 20, 0, 0, &kv) == SC_OK);
    model *m = calloc(1, sizeof *m);
    uint8_t key[64], val[1500];
    int present;
    CHECK_ST(sc_kv_probe(kv, &present), SC_OK);
    CHECK(present == 0);
    uint64_t snap = 0;
    model *snap_model = NULL;
    for (int step = 0; step < 40000; step++) {
        int op = (int)below(100), id = (int)below(NKEYS);
        uint64_t kl = key_of(id, key);
        if (op < 55) {
            uint32_t vl = (uint32_t)(below(10) == 0 ? below(1500) : below(120));
            make_value(val, vl);
            CHECK_ST(sc_kv_put(kv, key, kl, val, vl), SC_OK);
            model_set(m, id, val, vl);
        } else if (op < 80) {
            int found = -1;
            CHECK_ST(sc_kv_delete(kv, key, kl, &found), SC_OK);
            CHECK(found == m->present[id]);
            m->present[id] = 0;
        } else if (op < 90) {
            /* batch put of 1..50 items (repeats allowed: last wins) */
            enum { B = 50 };
            static uint8_t kbuf[B][64], vbuf[B][200];
            sc_kv_buf ks[B], vs[B];
            int nb = 1 + (int)below(B);
            for (int i = 0; i < nb; i++) {
                int bid = (int)below(NKEYS);
                ks[i].len = key_of(bid, kbuf[i]);
                ks[i].ptr = kbuf[i];
                vs[i].len = below(200);
                make_value(vbuf[i], (uint32_t)vs[i].len);
                vs[i].ptr = vbuf[i];
                model_set(m, bid, vbuf[i], (uint32_t)vs[i].len);
            }
            uint64_t failed;
            CHECK_ST(sc_kv_put_many(kv, ks, vs, (uint64_t)nb, &failed), SC_OK);
        } else if (op < 95) {
            enum { B = 40 };
            static uint8_t kbuf[B][64];
            sc_kv_buf ks[B];
            int nb = 1 + (int)below(B), expect = 0;
            uint8_t seen[NKEYS] = {0};
            for (int i = 0; i < nb; i++) {
                int bid = (int)below(NKEYS);
                ks[i].len = key_of(bid, kbuf[i]);
                ks[i].ptr = kbuf[i];
                if (m->present[bid] && !seen[bid]) expect++;
                seen[bid] = 1;
                m->present[bid] = 0;
            }
            uint64_t deleted;
            CHECK_ST(sc_kv_delete_many(kv, ks, (uint64_t)nb, &deleted), SC_OK);
            CHECK(deleted == (uint64_t)expect);
        } else if (op < 97 && below(8) == 0) {
            /* snapshot: a view must keep reading the state as of the snapshot */
            if (snap) {
                sc_kv *view;
                REQUIRE(sc_kv_open(s, 0, 4u << 20, snap, 0, &view) == SC_OK);
                check_all(view, snap_model);
                verify_ok(view);
                CHECK_ST(sc_kv_put(view, key, kl, val, 1), SC_KV_READONLY);
                sc_kv_close(view);
                sc_snapshot_release(s, snap);
                model_free(snap_model);
                free(snap_model);
            }
            REQUIRE(sc_snapshot_take(s, &snap) == SC_OK);
            snap_model = calloc(1, sizeof *snap_model);
            for (int i = 0; i < NKEYS; i++)
                if (m->present[i]) model_set(snap_model, i, m->val[i], m->vlen[i]);
        } else {
            uint64_t off, vl;
            int found;
            CHECK_ST(sc_kv_get(kv, key, kl, &off, &vl, &found), SC_OK);
            CHECK(found == m->present[id]);
        }
        if (step % 4000 == 0) {
            verify_ok(kv);
            check_all(kv, m);
        }
    }
    verify_ok(kv);
    check_all(kv, m);
    /* batch get agrees with single gets */
    {
        enum { B = 500 };
        static uint8_t kbuf[B][64];
        sc_kv_buf ks[B];
        uint64_t offs[B], lens[B];
        for (int i = 0; i < B; i++) {
            ks[i].len = key_of(i * 5, kbuf[i]);
            ks[i].ptr = kbuf[i];
        }
        CHECK_ST(sc_kv_get_many(kv, ks, B, offs, lens), SC_OK);
        for (int i = 0; i < B; i++) {
            CHECK((lens[i] != UINT64_MAX) == m->present[i * 5]);
            if (lens[i] != UINT64_MAX) CHECK(lens[i] == m->vlen[i * 5]);
        }
        /* read_many copies exactly the values found; NULL destinations are skipped */
        void *dst[B];
        uint64_t failed;
        for (int i = 0; i < B; i++) dst[i] = lens[i] == UINT64_MAX ? NULL : malloc(lens[i] + 1);
        CHECK_ST(sc_kv_read_many(kv, offs, lens, dst, B, &failed), SC_OK);
        CHECK(failed == B);
        for (int i = 0; i < B; i++)
            if (dst[i]) CHECK(memcmp(dst[i], m->val[i * 5], lens[i]) == 0);
        /* a range outside the region is refused, and *failed_at names the item */
        int j = -1;
        for (int i = B - 1; i >= 0 && j < 0; i--)
            if (dst[i] && lens[i]) j = i;
        REQUIRE(j >= 0);
        uint64_t keep = offs[j];
        offs[j] = UINT64_MAX - 2;
        CHECK_ST(sc_kv_read_many(kv, offs, lens, dst, B, &failed), SC_ERANGE);
        CHECK(failed == (uint64_t)j);
        offs[j] = keep;
        lens[j] = UINT64_MAX - 1;
        CHECK_ST(sc_kv_read_many(kv, offs, lens, dst, B, &failed), SC_ERANGE);
        CHECK(failed == (uint64_t)j);
        for (int i = 0; i < B; i++) free(dst[i]);
    }
    sc_kv_stats st;
    CHECK_ST(sc_kv_stat(kv, &st), SC_OK);
    CHECK(st.splits > 0);
    CHECK_ST(sc_kv_clear(kv), SC_OK);
    CHECK_ST(sc_kv_stat(kv, &st), SC_OK);
    CHECK(st.count == 0);
    verify_ok(kv);
    if (snap) {
        sc_snapshot_release(s, snap);
        model_free(snap_model);
        free(snap_model);
    }
    model_free(m);
    free(m);
    sc_kv_close(kv);
    sc_store_close(s);
}

/* ---- full store: nothing half-written ------------------------------------------------------- */
static uint64_t map_digest(sc_kv *kv, uint64_t *count) {
    sc_kv_cursor cur = {0, 0};
    sc_kv_entry ent[64];
    uint64_t n, d = 0;
    *count = 0;
    uint8_t buf[4096];
    do {
        if (sc_kv_scan(kv, &cur, ent, 64, &n) != SC_OK) return 0;
        for (uint64_t i = 0; i < n; i++) {
            uint64_t h[2];
            sc_kv_read(kv, ent[i].key_off, buf, ent[i].klen);
            uint64_t kh = sc_kv_hash(buf, ent[i].klen);
            sc_kv_read(kv, ent[i].val_off, buf, ent[i].vlen);
            sc_murmur3_128(buf, ent[i].vlen, (uint32_t)kh, h);
            d += h[0] ^ kh;  /* order-independent */
        }
        *count += n;
    } while (n == 64);
    return d;
}

static void test_full(void) {
    sc_store *s;
    uint64_t size = 256u << 10;
    REQUIRE(sc_store_open(NULL, size, 4096, &s) == SC_OK);
    sc_kv *kv;
    REQUIRE(sc_kv_open(s, 0, size, 0, 0, &kv) == SC_OK);
    uint8_t key[16], val[3000];
    int i = 0, st = SC_OK;
    for (; i < 100000; i++) {
        memcpy(key, &i, 4);
        memset(key + 4, 'k', 12);
        make_value(val, 100);
        st = sc_kv_put(kv, key, 16, val, 100);
        if (st != SC_OK) break;
    }
    CHECK_ST(st, SC_KV_FULL);
    verify_ok(kv);
    uint64_t c0, d0 = map_digest(kv, &c0);
    CHECK(c0 == (uint64_t)i);
    /* a failing single put changes nothing visible */
    memcpy(key, &i, 4);
    CHECK_ST(sc_kv_put(kv, key, 16, val, 2900), SC_KV_FULL);
    int zero = 0;
    memcpy(key, &zero, 4);
    CHECK_ST(sc_kv_put(kv, key, 16, val, 2900), SC_KV_FULL);  /* overwrite that cannot fit */
    uint64_t c1, d1 = map_digest(kv, &c1);
    CHECK(c1 == c0 && d1 == d0);
    verify_ok(kv);
    /* free some room, then a batch that overwrites, inserts and runs out part-way */
    for (int j = 0; j < i; j += 3) {
        int found;
        memcpy(key, &j, 4);
        CHECK_ST(sc_kv_delete(kv, key, 16, &found), SC_OK);
    }
    verify_ok(kv);
    c0 = 0;
    d0 = map_digest(kv, &c0);
    enum { B = 400 };
    static uint8_t kb[B][16], vb[B][300];
    sc_kv_buf ks[B], vs[B];
    for (int j = 0; j < B; j++) {
        int id = j % 3 == 0 ? j + 1 : 200000 + j; /* overwrites of live keys, then new keys */
        memcpy(kb[j], &id, 4);
        memset(kb[j] + 4, 'k', 12);
        ks[j] = (sc_kv_buf){kb[j], 16};
        uint64_t vl = j % 2 ? 100 : 300;  /* same size: in place; bigger: replaced */
        make_value(vb[j], (uint32_t)vl);
        vs[j] = (sc_kv_buf){vb[j], vl};
    }
    uint64_t failed = 0;
    CHECK_ST(sc_kv_put_many(kv, ks, vs, B, &failed), SC_KV_FULL);
    CHECK(failed < B);
    c1 = 0;
    d1 = map_digest(kv, &c1);
    CHECK(c1 == c0 && d1 == d0);
    verify_ok(kv);
    /* a batch that fits succeeds (300-byte values cannot use the 144-byte holes) */
    for (int j = 0; j < 20; j++) vs[j].len = 100;
    CHECK_ST(sc_kv_put_many(kv, ks, vs, 20, &failed), SC_OK);
    verify_ok(kv);
    sc_kv_close(kv);
    sc_store_close(s);
}

/* A single put whose record fits in the wilderness and whose overflow bucket then does not:
 * the region's bytes stay as they were, the wilderness's included. */
static void test_full_single_put_restores(void) {
    uint64_t size = SC_KV_MIN_REGION;
    sc_store *s;
    sc_kv *kv;
    REQUIRE(sc_store_open(NULL, size, 4096, &s) == SC_OK);
    REQUIRE(sc_kv_open(s, 0, size, 0, 0, &kv) == SC_OK);
    uint8_t key[24], val[4096] = {0};
    int made = 0;
    /* 7 keys fill bucket 0 of the 16 (no split before 56 keys); the 8th needs a bucket */
    for (int c = 0; made < 8; c++) {
        uint64_t kl = (uint64_t)snprintf((char *)key, sizeof key, "b0-%d", c);
        if (sc_kv_hash(key, kl) & 15) continue;
        if (made++ < 7) {
            CHECK_ST(sc_kv_put(kv, key, kl, val, 40), SC_OK);
            continue;
        }
        sc_kv_stats st;
        CHECK_ST(sc_kv_stat(kv, &st), SC_OK);
        uint64_t vl = st.wilderness_bytes - 100 - 16 - kl;  /* the record leaves 100 bytes */
        uint8_t *image = malloc(size), *now = malloc(size);
        sc_store_read(s, 0, image, size);
        CHECK_ST(sc_kv_put(kv, key, kl, val, vl), SC_KV_FULL);
        sc_store_read(s, 0, now, size);
        CHECK(memcmp(image, now, size) == 0);
        verify_ok(kv);
        free(image);
        free(now);
    }
    sc_kv_close(kv);
    sc_store_close(s);
}

/* ---- fuzz: damaged bytes never crash --------------------------------------------------------- */
static void test_fuzz(void) {
    uint64_t size = 512u << 10;
    for (int round = 0; round < 300; round++) {
        sc_store *s;
        REQUIRE(sc_store_open(NULL, size, 4096, &s) == SC_OK);
        sc_kv *kv;
        REQUIRE(sc_kv_open(s, 0, size, 0, 0, &kv) == SC_OK);
        uint8_t key[40], val[300];
        for (int i = 0; i < 600; i++) {
            uint64_t kl = key_of(i, key);
            make_value(val, (uint32_t)below(300));
            sc_kv_put(kv, key, kl, val, below(300));
        }
        for (int i = 0; i < 600; i += 4) {
            int f;
            uint64_t kl = key_of(i, key);
            sc_kv_delete(kv, key, kl, &f);
        }
        sc_kv_stats st;
        sc_kv_stat(kv, &st);
        /* damage: flip random bytes, mostly in the used part of the region */
        int flips = 1 + (int)below(8);
        for (int f = 0; f < flips; f++) {
            uint64_t at = below(10) < 3 ? below(2560) : below(size - st.wilderness_bytes);
            uint8_t b;
            sc_store_read(s, at, &b, 1);
            b ^= (uint8_t)(1u << below(8));
            if (below(4) == 0) b = (uint8_t)rnd();
            sc_store_write(s, at, &b, 1);
        }
        char msg[200];
        sc_kv_verify(kv, msg, sizeof msg);
        /* batch lookups on the damaged map: whatever they find is within the region */
        {
            enum { B = 64 };
            static uint8_t kbuf[B][40], vbuf[B][400];
            sc_kv_buf ks[B];
            uint64_t offs[B], lens[B], failed;
            void *dst[B];
            for (int i = 0; i < B; i++) {
                ks[i].len = key_of((int)below(800), kbuf[i]);
                ks[i].ptr = kbuf[i];
            }
            if (sc_kv_get_many(kv, ks, B, offs, lens) == SC_OK) {
                for (int i = 0; i < B; i++)
                    dst[i] = lens[i] != UINT64_MAX && lens[i] <= sizeof vbuf[i] ? vbuf[i] : NULL;
                CHECK_ST(sc_kv_read_many(kv, offs, lens, dst, B, &failed), SC_OK);
            }
        }
        for (int i = 0; i < 800; i++) {
            uint64_t kl = key_of((int)below(800), key), off, vl;
            int found, op = (int)below(4);
            if (op == 0) {
                if (sc_kv_get(kv, key, kl, &off, &vl, &found) == SC_OK && found) {
                    uint8_t buf[400];
                    if (vl <= sizeof buf) CHECK_ST(sc_kv_read(kv, off, buf, vl), SC_OK);
                }
            } else if (op == 1 && below(8) == 0) {
                /* a batch put (its pipeline reads buckets and records ahead) */
                enum { B = 24 };
                static uint8_t kbuf[B][40];
                sc_kv_buf ks[B], vs[B];
                uint64_t failed;
                for (int b = 0; b < B; b++) {
                    ks[b].len = key_of((int)below(800), kbuf[b]);
                    ks[b].ptr = kbuf[b];
                    vs[b].len = below(300);
                    vs[b].ptr = val;
                }
                sc_kv_put_many(kv, ks, vs, B, &failed);
            } else if (op == 1) {
                sc_kv_put(kv, key, kl, val, below(300));
            } else if (op == 2) {
                sc_kv_delete(kv, key, kl, &found);
            } else {
                sc_kv_cursor cur = {0, 0};
                sc_kv_entry ent[16];
                uint64_t n;
                int guard = 0;
                while (sc_kv_scan(kv, &cur, ent, 16, &n) == SC_OK && n == 16 && guard++ < 1000) {}
            }
        }
        sc_kv_verify(kv, msg, sizeof msg);
        sc_kv_close(kv);
        sc_store_close(s);
    }
}

/* ---- arguments ----------------------------------------------------------------------------------- */
static void test_args(void) {
    sc_store *s;
    REQUIRE(sc_store_open(NULL, 64u << 10, 4096, &s) == SC_OK);
    sc_kv *kv;
    CHECK_ST(sc_kv_open(s, 100, 8192, 0, 0, &kv), SC_EINVAL);      /* unaligned base */
    CHECK_ST(sc_kv_open(s, 0, 4096, 0, 0, &kv), SC_EINVAL);        /* too small */
    CHECK_ST(sc_kv_open(s, 32768, 65536, 0, 0, &kv), SC_EINVAL);   /* past the end */
    CHECK_ST(sc_kv_open(s, 0, 65536, 0, 1u << 30, &kv), SC_OK);
    uint8_t k = 1;
    CHECK_ST(sc_kv_put(kv, &k, 1, &k, 1), SC_KV_FULL);             /* capacity too large */
    sc_kv_close(kv);
    CHECK_ST(sc_kv_open(s, 0, 65536, 0, 0, &kv), SC_OK);
    CHECK_ST(sc_kv_put(kv, &k, SC_KV_MAX_KEY + 1ull, &k, 1), SC_EINVAL);
    CHECK_ST(sc_kv_put(kv, &k, 1, &k, SC_KV_MAX_VALUE + 1ull), SC_EINVAL);
    /* a region with data but no header is refused, and the data stays */
    sc_store_write(s, 40000, "x", 1);
    uint8_t x = 0;
    CHECK_ST(sc_kv_put(kv, &k, 1, &k, 1), SC_KV_NOT_EMPTY);
    sc_store_read(s, 40000, &x, 1);
    REQUIRE(x == 'x');  /* else the region is a map's now, and the rest would fail too */
    sc_kv_buf kb = {&k, 1};
    uint64_t failed;
    CHECK_ST(sc_kv_put_many(kv, &kb, &kb, 1, &failed), SC_KV_NOT_EMPTY);
    x = 0;
    sc_store_read(s, 40000, &x, 1);
    CHECK(x == 'x');
    sc_kv_close(kv);
    CHECK_ST(sc_kv_open(s, 0, 32768, 0, 0, &kv), SC_OK);
    CHECK_ST(sc_kv_put(kv, &k, 1, &k, 1), SC_OK);
    sc_kv_close(kv);
    /* the same region opened with another length: a mismatch, and the length it needs */
    kv = NULL;
    CHECK_ST(sc_kv_open(s, 0, 16384, 0, 0, &kv), SC_KV_MISMATCH);
    CHECK(kv == NULL);
    uint64_t recorded = 0;
    CHECK_ST(sc_kv_recorded_size(s, 0, 0, &recorded), SC_OK);
    CHECK(recorded == 32768);
    uint64_t snap;
    REQUIRE(sc_snapshot_take(s, &snap) == SC_OK);
    CHECK_ST(sc_kv_open(s, 0, 16384, snap, 0, &kv), SC_KV_MISMATCH);
    CHECK_ST(sc_kv_recorded_size(s, 0, snap, &recorded), SC_OK);
    CHECK(recorded == 32768);
    sc_snapshot_release(s, snap);
    CHECK_ST(sc_kv_recorded_size(s, 32768, 0, &recorded), SC_OK);
    CHECK(recorded == 0);  /* no map there */
    /* a recorded length no region could have is damage, not a mismatch */
    uint64_t bogus = 12345;
    sc_store_write(s, 16, &bogus, 8);
    CHECK_ST(sc_kv_open(s, 0, 32768, 0, 0, &kv), SC_OK);
    int present;
    CHECK_ST(sc_kv_probe(kv, &present), SC_ECORRUPT);
    sc_kv_close(kv);
    sc_store_close(s);
}

/* ---- a failed batch leaves the allocator and the table as they were ---------------------- */
static void stats_equal(const sc_kv_stats *a, const sc_kv_stats *b) {
    CHECK(a->count == b->count && a->changes == b->changes);
    CHECK(a->buckets == b->buckets && a->level == b->level && a->split == b->split);
    CHECK(a->splits == b->splits && a->overflow_buckets == b->overflow_buckets);
    CHECK(a->used_bytes == b->used_bytes && a->free_bytes == b->free_bytes);
    CHECK(a->wilderness_bytes == b->wilderness_bytes);
}

static bool region_is_zero(sc_store *s, uint64_t len) {
    static uint8_t buf[1u << 16];
    for (uint64_t at = 0; at < len; at += sizeof buf) {
        uint64_t n = len - at < sizeof buf ? len - at : sizeof buf;
        sc_store_read(s, at, buf, n);
        for (uint64_t i = 0; i < n; i++)
            if (buf[i]) return false;
    }
    return true;
}

static void test_full_batch_restores(void) {
    uint64_t size = 256u << 10;
    sc_store *s;
    REQUIRE(sc_store_open(NULL, size, 4096, &s) == SC_OK);
    sc_kv *kv;
    REQUIRE(sc_kv_open(s, 0, size, 0, 0, &kv) == SC_OK);
    enum { B = 3000 };
    static uint8_t kb[B][16], vb[200];
    sc_kv_buf ks[B], vs[B];
    memset(vb, 'v', sizeof vb);
    for (int j = 0; j < B; j++) {
        snprintf((char *)kb[j], sizeof kb[j], "k%06d", j);
        ks[j] = (sc_kv_buf){kb[j], 7};
        vs[j] = (sc_kv_buf){vb, 60};
    }
    uint64_t failed;
    CHECK_ST(sc_kv_put_many(kv, ks, vs, 200, &failed), SC_OK);
    /* some holes below the top, and values rewritten in place and replaced */
    for (int j = 0; j < 200; j += 5) {
        int found;
        CHECK_ST(sc_kv_delete(kv, ks[j].ptr, 7, &found), SC_OK);
    }
    sc_kv_stats before, after;
    CHECK_ST(sc_kv_stat(kv, &before), SC_OK);
    uint64_t top = size - before.wilderness_bytes;
    uint8_t *image = malloc(top), *now = malloc(top);
    sc_store_read(s, 0, image, top);
    uint64_t snap;
    REQUIRE(sc_snapshot_take(s, &snap) == SC_OK);
    /* overwrites in place (60), replacements (150) and new keys until the region is full:
     * the batch splits buckets and reserves segments before it runs out of room */
    for (int j = 0; j < B; j++) vs[j].len = j < 100 ? (j % 2 ? 60 : 150) : 60;
    CHECK_ST(sc_kv_put_many(kv, ks, vs, B, &failed), SC_KV_FULL);
    CHECK(failed > 1000 && failed < B);
    CHECK_ST(sc_kv_stat(kv, &after), SC_OK);
    stats_equal(&before, &after);
    sc_store_read(s, 0, now, top);
    CHECK(memcmp(image, now, top) == 0);  /* the map's bytes, exactly */
    verify_ok(kv);
    /* a snapshot taken before reads the same map (restoring is tracked like any write) */
    sc_kv *view;
    REQUIRE(sc_kv_open(s, 0, size, snap, 0, &view) == SC_OK);
    verify_ok(view);
    uint64_t c0, c1, d0 = map_digest(kv, &c0), d1 = map_digest(view, &c1);
    CHECK(c0 == c1 && d0 == d1 && c0 == 160);
    sc_kv_close(view);
    sc_snapshot_release(s, snap);
    /* what fit before the failed batch still fits: the wilderness was given back */
    uint64_t big_len = before.wilderness_bytes - 4096;
    uint8_t *big = calloc(1, big_len);
    CHECK_ST(sc_kv_put(kv, "big", 3, big, big_len), SC_OK);
    verify_ok(kv);
    free(big);
    free(image);
    free(now);
    sc_kv_close(kv);

    sc_store_close(s);

    /* a failing first write leaves no map behind: the region is all zero again */
    uint64_t small = 64u << 10;
    REQUIRE(sc_store_open(NULL, small, 4096, &s) == SC_OK);
    REQUIRE(sc_kv_open(s, 0, small, 0, 0, &kv) == SC_OK);
    uint8_t *v = calloc(1, 100u << 10);
    memset(v, 'x', 100u << 10);
    int present = -1;
    CHECK_ST(sc_kv_put(kv, "k", 1, v, 100u << 10), SC_KV_FULL);
    CHECK_ST(sc_kv_probe(kv, &present), SC_OK);
    CHECK(present == 0);
    CHECK(region_is_zero(s, small));
    for (int j = 0; j < B; j++) vs[j].len = 100;
    CHECK_ST(sc_kv_put_many(kv, ks, vs, 1000, &failed), SC_KV_FULL);
    CHECK_ST(sc_kv_probe(kv, &present), SC_OK);
    CHECK(present == 0);
    CHECK(region_is_zero(s, small));
    CHECK_ST(sc_kv_put(kv, "k", 1, v, 100), SC_OK);  /* and a write that fits creates it */
    verify_ok(kv);
    free(v);
    sc_kv_close(kv);
    sc_store_close(s);
}

/* ---- allocation failures: a failed call changes nothing ------------------------------------ */
#ifdef SC_FAULT_INJECTION
/* The map's region lies inside the store; under a snapshot the pages around it are written
 * first (each takes a slot of the pool's first chunk), so that the call under test fills
 * that chunk and needs the next one part-way, after it has changed the map. */
#define AF_PS 4096u
#define AF_BASE (1u << 20)
#define AF_LEN (2u << 20)
#define AF_SIZE (5u << 20)
#define AF_SLOTS ((2u << 20) / AF_PS) /* pages per pool chunk */
#define AF_KEYS 600
#define AF_MAX 300                    /* items in a batch */
#define AF_COLLIDING 130

typedef struct af_batch {
    uint64_t n, used;
    sc_kv_buf k[AF_MAX], v[AF_MAX];
    uint8_t kb[AF_MAX][24];
    uint8_t vb[1u << 20];
} af_batch;

static af_batch g_mixed, g_chain;  /* the batches put_many writes */
static uint8_t *g_full, *g_small;  /* stores with a map: AF_KEYS keys; one key */

static uint64_t af_key(int id, uint8_t *buf) {
    return (uint64_t)snprintf((char *)buf, 24, "af-%07d", id);
}

static void af_add(af_batch *b, const uint8_t *key, uint64_t klen, uint64_t vlen) {
    memcpy(b->kb[b->n], key, klen);
    make_value(b->vb + b->used, (uint32_t)vlen);
    b->k[b->n] = (sc_kv_buf){b->kb[b->n], klen};
    b->v[b->n] = (sc_kv_buf){b->vb + b->used, vlen};
    b->used += vlen;
    b->n++;
}

/* Overwrites in place and by a bigger record, new keys (some into freed blocks, each
 * splitting a bucket), a repeated key, and values that span pages. */
static void af_make_mixed(af_batch *b) {
    uint8_t key[24];
    for (int id = 1; id < 200; id += 2) af_add(b, key, af_key(id, key), id % 4 == 1 ? 40 : 260);
    for (int id = 0; id < 60; id++) af_add(b, key, af_key(2 * AF_KEYS + id, key), 30);
    af_add(b, key, af_key(1, key), 41);
    for (int i = 0; i < 20; i++)
        af_add(b, key, af_key(3 * AF_KEYS + i, key), 1500 + 120 * (uint64_t)i);
}

/* Keys that all stay in bucket 0 while the table has 16 and then 32 primary buckets: when
 * the table splits bucket 0 the second time (at 113 keys), the chain holds more entries
 * than split_one gathers on the stack, so the split allocates. */
static void af_make_chain(af_batch *b) {
    uint8_t key[24];
    for (int c = 0; b->n < AF_COLLIDING; c++) {
        uint64_t n = (uint64_t)snprintf((char *)key, sizeof key, "collide-%d", c);
        if ((sc_kv_hash(key, n) & 63) == 0) af_add(b, key, n, 16);
    }
}

/* A store whose map has the given keys; with more than one, every 4th deleted (blocks to
 * reuse) and then new ones up to the load where each insert splits a bucket. */
static uint8_t *af_make_image(int keys) {
    sc_store *s;
    sc_kv *kv = NULL;
    if (sc_store_open(NULL, AF_SIZE, AF_PS, &s) != SC_OK) return NULL;
    if (sc_kv_open(s, AF_BASE, AF_LEN, 0, 0, &kv) != SC_OK) {
        sc_store_close(s);
        return NULL;
    }
    uint8_t key[24], val[300];
    for (int id = 0; id < keys; id++) {
        make_value(val, (uint32_t)(20 + id % 280));
        CHECK_ST(sc_kv_put(kv, key, af_key(id, key), val, 20 + (uint64_t)(id % 280)), SC_OK);
    }
    for (int id = 0; keys > 1 && id < keys; id += 4) {
        int found;
        CHECK_ST(sc_kv_delete(kv, key, af_key(id, key), &found), SC_OK);
    }
    sc_kv_stats st;
    for (int id = keys; keys > 1; id++) {
        CHECK_ST(sc_kv_stat(kv, &st), SC_OK);
        if (st.count * 2 > st.buckets * st.slots_per_bucket) break;
        CHECK_ST(sc_kv_put(kv, key, af_key(id, key), val, 50), SC_OK);
    }
    uint8_t *image = malloc(AF_SIZE);
    sc_store_read(s, 0, image, AF_SIZE);
    sc_kv_close(kv);
    sc_store_close(s);
    return image;
}

typedef struct af_case {
    const char *name;
    int (*call)(sc_kv *kv, const af_batch *b);
    uint8_t *const *image;  /* the store it starts from; NULL: all zero, no map */
    const af_batch *batch;
    bool snapshot;          /* a snapshot is live */
} af_case;

static int af_put_many(sc_kv *kv, const af_batch *b) {
    uint64_t failed;
    return sc_kv_put_many(kv, b->k, b->v, b->n, &failed);
}

static int af_put(sc_kv *kv, const af_batch *b) {
    return sc_kv_put(kv, b->k[0].ptr, b->k[0].len, b->vb, 3000);
}

static int af_delete_many(sc_kv *kv, const af_batch *b) {
    uint64_t deleted;
    return sc_kv_delete_many(kv, b->k, 150, &deleted);
}

static int af_clear(sc_kv *kv, const af_batch *b) {
    (void)b;
    return sc_kv_clear(kv);
}

typedef struct af_state {
    uint64_t count, digest;
    int present;
} af_state;

static af_state af_observe(sc_kv *kv) {
    af_state o = {0, 0, -1};
    CHECK_ST(sc_kv_probe(kv, &o.present), SC_OK);
    o.digest = map_digest(kv, &o.count);
    return o;
}

static bool af_same(af_state a, af_state b) {
    return a.present == b.present && a.count == b.count && a.digest == b.digest;
}

/* After the failed call: the store's bytes (the region's, its wilderness included), the
 * map and its allocation state are as before, and the same call then succeeds. */
static void af_check_unchanged(sc_store *s, sc_kv *kv, const af_case *c,
                               const uint8_t *before, af_state was, const sc_kv_stats *had) {
    static uint8_t *now;
    if (!now) now = malloc(AF_SIZE);
    sc_kv_stats has;
    sc_store_read(s, 0, now, AF_SIZE);
    CHECK(memcmp(before, now, AF_SIZE) == 0);
    CHECK(af_same(af_observe(kv), was));
    CHECK_ST(sc_kv_stat(kv, &has), SC_OK);
    stats_equal(had, &has);
    CHECK_ST(c->call(kv, c->batch), SC_OK);
}

/* The snapshot still reads the map's region as it was taken. */
static void af_check_snapshot(sc_store *s, uint64_t snap, const af_case *c) {
    static uint8_t *seen;
    if (!seen) seen = malloc(AF_LEN);
    CHECK_ST(sc_snapshot_read(s, snap, AF_BASE, seen, AF_LEN), SC_OK);
    if (*c->image) CHECK(memcmp(seen, *c->image + AF_BASE, AF_LEN) == 0);
    else CHECK(seen[0] == 0 && memcmp(seen, seen + 1, AF_LEN - 1) == 0);
}

/* One run: the call with allocation `fail` failing (-1: none). Returns whether the call
 * reached that allocation; *after: the map then, *ok: whether the call succeeded. */
static bool af_run(const af_case *c, long fail, af_state *after, bool *ok) {
    static uint8_t *before;
    if (!before) before = malloc(AF_SIZE);
    sc_store *s;
    sc_kv *kv;
    uint64_t snap = 0;
    if (sc_store_open(NULL, AF_SIZE, AF_PS, &s) != SC_OK) {
        CHECK(!"store opened");
        return false;
    }
    if (*c->image) CHECK_ST(sc_store_write(s, 0, *c->image, AF_SIZE), SC_OK);
    CHECK_ST(sc_kv_open(s, AF_BASE, AF_LEN, 0, 0, &kv), SC_OK);
    if (c->snapshot) {
        uint8_t page[AF_PS];
        memset(page, 0x5a, sizeof page);
        CHECK_ST(sc_snapshot_take(s, &snap), SC_OK);
        for (uint64_t p = 0; p < AF_SLOTS - 2; p++)  /* below the region, then above it */
            sc_store_write(s, (p < AF_BASE / AF_PS ? p : p + AF_LEN / AF_PS) * AF_PS, page,
                           AF_PS);
    }
    sc_store_read(s, 0, before, AF_SIZE);
    af_state was = af_observe(kv);
    sc_kv_stats had;
    CHECK_ST(sc_kv_stat(kv, &had), SC_OK);

    atomic_store(&sc_test_allocs_left, fail);
    int st = c->call(kv, c->batch);
    bool reached = atomic_exchange(&sc_test_allocs_left, -1) < 0;
    CHECK(st == SC_OK || (st == SC_ENOMEM && reached));
    if (st != SC_OK) af_check_unchanged(s, kv, c, before, was, &had);
    verify_ok(kv);
    *after = af_observe(kv);
    *ok = st == SC_OK;
    if (snap) {
        af_check_snapshot(s, snap, c);
        CHECK_ST(sc_snapshot_release(s, snap), SC_OK);
    }
    sc_kv_close(kv);
    sc_store_close(s);
    return reached;
}

/* Allocation k = 0, 1, ... of the call fails in turn, until the call no longer reaches k;
 * whether the call failed or went on without (a split waits), the map ends the same. */
static void af_each_failure(const af_case *c, long *failures, long *reached) {
    af_state want, got;
    bool ok;
    af_run(c, -1, &want, &ok);
    CHECK(ok);
    *failures = 0;
    long k = 0;
    for (; k < 2000 && af_run(c, k, &got, &ok); k++) {
        *failures += !ok;
        CHECK(af_same(got, want));
    }
    CHECK(k < 2000);
    *reached = k;
}
#endif

static void test_alloc_failures(void) {
#ifdef SC_FAULT_INJECTION
    static uint8_t *none = NULL;
    g_full = af_make_image(AF_KEYS);
    g_small = af_make_image(1);
    REQUIRE(g_full && g_small);
    af_make_mixed(&g_mixed);
    af_make_chain(&g_chain);
    static const af_case cases[] = {
        {"put_many", af_put_many, &g_full, &g_mixed, true},
        {"put_many creating the map", af_put_many, &none, &g_mixed, true},
        {"put_many splitting a long chain", af_put_many, &g_small, &g_chain, true},
        {"put_many splitting a long chain, no snapshot", af_put_many, &g_small, &g_chain, false},
        {"put", af_put, &g_full, &g_mixed, true},
        {"delete_many", af_delete_many, &g_full, &g_mixed, true},
        {"clear", af_clear, &g_full, &g_mixed, true},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        long failures = 0, reached = 0;
        af_each_failure(&cases[i], &failures, &reached);
        fprintf(stderr, "  %s: %ld allocations, %ld failed calls\n", cases[i].name, reached,
                failures);
        if (cases[i].snapshot) CHECK(failures >= 3);  /* the journal's, the pool's at least */
        /* Without a snapshot the only allocations are the long chain's, and a split that
         * cannot make them waits: the batch succeeds. */
        else CHECK(reached >= 1 && failures == 0);
    }
    free(g_full);
    free(g_small);
#endif
}

int main(int argc, char **argv) {
    if (argc > 1) g_rng = strtoull(argv[1], NULL, 0);
    struct { const char *name; void (*fn)(void); } tests[] = {
        {"args", test_args},   {"model", test_model}, {"full", test_full},
        {"full_batch_restores", test_full_batch_restores},
        {"full_single_put_restores", test_full_single_put_restores}, {"fuzz", test_fuzz},
        {"alloc_failures", test_alloc_failures},
    };
    int passed = 0, failed = 0;
    for (size_t i = 0; i < sizeof tests / sizeof tests[0]; i++) {
        long before = g_failures;
        clock_t t0 = clock();
        tests[i].fn();
        fprintf(stderr, "%s: %.1f s\n", tests[i].name, (double)(clock() - t0) / CLOCKS_PER_SEC);
        if (g_failures == before) passed++;
        else {
            failed++;
            fprintf(stderr, "FAILED: %s\n", tests[i].name);
        }
        printf("%s: %s\n", tests[i].name, g_failures == before ? "ok" : "FAILED");
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
