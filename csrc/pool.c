/* Page pool for preserved copies.
 *
 * A snapshot's first-write copies are the writer's hot path. malloc'ing each page and
 * faulting it in costs several times the copy itself, so copies come from 2 MiB-aligned
 * chunks (transparent huge pages where the kernel allows: one fault per chunk), carved
 * into page-sized slots with a free list. A chunk whose slots are all free is handed to
 * the kernel with MADV_FREE but kept mapped: the next snapshot's copies land in it
 * without a fault or a zeroing pass unless memory pressure reclaimed it meanwhile, so
 * memory still follows the live snapshots' needs. Writer-side only (allocation in the
 * write path, freeing in release), so no locking here. */
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "internal.h"

#define CHUNK_ALIGN (2u << 20)

struct sc_chunk {
    struct sc_chunk *prev, *next; /* in the pool's list of chunks with free slots */
    void *free_slot;              /* singly linked through the slots themselves */
    uint32_t live;
    uint32_t carved;              /* slots handed out at least once (bump allocation) */
    bool listed;
};

static uint64_t chunk_bytes(const sc_pool *p) {
    uint64_t want = (uint64_t)p->page_size * 16;
    return want > CHUNK_ALIGN ? want : CHUNK_ALIGN;
}

void sc__pool_init(sc_pool *p, uint32_t page_size) {
    memset(p, 0, sizeof *p);
    p->page_size = page_size;
    p->chunk_size = chunk_bytes(p);
    /* Slot 0 holds the chunk header (page-sized so slots stay page-aligned). */
    p->slots_per_chunk = (uint32_t)(p->chunk_size / page_size) - 1;
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

static sc_chunk *chunk_new(sc_pool *p) {
    /* Over-allocate, then trim to an aligned chunk: the owner of a slot is then found by
     * masking its address. */
    uint64_t size = p->chunk_size, align = p->chunk_size;
    uint8_t *raw = mmap(NULL, size + align, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (raw == MAP_FAILED) return NULL;
    uint8_t *base = (uint8_t *)(((uintptr_t)raw + align - 1) & ~(uintptr_t)(align - 1));
    if (base > raw) munmap(raw, (size_t)(base - raw));
    uint8_t *end = base + size, *raw_end = raw + size + align;
    if (raw_end > end) munmap(end, (size_t)(raw_end - end));
#ifdef MADV_HUGEPAGE
    madvise(base, size, MADV_HUGEPAGE); /* a hint: fine if refused */
#endif
    sc_chunk *c = (sc_chunk *)base;
    memset(c, 0, sizeof *c);
    p->chunks++;
    return c;
}

static void chunk_free(sc_pool *p, sc_chunk *c) {
    munmap(c, p->chunk_size);
    p->chunks--;
}

static sc_chunk *chunk_reuse(sc_pool *p) {
    sc_chunk *c = p->empty[--p->n_empty];
    /* The header page may have been reclaimed (zeroed) while lazily free: rebuild it. */
    memset(c, 0, sizeof *c);
    return c;
}

static void chunk_retire(sc_pool *p, sc_chunk *c) {
    if (p->n_empty == p->cap_empty) {
        uint64_t cap = p->cap_empty ? p->cap_empty * 2 : 16;
        void **grown = realloc(p->empty, cap * sizeof *grown);
        if (!grown) { chunk_free(p, c); return; }
        p->empty = grown;
        p->cap_empty = cap;
    }
#ifdef MADV_FREE
    madvise(c, p->chunk_size, MADV_FREE);
#endif
    p->empty[p->n_empty++] = c;
}

void *sc__pool_alloc(sc_pool *p) {
    if (!p->partial) {
        sc_chunk *c = p->n_empty ? chunk_reuse(p) : chunk_new(p);
        if (!c) return NULL;
        list_add(p, c);
    }
    sc_chunk *c = p->partial;
    void *slot;
    if (c->free_slot) {
        slot = c->free_slot;
        c->free_slot = *(void **)slot;
    } else {
        slot = (uint8_t *)c + (uint64_t)(c->carved + 1) * p->page_size;
        c->carved++;
    }
    c->live++;
    if (!c->free_slot && c->carved == p->slots_per_chunk) list_remove(p, c);
    return slot;
}

void sc__pool_free(sc_pool *p, void *slot) {
    sc_chunk *c = (sc_chunk *)((uintptr_t)slot & ~(uintptr_t)(p->chunk_size - 1));
    *(void **)slot = c->free_slot;
    c->free_slot = slot;
    c->live--;
    if (!c->listed) list_add(p, c);
    if (c->live == 0) {
        list_remove(p, c);
        chunk_retire(p, c);
    }
}

void sc__pool_destroy(sc_pool *p) {
    while (p->partial) {
        sc_chunk *c = p->partial;
        list_remove(p, c);
        chunk_free(p, c);
    }
    while (p->n_empty) chunk_free(p, p->empty[--p->n_empty]);
    free(p->empty);
    p->empty = NULL;
    p->cap_empty = 0;
    /* Full chunks are not listed: they are freed through their slots by the caller
     * (every node is freed before destroy). */
}
