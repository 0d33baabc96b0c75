/* The per-page checksum (murmur3 x64-128, seed 0, low 64 bits) of many equal-sized pages
 * at once, bit for bit what sc_page_checksum gives for each page.
 *
 * One murmur3 stream is a chain of dependent multiplies and rotates: a core runs it at
 * about a third of what its multipliers could do. Hashing several pages side by side
 * keeps them busy: four pages interleaved in scalar code (any CPU), or eight pages in the
 * lanes of AVX-512 registers where the CPU has AVX-512DQ (chosen once, at run time).
 * Replication checksums every page twice (primary and follower); this is that cost. */
#include <stdatomic.h>
#include <stdbool.h>
#include <string.h>

#include "delta_pages.h"
#include "internal.h"
#include "murmur3_parts.h"
#include "parallel.h"

static const uint64_t C1 = MURMUR_C1, C2 = MURMUR_C2;

static inline uint64_t finish(uint64_t h1, uint64_t h2, uint64_t len) {
    h1 ^= len;
    h2 ^= len;
    h1 += h2;
    h2 += h1;
    h1 = fmix64(h1);
    h2 = fmix64(h2);
    return h1 + h2;
}

#define MIX(h1, h2, p)                                                   \
    do {                                                                 \
        uint64_t k1_ = load64(p), k2_ = load64((p) + 8);                 \
        k1_ *= C1; k1_ = rotl64(k1_, 31); k1_ *= C2; h1 ^= k1_;          \
        h1 = rotl64(h1, 27); h1 += h2; h1 = h1 * 5 + 0x52dce729;         \
        k2_ *= C2; k2_ = rotl64(k2_, 33); k2_ *= C1; h2 ^= k2_;          \
        h2 = rotl64(h2, 31); h2 += h1; h2 = h2 * 5 + 0x38495ab5;         \
    } while (0)

/* Four pages of `len` bytes (a multiple of 16) side by side. */
static void four_pages(const uint8_t *const p[4], uint64_t len, uint64_t out[4]) {
    uint64_t a1 = 0, a2 = 0, b1 = 0, b2 = 0, c1 = 0, c2 = 0, d1 = 0, d2 = 0;
    for (uint64_t i = 0; i < len; i += 16) {
        MIX(a1, a2, p[0] + i);
        MIX(b1, b2, p[1] + i);
        MIX(c1, c2, p[2] + i);
        MIX(d1, d2, p[3] + i);
    }
    out[0] = finish(a1, a2, len);
    out[1] = finish(b1, b2, len);
    out[2] = finish(c1, c2, len);
    out[3] = finish(d1, d2, len);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_AVX512_PATH 1

#define AVX512 __attribute__((target("avx512f,avx512dq")))

AVX512 static inline __m512i mul5_add(__m512i h, __m512i c) {
    return _mm512_add_epi64(_mm512_add_epi64(_mm512_slli_epi64(h, 2), h), c);
}

/* Eight pages at p[0..7], one per 64-bit lane. Each step reads 64 bytes (four murmur3
 * blocks) of every page and transposes them, so every load is a whole cache line. */
AVX512 static void eight_pages(const uint8_t *const p[8], uint64_t len, uint64_t out[8]) {
    const __m512i c1 = _mm512_set1_epi64((long long)C1), c2 = _mm512_set1_epi64((long long)C2);
    const __m512i n1 = _mm512_set1_epi64(0x52dce729), n2 = _mm512_set1_epi64(0x38495ab5);
    /* Transpose index vectors: unpacklo/hi of pairs, then 128-bit lane shuffles. */
    const __m512i sel_lo = _mm512_set_epi64(13, 12, 5, 4, 9, 8, 1, 0);
    const __m512i sel_hi = _mm512_set_epi64(15, 14, 7, 6, 11, 10, 3, 2);
    const __m512i fin_lo = _mm512_set_epi64(11, 10, 9, 8, 3, 2, 1, 0);
    const __m512i fin_hi = _mm512_set_epi64(15, 14, 13, 12, 7, 6, 5, 4);
    __m512i h1 = _mm512_setzero_si512(), h2 = _mm512_setzero_si512();
    uint64_t i = 0;
    for (; i + 64 <= len; i += 64) {
        /* r[j] holds qwords 0..7 of page j's 64 bytes: blocks b = 0..3 are qwords 2b, 2b+1. */
        __m512i r0 = _mm512_loadu_si512(p[0] + i), r1 = _mm512_loadu_si512(p[1] + i);
        __m512i r2 = _mm512_loadu_si512(p[2] + i), r3 = _mm512_loadu_si512(p[3] + i);
        __m512i r4 = _mm512_loadu_si512(p[4] + i), r5 = _mm512_loadu_si512(p[5] + i);
        __m512i r6 = _mm512_loadu_si512(p[6] + i), r7 = _mm512_loadu_si512(p[7] + i);
        /* 8x8 transpose of qwords: t[q] gets qword q of every page, page j in lane j. */
        __m512i a0 = _mm512_unpacklo_epi64(r0, r1), a1 = _mm512_unpackhi_epi64(r0, r1);
        __m512i a2 = _mm512_unpacklo_epi64(r2, r3), a3 = _mm512_unpackhi_epi64(r2, r3);
        __m512i a4 = _mm512_unpacklo_epi64(r4, r5), a5 = _mm512_unpackhi_epi64(r4, r5);
        __m512i a6 = _mm512_unpacklo_epi64(r6, r7), a7 = _mm512_unpackhi_epi64(r6, r7);
        __m512i b0 = _mm512_permutex2var_epi64(a0, sel_lo, a2);
        __m512i b1 = _mm512_permutex2var_epi64(a1, sel_lo, a3);
        __m512i b2 = _mm512_permutex2var_epi64(a0, sel_hi, a2);
        __m512i b3 = _mm512_permutex2var_epi64(a1, sel_hi, a3);
        __m512i b4 = _mm512_permutex2var_epi64(a4, sel_lo, a6);
        __m512i b5 = _mm512_permutex2var_epi64(a5, sel_lo, a7);
        __m512i b6 = _mm512_permutex2var_epi64(a4, sel_hi, a6);
        __m512i b7 = _mm512_permutex2var_epi64(a5, sel_hi, a7);
        __m512i t[8];
        t[0] = _mm512_permutex2var_epi64(b0, fin_lo, b4);
        t[1] = _mm512_permutex2var_epi64(b1, fin_lo, b5);
        t[2] = _mm512_permutex2var_epi64(b2, fin_lo, b6);
        t[3] = _mm512_permutex2var_epi64(b3, fin_lo, b7);
        t[4] = _mm512_permutex2var_epi64(b0, fin_hi, b4);
        t[5] = _mm512_permutex2var_epi64(b1, fin_hi, b5);
        t[6] = _mm512_permutex2var_epi64(b2, fin_hi, b6);
        t[7] = _mm512_permutex2var_epi64(b3, fin_hi, b7);
        for (int b = 0; b < 4; b++) {
            __m512i k1 = t[2 * b], k2 = t[2 * b + 1];
            k1 = _mm512_mullo_epi64(k1, c1);
            k1 = _mm512_rol_epi64(k1, 31);
            k1 = _mm512_mullo_epi64(k1, c2);
            h1 = _mm512_xor_si512(h1, k1);
            h1 = _mm512_rol_epi64(h1, 27);
            h1 = _mm512_add_epi64(h1, h2);
            h1 = mul5_add(h1, n1);
            k2 = _mm512_mullo_epi64(k2, c2);
            k2 = _mm512_rol_epi64(k2, 33);
            k2 = _mm512_mullo_epi64(k2, c1);
            h2 = _mm512_xor_si512(h2, k2);
            h2 = _mm512_rol_epi64(h2, 31);
            h2 = _mm512_add_epi64(h2, h1);
            h2 = mul5_add(h2, n2);
        }
    }
    uint64_t x1[8], x2[8];
    _mm512_storeu_si512(x1, h1);
    _mm512_storeu_si512(x2, h2);
    for (int j = 0; j < 8; j++) {
        for (uint64_t k = i; k < len; k += 16) MIX(x1[j], x2[j], p[j] + k); /* 16..48 left */
        out[j] = finish(x1[j], x2[j], len);
    }
}

#endif

/* Checksums of pages p[0..n), each `len` bytes. */
void sc__page_checksums_at(const uint8_t *const *p, uint64_t n, uint64_t len, uint64_t *out) {
    uint64_t i = 0;
    if (len % 16 == 0 && len) {
#ifdef HAVE_AVX512_PATH
        if (sc__have_avx512())
            for (; i + 8 <= n; i += 8) eight_pages(p + i, len, out + i);
#endif
        for (; i + 4 <= n; i += 4) four_pages(p + i, len, out + i);
    }
    for (; i < n; i++) out[i] = sc_page_checksum(p[i], len);
}

#define BATCH 64

void sc_page_checksums(const uint8_t *pages, uint64_t page_size, uint64_t n, uint64_t *out) {
    const uint8_t *p[BATCH];
    for (uint64_t i = 0; i < n; i += BATCH) {
        uint64_t k = n - i < BATCH ? n - i : BATCH;
        for (uint64_t j = 0; j < k; j++) p[j] = pages + (i + j) * page_size;
        sc__page_checksums_at(p, k, page_size, out + i);
    }
}

typedef struct {
    const uint8_t *pages;
    uint64_t page_size;
    const uint64_t *expect;
    uint64_t first_bad;
} verify_job;

static int verify_range(void *ctx, uint64_t begin, uint64_t end) {
    verify_job *j = ctx;
    uint64_t got[BATCH];
    for (uint64_t i = begin; i < end; i += BATCH) {
        uint64_t k = end - i < BATCH ? end - i : BATCH;
        sc_page_checksums(j->pages + i * j->page_size, j->page_size, k, got);
        for (uint64_t m = 0; m < k; m++) {
            if (got[m] == j->expect[i + m]) continue;
            /* The lowest bad index across threads. */
            uint64_t bad = i + m, seen = __atomic_load_n(&j->first_bad, __ATOMIC_RELAXED);
            while (bad < seen && !__atomic_compare_exchange_n(&j->first_bad, &seen, bad, false,
                                                              __ATOMIC_RELAXED,
                                                              __ATOMIC_RELAXED)) {
            }
            return SC_ECORRUPT;
        }
    }
    return SC_OK;
}

sc_status sc_verify_page_checksums(const uint8_t *pages, uint64_t page_size, uint64_t n,
                                   const uint64_t *expect, int threads, uint64_t *bad_page) {
    verify_job job = {pages, page_size, expect, UINT64_MAX};
    int st = sc__parallel_for(n, sc__threads_for(n * page_size, threads), verify_range, &job);
    if (st && bad_page) *bad_page = job.first_bad;
    return (sc_status)st;
}
