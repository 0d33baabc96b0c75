/* Writes of whole rows of an array in the store, by index (StateArray's fancy
 * assignment): bounds checks, the pages' preparation, and the rows' bytes. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

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
        uint64_t row = sc__row_of(idx[i], hi);
        low = row < low ? row : low;
        high = row > high ? row : high;
    }
    span[0] = low;
    span[1] = high;
    return SC_OK;
}

/* The first and last page of the rows between span[0] and span[1]. */
static void span_pages(const sc_store *s, uint64_t base, uint64_t row_bytes,
                       const uint64_t span[2], uint64_t pages[2]) {
    pages[0] = (base + span[0] * row_bytes) >> s->page_shift;
    pages[1] = (base + (span[1] + 1) * row_bytes - 1) >> s->page_shift;
}

/* Marks every page of the rows for sc__prep_marked, counting page writes as the unsorted
 * path does. */
static void mark_rows(sc_store *s, const int64_t *idx, uint64_t n, int64_t hi, uint64_t base,
                      uint64_t row_bytes, uint64_t *touched) {
    uint64_t last_page = UINT64_MAX;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t start = base + sc__row_of(idx[i], hi) * row_bytes;
        sc__mark_row(s->sort_bits, 0, start >> s->page_shift,
                     (start + row_bytes - 1) >> s->page_shift, &last_page, touched);
    }
}

/* Under a live snapshot: every page of the rows marked, then prepared in address order. */
static sc_status touch_rows_sorted(sc_store *s, const int64_t *idx, uint64_t n, int64_t hi,
                                   uint64_t base, uint64_t row_bytes, uint64_t span_first,
                                   uint64_t span_last, uint64_t *touched) {
    mark_rows(s, idx, n, hi, base, row_bytes, touched);
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
            sc__prefetch_meta(s, (base + sc__row_of(idx[i + SC_PREFETCH_AHEAD], hi) * row_bytes) >>
                                     s->page_shift);
        uint64_t row = sc__row_of(idx[i], hi);
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
    uint64_t pages[2], touched = 0;
    span_pages(s, base, row_bytes, span, pages);
    sc_status st =
        sc__prep_worth_sorting(s, n, pages[0], pages[1])
            ? touch_rows_sorted(s, idx, n, hi, base, row_bytes, pages[0], pages[1], &touched)
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
            uint64_t ahead = base + sc__row_of(idx[i + SC_PREFETCH_AHEAD], n_rows) * row_bytes;
            sc__prefetch_meta(s, ahead >> s->page_shift);
            __builtin_prefetch(s->data + ahead, 1);
        }
        uint64_t start = base + sc__row_of(idx[i], n_rows) * row_bytes;
        uint64_t first = start >> s->page_shift, last = (start + row_bytes - 1) >> s->page_shift;
        for (uint64_t p = first; p <= last; p++) {
            if (p == last_page) continue;
            (void)sc__prep_page(&b, p, e); /* restamps only: cannot fail without a snapshot */
            last_page = p;
            touched++;
        }
        sc_store_publish(s); /* the new stamps before the new bytes, as on every path */
        sc__copy_row(s->data + start, src + i * src_stride, row_bytes);
    }
    sc__prep_finish(&b);
    sc__writer_add(&s->pages_written, touched);
}

/* Without a live snapshot, each row right after its pages (write_rows_fused); with one,
 * many rows go to rows_windows.c, fewer have all their pages prepared first. */
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
    uint64_t pages[2];
    span_pages(s, base, row_bytes, span, pages);
    if (sc__prep_worth_sorting(s, n, pages[0], pages[1]) && n <= UINT32_MAX) {
        sc_rows rows = {idx, (int64_t)n_rows, base, row_bytes, in, src_stride};
        st = sc__write_rows_sorted(s, &rows, n, pages[0], pages[1]);
        /* Out of memory changed nothing: the way below needs no grouping arrays, and its
         * own copies fail the same way if they were what could not be had. */
        if (st != SC_ENOMEM) return st;
    }
    /* A live snapshot: every page prepared (and its old content preserved) first, so that a
     * failed copy leaves nothing written; then the rows, in order (the last of repeats wins). */
    st = touch_checked_rows(s, idx, n, (int64_t)n_rows, base, row_bytes, span);
    if (st) return st;
    uint8_t *rows = s->data + base;
    for (uint64_t i = 0; i < n; i++) {
        if (i + SC_PREFETCH_AHEAD < n)
            __builtin_prefetch(rows + sc__row_of(idx[i + SC_PREFETCH_AHEAD], (int64_t)n_rows) * row_bytes,
                               1);
        sc__copy_row(rows + sc__row_of(idx[i], (int64_t)n_rows) * row_bytes, in + i * src_stride,
                     row_bytes);
    }
    return SC_OK;
}

