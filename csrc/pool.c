/* Page pool for preserved copies, and the nodes that describe them.
 *
 * A snapshot's first-write copies are the writer's hot path. malloc'ing each page and
 * faulting it in costs several times the copy itself, so copies come from 2 MiB-aligned
 * chunks (transparent huge pages where the kernel allows: one fault per chunk), carved
 * into page-sized slots. A chunk whose slots are all free is handed to the kernel with
 * MADV_FREE but kept mapped: the next snapshot's copies land in it without a fault or a
 * zeroing pass unless memory pressure reclaimed it meanwhile, so memory still follows the
 * live snapshots' needs.
 *
 * Each slot is a node: its metadata sits in arrays beside the chunk, one entry per slot,
 * and the node is named by a 32-bit id. Arrays rather than a struct because a struct of
 * two u64 and three u32 pads to 32 bytes where the fields need 28; with the id-sized
 * chain table that keeps a snapshot's overhead within 1% of a 4 KiB page.
 *
 * Ids map to chunks through a two-level directory whose parts never move, so snapshot
 * readers in other threads can follow ids while the writer adds chunks. Writer-side only
 * otherwise (allocation in the write path, freeing in release): no locking here. The
 * write path's copier thread (prep_copier.c) also reads, for nodes of its batch, the
 * directory, the chunk's base and page[i]: none of these change while the node is live
 * (page[i] is set by sc__node_new before the hand-off), and a node not yet published is
 * in no snapshot's owned list, so no release can free it under the copier. */
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "internal.h"

#define CHUNK_ALIGN (2u << 20)
#define DIR_MAX 4096u /* directory entries; a leaf covers the rest of the id space */

static uint32_t log2_u64(uint64_t x) { return (uint32_t)(63 - __builtin_clzll(x)); }

void sc__pool_init(sc_pool *p, uint32_t page_size) {
    memset(p, 0, sizeof *p);
    p->page_size = page_size;
    p->page_shift = log2_u64(page_size);
    uint64_t want = (uint64_t)page_size * 16;
    p->chunk_size = want > CHUNK_ALIGN ? want : CHUNK_ALIGN;
    p->slot_shift = log2_u64(p->chunk_size / page_size);
    /* Node ids are 1 + chunk id * slots per chunk + slot, and must fit 32 bits. */
    p->max_chunks = (uint32_t)(UINT32_MAX >> p->slot_shift);
    uint32_t id_bits = log2_u64(p->max_chunks) + 1;
    p->leaf_shift = id_bits > 22 ? id_bits - 12 : 10;
}

static void list_add(sc_pool *p, sc_chunk *c) {
    c->prev = NULL;
    c->next = p->partial;
    if (p->partial) p->partial->prev = c;
    p->partial = c;
    c->listed = true;
}

static void list_remove(sc_pool *p, sc_chunk *c) {
    if (c->prev) c->prev->next = c->next;
    else p->partial = c->next;
    if (c->next) c->next->prev = c->prev;
    c->prev = c->next = NULL;
    c->listed = false;
}

#ifdef SC_FAULT_INJECTION
_Atomic long sc_test_allocs_left = -1;

bool sc__alloc_fails(void) {
    long left = atomic_load(&sc_test_allocs_left);
    return left >= 0 && atomic_fetch_sub(&sc_test_allocs_left, 1) <= 0;
}
#endif

static uint8_t *map_aligned(uint64_t size) {
    if (sc__alloc_fails()) return NULL;
    /* Over-allocate, then trim to an aligned chunk (huge pages need the alignment). */
    uint8_t *raw = mmap(NULL, size * 2, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (raw == MAP_FAILED) return NULL;
    uint8_t *base = (uint8_t *)(((uintptr_t)raw + size - 1) & ~(uintptr_t)(size - 1));
    if (base > raw) munmap(raw, (size_t)(base - raw));
    uint8_t *end = base + size, *raw_end = raw + size * 2;
    if (raw_end > end) munmap(end, (size_t)(raw_end - end));
#ifdef MADV_HUGEPAGE
    madvise(base, size, MADV_HUGEPAGE); /* a hint: fine if refused */
#endif
    return base;
}

/* Register c under its id. Directory and leaves are written before any node of c is
 * published, and a reader reaches them only through a published id. */
static bool dir_put(sc_pool *p, uint32_t id, sc_chunk *c) {
    uint32_t leaf = id >> p->leaf_shift;
    if (!p->dir) {
        p->dir = calloc(DIR_MAX, sizeof *p->dir);
        if (!p->dir) return false;
    }
    if (!p->dir[leaf]) {
        p->dir[leaf] = calloc((size_t)1 << p->leaf_shift, sizeof **p->dir);
        if (!p->dir[leaf]) return false;
    }
    p->dir[leaf][id & ((1u << p->leaf_shift) - 1)] = c;
    return true;
}

static sc_chunk *chunk_new(sc_pool *p) {
    if (p->next_id >= p->max_chunks) return NULL; /* 2^32 preserved pages: out of ids */
    uint64_t slots = (uint64_t)1 << p->slot_shift;
    /* One allocation for the header and the metadata arrays, u64 arrays first. */
    sc_chunk *c = sc__alloc_fails() ? NULL : calloc(1, sizeof *c + slots * SC_NODE_META_BYTES);
    if (!c) return NULL;
    c->base = map_aligned(p->chunk_size);
    if (!c->base || !dir_put(p, p->next_id, c)) {
        if (c->base) munmap(c->base, p->chunk_size);
        free(c);
        return NULL;
    }
    uint8_t *meta = (uint8_t *)(c + 1);
    c->version = (uint64_t *)meta;
    c->stamp = c->version + slots;
    c->page = (uint32_t *)(c->stamp + slots);
    c->next_owned = c->page + slots;
    c->next_in_page = (_Atomic uint32_t *)(c->next_owned + slots);
    c->id = p->next_id++;
    p->chunks++;
    p->spare += slots;
    return c;
}

static void chunk_free(sc_pool *p, sc_chunk *c) {
    p->spare -= ((uint64_t)1 << p->slot_shift) - c->live;
    p->dir[c->id >> p->leaf_shift][c->id & ((1u << p->leaf_shift) - 1)] = NULL;
    munmap(c->base, p->chunk_size);
    free(c);
    p->chunks--;
}

/* Room in the empty list for one more chunk. */
static bool empty_room(sc_pool *p) {
    if (p->n_empty < p->cap_empty) return true;
    uint64_t cap = p->cap_empty ? p->cap_empty * 2 : 16;
    sc_chunk **grown = realloc(p->empty, cap * sizeof *grown);
    if (!grown) return false;
    p->empty = grown;
    p->cap_empty = cap;
    return true;
}

static void chunk_retire(sc_pool *p, sc_chunk *c) {
    if (!empty_room(p)) { chunk_free(p, c); return; }
#ifdef MADV_FREE
    madvise(c->base, p->chunk_size, MADV_FREE);
#endif
    c->carved = 0;
    c->free_head = 0;
    p->empty[p->n_empty++] = c;
}

sc_node sc__pool_alloc(sc_pool *p) {
    if (!p->partial) {
        sc_chunk *c = p->n_empty ? p->empty[--p->n_empty] : chunk_new(p);
        if (!c) return 0;
        list_add(p, c);
    }
    p->spare--;
    sc_chunk *c = p->partial;
    uint32_t slot;
    if (c->free_head) {
        slot = c->free_head - 1;
        c->free_head = c->next_owned[slot]; /* free slots chain through next_owned */
    } else {
        slot = c->carved++;
    }
    c->live++;
    if (!c->free_head && c->carved == (1u << p->slot_shift)) list_remove(p, c);
    return ((c->id << p->slot_shift) | slot) + 1;
}

void sc__pool_free(sc_pool *p, sc_node n) {
    sc_chunk *c = sc__chunk_of(p, n);
    uint32_t slot = sc__slot_of(p, n);
    c->next_owned[slot] = c->free_head;
    c->free_head = slot + 1;
    c->live--;
    p->spare++;
    if (!c->listed) list_add(p, c);
    if (c->live == 0) {
        list_remove(p, c);
        chunk_retire(p, c);
    }
}

/* Chunks made ahead go to the empty list, untouched: they cost address space, not memory,
 * until used. */
bool sc__pool_reserve(sc_pool *p, uint64_t n) {
    while (p->spare < n) {
        if (!empty_room(p)) return false;
        sc_chunk *c = chunk_new(p);
        if (!c) return false;
        p->empty[p->n_empty++] = c;
    }
    return true;
}

void sc__pool_destroy(sc_pool *p) {
    /* Every node is freed before destroy, so every chunk is retired by now. */
    while (p->partial) {
        sc_chunk *c = p->partial;
        list_remove(p, c);
        chunk_free(p, c);
    }
    while (p->n_empty) chunk_free(p, p->empty[--p->n_empty]);
    free(p->empty);
    p->empty = NULL;
    p->cap_empty = 0;
    if (p->dir) {
        for (uint32_t i = 0; i < DIR_MAX; i++) free(p->dir[i]);
        free(p->dir);
        p->dir = NULL;
    }
    p->next_id = 0;
}
