/* Many rows written under a live snapshot (rows.c hands them here): their pages are
 * prepared in address order (sc__prep_marked), and the rows are written window by window
 * right behind their pages' preserving copies.
 *
 * A row waits only for the window of its last page: once that window is published (the
 * copier is then on the next one), its rows are written, in their given order. The rows
 * wait in a stable partition by window, so the last of repeats still wins. Grouped by
 * window (16 MiB, or 64 pages if more), the writes land in a window instead of the whole store: several times fewer TLB
 * and DRAM-page misses than writing in the given order. The copies are reserved first:
 * after that nothing can fail, so a failed write leaves nothing written.
 *
 * Marking the pages and grouping the rows come before the first copy, with the copier
 * idle, so both run in two parts on two threads: each part marks its rows' pages into a
 * bitmap of its own (merged after) and counts its rows per window; a window's group then
 * holds part 0's rows, then part 1's, each in their given order. */
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "internal.h"
#include "parallel.h"

#define PARTS_MAX 2

typedef struct {
    sc_store *s;
    sc_rows rows;
    uint64_t n, first, last;          /* rows, and the span of pages they touch */
    uint64_t shift, w0, n_windows;    /* windows of 2^shift pages, from window w0 */
    int parts;
    /* Part 0 marks the store's scratch (word 0 for page 0), part 1 its own bitmap of the
     * span's words (word 0 for the span's first page's word). */
    uint64_t *bits[PARTS_MAX], word0[PARTS_MAX];
    uint64_t *count[PARTS_MAX];       /* rows per window, then where the part's next goes */
    uint64_t touched[PARTS_MAX];
    /* The groups: where each row goes in the store, which source row it takes, and where
     * each window's group ends. */
    uint64_t *at;
    uint32_t *from;
    uint64_t *ends;
} windows;

static uint64_t part_begin(const windows *g, int k) { return g->n * (uint64_t)k / (uint64_t)g->parts; }

static uint64_t row_start(const windows *g, uint64_t i) {
    return g->rows.base + sc__row_of(g->rows.idx[i], g->rows.n_rows) * g->rows.row_bytes;
}

static uint64_t last_page_of(const windows *g, uint64_t i) {
    return (row_start(g, i) + g->rows.row_bytes - 1) >> g->s->page_shift;
}

/* Marks and counts part k's rows. Page writes are counted as the unsorted path does (a
 * page repeated by consecutive rows once), part 1 carrying on from part 0's last row. */
static int mark_part(void *ctx, uint64_t k0, uint64_t k1) {
    windows *g = ctx;
    for (uint64_t k = k0; k < k1; k++) {
        uint64_t *bits = g->bits[k], word0 = g->word0[k], *count = g->count[k], touched = 0;
        uint64_t begin = part_begin(g, (int)k), end = part_begin(g, (int)k + 1);
        uint64_t last_page = begin ? last_page_of(g, begin - 1) : UINT64_MAX;
        for (uint64_t i = begin; i < end; i++) {
            uint64_t start = row_start(g, i), page_shift = g->s->page_shift;
            uint64_t last = (start + g->rows.row_bytes - 1) >> page_shift;
            sc__mark_row(bits, word0, start >> page_shift, last, &last_page, &touched);
            count[(last >> g->shift) - g->w0]++;
        }
        g->touched[k] = touched;
    }
    return SC_OK;
}

/* Each part's rows into its place in each window's group, in their given order. */
static int group_part(void *ctx, uint64_t k0, uint64_t k1) {
    windows *g = ctx;
    for (uint64_t k = k0; k < k1; k++) {
        uint64_t *next = g->count[k];
        for (uint64_t i = part_begin(g, (int)k); i < part_begin(g, (int)k + 1); i++) {
            uint64_t start = row_start(g, i);
            uint64_t last = (start + g->rows.row_bytes - 1) >> g->s->page_shift;
            uint64_t j = next[(last >> g->shift) - g->w0]++;
            g->at[j] = start;
            g->from[j] = (uint32_t)i;
        }
    }
    return SC_OK;
}

/* Counts become positions: window w's group starts after every earlier window's rows,
 * with part 0's rows before part 1's. */
static void place_parts(windows *g) {
    uint64_t at = 0;
    for (uint64_t w = 0; w < g->n_windows; w++) {
        for (int k = 0; k < g->parts; k++) {
            uint64_t c = g->count[k][w];
            g->count[k][w] = at;
            at += c;
        }
        g->ends[w] = at;
    }
}

static uint64_t span_words(const windows *g) { return (g->last >> 6) - (g->first >> 6) + 1; }

static void merge_marks(windows *g) {
    uint64_t *into = g->s->sort_bits + (g->first >> 6);
    for (int k = 1; k < g->parts; k++)
        for (uint64_t word = 0; word < span_words(g); word++) into[word] |= g->bits[k][word];
}

/* The groups' arrays are mapped for the write and unmapped after it, not malloc'd: freed
 * heap memory of this size stays in the process, and would count against what a
 * snapshot is allowed to hold (its preserved pages and 1% of the state). */
static uint64_t groups_bytes(uint64_t n) { return n * (sizeof(uint64_t) + sizeof(uint32_t)); }

static bool alloc_windows(windows *g) {
    bool ok = true;
    g->ends = sc__alloc_fails() ? NULL : calloc(g->n_windows, sizeof *g->ends);
    ok &= g->ends != NULL;
    g->bits[0] = g->s->sort_bits;
    for (int k = 0; k < g->parts; k++) {
        g->count[k] = sc__alloc_fails() ? NULL : calloc(g->n_windows, sizeof *g->count[k]);
        ok &= g->count[k] != NULL;
        if (k) {
            g->bits[k] = sc__alloc_fails() ? NULL : calloc(span_words(g), sizeof *g->bits[k]);
            g->word0[k] = g->first >> 6;
            ok &= g->bits[k] != NULL;
        }
    }
    void *m = sc__alloc_fails() ? MAP_FAILED
                                : mmap(NULL, groups_bytes(g->n), PROT_READ | PROT_WRITE,
                                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    g->at = m == MAP_FAILED ? NULL : m;
    g->from = g->at ? (uint32_t *)(g->at + g->n) : NULL;
    return ok && g->at;
}

static void free_windows(windows *g) {
    free(g->ends);
    for (int k = 0; k < g->parts; k++) {
        free(g->count[k]);
        if (k) free(g->bits[k]);
    }
    if (g->at) munmap(g->at, groups_bytes(g->n));
}

/* A group's destinations are read in order, and each row's source (at a random place in
 * src) is fetched two steps ahead of writing it. */
static void write_window(const windows *g, uint64_t w) {
    uint64_t begin = w ? g->ends[w - 1] : 0, end = g->ends[w], bytes = g->rows.row_bytes;
    const uint64_t near = SC_PREFETCH_AHEAD, far = 2 * SC_PREFETCH_AHEAD;
    const uint8_t *src = g->rows.src;
    uint8_t *data = g->s->data;
    for (uint64_t j = begin; j < end; j++) {
        if (j + far < end) __builtin_prefetch(src + g->from[j + far] * g->rows.src_stride);
        if (j + near < end) __builtin_prefetch(data + g->at[j + near], 1);
        sc__copy_row(data + g->at[j], src + g->from[j] * g->rows.src_stride, bytes);
    }
}

/* Marks, reserves and groups; SC_ENOMEM leaves nothing marked or changed. */
static sc_status prepare_windows(windows *g, sc_prep *b) {
    if (!alloc_windows(g)) return SC_ENOMEM;
    sc__parallel_for((uint64_t)g->parts, g->parts, mark_part, g);
    merge_marks(g);
    if (sc__prep_reserve(b, sc__sort_count_copies(g->s, g->first, g->last))) {
        sc__sort_clear(g->s, g->first, g->last);
        return SC_ENOMEM;
    }
    place_parts(g);
    sc__parallel_for((uint64_t)g->parts, g->parts, group_part, g);
    return SC_OK;
}

/* Each window's pages prepared and handed to the copier, then the rows of every window
 * whose pages are all published by now. */
static void write_windows(windows *g, sc_prep *b) {
    sc_store *s = g->s;
    uint64_t e = atomic_load(&s->epoch), written = 0;
    for (uint64_t w = 0; w < g->n_windows; w++) {
        uint64_t lo = (g->w0 + w) << g->shift, hi = ((g->w0 + w + 1) << g->shift) - 1;
        /* Cannot fail: the batch and every copy are reserved. */
        (void)sc__prep_marked(b, lo > g->first ? lo : g->first, hi < g->last ? hi : g->last, e);
        sc__prep_push(b);
        uint64_t ready = sc__prep_ready_below(b, hi + 1);
        sc_store_publish(s); /* the new stamps before the new bytes, as on every path */
        for (; written < g->n_windows && (g->w0 + written + 1) << g->shift <= ready; written++)
            write_window(g, written);
    }
    sc__prep_finish(b);
    sc_store_publish(s);
    for (; written < g->n_windows; written++) write_window(g, written);
}

sc_status sc__write_rows_sorted(sc_store *s, const sc_rows *rows, uint64_t n, uint64_t first,
                                uint64_t last) {
    windows g = {.s = s, .rows = *rows, .n = n, .first = first, .last = last};
    g.shift = sc__prep_window_shift(s);
    g.w0 = first >> g.shift;
    g.n_windows = (last >> g.shift) - g.w0 + 1;
    g.parts = sc__usable_cpus() >= 2 ? 2 : 1;
    sc_prep b;
    sc__prep_init(&b, s);
    sc_status st = prepare_windows(&g, &b);
    if (st) {
        sc__prep_finish(&b);
    } else {
        write_windows(&g, &b);
        sc__writer_add(&s->pages_written, g.touched[0] + g.touched[1]);
    }
    free_windows(&g);
    return st;
}
