/* Writes of whole rows of an array in the store, by index (StateArray's fancy
 * assignment): bounds checks, the pages' preparation, and the rows' bytes. */
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "internal.h"

/* A row index from Python's convention (negative counts from the end), already checked. */
static uint64_t row_of(int64_t i, int64_t n_rows) {
    return i < 0 ? (uint64_t)(i + n_rows) : (uint64_t)i;
}

/* The array's rows lie in the store and every index names one of them; span gets the
 * lowest and highest row named (n > 0). */
static sc_status check_rows(const sc_store *s, const int64_t *idx, uint64_t n, uint64_t n_rows,
                            uint64_t base, uint64_t row_bytes, uint64_t *bad, uint64_t span[2]) {
    if (!row_bytes || n_rows > UINT64_MAX / row_bytes || !sc__range_ok(s, base, n_rows * row_bytes))
        return SC_EINVAL;
    if (n_rows > (uint64_t)INT64_MAX) return SC_EINVAL;
    int64_t lo = -(int64_t)n_rows, hi = (int64_t)n_rows;
    uint64_t low = UINT64_MAX, high = 0;
    for (uint64_t i = 0; i < n; i++) {
        if (idx[i] < lo || idx[i] >= hi) {
            *bad = i;
            return SC_ERANGE;
        }
        uint64_t row = row_of(idx[i], hi);
        low = row < low ? row : low;
        high = row > high ? row : high;
    }
    span[0] = low;
    span[1] = high;
    return SC_OK;
}

/* Marks every page of the rows for sc__prep_marked, counting page writes as the unsorted
 * path does; with `per_window`, also counts each window's rows (a row belongs to the
 * window of its last page, which is prepared last). */
static void mark_rows(sc_store *s, const int64_t *idx, uint64_t n, int64_t hi, uint64_t base,
                      uint64_t row_bytes, uint64_t *touched, uint64_t *per_window,
                      uint64_t window_shift, uint64_t first_window) {
    uint64_t last_page = UINT64_MAX;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t start = base + row_of(idx[i], hi) * row_bytes;
        uint64_t first = start >> s->page_shift, last = (start + row_bytes - 1) >> s->page_shift;
        for (uint64_t p = first; p <= last; p++) {
            if (p == last_page) continue;
            sc__sort_mark(s, p);
            last_page = p;
            (*touched)++;
        }
        if (per_window) per_window[(last >> window_shift) - first_window]++;
    }
}

/* Under a live snapshot: every page of the rows marked, then prepared in address order. */
static sc_status touch_rows_sorted(sc_store *s, const int64_t *idx, uint64_t n, int64_t hi,
                                   uint64_t base, uint64_t row_bytes, uint64_t span_first,
                                   uint64_t span_last, uint64_t *touched) {
    mark_rows(s, idx, n, hi, base, row_bytes, touched, NULL, 0, 0);
    return sc__prep_sorted(s, span_first, span_last, atomic_load(&s->epoch));
}

/* Rows in the given order, one page batch. */
static sc_status touch_rows_in_order(sc_store *s, const int64_t *idx, uint64_t n, int64_t hi,
                                     uint64_t base, uint64_t row_bytes, uint64_t *touched) {
    uint64_t e = atomic_load(&s->epoch), last_page = UINT64_MAX;
    sc_status st = SC_OK;
    sc_prep b;
    sc__prep_init(&b, s);
    for (uint64_t i = 0; i < n && st == SC_OK; i++) {
        if (i + SC_PREFETCH_AHEAD < n)
            sc__prefetch_meta(s, (base + row_of(idx[i + SC_PREFETCH_AHEAD], hi) * row_bytes) >>
                                     s->page_shift);
        uint64_t row = row_of(idx[i], hi);
        uint64_t start = base + row * row_bytes;
        uint64_t first = start >> s->page_shift, last = (start + row_bytes - 1) >> s->page_shift;
        for (uint64_t p = first; p <= last && st == SC_OK; p++) {
            if (p == last_page) continue; /* sorted or clustered indices: skip the repeat */
            st = sc__prep_page(&b, p, e);
            last_page = p;
            (*touched)++;
        }
    }
    sc__prep_finish(&b);
    return st;
}

static sc_status touch_checked_rows(sc_store *s, const int64_t *idx, uint64_t n, int64_t hi,
                                   uint64_t base, uint64_t row_bytes, const uint64_t span[2]) {
    uint64_t first = (base + span[0] * row_bytes) >> s->page_shift;
    uint64_t last = (base + (span[1] + 1) * row_bytes - 1) >> s->page_shift;
    uint64_t touched = 0;
    sc_status st = sc__prep_worth_sorting(s, n, first, last)
                       ? touch_rows_sorted(s, idx, n, hi, base, row_bytes, first, last, &touched)
                       : touch_rows_in_order(s, idx, n, hi, base, row_bytes, &touched);
    if (st) return st;
    sc__writer_add(&s->pages_written, touched);
    sc_store_publish(s);
    return SC_OK;
}

sc_status sc_store_touch_rows(sc_store *s, const int64_t *idx, uint64_t n, uint64_t n_rows,
                              uint64_t base, uint64_t row_bytes, uint64_t *bad) {
    uint64_t span[2];
    sc_status st = check_rows(s, idx, n, n_rows, base, row_bytes, bad, span);
    if (st || !n) return st;
    return touch_checked_rows(s, idx, n, (int64_t)n_rows, base, row_bytes, span);
}

static inline void copy_row(uint8_t *dst, const uint8_t *src, uint64_t row_bytes) {
    if (row_bytes == 8) memcpy(dst, src, 8); /* the common int64/float64 case, inlined */
    else memcpy(dst, src, row_bytes);
}

/* Prepare the pages of rows idx, one row at a time, and write each row right after its
 * pages: one pass over the scattered pages instead of two. Only when no snapshot is live:
 * then no page needs a preserving copy and nothing can fail half-way. */
static void write_rows_fused(sc_store *s, const int64_t *idx, uint64_t n, int64_t n_rows,
                             uint64_t base, uint64_t row_bytes, const uint8_t *src,
                             uint64_t src_stride) {
    uint64_t e = atomic_load(&s->epoch), touched = 0, last_page = UINT64_MAX;
    sc_prep b;
    sc__prep_init(&b, s);
    for (uint64_t i = 0; i < n; i++) {
        if (i + SC_PREFETCH_AHEAD < n) {
            uint64_t ahead = base + row_of(idx[i + SC_PREFETCH_AHEAD], n_rows) * row_bytes;
            sc__prefetch_meta(s, ahead >> s->page_shift);
            __builtin_prefetch(s->data + ahead, 1);
        }
        uint64_t start = base + row_of(idx[i], n_rows) * row_bytes;
        uint64_t first = start >> s->page_shift, last = (start + row_bytes - 1) >> s->page_shift;
        for (uint64_t p = first; p <= last; p++) {
            if (p == last_page) continue;
            (void)sc__prep_page(&b, p, e); /* restamps only: cannot fail without a snapshot */
            last_page = p;
            touched++;
        }
        sc_store_publish(s); /* the new stamps before the new bytes, as on every path */
        copy_row(s->data + start, src + i * src_stride, row_bytes);
    }
    sc__prep_finish(&b);
    sc__writer_add(&s->pages_written, touched);
}

/* Rows written window by window right behind their pages' preserving copies, with the
 * pages prepared in address order (sc__prep_marked). A row waits only for the window of
 * its last page: once that window is published (the copier is then on the next one), its
 * rows are written, in their given order, while the lines the copy just read are still
 * cached. The rows wait in a stable partition by window, so the last of repeats still
 * wins. The copies are reserved first: after that nothing can fail, so a failed write
 * leaves nothing written. */
typedef struct {
    const int64_t *idx;
    int64_t n_rows;
    uint64_t base, row_bytes;
    const uint8_t *src;
    uint64_t src_stride;
    /* The rows grouped by window, in their given order within each: where each goes in
     * the store, which source row it takes, and where each window's group ends. */
    uint64_t *at;
    uint32_t *from;
    uint64_t *ends;
} window_rows;

/* A group's destinations are read in order, and each row's source (at a random place in
 * src) is fetched two steps ahead of writing it. Grouped by window, the writes land in
 * 16 MiB instead of the whole store: several times fewer TLB and DRAM-page misses than
 * writing in the given order, even with nothing cached. */
static void write_window(sc_store *s, const window_rows *w, uint64_t k) {
    uint64_t begin = k ? w->ends[k - 1] : 0, end = w->ends[k];
    const uint64_t near = SC_PREFETCH_AHEAD, far = 2 * SC_PREFETCH_AHEAD;
    for (uint64_t j = begin; j < end; j++) {
        if (j + far < end) __builtin_prefetch(w->src + w->from[j + far] * w->src_stride);
        if (j + near < end) __builtin_prefetch(s->data + w->at[j + near], 1);
        copy_row(s->data + w->at[j], w->src + w->from[j] * w->src_stride, w->row_bytes);
    }
}

/* ends[k] counts window k's rows on entry; on return it is where window k's group ends. */
static void group_by_window(sc_store *s, window_rows *w, uint64_t n, uint64_t shift,
                            uint64_t first_window, uint64_t n_windows) {
    uint64_t *ends = w->ends;
    for (uint64_t k = 1; k < n_windows; k++) ends[k] += ends[k - 1];
    /* Filled back to front, each group's end moves down to its start: stable order. */
    for (uint64_t i = n; i-- > 0;) {
        uint64_t start = w->base + row_of(w->idx[i], w->n_rows) * w->row_bytes;
        uint64_t last = (start + w->row_bytes - 1) >> s->page_shift;
        uint64_t j = --ends[(last >> shift) - first_window];
        w->at[j] = start;
        w->from[j] = (uint32_t)i;
    }
    for (uint64_t k = 0; k + 1 < n_windows; k++) ends[k] = ends[k + 1];
    ends[n_windows - 1] = n;
}

/* The groups' arrays are mapped for the write and unmapped after it, not malloc'd: freed
 * heap memory of this size stays in the process, and would count against what a
 * snapshot is allowed to hold (its preserved pages and 1% of the state). */
static uint64_t groups_bytes(uint64_t n) { return n * (sizeof(uint64_t) + sizeof(uint32_t)); }

static bool alloc_groups(window_rows *w, uint64_t n, uint64_t n_windows) {
    w->ends = sc__alloc_fails() ? NULL : calloc(n_windows, sizeof *w->ends);
    void *m = sc__alloc_fails() ? MAP_FAILED
                                : mmap(NULL, groups_bytes(n), PROT_READ | PROT_WRITE,
                                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    w->at = m == MAP_FAILED ? NULL : m;
    w->from = w->at ? (uint32_t *)(w->at + n) : NULL;
    return w->ends && w->at;
}

static void free_groups(window_rows *w, uint64_t n) {
    free(w->ends);
    if (w->at) munmap(w->at, groups_bytes(n));
}

static sc_status write_rows_sorted(sc_store *s, window_rows *w, uint64_t n, uint64_t first,
                                   uint64_t last) {
    uint64_t shift = sc__prep_window_shift(s), w0 = first >> shift;
    uint64_t n_windows = (last >> shift) - w0 + 1, touched = 0;
    sc_prep b;
    sc__prep_init(&b, s);
    sc_status st = alloc_groups(w, n, n_windows) ? SC_OK : SC_ENOMEM;
    if (!st) {
        mark_rows(s, w->idx, n, w->n_rows, w->base, w->row_bytes, &touched, w->ends, shift, w0);
        st = sc__prep_reserve(&b, sc__sort_count(s, first, last));
        if (st) sc__sort_clear(s, first, last);
    }
    if (st) {
        sc__prep_finish(&b);
        free_groups(w, n);
        return st;
    }
    group_by_window(s, w, n, shift, w0, n_windows);
    uint64_t e = atomic_load(&s->epoch), written = 0;
    for (uint64_t k = 0; k < n_windows; k++) {
        uint64_t lo = (w0 + k) << shift, hi = ((w0 + k + 1) << shift) - 1;
        /* Cannot fail: the batch and every copy are reserved. */
        (void)sc__prep_marked(&b, lo > first ? lo : first, hi < last ? hi : last, e);
        sc__prep_push(&b);
        uint64_t ready = sc__prep_ready_below(&b, hi + 1);
        sc_store_publish(s); /* the new stamps before the new bytes, as on every path */
        for (; written < n_windows && (w0 + written + 1) << shift <= ready; written++)
            write_window(s, w, written);
    }
    sc__prep_finish(&b);
    sc_store_publish(s);
    for (; written < n_windows; written++) write_window(s, w, written);
    free_groups(w, n);
    sc__writer_add(&s->pages_written, touched);
    return SC_OK;
}

sc_status sc_store_write_rows(sc_store *s, const int64_t *idx, uint64_t n, uint64_t n_rows,
                              uint64_t base, uint64_t row_bytes, const void *src,
                              uint64_t src_stride, uint64_t *bad) {
    uint64_t span[2];
    sc_status st = check_rows(s, idx, n, n_rows, base, row_bytes, bad, span);
    if (st || !n) return st;
    const uint8_t *in = src;
    if (!s->newest_snap) {
        write_rows_fused(s, idx, n, (int64_t)n_rows, base, row_bytes, in, src_stride);
        return SC_OK;
    }
    uint64_t first = (base + span[0] * row_bytes) >> s->page_shift;
    uint64_t last = (base + (span[1] + 1) * row_bytes - 1) >> s->page_shift;
    if (sc__prep_worth_sorting(s, n, first, last) && n <= UINT32_MAX) {
        window_rows w = {idx, (int64_t)n_rows, base, row_bytes, in, src_stride, NULL, NULL, NULL};
        return write_rows_sorted(s, &w, n, first, last);
    }
    /* A live snapshot: every page prepared (and its old content preserved) first, so that a
     * failed copy leaves nothing written; then the rows, in order (the last of repeats wins). */
    st = touch_checked_rows(s, idx, n, (int64_t)n_rows, base, row_bytes, span);
    if (st) return st;
    uint8_t *rows = s->data + base;
    for (uint64_t i = 0; i < n; i++) {
        if (i + SC_PREFETCH_AHEAD < n)
            __builtin_prefetch(rows + row_of(idx[i + SC_PREFETCH_AHEAD], (int64_t)n_rows) * row_bytes,
                               1);
        copy_row(rows + row_of(idx[i], (int64_t)n_rows) * row_bytes, in + i * src_stride,
                 row_bytes);
    }
    return SC_OK;
}

