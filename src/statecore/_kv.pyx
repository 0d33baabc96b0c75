# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Binding of the keyed-state map (csrc/kv.h). statecore.kv.KVStore subclasses KVCore.

Live maps: a call must not overlap any other writer of the store (the table moves entries
while it grows, and a snapshot must never fall inside an operation). Batch calls hold the
store's write lock and release the GIL for the C part. A single call (values under 1 MiB)
never releases the GIL, so when the write lock is free nobody can be writing and nobody
can start before the call returns: it skips the lock (about half its fixed cost) and only
takes it when someone holds it. Views over a snapshot read through sc_snapshot_read without the lock and
hold the snapshot (Snapshot._acquire/_done) while they read; a view call that releases the
GIL also holds a buffer export of the store, so the store cannot be closed under it.

Every call counts itself in KVCore._active from before it first uses the handle until it
is done with it (as py-lmdb counts active operations), so close() cannot free the handle
under a call that released the GIL: it raises instead, as Store.close does.

While a call that keeps the GIL uses the handle, it makes no object the garbage collector
tracks (bytes objects and list appends are fine): a collection runs finalizers, and one
that closes the store would free what a view is reading (Store.close() does not wait for
views' reads) or wait forever for the write lock a live call holds."""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport (PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize,
                            PyBytes_GET_SIZE)
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE, PyList_New, PyList_SET_ITEM
from cpython.pycapsule cimport PyCapsule_GetPointer
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF, Py_XDECREF, Py_XINCREF
from libc.stdint cimport uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset

from statecore import _core, errors
from statecore._args import byte_view

cdef extern from "statecore.h" nogil:
    ctypedef struct sc_store:
        pass
    const char *sc_strerror(int st)
    enum:
        SC_OK
        SC_EINVAL
        SC_ERANGE
        SC_ENOMEM
        SC_EFORMAT
        SC_ECORRUPT
        SC_ENOSNAP

cdef extern from "kv.h" nogil:
    enum:
        SC_KV_MAX_KEY
        SC_KV_MAX_VALUE
        SC_KV_MIN_REGION
        SC_KV_FULL
        SC_KV_NOT_EMPTY
        SC_KV_READONLY
        SC_KV_MISMATCH
    ctypedef struct sc_kv:
        pass
    ctypedef struct sc_kv_buf:
        const void *ptr
        uint64_t len
    ctypedef struct sc_kv_cursor:
        uint64_t bucket
        uint64_t pos
    ctypedef struct sc_kv_entry:
        uint64_t key_off, klen, val_off, vlen
    ctypedef struct sc_kv_stats:
        uint64_t present, count, changes, buckets, initial_buckets, level, split, splits
        uint64_t overflow_buckets, slots_per_bucket, region_bytes, header_bytes
        uint64_t used_bytes, free_bytes, wilderness_bytes

    const char *sc_kv_strerror(int st) noexcept
    int sc_kv_open(sc_store *s, uint64_t base, uint64_t length, uint64_t snap_epoch,
                   uint64_t capacity, sc_kv **out)
    void sc_kv_close(sc_kv *kv)
    int sc_kv_recorded_size(sc_store *s, uint64_t base, uint64_t snap_epoch, uint64_t *length)
    int sc_kv_probe(sc_kv *kv, int *present)
    int sc_kv_clear(sc_kv *kv)
    uint64_t sc_kv_hash(const void *key, uint64_t length) noexcept
    int sc_kv_get(sc_kv *kv, const void *key, uint64_t klen, uint64_t *val_off,
                  uint64_t *vlen, int *found)
    int sc_kv_read(sc_kv *kv, uint64_t off, void *dst, uint64_t length)
    int sc_kv_put(sc_kv *kv, const void *key, uint64_t klen, const void *val, uint64_t vlen)
    int sc_kv_delete(sc_kv *kv, const void *key, uint64_t klen, int *found)
    int sc_kv_get_many(sc_kv *kv, const sc_kv_buf *keys, uint64_t n, uint64_t *val_off,
                       uint64_t *vlen)
    int sc_kv_read_many(sc_kv *kv, const uint64_t *off, const uint64_t *length,
                        void *const *dst, uint64_t n, uint64_t *failed_at)
    int sc_kv_put_many(sc_kv *kv, const sc_kv_buf *keys, const sc_kv_buf *vals, uint64_t n,
                       uint64_t *failed_at)
    int sc_kv_delete_many(sc_kv *kv, const sc_kv_buf *keys, uint64_t n, uint64_t *deleted)
    int sc_kv_scan(sc_kv *kv, sc_kv_cursor *cursor, sc_kv_entry *out, uint64_t max,
                   uint64_t *n_out)
    int sc_kv_stat(sc_kv *kv, sc_kv_stats *out)
    int sc_kv_verify(sc_kv *kv, char *msg, size_t msg_len)

MAX_KEY_SIZE = SC_KV_MAX_KEY
MAX_VALUE_SIZE = SC_KV_MAX_VALUE
MIN_REGION = SC_KV_MIN_REGION

cdef uint64_t MISSING = <uint64_t>-1
cdef Py_ssize_t GET_CHUNK = 4096      # keys per GIL-free lookup pass of get_many
cdef Py_ssize_t SCAN_CHUNK = 512      # entries per refill of an iterator
cdef uint64_t NOGIL_BYTES = 1 << 20   # single calls copying more release the GIL


# ---- the one place KV status codes become exceptions -----------------------------------
cdef int raise_kv(int st, str what, str detail=None) except -1:
    from statecore.kv import CorruptKV, KVFull
    msg = f"{what}: {sc_kv_strerror(st).decode()}"
    if st == SC_KV_FULL:
        raise KVFull(msg + "; nothing was written (use a larger store or region)")
    if st == SC_KV_NOT_EMPTY:
        raise ValueError(msg + " (or its header was overwritten): open the map on a zeroed "
                         "region (offset=, size=), or zero the region first")
    if st == SC_KV_READONLY:
        raise TypeError(f"{what}: this KVStore is a read-only view")
    if st == SC_KV_MISMATCH:
        raise errors.StoreMismatch(f"{what}: {detail}" if detail else
                                   msg + " (open it with the offset= and size= it was made with)")
    if st == SC_ECORRUPT:
        raise CorruptKV((f"{what}: {detail}" if detail else msg) + " (the map's structure in "
                        "the store is damaged; KVStore.verify() describes it)")
    # Every status the core shares: its one map in _core.
    _core._raise_status(st, what, CorruptKV)
    return -1


cdef inline int check(int st, str what) except -1:
    if st != SC_OK:
        raise_kv(st, what)
    return 0


# ---- bytes-like arguments ----------------------------------------------------------------
cdef int arg_bytes(object obj, Py_buffer *buf, const char **ptr, uint64_t *n, str what,
                   uint64_t limit) except -1:
    """Point at obj's bytes. Returns 1 when buf holds an export the caller releases."""
    cdef int owned = 0
    if PyBytes_CheckExact(obj):
        ptr[0] = PyBytes_AS_STRING(obj)
        n[0] = <uint64_t>PyBytes_GET_SIZE(obj)
    else:
        view = byte_view(obj, what)  # TypeError naming the argument; flattens, rejects objects
        PyObject_GetBuffer(view, buf, PyBUF_SIMPLE)
        owned = 1
        ptr[0] = <const char *>buf.buf
        n[0] = <uint64_t>buf.len
    if n[0] > limit:
        if owned:
            PyBuffer_Release(buf)
        raise ValueError(f"{what} is {n[0]} bytes; a {what} may be at most {limit} bytes")
    return owned


cdef class _Batch:
    """C views of a sequence of bytes-like objects, pinned until released: by the tuple
    itself when given one, else by a reference to each item taken up front (as tuple()
    would, but releasable in parts: a batch that is done with its first keys can drop
    them while they are still in cache); other than bytes objects also by a buffer
    export each."""
    cdef sc_kv_buf *items
    cdef Py_buffer *bufs
    cdef char *owned
    cdef PyObject **refs        # NULL when seq (a tuple) holds the items
    cdef Py_ssize_t n           # items (with refs: references [0, n) are held until released)
    cdef Py_ssize_t released    # items [0, released) are released
    cdef object seq

    def __dealloc__(self):
        self.release()

    cdef void release_to(self, Py_ssize_t k) noexcept:
        """Release items [released, k): their C views must not be used afterwards."""
        cdef Py_ssize_t i
        for i in range(self.released, k):
            if self.owned != NULL and self.owned[i]:
                PyBuffer_Release(&self.bufs[i])
                self.owned[i] = 0
            if self.refs != NULL:
                Py_XDECREF(self.refs[i])
                self.refs[i] = NULL
        if k > self.released:
            self.released = k

    cdef void release(self) noexcept:
        self.release_to(self.n)
        free(self.items)
        free(self.bufs)
        free(self.owned)
        free(self.refs)
        self.items = NULL
        self.bufs = NULL
        self.owned = NULL
        self.refs = NULL
        self.seq = None


cdef inline void pin_list_items(_Batch b, list items, Py_ssize_t upto) noexcept:
    """Take references to items [b.n, upto) of the list (b.n counts the references held)."""
    cdef PyObject *o
    while b.n < upto:
        o = PyList_GET_ITEM(items, b.n)
        Py_XINCREF(o)
        b.refs[b.n] = o
        b.n += 1


cdef _Batch make_batch(object items, str what, uint64_t limit):
    cdef _Batch b = _Batch.__new__(_Batch)
    cdef Py_ssize_t i, n
    cdef const char *p = NULL
    cdef uint64_t length = 0
    cdef bint is_list = type(items) is list
    if is_list:
        # Each item is pinned as it is reached (one pass over the items, which matters
        # when they are scattered in memory); the first item that is not bytes pins all
        # the rest first, because converting it runs Python code, which could change
        # the list. Until then no Python code runs and the GIL is held.
        n = PyList_GET_SIZE(items)
        b.refs = <PyObject **>malloc((n or 1) * sizeof(PyObject *))
        if b.refs == NULL:
            raise MemoryError(what)
    else:
        b.seq = items if type(items) is tuple else tuple(items)
        n = len(b.seq)
    b.items = <sc_kv_buf *>malloc((n or 1) * sizeof(sc_kv_buf))
    if b.items == NULL:
        raise MemoryError(what)
    for i in range(n):
        if is_list:
            if b.n == i:
                pin_list_items(b, <list>items, i + 1)
            obj = <object>b.refs[i]
        else:
            obj = b.seq[i]
        if PyBytes_CheckExact(obj):
            p = PyBytes_AS_STRING(obj)
            length = <uint64_t>PyBytes_GET_SIZE(obj)
            if length > limit:
                raise ValueError(f"{what}[{i}] is {length} bytes; each may be at most "
                                 f"{limit} bytes")
        else:
            if is_list:
                pin_list_items(b, <list>items, n)
            if b.bufs == NULL:
                b.bufs = <Py_buffer *>malloc((n or 1) * sizeof(Py_buffer))
                b.owned = <char *>malloc(n or 1)
                if b.bufs == NULL or b.owned == NULL:
                    raise MemoryError(what)
                memset(b.owned, 0, n or 1)
            b.n = n
            b.owned[i] = <char>arg_bytes(obj, &b.bufs[i], &p, &length, f"{what}[{i}]", limit)
        b.items[i].ptr = p
        b.items[i].len = length
    b.n = n
    return b


# ---- the map ----------------------------------------------------------------------------
cdef class KVCore:
    cdef sc_kv *_kv
    cdef int _active            # calls using _kv right now (close() refuses while > 0)
    cdef uint64_t _writes       # write calls through this handle (iterators look again)
    cdef object _store
    cdef object _snap           # Snapshot for a view, else None
    cdef object _acquire, _release_lock, _locked, _pending, _drain, _store_check
    cdef readonly bint readonly
    cdef readonly bint is_view
    cdef readonly uint64_t offset
    cdef readonly uint64_t region_size

    def __cinit__(self, *args, **kwargs):
        self._kv = NULL

    def __dealloc__(self):
        if self._kv != NULL:
            sc_kv_close(self._kv)
            self._kv = NULL

    def _attach(self, store, snap, uint64_t offset, uint64_t size, uint64_t capacity,
                bint readonly):
        cdef sc_store *s
        cdef sc_kv *kv = NULL
        cdef uint64_t epoch = 0 if snap is None else snap.epoch
        cdef int st
        cdef str mismatch = None
        if self._kv != NULL:
            raise ValueError("KVStore is already attached")
        if snap is not None:
            snap._acquire()
        try:
            # The store pointer is taken last, after every Python call, and the store
            # counts this as a running call until it is no longer used: a close() from
            # another thread meanwhile raises instead of freeing it.
            capsule = store._enter_call()
            try:
                s = <sc_store *>PyCapsule_GetPointer(capsule, b"statecore.sc_store")
                st = sc_kv_open(s, offset, size, epoch, capacity, &kv)
                if st == SC_KV_MISMATCH:
                    mismatch = self._mismatch(s, offset, size, epoch)
            finally:
                store._leave_call()
        finally:
            if snap is not None:
                snap._done()
        if st == SC_KV_MISMATCH:
            raise_kv(st, "open key-value map", mismatch)
        check(st, "open key-value map")
        if self._kv != NULL:  # attached by another thread meanwhile
            sc_kv_close(kv)
            raise ValueError("KVStore is already attached")
        self._kv = kv
        self._store = store
        self._snap = snap
        self.is_view = snap is not None
        self.readonly = readonly or snap is not None
        self.offset = offset
        self.region_size = size
        self._acquire = store._write_lock.acquire
        self._release_lock = store._write_lock.release
        self._locked = store._write_lock.locked
        self._pending = store._pending_releases
        self._drain = store._drain_releases
        self._store_check = store._check

    cdef str _mismatch(self, sc_store *s, uint64_t offset, uint64_t size, uint64_t epoch):
        cdef uint64_t recorded = 0
        sc_kv_recorded_size(s, offset, epoch, &recorded)
        return (f"size={size}, but the map at offset={offset} was made for a region of "
                f"{recorded} bytes; open it with size={recorded}")

    def _detach(self):
        cdef sc_kv *kv = self._kv
        if kv == NULL:
            return
        if self._active:
            raise errors.StateError("cannot close: a call is still running in another thread")
        self._kv = NULL
        sc_kv_close(kv)

    @property
    def closed(self):
        return self._kv == NULL

    # -- entering and leaving a call --
    # _enter/_leave bracket a call: _enter checks the handle and counts the call before
    # anything that can run Python code or switch threads, so from then on close() refuses
    # and _kv stays valid until _leave. _lock/_unlock only serialize with the store's
    # writers (live) or hold the snapshot (views).
    cdef inline int _use(self) except -1:
        if self._kv == NULL:
            raise errors.StoreClosed("KVStore is closed")
        self._active += 1
        return 0

    cdef int _lock(self) except -1:
        if self._snap is not None:
            self._snap._acquire()
            try:
                self._store_check()
            except BaseException:
                self._snap._done()
                raise
            return 0
        self._acquire()
        try:
            self._store_check()  # after the lock: close() takes it too
            if self._pending:
                self._drain()
        except BaseException:
            self._release_lock()
            raise
        return 0

    cdef void _unlock(self) noexcept:
        if self._snap is not None:
            try:
                self._snap._done()
            except BaseException:
                pass
        else:
            self._release_lock()

    cdef int _enter(self) except -1:
        self._use()
        try:
            self._lock()
        except BaseException:
            self._active -= 1
            raise
        return 0

    cdef void _leave(self) noexcept:
        self._unlock()
        self._active -= 1

    cdef int _check_writable(self, str what) except -1:
        if self.readonly and self._kv != NULL:
            raise TypeError(f"{what}: this KVStore is read-only"
                            + (" (a view of a snapshot)" if self.is_view else ""))
        self._writes += 1  # every write entry point passes here
        return 0

    cdef int _enter_write(self, str what) except -1:
        self._check_writable(what)
        return self._enter()

    # A single call that keeps the GIL from start to end. Returns whether it took the lock
    # (pass that to _leave_single). Call it after every argument is converted: converting
    # may run Python code, which may switch threads.
    cdef int _enter_single(self) except -1:
        self._use()
        try:
            if self._snap is None and not self._pending and not self._locked():
                self._store_check()
                return 0
            self._lock()
        except BaseException:
            self._active -= 1
            raise
        return 1

    cdef inline void _leave_single(self, int locked) noexcept:
        if locked:
            self._unlock()
        self._active -= 1

    # -- single keys --
    cdef object _value(self, object key, object default, bint raise_missing):
        """The value of key (bytes), or default / KeyError when it is missing."""
        cdef Py_buffer kb
        cdef const char *kp = NULL
        cdef uint64_t kn = 0, off = 0, vl = 0
        cdef int found = 0, owned, locked = 0, st
        cdef bytes out
        cdef char *dst
        owned = arg_bytes(key, &kb, &kp, &kn, "key", SC_KV_MAX_KEY)
        try:
            locked = self._enter_single()
            try:
                while True:
                    check(sc_kv_get(self._kv, kp, kn, &off, &vl, &found), "get")
                    if not found:
                        if raise_missing:
                            raise KeyError(key)
                        return default
                    if vl < NOGIL_BYTES or locked or self._snap is not None:
                        break
                    # A big copy releases the GIL: hold the lock for it, and look again
                    # (taking the lock may have let a writer in).
                    self._lock()
                    locked = 1
                out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>vl)
                dst = PyBytes_AS_STRING(out)
                if vl >= NOGIL_BYTES and self._snap is None:
                    with nogil:
                        st = sc_kv_read(self._kv, off, dst, vl)
                else:
                    st = sc_kv_read(self._kv, off, dst, vl)
                check(st, "get")
                return out
            finally:
                self._leave_single(locked)
        finally:
            if owned:
                PyBuffer_Release(&kb)

    def __getitem__(self, key):
        return self._value(key, None, True)

    def get(self, key, default=None):
        return self._value(key, default, False)

    def __contains__(self, key):
        cdef Py_buffer kb
        cdef const char *kp = NULL
        cdef uint64_t kn = 0, off = 0, vl = 0
        cdef int found = 0, owned
        cdef int locked
        owned = arg_bytes(key, &kb, &kp, &kn, "key", SC_KV_MAX_KEY)
        try:
            locked = self._enter_single()
            try:
                check(sc_kv_get(self._kv, kp, kn, &off, &vl, &found), "contains")
                return found != 0
            finally:
                self._leave_single(locked)
        finally:
            if owned:
                PyBuffer_Release(&kb)

    def __setitem__(self, key, value):
        cdef Py_buffer kb, vb
        cdef const char *kp = NULL
        cdef const char *vp = NULL
        cdef uint64_t kn = 0, vn = 0
        cdef int kown = 0, vown = 0, st, locked
        kown = arg_bytes(key, &kb, &kp, &kn, "key", SC_KV_MAX_KEY)
        try:
            vown = arg_bytes(value, &vb, &vp, &vn, "value", SC_KV_MAX_VALUE)
            if vn < NOGIL_BYTES:
                self._check_writable("put")
                locked = self._enter_single()
                try:
                    check(sc_kv_put(self._kv, kp, kn, vp, vn), "put")
                finally:
                    self._leave_single(locked)
            else:
                self._enter_write("put")
                try:
                    with nogil:
                        st = sc_kv_put(self._kv, kp, kn, vp, vn)
                    check(st, "put")
                finally:
                    self._leave()
        finally:
            if kown:
                PyBuffer_Release(&kb)
            if vown:
                PyBuffer_Release(&vb)

    def __delitem__(self, key):
        cdef Py_buffer kb
        cdef const char *kp = NULL
        cdef uint64_t kn = 0
        cdef int found = 0, owned
        cdef int locked
        owned = arg_bytes(key, &kb, &kp, &kn, "key", SC_KV_MAX_KEY)
        try:
            self._check_writable("delete")
            locked = self._enter_single()
            try:
                check(sc_kv_delete(self._kv, kp, kn, &found), "delete")
            finally:
                self._leave_single(locked)
            if not found:
                raise KeyError(key)
        finally:
            if owned:
                PyBuffer_Release(&kb)

    def __len__(self):
        cdef sc_kv_stats s
        cdef int locked = self._enter_single()
        try:
            check(sc_kv_stat(self._kv, &s), "len")
        finally:
            self._leave_single(locked)
        # The count is read from the region's bytes as they are: every entry takes at least
        # a block header (16 bytes) of the region, so a larger count is damage (and, cast
        # to Py_ssize_t, could be a negative length).
        if s.count > s.region_bytes // 16:
            raise_kv(SC_ECORRUPT, "len", f"the map's header counts {s.count} entries, more "
                     f"than its region of {s.region_bytes} bytes can hold")
        return <Py_ssize_t>s.count

    cdef sc_kv_stats _stat(self) except *:
        cdef sc_kv_stats s
        self._enter()
        try:
            check(sc_kv_stat(self._kv, &s), "stats")
        finally:
            self._leave()
        return s

    # -- batches --
    def get_many(self, keys, default=None):
        """Values of keys, in order (default for a missing key). Per 4096 keys: one C call
        looks them up, then each result is allocated once and one more C call copies the
        values straight into them, both without the GIL."""
        cdef _Batch kb = make_batch(keys, "keys", SC_KV_MAX_KEY)
        cdef Py_ssize_t n = kb.n, i, start, m, made = 0
        cdef uint64_t *offs = <uint64_t *>malloc(GET_CHUNK * sizeof(uint64_t))
        cdef uint64_t *lens = <uint64_t *>malloc(GET_CHUNK * sizeof(uint64_t))
        cdef void **dsts = <void **>malloc(GET_CHUNK * sizeof(void *))
        # A chunk's results while their bytes are copied: only referenced from here, so no
        # Python code (another thread, gc.get_objects()) can see one before it is filled.
        cdef PyObject **objs = <PyObject **>malloc(GET_CHUNK * sizeof(PyObject *))
        cdef list out = PyList_New(n)
        cdef object v
        cdef PyObject *old
        cdef uint64_t failed = 0
        cdef int st = SC_OK
        cdef object pin = None
        if offs == NULL or lens == NULL or dsts == NULL or objs == NULL:
            free(offs)
            free(lens)
            free(dsts)
            free(objs)
            raise MemoryError("get_many")
        try:
            for i in range(n):  # a valid list while it fills (a failure leaves Nones)
                Py_INCREF(None)
                PyList_SET_ITEM(out, i, None)
            self._enter()
            try:
                pin = self._pin()
                start = 0
                while start < n:
                    m = min(GET_CHUNK, n - start)
                    with nogil:
                        st = sc_kv_get_many(self._kv, kb.items + start, m, offs, lens)
                    check(st, "get_many")
                    kb.release_to(start + m)  # done with these keys while they are in cache
                    made = 0
                    for i in range(m):
                        if lens[i] == MISSING:
                            objs[i] = NULL
                            dsts[i] = NULL
                        else:
                            v = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>lens[i])
                            Py_INCREF(v)
                            objs[i] = <PyObject *>v
                            dsts[i] = PyBytes_AS_STRING(v)
                        made = i + 1
                    with nogil:
                        st = sc_kv_read_many(self._kv, offs, lens, dsts, m, &failed)
                    check(st, "get_many")
                    for i in range(m):  # each result moves into the list (its None goes)
                        if objs[i] == NULL:
                            Py_INCREF(default)
                            objs[i] = <PyObject *>default
                        old = PyList_GET_ITEM(out, start + i)
                        PyList_SET_ITEM(out, start + i, <object>objs[i])
                        objs[i] = NULL
                        Py_XDECREF(old)
                    made = 0
                    start += m
            finally:
                for i in range(made):  # results of a chunk that failed
                    Py_XDECREF(objs[i])
                if pin is not None:
                    pin.release()
                self._leave()
        finally:
            free(offs)
            free(lens)
            free(dsts)
            free(objs)
            kb.release()
        return out

    cdef object _pin(self):
        # Views run without the write lock: an export keeps the store from closing while
        # the GIL is released. Live calls hold the lock, which close() needs.
        return memoryview(self._store) if self._snap is not None else None

    def put_many(self, keys, values):
        """Insert or overwrite keys[i] -> values[i] in one GIL-free C call. All or nothing:
        on an error (sc.KVFull, ...) the map is as before. Repeated keys: the last wins."""
        cdef _Batch kb = make_batch(keys, "keys", SC_KV_MAX_KEY)
        cdef _Batch vb
        cdef uint64_t failed = 0
        cdef int st = SC_OK
        try:
            vb = make_batch(values, "values", SC_KV_MAX_VALUE)
            try:
                if kb.n != vb.n:
                    raise ValueError(f"keys and values must have the same length, got "
                                     f"{kb.n} and {vb.n}")
                self._enter_write("put_many")
                try:
                    with nogil:
                        st = sc_kv_put_many(self._kv, kb.items, vb.items, <uint64_t>kb.n, &failed)
                    if st != SC_OK:
                        raise_kv(st, f"put_many (at item {failed} of {kb.n})")
                finally:
                    self._leave()
            finally:
                vb.release()
        finally:
            kb.release()

    def delete_many(self, keys):
        """Delete the keys that are present (missing keys are ignored); returns how many
        were deleted."""
        cdef _Batch kb = make_batch(keys, "keys", SC_KV_MAX_KEY)
        cdef uint64_t deleted = 0
        cdef int st = SC_OK
        try:
            self._enter_write("delete_many")
            try:
                with nogil:
                    st = sc_kv_delete_many(self._kv, kb.items, <uint64_t>kb.n, &deleted)
                check(st, "delete_many")
            finally:
                self._leave()
        finally:
            kb.release()
        return deleted

    def clear(self):
        """Remove every key at once (O(initial table size), not O(keys))."""
        self._enter_write("clear")
        try:
            check(sc_kv_clear(self._kv), "clear")
        finally:
            self._leave()

    # -- iteration --
    def __iter__(self):
        return _KVIter.start(self, 0)

    def _iter(self, int mode):
        return _KVIter.start(self, mode)

    # -- inspection --
    def _stats(self):
        cdef sc_kv_stats s = self._stat()
        return {
            "present": bool(s.present), "count": s.count, "changes": s.changes,
            "buckets": s.buckets, "initial_buckets": s.initial_buckets, "level": s.level,
            "split": s.split, "splits": s.splits, "overflow_buckets": s.overflow_buckets,
            "slots_per_bucket": s.slots_per_bucket, "region_bytes": s.region_bytes,
            "header_bytes": s.header_bytes, "used_bytes": s.used_bytes,
            "free_bytes": s.free_bytes, "wilderness_bytes": s.wilderness_bytes,
        }

    def _verify(self):
        cdef char msg[512]
        cdef int st
        cdef object pin = None
        msg[0] = 0
        self._enter()
        try:
            pin = self._pin()
            with nogil:
                st = sc_kv_verify(self._kv, msg, sizeof(msg))
        finally:
            if pin is not None:
                pin.release()
            self._leave()
        if st == SC_ECORRUPT and msg[0]:
            from statecore.kv import CorruptKV
            raise CorruptKV(f"key-value map damaged: {msg.decode(errors='replace')}")
        check(st, "verify")

    def _present(self):
        cdef int present = 0
        self._enter()
        try:
            check(sc_kv_probe(self._kv, &present), "probe")
        finally:
            self._leave()
        return bool(present)

    @staticmethod
    def key_hash(key):
        """The 64-bit hash that places key: murmur3 x64-128 with seed 0, first half
        (what mmh3.hash64(key, signed=False)[0] returns)."""
        cdef Py_buffer kb
        cdef const char *kp = NULL
        cdef uint64_t kn = 0
        cdef int owned = arg_bytes(key, &kb, &kp, &kn, "key", SC_KV_MAX_KEY)
        try:
            return sc_kv_hash(kp, kn)
        finally:
            if owned:
                PyBuffer_Release(&kb)


cdef class _KVIter:
    """Keys (mode 0), values (1) or (key, value) pairs (2), fetched SCAN_CHUNK at a time.
    Raises RuntimeError if a key is inserted or deleted (not merely overwritten) meanwhile,
    as dict does: the map's change counter is compared at each refill, before the end is
    reported, and before each item once this handle has written since the last look (a
    write through another handle or thread is caught at the next refill or the end)."""
    cdef KVCore core
    cdef int mode
    cdef sc_kv_cursor cur
    cdef uint64_t changes
    cdef uint64_t writes        # core._writes when the change counter was last compared
    cdef list buf
    cdef Py_ssize_t pos
    cdef bint done              # the scan reached the end of the table
    cdef bint finished          # StopIteration was raised

    @staticmethod
    cdef _KVIter start(KVCore core, int mode):
        cdef _KVIter it = _KVIter.__new__(_KVIter)
        cdef sc_kv_stats s = core._stat()
        it.core = core
        it.mode = mode
        it.changes = s.changes
        it.writes = core._writes
        it.buf = []
        it.pos = 0
        it.done = False
        it.finished = False
        return it

    def __iter__(self):
        return self

    def __next__(self):
        if self.core is None:
            raise TypeError("this iterator belongs to no KVStore: iterate a KVStore "
                            "(iter(kv), kv.items(), kv.values()) to get one")
        if self.finished:
            raise StopIteration
        if self.core._writes != self.writes:
            self._check_unchanged()
        if self.pos < len(self.buf):
            item = self.buf[self.pos]
            self.pos += 1
            return item
        if not self.done:
            self._refill()
            if self.buf:
                self.pos = 1
                return self.buf[0]
        # The last chunk was served from the buffer: a change since its refill must not
        # end the loop quietly.
        self._check_unchanged()
        self.finished = True
        self.buf = []
        raise StopIteration

    cdef int _compare(self, sc_kv_stats *s) except -1:
        if s.changes != self.changes:
            raise RuntimeError("KVStore changed size during iteration")
        self.writes = self.core._writes
        return 0

    cdef int _check_unchanged(self) except -1:
        cdef sc_kv_stats s = self.core._stat()
        return self._compare(&s)

    cdef int _refill(self) except -1:
        cdef KVCore c = self.core
        cdef sc_kv_entry ent[512]
        cdef sc_kv_stats s
        cdef uint64_t n = 0, i
        cdef bytes k, v
        # Only bytes objects are made while the handle is in use, and the pairs after it:
        # making a pair can start a garbage collection (see the module docstring).
        cdef list keys = [], vals = []
        c._enter()
        try:
            check(sc_kv_stat(c._kv, &s), "iterate")
            self._compare(&s)
            check(sc_kv_scan(c._kv, &self.cur, ent, SCAN_CHUNK, &n), "iterate")
            for i in range(n):
                if self.mode != 1:
                    k = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>ent[i].klen)
                    check(sc_kv_read(c._kv, ent[i].key_off, PyBytes_AS_STRING(k), ent[i].klen),
                          "iterate")
                    keys.append(k)
                if self.mode != 0:
                    v = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>ent[i].vlen)
                    check(sc_kv_read(c._kv, ent[i].val_off, PyBytes_AS_STRING(v), ent[i].vlen),
                          "iterate")
                    vals.append(v)
        finally:
            c._leave()
        self.buf = keys if self.mode == 0 else vals if self.mode == 1 else list(zip(keys, vals))
        if n < <uint64_t>SCAN_CHUNK:
            self.done = True
        self.pos = 0
        return 0
