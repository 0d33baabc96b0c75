/* Deterministic mutation fuzzer for the delta/checkpoint decoder (sc_delta_parse) and
 * what consumes its output (sc_delta_apply, sc_replay). Meant to run under ASan + UBSan.
 *
 * Seeds are real buffers built by the core: deltas, an empty delta, a checkpoint, and a
 * delta for another geometry. Each iteration stacks 1-3 mutations on a copy of one seed:
 * bit flips, truncation, extension, random bytes, "interesting" header values with the
 * header checksum recomputed, index edits (ids out of range / unsorted / duplicated,
 * versions out of range) resealed with sc_header_seal, payload edits with their page
 * checksum fixed, consistent subsets, and epoch / geometry / compression rewrites. The
 * result goes into a malloc'd buffer of exactly its length, so any over-read is an ASan
 * report. Resealing is what lets inputs past the checksums into the deeper checks.
 *
 * Oracle: parse never crashes and only returns ok/corrupt/format. When a buffer parses,
 * applying it to a scratch store (with or without a live snapshot, with or without
 * allow_gap) must give exactly the state the view describes: every carried page newer
 * than the store's replaced by its row, nothing else touched, epoch past the target, a
 * live snapshot unchanged. sc_replay of it together with a valid delta must leave each
 * page equal to a newest-version row carrying it.
 *
 * Usage: fuzz_decode [iterations (20000)] [seed]. Last line: "N passed, M failed".
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "statecore.h"

#define PS 512u
#define NP 96u          /* pages of the scratch stores: two 64-page groups, one partial */

static uint64_t rng_state;
static uint64_t rnd(void) { /* splitmix64 */
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}
static uint64_t below(uint64_t n) { return n ? rnd() % n : 0; }
static void fill(void *dst, size_t n) {
    uint8_t *p = dst;
    for (size_t i = 0; i < n; i++) p[i] = (uint8_t)rnd();
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) { perror("malloc"); exit(2); }
    return p;
}

static void die(const char *what, sc_status st) {
    fprintf(stderr, "fuzz setup: %s: %s\n", what, sc_strerror(st));
    exit(2);
}

/* ---- seeds ------------------------------------------------------------ */

typedef struct {
    const char *name;
    uint16_t kind;
    uint8_t *buf;
    uint64_t len;
} seed_buf;

enum { N_SEEDS = 6 };
static seed_buf seeds[N_SEEDS];
static sc_delta_view base_view;   /* delta(0, S1): the state every scratch store starts from */
static uint8_t *base_buf;
static uint64_t s1_epoch;

static void write_random(sc_store *s, int count) {
    uint8_t page[PS];
    uint64_t n = sc_store_n_pages(s);
    for (int i = 0; i < count; i++) {
        fill(page, sizeof page);
        uint64_t off = below(n * PS - 40);
        sc_status st = i % 3 ? sc_store_write(s, off, page, 40)
                             : sc_store_write(s, (off / PS) * PS, page, PS);
        if (st) die("write", st);
    }
}

static void make_seeds(void) {
    sc_store *src;
    sc_status st = sc_store_open(NULL, (uint64_t)NP * PS, PS, &src);
    if (st) die("open", st);
    uint64_t s1, s2, len;
    write_random(src, 60);
    if ((st = sc_snapshot_take(src, &s1))) die("snapshot", st);
    write_random(src, 40);
    if ((st = sc_snapshot_take(src, &s2))) die("snapshot", st);
    s1_epoch = s1;

    if ((st = sc_delta_build(src, 0, s1, &base_buf, &len))) die("build", st);
    uint64_t bad;
    if ((st = sc_delta_parse(base_buf, len, SC_KIND_DELTA, 1, &base_view, &bad))) die("parse", st);

    seeds[0] = (seed_buf){"delta(S1,S2)", SC_KIND_DELTA, NULL, 0};
    if ((st = sc_delta_build(src, s1, s2, &seeds[0].buf, &seeds[0].len))) die("build", st);
    seeds[1] = (seed_buf){"delta(0,S2)", SC_KIND_DELTA, NULL, 0};
    if ((st = sc_delta_build(src, 0, s2, &seeds[1].buf, &seeds[1].len))) die("build", st);
    seeds[2] = (seed_buf){"delta(S2,S2)", SC_KIND_DELTA, NULL, 0};
    if ((st = sc_delta_build(src, s2, s2, &seeds[2].buf, &seeds[2].len))) die("build", st);

    /* A checkpoint goes through a file: that is the only way the core writes one. */
    const char *tmp = getenv("TMPDIR");
    char tpath[4096];
    snprintf(tpath, sizeof tpath, "%s/statecore-fuzz-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    int fd = mkstemp(tpath);
    if (fd < 0) { perror("mkstemp"); exit(2); }
    uint64_t clen;
    if ((st = sc_checkpoint_save(src, s2, fd, &clen, NULL))) die("checkpoint", st);
    seeds[3] = (seed_buf){"checkpoint(S2)", SC_KIND_CHECKPOINT, xmalloc(clen), clen};
    if (pread(fd, seeds[3].buf, clen, 0) != (ssize_t)clen) { perror("pread"); exit(2); }
    close(fd);
    unlink(tpath);

    /* Small deltas from other geometries: the same byte layout, incompatible stores. */
    sc_store *other;
    if ((st = sc_store_open(NULL, (uint64_t)NP * PS, 2 * PS, &other))) die("open", st);
    write_random(other, 10);
    uint64_t o1;
    if ((st = sc_snapshot_take(other, &o1))) die("snapshot", st);
    seeds[4] = (seed_buf){"delta(other page size)", SC_KIND_DELTA, NULL, 0};
    if ((st = sc_delta_build(other, 0, o1, &seeds[4].buf, &seeds[4].len))) die("build", st);
    sc_store_close(other);
    if ((st = sc_store_open(NULL, 2ull * NP * PS, PS, &other))) die("open", st);
    write_random(other, 10);
    if ((st = sc_snapshot_take(other, &o1))) die("snapshot", st);
    seeds[5] = (seed_buf){"delta(other store size)", SC_KIND_DELTA, NULL, 0};
    if ((st = sc_delta_build(other, 0, o1, &seeds[5].buf, &seeds[5].len))) die("build", st);
    sc_store_close(other);
    sc_store_close(src);

    for (int i = 0; i < N_SEEDS; i++) { /* every seed is valid as built */
        sc_delta_view v;
        if ((st = sc_delta_parse(seeds[i].buf, seeds[i].len, seeds[i].kind, 1, &v, &bad)))
            die(seeds[i].name, st);
    }
}

/* ---- mutations ---------------------------------------------------------- */

typedef struct {
    uint8_t *p;
    uint64_t len, cap;
    char log[256];
} work;

static void note(work *w, const char *what) {
    size_t used = strlen(w->log);
    snprintf(w->log + used, sizeof w->log - used, "%s%s", used ? "+" : "", what);
}

static sc_header *hdr(work *w) { return w->len >= SC_HEADER_SIZE ? (sc_header *)w->p : NULL; }

/* Rows the index really has room for, or 0 when the header's count does not fit. */
static uint64_t index_rows(work *w) {
    sc_header *h = hdr(w);
    if (!h) return 0;
    uint64_t n = h->n_pages;
    if (n > (w->len - SC_HEADER_SIZE) / 24) return 0;
    return n;
}

static void reseal_header(work *w) {
    sc_header *h = hdr(w);
    if (h) h->header_checksum = sc_page_checksum(h, SC_HEADER_SIZE - 8);
}

static void reseal_all(work *w) {
    sc_header *h = hdr(w);
    if (!h) return;
    if (h->n_pages <= (w->len - SC_HEADER_SIZE) / 24) sc_header_seal(h, w->p + SC_HEADER_SIZE);
    else reseal_header(w);
}

static uint64_t interesting_u64(work *w, uint64_t cur) {
    switch (below(16)) {
    case 0: return 0;
    case 1: return 1;
    case 2: return UINT64_MAX;
    case 3: return UINT64_MAX - 1;
    case 4: return 1ull << 63;
    case 5: return 1ull << 32;
    case 6: return UINT32_MAX;
    case 7: return cur + 1;
    case 8: return cur - 1;
    case 9: return w->len;
    case 10: return w->len / 24;
    case 11: return w->len > SC_HEADER_SIZE ? (w->len - SC_HEADER_SIZE) / 24 + below(3) : 0;
    case 12: return UINT64_MAX / PS + below(3);          /* n * page_size wraps */
    case 13: return (UINT64_MAX / 24) + below(3);         /* n * 24 wraps */
    case 14: return cur ^ (1ull << below(64));
    default: return rnd();
    }
}

static void mut_bitflips(work *w) {
    if (!w->len) return;
    uint64_t k = 1 + below(8);
    uint64_t hot = SC_HEADER_SIZE + index_rows(w) * 24; /* header and index matter most */
    if (hot > w->len) hot = w->len;
    for (uint64_t i = 0; i < k; i++) {
        uint64_t at = below(2) ? below(hot) : below(w->len);
        w->p[at] ^= (uint8_t)(1u << below(8));
    }
    note(w, "bitflip");
}

static void mut_truncate(work *w) {
    if (!w->len) return;
    w->len = below(2) ? w->len - 1 - below(w->len < 32 ? w->len : 32) : below(w->len);
    note(w, "truncate");
}

static void mut_extend(work *w) {
    uint64_t k = 1 + below(64);
    if (w->len + k > w->cap) return;
    if (below(2)) fill(w->p + w->len, k);
    else memset(w->p + w->len, 0, k);
    w->len += k;
    note(w, "extend");
}

static void mut_random_bytes(work *w) {
    if (!w->len) return;
    uint64_t at = below(w->len), k = 1 + below(32);
    if (k > w->len - at) k = w->len - at;
    fill(w->p + at, k);
    note(w, "randbytes");
}

/* One header field to an edge value; only the header checksum is recomputed. */
static void mut_header_field(work *w) {
    sc_header *h = hdr(w);
    if (!h) return;
    switch (below(11)) {
    case 0: h->format_version = (uint16_t)interesting_u64(w, h->format_version); break;
    case 1: h->kind = (uint16_t)interesting_u64(w, h->kind); break;
    case 2: h->compression = (uint16_t)interesting_u64(w, h->compression); break;
    case 3: h->page_size = below(2) ? (uint32_t)interesting_u64(w, h->page_size)
                                    : 1u << below(32); break;
    case 4: h->store_pages = interesting_u64(w, h->store_pages); break;
    case 5: h->base_epoch = interesting_u64(w, h->base_epoch); break;
    case 6: h->target_epoch = interesting_u64(w, h->target_epoch); break;
    case 7: h->n_pages = interesting_u64(w, h->n_pages); break;
    case 8: h->payload_bytes = interesting_u64(w, h->payload_bytes); break;
    case 9: h->schema_version = rnd(); break;
    default: h->reserved1 = (uint32_t)rnd(); h->reserved2[below(24)] ^= 0xff; break;
    }
    if (below(8)) reseal_header(w); /* mostly: get past the checksum */
    note(w, "header");
}

/* n_pages and payload_bytes moved together, so the length checks still line up or
 * overflow in interesting ways. Often just past what the buffer holds: with compression
 * only payload_bytes == len - payload_offset is checked, so the index-fits check is the
 * one thing between such a header and an over-read. */
static void mut_counts(work *w) {
    sc_header *h = hdr(w);
    if (!h) return;
    uint64_t fit = (w->len - SC_HEADER_SIZE) / 24;
    uint64_t n = below(2) ? fit + 1 + below(3) : interesting_u64(w, h->n_pages);
    h->n_pages = n;
    if (below(2)) h->compression = SC_COMP_LZ4;
    if (n > h->store_pages && below(2)) h->store_pages = n;
    uint64_t ps = h->page_size ? h->page_size : PS;
    h->payload_bytes = below(2) ? n * ps : w->len - SC_HEADER_SIZE - n * 24; /* may wrap */
    reseal_all(w);
    note(w, "counts");
}

static void mut_index(work *w) {
    uint64_t n = index_rows(w);
    if (!n) return;
    sc_header *h = hdr(w);
    uint64_t *ids = (uint64_t *)(w->p + SC_HEADER_SIZE), *vers = ids + n, *sums = ids + 2 * n;
    uint64_t i = below(n);
    switch (below(10)) {
    case 0: ids[i] = h->store_pages + below(3); break;
    case 1: ids[i] = UINT64_MAX - below(2); break;
    case 2: ids[i] = i ? ids[i - 1] : ids[i]; break;                   /* duplicate */
    case 3: if (n > 1) { uint64_t j = below(n), t = ids[i]; ids[i] = ids[j]; ids[j] = t; } break;
    case 4: ids[i] = below(NP); break;                                   /* maybe unsorted */
    case 5: vers[i] = h->base_epoch; break;
    case 6: vers[i] = h->target_epoch + below(2); break;                 /* edge, or past */
    case 7: vers[i] = below(2) ? 0 : UINT64_MAX; break;
    case 8: vers[i] = h->base_epoch + 1 + below(h->target_epoch - h->base_epoch + 1); break;
    default: sums[i] = rnd(); break;
    }
    if (below(8)) reseal_all(w);
    note(w, "index");
}

/* Valid new content: edit a carried page and fix its checksum and the seals. */
static void mut_payload_fixed(work *w) {
    uint64_t n = index_rows(w);
    sc_header *h = hdr(w);
    if (!n || h->page_size != PS || w->len != SC_HEADER_SIZE + n * 24 + n * PS) return;
    uint64_t *sums = (uint64_t *)(w->p + SC_HEADER_SIZE) + 2 * n;
    uint64_t i = below(n);
    uint8_t *page = w->p + SC_HEADER_SIZE + n * 24 + i * PS;
    fill(page + below(PS - 16), 16);
    sums[i] = sc_page_checksum(page, PS);
    reseal_all(w);
    note(w, "payload");
}

/* Valid: keep a random subset of the rows. */
static void mut_subset(work *w) {
    uint64_t n = index_rows(w);
    sc_header *h = hdr(w);
    if (!n || h->page_size != PS || w->len != SC_HEADER_SIZE + n * 24 + n * PS) return;
    uint64_t *ids = (uint64_t *)(w->p + SC_HEADER_SIZE);
    uint64_t *nids = xmalloc(n * 24);
    uint8_t *npay = xmalloc(n * PS);
    uint64_t m = 0;
    for (uint64_t i = 0; i < n; i++) {
        if (below(3) == 0) continue;
        nids[m] = ids[i];
        nids[n + m] = ids[n + i];
        nids[2 * n + m] = ids[2 * n + i];
        memcpy(npay + m * PS, w->p + SC_HEADER_SIZE + n * 24 + i * PS, PS);
        m++;
    }
    uint8_t *out = w->p + SC_HEADER_SIZE;
    memcpy(out, nids, m * 8);
    memcpy(out + m * 8, nids + n, m * 8);
    memcpy(out + m * 16, nids + 2 * n, m * 8);
    memcpy(out + m * 24, npay, m * PS);
    h->n_pages = m;
    h->payload_bytes = m * PS;
    w->len = SC_HEADER_SIZE + m * 24 + m * PS;
    reseal_all(w);
    free(nids);
    free(npay);
    note(w, "subset");
}

/* Valid structure, hostile epochs: base/target anywhere, every version inside. */
static void mut_epochs(work *w) {
    uint64_t n = index_rows(w);
    sc_header *h = hdr(w);
    if (!h) return;
    static const uint64_t targets[] = {UINT64_MAX, UINT64_MAX - 1, 1ull << 63, 2, 3, 1000};
    uint64_t t = below(3) ? targets[below(6)] : rnd();
    uint64_t b = below(2) ? 0 : (below(2) ? t - 1 : below(t));
    if (t == 0) t = 1;
    if (b >= t) b = t - 1;
    h->base_epoch = b;
    h->target_epoch = t;
    uint64_t *vers = (uint64_t *)(w->p + SC_HEADER_SIZE) + n;
    for (uint64_t i = 0; i < n; i++) vers[i] = below(2) ? t : b + 1 + below(t - b);
    reseal_all(w);
    note(w, "epochs");
}

/* Valid structure, other geometry: the store must refuse it as incompatible. */
static void mut_geometry(work *w) {
    sc_header *h = hdr(w);
    if (!h) return;
    if (below(2)) h->store_pages = h->store_pages + 1 + below(1000);
    else h->store_pages = below(2) ? UINT64_MAX : (uint64_t)NP * 2;
    reseal_all(w);
    note(w, "geometry");
}

static void mut_compression(work *w) {
    sc_header *h = hdr(w);
    if (!h) return;
    h->compression = (uint16_t)below(3);
    if (below(2)) { /* an honest compressed-looking payload of any length */
        uint64_t n = index_rows(w);
        h->payload_bytes = w->len - SC_HEADER_SIZE - n * 24;
    }
    reseal_all(w);
    note(w, "compression");
}

static void mut_kind(work *w) {
    sc_header *h = hdr(w);
    if (!h) return;
    if (below(2)) memcpy(h->magic, below(2) ? SC_CKPT_MAGIC : SC_DELTA_MAGIC, 8);
    else h->kind = (uint16_t)(1 + below(2));
    reseal_header(w);
    note(w, "kind");
}

typedef void (*mutator)(work *);
static const mutator mutators[] = {
    mut_bitflips, mut_truncate, mut_extend, mut_random_bytes, mut_header_field, mut_counts,
    mut_index, mut_index, mut_payload_fixed, mut_payload_fixed, mut_subset, mut_epochs,
    mut_epochs, mut_geometry, mut_compression, mut_kind,
};
#define N_MUTATORS (sizeof mutators / sizeof mutators[0])

/* ---- oracle ------------------------------------------------------------- */

static long failures;
static uint64_t cur_iter;
static const char *cur_log;
static const char *cur_seed;

#define EXPECT(cond)                                                                      \
    do {                                                                                  \
        if (!(cond)) {                                                                    \
            fprintf(stderr, "%s:%d: iteration %" PRIu64 " (seed %s, mutations %s): %s\n", \
                    __FILE__, __LINE__, cur_iter, cur_seed, cur_log, #cond);              \
            failures++;                                                                   \
            return 0;                                                                     \
        }                                                                                 \
    } while (0)

static sc_store *scratch_store(void) {
    sc_store *s;
    sc_status st = sc_store_open(NULL, (uint64_t)NP * PS, PS, &s);
    if (st) die("scratch open", st);
    if ((st = sc_delta_apply(s, &base_view, base_view.payload, 0, NULL))) die("base apply", st);
    return s;
}

/* The view must describe only memory inside the buffer and satisfy what parse promises. */
static int check_view(const sc_delta_view *v, const uint8_t *buf, uint64_t len) {
    const sc_header *h = &v->header;
    uint64_t n = h->n_pages;
    EXPECT(v->total_bytes == len);
    EXPECT(n <= (len - SC_HEADER_SIZE) / 24);
    EXPECT(v->payload_offset == SC_HEADER_SIZE + n * 24);
    EXPECT(v->payload_offset + h->payload_bytes == len);
    EXPECT((const uint8_t *)v->ids == buf + SC_HEADER_SIZE);
    EXPECT(h->base_epoch < h->target_epoch || (n == 0 && h->base_epoch == h->target_epoch));
    EXPECT(n <= h->store_pages);
    if (h->compression == SC_COMP_NONE) {
        EXPECT(v->payload == buf + v->payload_offset);
        EXPECT(h->payload_bytes == n * h->page_size);
    } else {
        EXPECT(v->payload == NULL);
    }
    for (uint64_t i = 0; i < n; i++) {
        EXPECT(v->ids[i] < h->store_pages);
        EXPECT(i == 0 || v->ids[i] > v->ids[i - 1]);
        EXPECT(v->versions[i] > h->base_epoch && v->versions[i] <= h->target_epoch);
        if (v->payload)
            EXPECT(sc_page_checksum(v->payload + i * h->page_size, h->page_size) ==
                   v->checksums[i]);
    }
    return 1;
}

/* Apply to a scratch store and compare with the model of what the view says. */
static int check_apply(const sc_delta_view *v, const uint8_t *payload) {
    const sc_header *h = &v->header;
    sc_store *s = scratch_store();
    int with_snap = (int)below(2), allow_gap = (int)below(2);
    uint64_t snap = 0;
    if (with_snap && sc_snapshot_take(s, &snap) != SC_OK) die("snapshot", SC_ENOMEM);
    const uint64_t size = (uint64_t)NP * PS;
    uint8_t *pre = xmalloc(size), *want = xmalloc(size), *got = xmalloc(size);
    uint64_t pre_ver[NP], want_ver[NP];
    memcpy(pre, sc_store_data(s), size);
    for (uint64_t p = 0; p < NP; p++) pre_ver[p] = want_ver[p] = sc_store_page_version(s, p);
    uint64_t pre_epoch = sc_store_epoch(s), written = UINT64_MAX;
    memcpy(want, pre, size);

    sc_status st = sc_delta_apply(s, v, payload, allow_gap, &written);
    int ok = 1;
    if (h->page_size != PS || h->store_pages != NP) {
        if (st != SC_EINCOMPAT) ok = 0;
    } else if (!allow_gap && h->base_epoch >= pre_epoch) {
        if (st != SC_EGAP) ok = 0;
    } else if (st != SC_OK) {
        ok = 0;
    } else {
        uint64_t count = 0;
        for (uint64_t i = 0; i < h->n_pages; i++) {
            uint64_t id = v->ids[i];
            if (v->versions[i] <= pre_ver[id]) continue;
            memcpy(want + id * PS, payload + i * PS, PS);
            /* The page takes the version the delta carries, live snapshot or not: snapshots
             * read by local write stamps, so the replica can keep the primary's versions. */
            want_ver[id] = v->versions[i];
            count++;
        }
        if (written != count) ok = 0;
        /* "After applying, the store's epoch is at least b + 1." */
        if (sc_store_epoch(s) <= h->target_epoch || sc_store_epoch(s) < pre_epoch) {
            fprintf(stderr, "epoch after apply %" PRIu64 ", delta target %" PRIu64 "\n",
                    sc_store_epoch(s), h->target_epoch);
            ok = 0;
        }
    }
    if (st != SC_OK && sc_store_epoch(s) != pre_epoch) ok = 0;
    int same_bytes = memcmp(sc_store_data(s), want, size) == 0;
    int same_vers = 1;
    for (uint64_t p = 0; p < NP; p++) same_vers &= sc_store_page_version(s, p) == want_ver[p];
    int snap_ok = 1;
    if (with_snap) {
        snap_ok = sc_snapshot_read(s, snap, 0, got, size) == SC_OK && memcmp(got, pre, size) == 0;
        snap_ok &= sc_snapshot_release(s, snap) == SC_OK;
        sc_stats stats;
        sc_store_stats(s, &stats);
        snap_ok &= stats.preserved_pages == 0;
    }
    free(pre);
    free(want);
    free(got);
    sc_store_close(s);
    if (!ok) fprintf(stderr, "apply returned %s (allow_gap %d, snapshot %d)\n",
                     sc_strerror(st), allow_gap, with_snap);
    EXPECT(ok);
    EXPECT(same_bytes);
    EXPECT(same_vers);
    EXPECT(snap_ok);
    return 1;
}

/* Replay with the valid base delta: each page ends as a newest-version row carrying it. */
static int check_replay(const sc_delta_view *v, const uint8_t *payload) {
    const sc_header *h = &v->header;
    if (h->page_size != PS || h->store_pages != NP) return 1;
    sc_delta_view views[2] = {base_view, *v};
    const uint8_t *pls[2] = {base_view.payload, payload};
    if (v->header.target_epoch < base_view.header.target_epoch) { /* sorted by target */
        views[0] = *v;
        views[1] = base_view;
        pls[0] = payload;
        pls[1] = base_view.payload;
    }
    sc_store *s;
    sc_status st = sc_store_open(NULL, (uint64_t)NP * PS, PS, &s);
    if (st) die("replay open", st);
    sc_replay_result r;
    st = sc_replay(s, views, pls, 2, 1, (int)below(3), &r);
    int ok = st == SC_OK, distinct = 0;
    uint64_t max_target = 0;
    for (int d = 0; d < 2; d++)
        if (views[d].header.target_epoch > max_target) max_target = views[d].header.target_epoch;
    for (uint64_t p = 0; p < NP && ok; p++) {
        uint64_t vmax = 0;
        for (int d = 0; d < 2; d++)
            for (uint64_t i = 0; i < views[d].header.n_pages; i++)
                if (views[d].ids[i] == p && views[d].versions[i] > vmax) vmax = views[d].versions[i];
        if (!vmax) {
            ok &= sc_store_page_version(s, p) == 0;
            for (uint64_t b = 0; b < PS; b++) ok &= sc_store_data(s)[p * PS + b] == 0;
            continue;
        }
        distinct++;
        ok &= sc_store_page_version(s, p) == vmax;
        int match = 0;
        for (int d = 0; d < 2; d++)
            for (uint64_t i = 0; i < views[d].header.n_pages; i++)
                if (views[d].ids[i] == p && views[d].versions[i] == vmax)
                    match |= memcmp(sc_store_data(s) + p * PS, pls[d] + i * PS, PS) == 0;
        ok &= match;
    }
    if (ok) ok = r.pages_written == (uint64_t)distinct && r.pages_in == base_view.header.n_pages + h->n_pages;
    int epoch_ok = st != SC_OK || sc_store_epoch(s) > max_target;
    sc_store_close(s);
    if (!ok) fprintf(stderr, "replay returned %s\n", sc_strerror(st));
    EXPECT(ok);
    EXPECT(epoch_ok);
    return 1;
}

/* ---- main --------------------------------------------------------------- */

int main(int argc, char **argv) {
    uint64_t iterations = argc > 1 ? strtoull(argv[1], NULL, 0) : 20000;
    uint64_t seed = argc > 2 ? strtoull(argv[2], NULL, 0) : 0xdec0de5eedULL;
    rng_state = seed;
    make_seeds();

    uint64_t max_len = 0;
    for (int i = 0; i < N_SEEDS; i++)
        if (seeds[i].len > max_len) max_len = seeds[i].len;
    work w;
    w.cap = max_len + 64 * 4;
    w.p = xmalloc(w.cap);

    uint64_t by_status[SC__COUNT] = {0}, parsed_ok = 0, applied = 0, replayed = 0;
    uint64_t passed = 0;
    for (cur_iter = 0; cur_iter < iterations; cur_iter++) {
        long before = failures;
        const seed_buf *sd = &seeds[below(N_SEEDS)];
        memcpy(w.p, sd->buf, sd->len);
        w.len = sd->len;
        w.log[0] = '\0';
        uint64_t k = 1 + below(3);
        for (uint64_t i = 0; i < k; i++) mutators[below(N_MUTATORS)](&w);
        cur_seed = sd->name;
        cur_log = w.log;

        /* Exactly the mutated length: one byte past it is outside the allocation. */
        uint8_t *buf = malloc(w.len);
        if (!buf && w.len) { perror("malloc"); return 2; }
        if (w.len) memcpy(buf, w.p, w.len);
        uint16_t kind = below(8) ? sd->kind : (uint16_t)(sd->kind == SC_KIND_DELTA ? 2 : 1);

        sc_delta_view v, v0;
        uint64_t bad = UINT64_MAX;
        sc_status st = sc_delta_parse(buf, w.len, kind, 1, &v, &bad);
        sc_status st0 = sc_delta_parse(buf, w.len, kind, 0, &v0, NULL);
        if ((unsigned)st < SC__COUNT) by_status[st]++;
        do {
            if (st != SC_OK && st != SC_ECORRUPT && st != SC_EFORMAT) {
                fprintf(stderr, "iteration %" PRIu64 " (%s, %s): parse returned %d\n", cur_iter,
                        cur_seed, cur_log, (int)st);
                failures++;
                break;
            }
            /* verify_pages only adds the page checksums on top. */
            if (st == SC_OK && st0 != SC_OK) {
                fprintf(stderr, "iteration %" PRIu64 ": parse ok only with verify\n", cur_iter);
                failures++;
                break;
            }
            if (st0 == SC_OK && st != SC_OK) {
                if (st != SC_ECORRUPT || !v0.payload || bad >= v0.header.n_pages ||
                    sc_page_checksum(v0.payload + bad * v0.header.page_size,
                                     v0.header.page_size) == v0.checksums[bad]) {
                    fprintf(stderr, "iteration %" PRIu64 ": bad page report %" PRIu64 "\n",
                            cur_iter, bad);
                    failures++;
                }
                break;
            }
            if (st != SC_OK) break;
            parsed_ok++;
            if (!check_view(&v, buf, w.len)) break;
            const uint8_t *payload = v.payload;
            uint8_t *synth = NULL;
            if (!payload) { /* compressed: the caller would decompress into n*page_size */
                if (v.header.page_size != PS || v.header.store_pages != NP) break;
                synth = xmalloc(v.header.n_pages * PS);
                fill(synth, v.header.n_pages * PS);
                payload = synth;
            }
            applied++;
            if (check_apply(&v, payload) && cur_iter % 3 == 0) {
                replayed++;
                check_replay(&v, payload);
            }
            free(synth);
        } while (0);
        free(buf);
        if (failures == before) passed++;
    }

    printf("fuzz_decode: seed 0x%" PRIx64 ", parse results:", seed);
    for (int i = 0; i < SC__COUNT; i++)
        if (by_status[i]) printf(" %s=%" PRIu64, sc_strerror((sc_status)i), by_status[i]);
    printf("; applied %" PRIu64 ", replayed %" PRIu64 "\n", applied, replayed);
    /* A fuzzer whose inputs all die at the first checksum tests nothing deep. */
    if (iterations >= 1000 && parsed_ok < iterations / 20) {
        fprintf(stderr, "fuzz_decode: only %" PRIu64 " inputs parsed; mutations too shallow\n",
                parsed_ok);
        failures++;
        if (passed) passed--;
    }

    for (int i = 0; i < N_SEEDS; i++) free(seeds[i].buf);
    free(base_buf);
    free(w.p);
    printf("%" PRIu64 " passed, %" PRIu64 " failed\n", passed, iterations - passed);
    return failures ? 1 : 0;
}
