"""Deltas: the pages whose version lies in (base, target], as one checksummed buffer.

Layout (little-endian), shared with checkpoint files:
  header (128 B): magic, format version, kind, compression, page size, store pages,
                  base/target epoch, page count, schema version, payload bytes,
                  store identity, index checksum, header checksum
  index:          page ids (u64, strictly increasing), versions (u64), checksums (u64,
                  murmur3 x64-128 low half of each uncompressed page)
  payload:        the pages, or for lz4: chunk table + independently compressed chunks
"""
from __future__ import annotations

import os
import struct
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from itertools import accumulate
from typing import TYPE_CHECKING, Any, Iterator, Optional, Tuple

import lz4.block  # type: ignore[import-untyped]  # python-lz4 ships no type information
import numpy as np

from . import _core, errors
from ._args import as_int, byte_view

if TYPE_CHECKING:
    from .store import Store

HEADER = _core.HEADER_SIZE
COMPRESSIONS = {"none": 0, "lz4": 1}
LZ4_CHUNK_BYTES = 1 << 20
_OFF_COMPRESSION = _core.HEADER_OFFSETS["compression"]
_OFF_PAYLOAD_BYTES = _core.HEADER_OFFSETS["payload_bytes"]
_OFF_HEADER_SUM = _core.HEADER_OFFSETS["header_checksum"]

_lz4_pool: Optional[ThreadPoolExecutor] = None


def header_and_index_end(buf: memoryview, start: int = 0) -> int:
    """Where the header and index of the delta at `start` of buf end (cut to buf's end):
    the part a journal record's or wire frame's checksum covers, since the index holds
    every page's checksum. Reads n_pages unchecked: a damaged count only moves the cut."""
    at = start + _core.HEADER_OFFSETS["n_pages"]
    n = struct.unpack_from("<Q", buf, at)[0] if len(buf) >= at + 8 else 0
    return min(len(buf), start + _core.HEADER_SIZE + 24 * n)


def _forget_pool_in_child() -> None:
    # A forked child inherits the pool object but none of its threads.
    global _lz4_pool
    _lz4_pool = None


os.register_at_fork(after_in_child=_forget_pool_in_child)


def _pool() -> ThreadPoolExecutor:
    # python-lz4 releases the GIL per block, so chunks (de)compress in parallel.
    global _lz4_pool
    if _lz4_pool is None:
        _lz4_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="statecore-lz4")
    return _lz4_pool


class Delta:
    """An immutable, validated delta. Build with `store.delta(...)` or `Delta.decode(buf)`."""

    __slots__ = ("_view", "_source", "_payload")

    def __init__(self, view: "_core.DeltaView", source: Any, payload: Any = None) -> None:
        self._view = view
        self._source = source  # the "none" encoding: a native or user buffer
        self._payload = payload

    # ---- header -----------------------------------------------------------------------
    base_epoch = property(lambda self: self._view.base_epoch)
    target_epoch = property(lambda self: self._view.target_epoch)
    page_size = property(lambda self: self._view.page_size)
    schema_version = property(lambda self: self._view.schema_version)
    store_uuid = property(lambda self: self._view.store_uuid)
    store_pages = property(lambda self: self._view.store_pages)
    format_version = property(lambda self: self._view.format_version)

    @property
    def n_pages(self) -> int:
        return self._view.n_pages

    def __len__(self) -> int:
        return self._view.n_pages

    @property
    def nbytes(self) -> int:
        """Size of the uncompressed encoding (header + index + pages)."""
        return HEADER + self._view.n_pages * (24 + self._view.page_size)

    @property
    def page_bytes(self) -> int:
        return self._view.n_pages * self._view.page_size

    def _index(self, which: int) -> np.ndarray:
        n = self._view.n_pages
        arr = np.frombuffer(self._source, dtype="<u8", count=n, offset=HEADER + which * 8 * n)
        arr.flags.writeable = False
        return arr

    @property
    def page_ids(self) -> np.ndarray:
        """Read-only ndarray over the buffer's page index (no copy)."""
        return self._index(0)

    @property
    def versions(self) -> np.ndarray:
        return self._index(1)

    @property
    def checksums(self) -> np.ndarray:
        return self._index(2)

    @property
    def payload(self) -> memoryview:
        """Read-only view of the page bytes, n_pages * page_size."""
        if self._payload is not None:
            return memoryview(self._payload).toreadonly()
        off = self._view.payload_offset
        return memoryview(self._source).toreadonly()[off:off + self.page_bytes]

    def page(self, i: int) -> memoryview:
        """Bytes of the i-th carried page."""
        ps = self.page_size
        return self.payload[i * ps:(i + 1) * ps]

    def __repr__(self) -> str:
        return (f"<Delta ({self.base_epoch}, {self.target_epoch}] pages={self.n_pages} "
                f"page_size={self.page_size}>")

    # ---- encoding ------------------------------------------------------------------------
    def encode(self, compression: str = "none") -> Any:
        """"none": the buffer itself, read-only, no copy. "lz4": compressed payload in 1 MiB
        chunks with the checksums of the uncompressed pages."""
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {sorted(COMPRESSIONS)}, got "
                             f"{compression!r}")
        if compression == "none":
            if self._payload is None:
                return memoryview(self._source).toreadonly()
            return self._reencode_plain()
        return self._encode_lz4()

    def _prefix(self) -> memoryview:
        return memoryview(self._source)[:self._view.payload_offset]

    def _reencode_plain(self) -> bytes:
        head = bytearray(self._prefix())
        return bytes(_reseal(head, 0, self.page_bytes)) + bytes(self._payload)

    def _encode_lz4(self) -> bytes:
        payload = self.payload
        chunk = max(1, LZ4_CHUNK_BYTES // self.page_size) * self.page_size
        pieces = [payload[i:i + chunk] for i in range(0, len(payload), chunk)]
        blobs = list(_pool().map(lambda p: lz4.block.compress(p, store_size=False), pieces))
        table = struct.pack(f"<QQ{len(blobs)}Q", chunk, len(blobs), *map(len, blobs))
        body = b"".join([table, *blobs])
        head = bytearray(self._prefix())
        return bytes(_reseal(head, COMPRESSIONS["lz4"], len(body))) + body

    # ---- decoding --------------------------------------------------------------------------
    @staticmethod
    def decode(buffer: Any, *, copy: Optional[bool] = None) -> "Delta":
        """Validate everything (magic, version, sizes, counts, index bounds and order, every
        checksum) and return a Delta. Raises sc.CorruptDelta; applies nothing.

        A buffer whose bytes can still change (anything but bytes or a buffer from
        encode(); a read-only view of a bytearray included) is copied first unless
        copy=False, so a later change to it cannot slip past validation. With copy=False the Delta reads the caller's
        buffer in place: the caller must not change it while the Delta is in use. If it
        does, applying the Delta checks every page id and version again and raises
        sc.CorruptDelta (nothing is applied) when they no longer pass; changed page bytes
        are applied as they are. Either way it is an error or wrong data, never a crash."""
        view = byte_view(buffer, "buffer")
        source: Any = view
        if copy or (copy is None and not _immutable(view)):
            source = bytes(view)
        dv = _core.parse(source, _core.KIND_DELTA, True, errors.CorruptDelta)
        if dv.compression == COMPRESSIONS["none"]:
            return Delta(dv, dv.source)
        payload = _decompress(dv)
        dv.attach_payload(payload, errors.CorruptDelta)
        return Delta(dv, dv.source, payload)


def _immutable(view: memoryview) -> bool:
    """Whether nobody can change the bytes behind `view`: a read-only view of a bytearray
    or a writable array can still change after validation, so only bytes and the core's
    own buffers count."""
    return isinstance(view.obj, (bytes, _core.NativeBuffer))


def _reseal(head: bytearray, compression: int, payload_bytes: int) -> bytearray:
    struct.pack_into("<H", head, _OFF_COMPRESSION, compression)
    struct.pack_into("<Q", head, _OFF_PAYLOAD_BYTES, payload_bytes)
    struct.pack_into("<Q", head, _OFF_HEADER_SUM, _core.page_checksum(bytes(head[:_OFF_HEADER_SUM])))
    return head


def _decompress(dv: "_core.DeltaView") -> bytes:
    src = memoryview(dv.source).cast("B")[dv.payload_offset:]
    n_bytes = dv.n_pages * dv.page_size
    if len(src) < 16:
        raise errors.CorruptDelta("lz4 chunk table truncated")
    chunk, count = struct.unpack_from("<QQ", src)
    expect = -(-n_bytes // chunk) if chunk else -1
    if chunk == 0 or chunk % dv.page_size or count != expect or len(src) < 16 + 8 * count:
        raise errors.CorruptDelta(f"lz4 chunk table invalid: chunk={chunk} count={count}")
    # Python ints: a uint64 sum of hostile sizes can wrap around to the right total.
    sizes = np.frombuffer(src, dtype="<u8", count=count, offset=16).tolist()
    if sum(sizes) != len(src) - 16 - 8 * count:
        raise errors.CorruptDelta("lz4 chunk sizes do not add up to the payload")
    starts = accumulate(sizes, initial=16 + 8 * count)
    jobs = [(src[s:s + z], min(chunk, n_bytes - i * chunk))
            for i, (s, z) in enumerate(zip(starts, sizes))]

    def one(job: Tuple[memoryview, int]) -> bytes:
        blob, size = job
        try:
            out = lz4.block.decompress(blob, uncompressed_size=size)
        except lz4.block.LZ4BlockError as e:
            raise errors.CorruptDelta(f"lz4 chunk does not decompress: {e}") from None
        if len(out) != size:
            raise errors.CorruptDelta("lz4 chunk decompressed to the wrong size")
        return out

    return b"".join(_pool().map(one, jobs)) if len(jobs) > 1 else (one(jobs[0]) if jobs else b"")


# ---- store methods -----------------------------------------------------------------------
def _epoch_of(store: "Store", what: str, value: Any) -> int:
    from .snapshot import Snapshot
    if isinstance(value, Snapshot):
        if value.released:
            raise errors.SnapshotReleased(f"{what} is a released snapshot (epoch {value.epoch})")
        if value._store is not store:
            raise ValueError(f"{what} is a snapshot of another store")
        return value.epoch
    e = as_int(what, value)
    if e < 0:
        raise ValueError(f"{what} must be an epoch >= 0 or a Snapshot, got {e}")
    return e


@contextmanager
def resolve_epochs(store: "Store", since: Any, until: Any) -> Iterator[Tuple[int, int]]:
    """(since, until) as epochs, with `until` held as a live snapshot while in use."""
    from .snapshot import Snapshot
    a = _epoch_of(store, "since", since)
    owned = None
    if until is None:
        # Checked before snapshot(): a rejected call must not close an epoch. The epoch only
        # grows, so the snapshot taken next is at or after the one checked here.
        if a > store.epoch:
            raise ValueError(f"since ({a}) must not be after until (now: the open epoch "
                             f"{store.epoch})")
        owned = snap = store.snapshot()
    elif isinstance(until, Snapshot):
        _epoch_of(store, "until", until)  # released, or another store's: raises
        snap = until
    else:
        e = _epoch_of(store, "until", until)
        found = store._snapshots.get(e)
        if found is None:
            raise ValueError(f"until={e} is not the epoch of a live snapshot of this store; "
                             "pass a Snapshot, or None for the current state")
        snap = found
    try:
        s = snap._acquire()
        try:
            if a > snap.epoch:
                raise ValueError(f"since ({a}) must not be after until ({snap.epoch})")
            yield a, snap.epoch
        finally:
            snap._done()
    finally:
        if owned is not None:
            owned.release()


def make_delta(store: "Store", since: Any, until: Any) -> Delta:
    with resolve_epochs(store, since, until) as (a, b):
        buf = store._delta_build(a, b)
    store._deltas_made += 1
    dv = _core.parse(buf, _core.KIND_DELTA, False, errors.CorruptDelta)
    return Delta(dv, buf)


def as_delta(delta: Any) -> Delta:
    return delta if isinstance(delta, Delta) else Delta.decode(delta)


def apply_delta(store: "Store", delta: Any, *, allow_gap: bool = False) -> int:
    d = as_delta(delta)
    store._begin_write()
    try:
        return store._apply(d._view, bool(allow_gap))
    finally:
        store._write_lock.release()
