/* The pieces of MurmurHash3 x64-128 shared by the one-stream version (murmur3.c) and the
 * several-pages-side-by-side one (page_checksums.c). */
#ifndef STATECORE_MURMUR3_PARTS_H
#define STATECORE_MURMUR3_PARTS_H

#include <stdint.h>
#include <string.h>

static const uint64_t MURMUR_C1 = 0x87c37b91114253d5ULL, MURMUR_C2 = 0x4cf5ad432745937fULL;

static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t fmix64(uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ULL;
    k ^= k >> 33;
    return k;
}

static inline uint64_t load64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8); /* unaligned-safe; little-endian hosts only (checked at build) */
    return v;
}

#endif
