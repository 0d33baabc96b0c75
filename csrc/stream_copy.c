/* Whole-page copies into the store that bypass the cache (non-temporal stores).
 *
 * A bulk write or an applied delta fills pages nobody reads soon. Through the cache, each
 * destination line is first read from memory (to own it) and later written back: two
 * memory transfers per line, and the bulk evicts whatever the program had cached. Streaming
 * stores write the line once. On this project's machine a 4 KiB page copy from a hot
 * source into a cold store went from 7-8.5 GB/s to 13-16 GB/s.
 *
 * Streaming stores are weakly ordered: they may become visible before earlier ordinary
 * stores. A page's new version must be visible before its new bytes (a snapshot reader
 * re-checks the version after copying a live page), so a run of streaming copies starts
 * with a store fence, and ends with one so that whoever the caller tells next sees the
 * bytes. */
#include <string.h>

#include "internal.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#define AVX512 __attribute__((target("avx512f")))

AVX512 static void copy_avx512(uint8_t *dst, const uint8_t *src, uint64_t len) {
    for (uint64_t i = 0; i < len; i += 256) {
        __m512i a = _mm512_loadu_si512(src + i), b = _mm512_loadu_si512(src + i + 64);
        __m512i c = _mm512_loadu_si512(src + i + 128), d = _mm512_loadu_si512(src + i + 192);
        _mm512_stream_si512((void *)(dst + i), a);
        _mm512_stream_si512((void *)(dst + i + 64), b);
        _mm512_stream_si512((void *)(dst + i + 128), c);
        _mm512_stream_si512((void *)(dst + i + 192), d);
    }
}

/* SSE2 is part of x86-64: every such CPU has it. */
static void copy_sse2(uint8_t *dst, const uint8_t *src, uint64_t len) {
    for (uint64_t i = 0; i < len; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
        _mm_stream_si128((__m128i *)(dst + i), a);
        _mm_stream_si128((__m128i *)(dst + i + 16), b);
        _mm_stream_si128((__m128i *)(dst + i + 32), c);
        _mm_stream_si128((__m128i *)(dst + i + 48), d);
    }
}

bool sc__have_avx512(void) {
    /* Any thread may be first: each computes the same answer. */
    static _Atomic int cached = -1;
    int v = atomic_load_explicit(&cached, memory_order_relaxed);
    if (v < 0) {
        __builtin_cpu_init();
        v = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
        atomic_store_explicit(&cached, v, memory_order_relaxed);
    }
    return v;
}

void sc__stream_fence(void) { _mm_sfence(); }

void sc__stream_page(uint8_t *dst, const uint8_t *src, uint64_t len) {
    /* Pages are at least 512 bytes and page-aligned in the store; anything else (never
     * expected) takes the ordinary copy. */
    if (len % 256 || (uintptr_t)dst % 64) {
        memcpy(dst, src, len);
    } else if (sc__have_avx512()) {
        copy_avx512(dst, src, len);
    } else {
        copy_sse2(dst, src, len);
    }
}
#else
bool sc__have_avx512(void) { return false; }
void sc__stream_fence(void) { atomic_thread_fence(memory_order_seq_cst); }
void sc__stream_page(uint8_t *dst, const uint8_t *src, uint64_t len) { memcpy(dst, src, len); }
#endif
