/* The keyed-state heap: a boundary-tag allocator inside the map's region.
 *
 * Blocks are multiples of 16 bytes (at least 32) with a 16-byte head; the first 8 bytes
 * are size | flags (in use, previous block in use, kind). A free block keeps its list
 * links at +8/+16 and its size in its last 8 bytes, so a block being freed can find a
 * free predecessor and merge with it; free neighbours are always merged, so two free
 * blocks are never adjacent, and a free block that reaches `top` joins the wilderness.
 *
 * Free lists are segregated by size class: one exact class per 16 bytes up to 1 KiB (a
 * pop is a perfect fit), then four classes per power of two (first fit over a few
 * entries). An allocation takes its own class, else splits a block of the smallest
 * larger non-empty class (a bitmap finds it), else carves from the wilderness. Every
 * step is O(1) apart from the bounded first-fit scan.
 *
 * All changes go through kv_poke (tracked writes), the header's included.
 */
#include "kv_internal.h"

#define FIRST_FIT_SCAN 32u

unsigned kv__size_class(uint64_t size) {
    if (size <= 1024) return (unsigned)((size - KV_MIN_BLOCK) / 16);
    unsigned lg = 63u - (unsigned)__builtin_clzll(size);
    unsigned sub = (unsigned)(size >> (lg - 2)) & 3u;
    unsigned c = KV_EXACT_CLASSES + (lg - 10) * 4 + sub;
    return c < KV_N_CLASSES ? c : KV_N_CLASSES - 1;
}

uint64_t kv__class_min(unsigned c) {
    if (c < KV_EXACT_CLASSES) return KV_MIN_BLOCK + 16ull * c;
    unsigned k = c - KV_EXACT_CLASSES, lg = 10 + k / 4, sub = k % 4;
    return (uint64_t)(4 + sub) << (lg - 2);
}

static inline void bit_set(kv_header *h, unsigned c) { h->nonempty[c >> 6] |= 1ull << (c & 63); }
static inline void bit_clear(kv_header *h, unsigned c) {
    h->nonempty[c >> 6] &= ~(1ull << (c & 63));
}

/* Smallest non-empty class above c, or KV_N_CLASSES. */
static unsigned next_nonempty(const kv_header *h, unsigned c) {
    unsigned from = c + 1;
    for (unsigned w = from >> 6; w < KV_BITMAP_WORDS; w++) {
        uint64_t bits = h->nonempty[w];
        if (w == from >> 6) bits &= ~0ull << (from & 63);
        if (bits) {
            unsigned found = w * 64 + (unsigned)__builtin_ctzll(bits);
            return found < KV_N_CLASSES ? found : KV_N_CLASSES;
        }
    }
    return KV_N_CLASSES;
}

static int put_u64(sc_kv *kv, uint64_t off, uint64_t v) {
    int st = SC_OK;
    uint8_t *p = kv_poke(kv, off, 8, &st);
    if (!p) return st;
    memcpy(p, &v, 8);
    return SC_OK;
}

static int get_u64(const sc_kv *kv, uint64_t off, uint64_t *v) {
    uint64_t tmp;
    int st = SC_OK;
    const uint8_t *p = kv_peek(kv, off, 8, &tmp, &st);
    if (!p) return st;
    *v = kv_load64(p);
    return SC_OK;
}

/* A list link must name a free block of the heap. */
static int check_free_block(const sc_kv *kv, const kv_header *h, uint64_t off, unsigned c,
                            uint64_t *size) {
    uint64_t w;
    KV_TRY(kv__block_head(kv, h, off, &w));
    if (w & KV_INUSE || KV_KIND(w) != KV_KIND_FREE) return SC_ECORRUPT;
    if (kv__size_class(KV_SIZE(w)) != c) return SC_ECORRUPT;
    *size = KV_SIZE(w);
    return SC_OK;
}

static int list_push(sc_kv *kv, kv_header *h, uint64_t off, uint64_t size) {
    unsigned c = kv__size_class(size);
    uint64_t old = h->free_head[c];
    int st = SC_OK;
    uint8_t *p = kv_poke(kv, off + 8, 16, &st);
    if (!p) return st;
    uint64_t links[2] = {old, 0};
    memcpy(p, links, 16);
    if (old) KV_TRY(put_u64(kv, old + 16, off));
    h->free_head[c] = off;
    bit_set(h, c);
    return SC_OK;
}

static int list_unlink(sc_kv *kv, kv_header *h, uint64_t off, uint64_t size) {
    unsigned c = kv__size_class(size);
    uint64_t next, prev, sz;
    KV_TRY(get_u64(kv, off + 8, &next));
    KV_TRY(get_u64(kv, off + 16, &prev));
    if (prev) {
        uint64_t back;
        KV_TRY(check_free_block(kv, h, prev, c, &sz));
        KV_TRY(get_u64(kv, prev + 8, &back));
        if (back != off) return SC_ECORRUPT;
    } else if (h->free_head[c] != off) {
        return SC_ECORRUPT;
    }
    if (next) {
        uint64_t fwd;
        KV_TRY(check_free_block(kv, h, next, c, &sz));
        KV_TRY(get_u64(kv, next + 16, &fwd));
        if (fwd != off) return SC_ECORRUPT;
    }
    if (prev) KV_TRY(put_u64(kv, prev + 8, next));
    else {
        h->free_head[c] = next;
        if (!next) bit_clear(h, c);
    }
    if (next) KV_TRY(put_u64(kv, next + 16, prev));
    return SC_OK;
}

/* Mark a free block of `size` at off (its predecessor is in use) and list it. */
static int make_free(sc_kv *kv, kv_header *h, uint64_t off, uint64_t size) {
    KV_TRY(put_u64(kv, off, size | KV_PINUSE));
    KV_TRY(put_u64(kv, off + size - 8, size));
    return list_push(kv, h, off, size);
}

static int set_pinuse(sc_kv *kv, const kv_header *h, uint64_t off, bool on) {
    if (off >= h->top) return SC_OK;  /* the wilderness has no head */
    uint64_t w;
    KV_TRY(kv__block_head(kv, h, off, &w));
    if (!!(w & KV_PINUSE) == on) return SC_OK;
    return put_u64(kv, off, on ? w | KV_PINUSE : w & ~(uint64_t)KV_PINUSE);
}

/* Take the free block at off (already unlinked) of `size` for `need` bytes. */
static int take_block(sc_kv *kv, kv_header *h, uint64_t off, uint64_t size, uint64_t need,
                      unsigned kind) {
    uint64_t flags = KV_INUSE | KV_PINUSE | ((uint64_t)kind << KV_KIND_SHIFT);
    if (size - need >= KV_MIN_BLOCK) {
        KV_TRY(put_u64(kv, off, need | flags));
        KV_TRY(make_free(kv, h, off + need, size - need));
        h->used_bytes += need;
        return SC_OK;
    }
    KV_TRY(put_u64(kv, off, size | flags));
    KV_TRY(set_pinuse(kv, h, off + size, true));
    h->used_bytes += size;
    return SC_OK;
}

int kv__alloc(sc_kv *kv, kv_header *h, uint64_t bytes, unsigned kind, uint64_t *out) {
    uint64_t heap = kv->len - h->header_bytes;
    if (bytes > heap) return SC_KV_FULL;
    KV_TRY(kv__touch_header(kv));
    uint64_t need = kv_round16(bytes);
    if (need < KV_MIN_BLOCK) need = KV_MIN_BLOCK;
    unsigned c = kv__size_class(need);
    uint64_t off = h->free_head[c], size = 0;

    /* 1. own class: exact classes fit by construction; others first-fit, bounded */
    if (off && c < KV_EXACT_CLASSES) {
        KV_TRY(check_free_block(kv, h, off, c, &size));
    } else if (off) {
        unsigned seen = 0;
        for (; off && seen < FIRST_FIT_SCAN; seen++) {
            KV_TRY(check_free_block(kv, h, off, c, &size));
            if (size >= need) break;
            KV_TRY(get_u64(kv, off + 8, &off));
        }
        if (seen == FIRST_FIT_SCAN) off = 0;
    }
    /* 2. the smallest larger class: every block there fits */
    if (!off) {
        unsigned c2 = next_nonempty(h, c);
        if (c2 < KV_N_CLASSES) {
            off = h->free_head[c2];
            if (!off) return SC_ECORRUPT;  /* bitmap says non-empty */
            KV_TRY(check_free_block(kv, h, off, c2, &size));
        }
    }
    if (off) {
        KV_TRY(list_unlink(kv, h, off, size));
        KV_TRY(take_block(kv, h, off, size, need, kind));
        *out = off;
        return SC_OK;
    }
    /* 3. the wilderness; a table segment must leave what a running batch reserved */
    uint64_t room = kv->len - h->top;
    uint64_t keep = kind == KV_KIND_SEGMENT ? kv->reserve : 0;
    if (need > room || room - need < keep) return SC_KV_FULL;
    off = h->top;
    h->top += need;
    /* The block before the wilderness is always in use: free blocks merge into it. */
    KV_TRY(put_u64(kv, off, need | KV_INUSE | KV_PINUSE | ((uint64_t)kind << KV_KIND_SHIFT)));
    h->used_bytes += need;
    *out = off;
    return SC_OK;
}

int kv__free(sc_kv *kv, kv_header *h, uint64_t off) {
    uint64_t w;
    KV_TRY(kv__touch_header(kv));
    KV_TRY(kv__block_head(kv, h, off, &w));
    if (!(w & KV_INUSE) || KV_KIND(w) == KV_KIND_FREE) return SC_ECORRUPT;
    uint64_t size = KV_SIZE(w), start = off, total = size;
    if (h->used_bytes < size) return SC_ECORRUPT;

    uint64_t next = off + size;
    if (next < h->top) {
        uint64_t nw;
        KV_TRY(kv__block_head(kv, h, next, &nw));
        if (!(nw & KV_INUSE)) {
            if (KV_KIND(nw) != KV_KIND_FREE) return SC_ECORRUPT;
            KV_TRY(list_unlink(kv, h, next, KV_SIZE(nw)));
            total += KV_SIZE(nw);
        } else {
            KV_TRY(set_pinuse(kv, h, next, false));
        }
    }
    if (!(w & KV_PINUSE)) {
        uint64_t psize, pw;
        if (off < h->header_bytes + KV_MIN_BLOCK) return SC_ECORRUPT;
        KV_TRY(get_u64(kv, off - 8, &psize));
        if (psize % 16 || psize < KV_MIN_BLOCK || psize > off - h->header_bytes)
            return SC_ECORRUPT;
        KV_TRY(kv__block_head(kv, h, off - psize, &pw));
        if (pw & KV_INUSE || KV_SIZE(pw) != psize) return SC_ECORRUPT;
        KV_TRY(list_unlink(kv, h, off - psize, psize));
        start = off - psize;
        total += psize;
    }
    h->used_bytes -= size;
    if (start + total == h->top) {
        h->top = start;
        return SC_OK;
    }
    return make_free(kv, h, start, total);
}
