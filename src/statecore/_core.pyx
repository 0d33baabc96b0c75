# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Thin binding over the C core. The Python API (store.py, delta.py, ...) validates
arguments and gives the friendly messages; this layer maps status codes to exceptions,
releases the GIL around bulk work and counts buffer exports and in-flight calls."""

import os

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.pycapsule cimport PyCapsule_New
from libc.errno cimport errno
from libc.stdint cimport UINT64_MAX, int64_t, uint8_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from statecore import errors

cdef extern from "Python.h":
    const Py_ssize_t PY_SSIZE_T_MAX

HEADER_SIZE = SC_HEADER_SIZE
MAX_THREADS = SC_MAX_THREADS  # the most threads a bulk job (replay) uses
FORMAT_VERSION = SC_FORMAT_VERSION
KIND_DELTA = SC_KIND_DELTA
KIND_CHECKPOINT = SC_KIND_CHECKPOINT

cdef extern from *:
    """
    #include <stddef.h>
    #define SC_OFF_COMPRESSION offsetof(sc_header, compression)
    #define SC_OFF_N_PAGES offsetof(sc_header, n_pages)
    #define SC_OFF_PAYLOAD_BYTES offsetof(sc_header, payload_bytes)
    #define SC_OFF_STORE_UUID offsetof(sc_header, store_uuid)
    #define SC_OFF_INDEX_CHECKSUM offsetof(sc_header, index_checksum)
    #define SC_OFF_HEADER_CHECKSUM offsetof(sc_header, header_checksum)
    """
    const size_t SC_OFF_COMPRESSION, SC_OFF_N_PAGES, SC_OFF_PAYLOAD_BYTES
    const size_t SC_OFF_STORE_UUID, SC_OFF_INDEX_CHECKSUM, SC_OFF_HEADER_CHECKSUM

# Where the fields Python reads or rewrites in place sit in a delta's or checkpoint's
# header (sc_header): the parts of a large delta get their own header from the delta's.
HEADER_OFFSETS = {"compression": SC_OFF_COMPRESSION, "n_pages": SC_OFF_N_PAGES,
                  "payload_bytes": SC_OFF_PAYLOAD_BYTES, "store_uuid": SC_OFF_STORE_UUID,
                  "index_checksum": SC_OFF_INDEX_CHECKSUM,
                  "header_checksum": SC_OFF_HEADER_CHECKSUM}

# ---- fork safety ------------------------------------------------------------------
# A child of fork() shares a file-backed mapping with its parent; writing through it
# would corrupt the parent's state, so every object made before the fork refuses work.
cdef unsigned long _fork_generation = 0


def _after_fork_in_child():
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


# ---- the one place status codes become exceptions ----------------------------------
cdef int raise_status(sc_status st, str what, object corrupt=None,
                      str detail=None) except -1:
    cdef int err = errno  # first: Python code below may overwrite it
    msg = f"{what}: {detail or sc_strerror(st).decode()}"
    if st == SC_EINVAL:
        raise ValueError(msg)
    if st == SC_ERANGE:
        raise IndexError(msg)
    if st == SC_ENOMEM:
        raise MemoryError(msg)
    if st == SC_EIO:
        raise OSError(err, f"{msg}: {os.strerror(err) if err else 'I/O error'}")
    if st == SC_EMISMATCH:
        raise errors.StoreMismatch(msg)
    if st == SC_EFORMAT:
        raise errors.UnsupportedFormat(msg)
    if st == SC_ECORRUPT:
        raise (corrupt or errors.CorruptDelta)(msg)
    if st == SC_EGAP:
        raise errors.EpochGap(msg)
    if st == SC_ENOSNAP:
        raise errors.SnapshotReleased(msg)
    if st == SC_EINCOMPAT:
        raise errors.IncompatibleDelta(msg)
    if st == SC_EBUSY:
        raise errors.StoreLocked(msg)
    raise errors.StateError(msg)


def _raise_status(int st, str what, object corrupt=None):
    """The same map for sibling extension modules (statecore._kv), so there is one."""
    raise_status(<sc_status>st, what, corrupt)


cdef inline int check(sc_status st, str what, object corrupt=None) except -1:
    if st != SC_OK:
        raise_status(st, what, corrupt)
    return 0


def page_checksum(const uint8_t[::1] data not None):
    """murmur3 x64-128 (seed 0), low 64 bits: the per-page checksum of every format."""
    cdef uint64_t h
    with nogil:
        h = sc_page_checksum(&data[0] if data.shape[0] else NULL, data.shape[0])
    return h


def page_checksums(const uint8_t[::1] data not None, uint32_t page_size):
    """The page_checksum of each page_size-byte page of data, as little-endian u64 bytes
    (several pages hashed side by side: the same values, faster)."""
    cdef uint64_t n
    if page_size == 0 or <uint64_t>data.shape[0] % page_size:
        raise ValueError(f"data ({data.shape[0]} bytes) must be whole pages of page_size "
                         f"({page_size}) bytes")
    n = <uint64_t>data.shape[0] // page_size
    cdef bytes out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>(n * 8))
    cdef uint64_t *o = <uint64_t *>PyBytes_AS_STRING(out)
    if n:
        with nogil:
            sc_page_checksums(&data[0], page_size, n, o)
    return out


def delta_pages_bytes(uint64_t n, uint32_t page_size):
    """Bytes of an uncompressed delta carrying n pages of page_size bytes."""
    return sc_delta_pages_bytes(n, page_size)


# ---- buffers ------------------------------------------------------------------------
cdef inline void fill_byte_view(Py_buffer *view, object owner, void *buf, Py_ssize_t *shape,
                                Py_ssize_t n, bint readonly) noexcept:
    """A flat, contiguous byte buffer: every export in this module has this shape."""
    shape[0] = n
    view.buf = buf
    view.obj = owner
    view.len = n
    view.readonly = readonly
    view.itemsize = 1
    view.format = "B"
    view.ndim = 1
    view.shape = shape
    view.strides = NULL
    view.suboffsets = NULL
    view.internal = NULL


cdef object _not_copyable(object obj, str how):
    return TypeError(f"cannot copy or pickle a {type(obj).__name__}: it is a view of native "
                     f"memory owned by statecore; {how}")


# Cython's automatic pickling would copy the fields: the data pointer of a NativeBuffer
# (freed twice), the store of a _Region (an export the store never counted). Neither can be
# copied or pickled.
@cython.auto_pickle(False)
cdef class NativeBuffer:
    """A read-only buffer made by the core (a delta, a page list), exported without copies."""
    cdef uint8_t *data
    cdef Py_ssize_t length
    cdef Py_ssize_t shape[1]
    cdef bint mapped  # from sc_buffer_alloc (else malloc)

    def __dealloc__(self):
        if self.mapped:
            sc_buffer_free(self.data, <uint64_t>self.length)
        else:
            free(self.data)

    def __len__(self):
        return self.length

    def __reduce_ex__(self, protocol):
        raise _not_copyable(self, "copy its bytes instead (bytes(buf))")

    def __getbuffer__(self, Py_buffer *view, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("statecore buffers are read-only")
        fill_byte_view(view, self, self.data, self.shape, self.length, True)

    def __releasebuffer__(self, Py_buffer *view):
        pass


cdef NativeBuffer wrap_native(uint8_t *data, uint64_t length, bint mapped=False):
    cdef NativeBuffer b = NativeBuffer.__new__(NativeBuffer)
    b.data = data
    b.length = <Py_ssize_t>length
    b.mapped = mapped
    return b


@cython.auto_pickle(False)
cdef class _Region:
    """Writable view of the live bytes, for StateArray's in-place numpy writes only.
    Counts as an export of the store, so the mapping cannot go away under it."""
    cdef StoreCore store
    cdef Py_ssize_t shape[1]

    def __getbuffer__(self, Py_buffer *view, int flags):
        if self.store is None:
            raise TypeError("this _Region belongs to no store: get one from "
                            "StoreCore._writable_region()")
        self.store._enter_export()
        fill_byte_view(view, self, <void *>sc_store_data(self.store._s), self.shape,
                       <Py_ssize_t>sc_store_size(self.store._s), False)

    def __releasebuffer__(self, Py_buffer *view):
        if self.store is not None:
            self.store._exports -= 1

    def __reduce_ex__(self, protocol):
        raise _not_copyable(self, "ask the store for another (StoreCore._writable_region())")


cdef class Progress:
    """Bytes done / total of a running core call, polled from another thread."""
    cdef sc_progress p

    @property
    def done(self):
        return self.p.done

    @property
    def total(self):
        return self.p.total


# ---- parsed deltas and checkpoints ---------------------------------------------------
cdef class DeltaView:
    """A validated delta or checkpoint buffer, held while in use."""
    cdef Py_buffer buf
    cdef bint has_buf
    cdef Py_buffer payload_buf
    cdef bint has_payload
    cdef sc_delta_view v
    cdef const uint8_t *payload
    cdef readonly object source

    def __dealloc__(self):
        if self.has_buf:
            PyBuffer_Release(&self.buf)
        if self.has_payload:
            PyBuffer_Release(&self.payload_buf)

    @property
    def base_epoch(self): return self.v.header.base_epoch
    @property
    def target_epoch(self): return self.v.header.target_epoch
    @property
    def page_size(self): return self.v.header.page_size
    @property
    def n_pages(self): return self.v.header.n_pages
    @property
    def store_pages(self): return self.v.header.store_pages
    @property
    def schema_version(self): return self.v.header.schema_version
    @property
    def compression(self): return self.v.header.compression
    @property
    def format_version(self): return self.v.header.format_version
    @property
    def store_uuid(self): return bytes(self.v.header.store_uuid[:16])
    @property
    def payload_offset(self): return self.v.payload_offset
    @property
    def total_bytes(self): return self.v.total_bytes
    @property
    def has_pages(self): return self.payload != NULL or self.v.header.n_pages == 0

    def attach_payload(self, object payload, object corrupt):
        """Give a compressed delta its decompressed pages; checks every page checksum."""
        cdef uint64_t bad = 0
        cdef sc_status st
        if self.has_payload:
            raise ValueError("payload already attached")
        PyObject_GetBuffer(payload, &self.payload_buf, PyBUF_SIMPLE)
        self.has_payload = True
        if <uint64_t>self.payload_buf.len != self.v.header.n_pages * self.v.header.page_size:
            raise corrupt("decompressed payload has the wrong size")
        with nogil:
            st = sc_verify_page_checksums(<const uint8_t *>self.payload_buf.buf,
                                          self.v.header.page_size, self.v.header.n_pages,
                                          self.v.checksums, 0, &bad)
        if st == SC_ECORRUPT:
            raise corrupt(f"checksum mismatch in page {self.v.ids[bad]} (entry {bad})")
        check(st, "verify pages", corrupt)
        self.payload = <const uint8_t *>self.payload_buf.buf


def parse(object source, int kind, bint verify_pages, object corrupt):
    """Validate a delta/checkpoint buffer. Raises `corrupt` naming what is wrong."""
    cdef DeltaView dv = DeltaView.__new__(DeltaView)
    cdef uint64_t bad = 0
    cdef sc_status st
    PyObject_GetBuffer(source, &dv.buf, PyBUF_SIMPLE)
    dv.has_buf = True
    if (<uintptr_t>dv.buf.buf) % 8:
        # u64 arrays are read in place; a misaligned buffer gets one aligned copy.
        PyBuffer_Release(&dv.buf)
        dv.has_buf = False
        source = bytes(source)
        PyObject_GetBuffer(source, &dv.buf, PyBUF_SIMPLE)
        dv.has_buf = True
    dv.source = source
    with nogil:
        # Structure first, then the page checksums with the batch hasher (several pages
        # side by side; the same checks as the parser's own verify_pages, faster).
        st = sc_delta_parse(<const uint8_t *>dv.buf.buf, <uint64_t>dv.buf.len, <uint16_t>kind,
                            0, &dv.v, &bad)
        if st == SC_OK and verify_pages and dv.v.payload != NULL:
            st = sc_verify_page_checksums(dv.v.payload, dv.v.header.page_size,
                                          dv.v.header.n_pages, dv.v.checksums, 0, &bad)
    if st == SC_ECORRUPT and verify_pages and dv.v.header.n_pages and bad < dv.v.header.n_pages \
            and dv.v.ids != NULL:
        raise corrupt(f"checksum mismatch in page {dv.v.ids[bad]} (entry {bad})")
    if st == SC_ECORRUPT:
        raise corrupt(_describe_corruption(source, kind))
    check(st, "parse", corrupt)
    dv.payload = dv.v.payload
    return dv


cdef object _row_out_of_bounds(int64_t index, uint64_t n_rows):
    return IndexError(f"index {index} is out of bounds for axis 0 with size {n_rows}: "
                      f"indices must be in [{-<int64_t>n_rows}, {n_rows - 1}]")


cdef str _describe_corruption(object source, int kind):
    # The C parser says only "corrupt"; re-derive the first failing check for the message.
    cdef const uint8_t[::1] b
    try:
        b = memoryview(source).cast("B")
    except TypeError:
        return "unreadable buffer"
    n = b.shape[0]
    name = "checkpoint" if kind == SC_KIND_CHECKPOINT else "delta"
    if n < SC_HEADER_SIZE:
        return f"{name} truncated: {n} bytes, header needs {SC_HEADER_SIZE}"
    magic = bytes(b[:8])
    if magic not in (b"SCDELTA1", b"SCCKPT01"):
        return f"not a statecore {name}: bad magic {magic!r}"
    if (magic == b"SCCKPT01") != (kind == SC_KIND_CHECKPOINT):
        return f"not a statecore {name}: magic {magic!r} belongs to another kind"
    if sc_page_checksum(&b[0], 120) != (<const uint64_t *>&b[120])[0]:
        return f"{name} header checksum mismatch"
    return f"{name} structure invalid (sizes, index checksum, page ids or versions)"


STORE_HEADER_BYTES = SC_STORE_HEADER_BYTES


cdef tuple _store_header(const uint8_t[::1] head):
    """(status, detail, fields) of a store file's first bytes: the core's checks, and for a
    refusal the words for it. A file without the store magic is not a store at all
    (corrupt, as for a delta's or checkpoint's magic); an older format version is damage,
    a newer one UnsupportedFormat."""
    cdef sc_store_header_info h
    cdef sc_status st
    with nogil:
        st = sc_store_read_header(&head[0] if head.shape[0] else NULL, head.shape[0], &h)
    if st == SC_EINVAL:  # no bytes at all
        st = SC_ECORRUPT
    if st == SC_EFORMAT and h.format_version == 0:
        return SC_ECORRUPT, f"not a statecore store file: bad magic {bytes(head[:8])!r}", None
    if st == SC_EFORMAT and h.format_version < SC_FORMAT_VERSION:
        return SC_ECORRUPT, f"invalid store format version {h.format_version}", None
    if st == SC_EFORMAT:
        return st, (f"store format version {h.format_version} is newer than this statecore "
                    f"reads (version {SC_FORMAT_VERSION})"), None
    if st == SC_ECORRUPT and head.shape[0] < SC_STORE_HEADER_BYTES:
        return st, f"header truncated ({head.shape[0]} of {SC_STORE_HEADER_BYTES} bytes)", None
    if st == SC_ECORRUPT:
        return st, "header damaged (checksum or geometry)", None
    return SC_OK, None, {"format_version": h.format_version, "page_size": h.page_size,
                         "size": h.size, "epoch": h.epoch,
                         "schema_version": h.schema_version, "uuid": bytes(h.uuid[:16])}


def read_store_header(head):
    """The fields of a store file's header (format_version, page_size, size, epoch,
    schema_version, uuid) from its first STORE_HEADER_BYTES bytes, checked as opening
    checks them, without opening the store (no lock, nothing written). CorruptStore for
    damage or a file that is no store, UnsupportedFormat for a newer format version."""
    st, detail, fields = _store_header(head)
    if st != SC_OK:
        raise_status(st, "store file", errors.CorruptStore, detail)
    return fields


cdef tuple _describe_existing(bytes path, sc_status st, uint64_t size, uint32_t page_size):
    """(status, message) for an existing store file the core refused with SC_EMISMATCH or
    SC_EFORMAT: what the file holds against what was asked. The core says only which
    check failed; its header is re-read here for the message."""
    try:
        with open(path, "rb") as f:
            head = f.read(SC_STORE_HEADER_BYTES)
    except OSError:
        return st, None
    read_st, detail, fields = _store_header(head)
    if read_st != SC_OK:
        return read_st, detail
    if st != SC_EMISMATCH:  # the file changed since the core read it: no better words
        return st, None
    file_size, file_page_size = fields["size"], fields["page_size"]
    asked = []
    if size:
        asked.append(f"size={size}")
    if page_size:
        asked.append(f"page_size={page_size}")
    return st, (f"the existing store has size={file_size}, page_size={file_page_size}; "
                f"asked for {', '.join(asked)} (omit size and page_size to open it as it is)")


# ---- the store -----------------------------------------------------------------------
# SC_ECORRUPT from apply or replay: the delta passed every check when it was parsed, so its
# index (in a buffer decoded with copy=False) was changed since.
cdef str INDEX_CHANGED = ("its page index changed after it was validated (was the buffer "
                          "given to Delta.decode(copy=False) changed?); nothing was applied")


cdef class StoreCore:
    """Owns an sc_store. Subclassed by statecore.Store."""
    cdef sc_store *_s
    cdef int _exports
    cdef int _active
    cdef unsigned long _gen
    cdef Py_ssize_t _shape[1]

    def __cinit__(self, *args, **kwargs):
        self._s = NULL
        self._gen = _fork_generation

    def __dealloc__(self):
        # In a forked child the mapping is the parent's (file-backed): leave it alone.
        if self._s != NULL and self._gen == _fork_generation:
            sc_store_close(self._s)
        self._s = NULL

    def _open(self, path, uint64_t size, uint32_t page_size):
        cdef bytes p = os.fsencode(path) if path is not None else None
        cdef const char *cp = NULL
        cdef sc_store *s = NULL
        cdef sc_status st
        if self._s != NULL:
            raise ValueError("store is already open")
        if p is not None:
            cp = p
        with nogil:
            st = sc_store_open(cp, size, page_size, &s)
        if st == SC_OK:
            if self._s != NULL:
                # Another thread opened it while the GIL was released: keep that one.
                sc_store_close(s)
                raise ValueError("store is already open")
            self._s = s
        else:
            what = f"open {os.fsdecode(p)!r}" if p is not None else "create anonymous store"
            detail = None
            if p is not None and (st == SC_EMISMATCH or st == SC_EFORMAT):
                # Neither status is SC_EIO: errno is not needed after the file is read.
                st, detail = _describe_existing(p, st, size, page_size)
            raise_status(st, what, errors.CorruptStore, detail)

    cdef inline int _enter(self) except -1:
        if self._s == NULL:
            raise errors.StoreClosed("store is closed")
        if self._gen != _fork_generation:
            raise errors.StoreForked("this store was opened before os.fork(); reopen it in the child")
        self._active += 1
        return 0

    cdef inline void _leave(self) noexcept:
        self._active -= 1

    cdef int _enter_export(self) except -1:
        self._enter()
        self._leave()
        self._exports += 1
        return 0

    @property
    def closed(self):
        return self._s == NULL

    def _check(self):
        self._enter()
        self._leave()

    def _close(self):
        if self._s == NULL:
            return
        if self._exports:
            raise BufferError(f"cannot close: {self._exports} buffer(s) still exported "
                              "(release memoryviews / numpy arrays over the store first)")
        if self._active:
            raise errors.StateError("cannot close: a call is still running in another thread")
        # Detach before releasing the GIL: another thread entering now must see a closed
        # store, not one being torn down under it.
        cdef sc_store *s = self._s
        self._s = NULL
        if self._gen == _fork_generation:
            with nogil:
                sc_store_close(s)

    def _sync(self):
        self._enter()
        try:
            with nogil:
                st = sc_store_sync(self._s)
            check(st, "sync")
        finally:
            self._leave()

    # -- properties (callers have checked the store is open) --
    @property
    def size(self):
        self._check()
        return sc_store_size(self._s)

    @property
    def page_size(self):
        self._check()
        return sc_store_page_size(self._s)

    @property
    def n_pages(self):
        self._check()
        return sc_store_n_pages(self._s)

    @property
    def epoch(self):
        self._check()
        return sc_store_epoch(self._s)

    @property
    def _exports_count(self):
        return self._exports

    def _overlaps(self, const uint8_t[::1] data not None):
        """Whether `data` lies (partly) in this store's live bytes. No export of the store
        is made: a concurrent close() must not see one for a write's own check."""
        cdef uintptr_t lo, hi, a
        if data.shape[0] == 0:
            return False
        self._check()
        lo = <uintptr_t>sc_store_data(self._s)
        hi = lo + <uintptr_t>sc_store_size(self._s)
        a = <uintptr_t>&data[0]
        return a < hi and lo < a + <uintptr_t>data.shape[0]

    def _uuid(self):
        # Entered while the bytes object is made: allocating may run Python code (a
        # finalizer), which must not be able to close the store under the copy.
        self._enter()
        try:
            return PyBytes_FromStringAndSize(<const char *>sc_store_uuid(self._s), 16)
        finally:
            self._leave()

    def _set_uuid(self, bytes uuid not None):
        self._check()
        if len(uuid) != 16:
            raise ValueError("uuid must be 16 bytes")
        sc_store_set_uuid(self._s, <const uint8_t *>PyBytes_AS_STRING(uuid))

    def _schema_version(self):
        self._check()
        return sc_store_schema_version(self._s)

    def _set_schema_version(self, uint64_t v):
        self._check()
        sc_store_set_schema_version(self._s, v)

    def _set_epoch(self, uint64_t e):
        self._check()
        sc_store_set_epoch(self._s, e)

    def _page_version(self, uint64_t page):
        self._check()
        return sc_store_page_version(self._s, page)

    # -- the live bytes as a read-only buffer --
    def __getbuffer__(self, Py_buffer *view, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("the live view of a store is read-only; write through the store")
        self._enter_export()
        fill_byte_view(view, self, <void *>sc_store_data(self._s), self._shape,
                       <Py_ssize_t>sc_store_size(self._s), True)

    def __releasebuffer__(self, Py_buffer *view):
        self._exports -= 1

    def _writable_region(self):
        self._check()
        cdef _Region r = _Region.__new__(_Region)
        r.store = self
        return r

    # -- writes --
    def _write(self, uint64_t offset, const uint8_t[::1] data not None):
        cdef sc_status st
        cdef uint64_t n = data.shape[0]
        self._enter()
        try:
            with nogil:
                st = sc_store_write(self._s, offset, &data[0] if n else NULL, n)
            check(st, "write")
        finally:
            self._leave()

    def _write_pages(self, const uint64_t[::1] ids not None, const uint8_t[::1] data not None):
        cdef sc_status st
        cdef uint64_t n = ids.shape[0], ps
        cdef uint64_t nbytes = data.shape[0]
        self._enter()
        try:
            ps = sc_store_page_size(self._s)
            # The core copies n whole pages from data: it must hold exactly that many.
            if nbytes // ps != n or nbytes % ps:
                raise ValueError(f"data must hold len(ids) * page_size = {n} * {ps} bytes, "
                                 f"got {nbytes}")
            if n == 0:
                return
            with nogil:
                st = sc_store_write_pages(self._s, &ids[0], n, &data[0])
            check(st, "write_pages")
        finally:
            self._leave()

    def _touch_pages(self, const uint64_t[::1] ids not None):
        cdef sc_status st
        cdef uint64_t n = ids.shape[0]
        if n == 0:
            return
        self._enter()
        try:
            with nogil:
                st = sc_store_touch_pages(self._s, &ids[0], n)
            check(st, "touch pages")
        finally:
            self._leave()

    def _touch_rows(self, const int64_t[::1] idx not None, uint64_t n_rows, uint64_t base,
                    uint64_t row_bytes):
        """Touch the pages under rows idx of an array; IndexError names a bad index."""
        cdef sc_status st
        cdef uint64_t n = idx.shape[0], bad = 0
        if n == 0:
            return
        self._enter()
        try:
            with nogil:
                st = sc_store_touch_rows(self._s, &idx[0], n, n_rows, base, row_bytes, &bad)
            if st == SC_ERANGE:
                raise _row_out_of_bounds(idx[bad], n_rows)
            check(st, "touch rows")
        finally:
            self._leave()

    def _write_rows(self, const int64_t[::1] idx not None, uint64_t n_rows, uint64_t base,
                    uint64_t row_bytes, const uint8_t[::1] src not None, uint64_t src_stride):
        """Rows idx of an array take src's rows (src_stride bytes apart, 0: one row for all),
        in order; IndexError names a bad index, and then nothing is written."""
        cdef sc_status st
        cdef uint64_t n = idx.shape[0], bad = 0
        if n == 0:
            return
        if row_bytes == 0:
            raise ValueError("row_bytes must be positive")
        if <uint64_t>src.shape[0] < row_bytes or (src_stride and (
                src_stride != row_bytes or <uint64_t>src.shape[0] // row_bytes != n
                or <uint64_t>src.shape[0] % row_bytes)):
            raise ValueError(f"src holds {src.shape[0]} bytes: expected {n} rows of "
                             f"{row_bytes} bytes, or one row with src_stride 0")
        self._enter()
        try:
            with nogil:
                st = sc_store_write_rows(self._s, &idx[0], n, n_rows, base, row_bytes, &src[0],
                                         src_stride, &bad)
            if st == SC_ERANGE:
                raise _row_out_of_bounds(idx[bad], n_rows)
            check(st, "write rows")
        finally:
            self._leave()

    def _touch_range(self, uint64_t offset, uint64_t length):
        cdef sc_status st
        self._enter()
        try:
            with nogil:
                st = sc_store_touch_range(self._s, offset, length)
            check(st, "touch range")
        finally:
            self._leave()

    cdef bytes _read_buffer(self, uint64_t offset, uint64_t length):
        """The bytes object a read of [offset, offset+length) fills, once the range is known
        to lie in the store (so its length fits a Py_ssize_t). Called entered."""
        cdef uint64_t size = sc_store_size(self._s)
        if length > size or offset > size - length:
            raise IndexError(f"length {length} at offset {offset} is out of range for a store "
                             f"of {size} bytes")
        return PyBytes_FromStringAndSize(NULL, <Py_ssize_t>length)

    def _read(self, uint64_t offset, uint64_t length):
        cdef bytes out
        cdef char *dst
        cdef sc_status st
        self._enter()
        try:
            out = self._read_buffer(offset, length)
            dst = PyBytes_AS_STRING(out)
            with nogil:
                st = sc_store_read(self._s, offset, dst, length)
            check(st, "read")
        finally:
            self._leave()
        return out

    # -- snapshots --
    def _snapshot(self):
        cdef uint64_t e = 0
        cdef sc_status st
        self._enter()
        try:
            st = sc_snapshot_take(self._s, &e)
            check(st, "snapshot")
        finally:
            self._leave()
        return e

    def _release(self, uint64_t epoch):
        cdef sc_status st
        self._enter()
        try:
            with nogil:
                st = sc_snapshot_release(self._s, epoch)
            check(st, "release snapshot")
        finally:
            self._leave()

    def _set_floor(self, uint64_t epoch, uint64_t floor):
        """True when applied; False when a lower floor came too late (see statecore.h)."""
        cdef int applied = 0
        cdef sc_status st
        self._enter()
        try:
            with nogil:
                st = sc_snapshot_set_floor(self._s, epoch, floor, &applied)
            check(st, "snapshot floor")
        finally:
            self._leave()
        return bool(applied)

    def _snap_read(self, uint64_t epoch, uint64_t offset, uint64_t length):
        cdef bytes out
        cdef char *dst
        cdef sc_status st
        self._enter()
        try:
            out = self._read_buffer(offset, length)
            dst = PyBytes_AS_STRING(out)
            with nogil:
                st = sc_snapshot_read(self._s, epoch, offset, dst, length)
            check(st, "snapshot read")
        finally:
            self._leave()
        return out

    def _snap_read_pages(self, uint64_t epoch, const uint64_t[::1] ids not None):
        cdef uint64_t n = ids.shape[0], ps
        cdef bytes out, vers
        cdef char *dst
        cdef uint64_t *vp
        cdef sc_status st = SC_OK
        self._enter()  # before the page size is read: the store may be closed
        try:
            ps = sc_store_page_size(self._s)
            if n > <uint64_t>PY_SSIZE_T_MAX // ps:
                raise ValueError(f"ids: {n} pages of {ps} bytes do not fit in one bytes object")
            out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>(n * ps))
            vers = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>(n * 8))
            dst = PyBytes_AS_STRING(out)
            vp = <uint64_t *>PyBytes_AS_STRING(vers)
            if n:
                with nogil:
                    st = sc_snapshot_read_pages(self._s, epoch, &ids[0], n, dst, vp)
            check(st, "snapshot read pages")
        finally:
            self._leave()
        return out, vers

    def _changed_pages(self, uint64_t since, uint64_t until):
        cdef uint64_t *ids = NULL
        cdef uint64_t *vers = NULL
        cdef uint64_t n = 0
        cdef sc_status st
        self._enter()
        try:
            with nogil:
                st = sc_changed_pages(self._s, since, until, &ids, &vers, &n)
            check(st, "changed pages")
            return wrap_native(<uint8_t *>ids, n * 8), wrap_native(<uint8_t *>vers, n * 8)
        finally:
            self._leave()

    def _clear_dirty(self, uint64_t epoch):
        self._enter()
        try:
            with nogil:
                sc_store_clear_dirty(self._s, epoch)
        finally:
            self._leave()

    # -- deltas, replay, checkpoints --
    def _delta_build(self, uint64_t since, uint64_t until):
        cdef uint8_t *buf = NULL
        cdef uint64_t n = 0
        cdef sc_status st
        self._enter()
        try:
            with nogil:
                st = sc_delta_build(self._s, since, until, &buf, &n)
            check(st, "build delta")
        finally:
            self._leave()
        return wrap_native(buf, n, True)

    def _delta_build_pages(self, uint64_t since, uint64_t until,
                           const uint64_t[::1] ids not None, uint8_t[::1] out not None):
        """delta(since, until] of exactly these pages (as _changed_pages lists them), into
        `out` (8-byte aligned, at least delta_pages_bytes(len(ids)) bytes); returns the
        bytes used. Nothing is allocated: callers reuse `out`."""
        cdef uint64_t n = ids.shape[0], used = 0
        cdef sc_status st
        if out.shape[0] == 0:
            raise ValueError("out must not be empty")
        self._enter()
        try:
            with nogil:
                st = sc_delta_build_pages(self._s, since, until, &ids[0] if n else NULL, n,
                                          &out[0], <uint64_t>out.shape[0], &used)
            check(st, f"build delta ({since}, {until}] of {n} pages")
        finally:
            self._leave()
        return used

    def _apply(self, DeltaView dv not None, bint allow_gap):
        cdef uint64_t written = 0
        cdef sc_status st
        if not dv.has_pages:
            raise ValueError("delta has no decompressed pages attached")
        self._enter()
        try:
            with nogil:
                st = sc_delta_apply(self._s, &dv.v, dv.payload, allow_gap, &written)
            if st != SC_OK:
                raise_status(st, f"apply delta ({dv.v.header.base_epoch}, "
                                 f"{dv.v.header.target_epoch}] to store at epoch "
                                 f"{sc_store_epoch(self._s)}", None,
                             INDEX_CHANGED if st == SC_ECORRUPT else None)
        finally:
            self._leave()
        return written

    def _replay(self, list views not None, bint allow_gap, int threads, Progress progress=None):
        # A tuple of its own: the views (and the buffers they point into) stay alive while
        # the core reads them without the GIL, whatever another thread does to the list.
        cdef tuple held = tuple(views)
        cdef uint64_t k = len(held), i
        cdef sc_delta_view *vs = <sc_delta_view *>malloc((k or 1) * sizeof(sc_delta_view))
        cdef const uint8_t **ps = <const uint8_t **>malloc((k or 1) * sizeof(uint8_t *))
        cdef sc_replay_result r
        cdef sc_status st
        cdef sc_progress *pp = &progress.p if progress is not None else NULL
        cdef DeltaView dv
        if vs == NULL or ps == NULL:
            free(vs)
            free(ps)
            raise MemoryError("replay")
        try:
            for i in range(k):
                dv = held[i]
                if dv is None:
                    raise TypeError(f"views[{i}] is None, not a DeltaView")
                if not dv.has_pages:
                    raise ValueError("delta has no decompressed pages attached")
                vs[i] = dv.v
                ps[i] = dv.payload
            self._enter()
            try:
                with nogil:
                    st = sc_replay_progress(self._s, vs, ps, k, allow_gap, threads, &r, pp)
                if st != SC_OK:
                    raise_status(st, "replay", None,
                                 INDEX_CHANGED if st == SC_ECORRUPT else None)
            finally:
                self._leave()
        finally:
            free(vs)
            free(ps)
        return r.pages_in, r.pages_written, r.pages_superseded, r.pages_skipped

    def _checkpoint_save(self, uint64_t epoch, int fd, Progress progress=None):
        cdef uint64_t nbytes = 0
        cdef sc_status st
        cdef sc_progress *p = &progress.p if progress is not None else NULL
        self._enter()
        try:
            with nogil:
                st = sc_checkpoint_save(self._s, epoch, fd, &nbytes, p)
            check(st, "save checkpoint")
        finally:
            self._leave()
        return nbytes

    def _restore(self, DeltaView dv not None, object corrupt, Progress progress=None):
        """Verify-and-copy a checkpoint parsed without page checks into this empty store."""
        cdef uint64_t bad = UINT64_MAX
        cdef sc_status st
        cdef sc_progress *p = &progress.p if progress is not None else NULL
        if dv.payload == NULL:
            raise ValueError("checkpoint has no pages attached")
        self._enter()
        try:
            with nogil:
                st = sc_checkpoint_restore(self._s, &dv.v, &bad, p)
            if st == SC_ECORRUPT and bad < dv.v.header.n_pages:
                raise corrupt(f"checksum mismatch in page {dv.v.ids[bad]} (entry {bad})")
            if st == SC_EINVAL:
                raise ValueError("a checkpoint restores only into an empty store "
                                 "(no page written, no snapshot)")
            if st == SC_ECORRUPT:
                raise_status(st, "restore checkpoint", corrupt,
                             "its page index changed after it was validated (was the file "
                             "written meanwhile?); nothing was restored")
            check(st, "restore checkpoint", corrupt)
        finally:
            self._leave()

    def _enter_call(self):
        """For sibling extension modules (statecore._kv): count a call as running, as this
        class's own calls do, and return the sc_store pointer as a capsule. The pointer
        stays valid until the matching _leave_call(): close() refuses (StateError) until
        then. Take it after any Python code the call runs, just before the C use."""
        self._enter()
        try:
            return PyCapsule_New(<void *>self._s, b"statecore.sc_store", NULL)
        except BaseException:
            self._leave()
            raise

    def _leave_call(self):
        """Ends a call counted by _enter_call()."""
        if self._active <= 0:
            raise RuntimeError("_leave_call() without a matching _enter_call()")
        self._leave()

    def _stats(self):
        cdef sc_stats s
        self._check()
        sc_store_stats(self._s, &s)
        return {
            "epoch": s.epoch,
            "live_snapshots": s.live_snapshots,
            "oldest_snapshot": s.oldest_snapshot or None,
            "preserved_pages": s.preserved_pages,
            "preserved_bytes": s.preserved_bytes,
            "pages_written": s.pages_written,
            "pages_preserved_total": s.pages_preserved_total,
            "dirty_pages": s.dirty_pages,
            "deltas_applied": s.deltas_applied,
            "pages_applied": s.pages_applied,
        }
