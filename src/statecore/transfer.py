"""Large deltas on the wire in parts: the primary's builder and the follower's applier.

A delta(a, b] of many pages (a full sync, or a coalesced catch-up) is sent as PART frames
of at most `part_pages` pages each. Every part is itself a complete delta (a, b] of the
next pages, with its own header, index and page checksums, so:

- the primary builds part k+1 (gather + checksum, GIL released) into one of two reused
  buffers while part k is being sent, instead of building the whole delta first in a
  fresh buffer as large as the state;
- the follower verifies each part as it arrives and a worker thread applies part k
  while part k+1 is received into one of three reused buffers, instead of receiving
  everything, then verifying everything, then applying everything.

What the follower's epoch means does not change: a part is applied only once it is fully
validated, and the follower reports (Follower.epoch, wait_for, ACK) epoch b only when the
last part is applied. If the connection drops in between, the store holds some pages as
of b over the state as of a, and the follower still says a: on reconnecting it asks for
delta(a, now), which carries every page changed since a, the ones it already has
included, and ends byte-identical. A store left that way remembers a (`_replica_resume`)
so that a new Follower on it also resumes from a, not from the store's own epoch. That
marker is a Python attribute, gone when the process ends: only followers on stores in
memory, which end with it, ask for parts; one on a store file or a DurableStore takes
every delta whole (replication._takes_deltas_whole).
"""
from __future__ import annotations

import struct
import threading
import traceback
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Deque, Iterator, List, Optional, Tuple

import numpy as np

from . import _core, wire
from .delta import Delta
from .store import Store

# Pages per part the follower asks for: big enough that per-part costs (a frame, a thread
# hand-off, a Python call per stage) vanish, small enough that three receive buffers stay
# a few MiB and the first part is applied while the rest is still on the wire.
PART_BYTES = 4 << 20


def part_pages_for(page_size: int, part_bytes: Optional[int] = None) -> int:
    return max(1, (PART_BYTES if part_bytes is None else part_bytes) // page_size)


def _aligned(nbytes: int) -> memoryview:
    """A writable, 64-byte aligned buffer of nbytes (the core reads u64 arrays in place)."""
    raw = np.empty(nbytes + 64, dtype=np.uint8)
    off = (-raw.ctypes.data) % 64
    return raw[off:off + nbytes].data


# ---- primary side ---------------------------------------------------------------------------
class PartBuilder:
    """Builds the frames of delta(since, snapshot epoch] for one follower into reused
    buffers, the next one in a worker thread while the caller sends the current one."""

    def __init__(self, store: Store, part_pages: int) -> None:
        self.store = store
        self.part_pages = part_pages
        self._size = wire.PART_HEADER_SIZE + _core.delta_pages_bytes(part_pages,
                                                                     store.page_size)
        self._buffers: List[memoryview] = []
        self._worker: Optional[ThreadPoolExecutor] = None

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        self._buffers = []

    def _buffer(self, i: int) -> memoryview:
        while len(self._buffers) <= i:
            self._buffers.append(_aligned(self._size))
        return self._buffers[i]

    def _build(self, since: int, until: int, ids: np.ndarray, buf: memoryview,
               header: Optional[Tuple[int, int, int]]) -> memoryview:
        """Part (or whole delta) into buf; returns the frame body."""
        used = self.store._delta_build_pages(since, until, ids, buf[wire.PART_HEADER_SIZE:])
        if header is None:
            return buf[wire.PART_HEADER_SIZE:wire.PART_HEADER_SIZE + used]
        wire.PART_HEADER.pack_into(buf, 0, header[0], header[1], header[2], 0)
        return buf[:wire.PART_HEADER_SIZE + used]

    def frames(self, since: int, until: int, ids: np.ndarray
               ) -> Iterator[Tuple[int, memoryview, bool]]:
        """(frame type, body, is last) for delta(since, until] of these changed pages: one
        DELTA frame when they fit in a part, else PART frames. A body is valid until the
        next item is asked for. The caller holds the snapshot `until` throughout."""
        n = len(ids)
        if n <= self.part_pages:
            yield wire.DELTA, self._build(since, until, ids, self._buffer(0), None), True
            return
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="statecore-part-build")
        starts = range(0, n, self.part_pages)

        def build(k: int) -> memoryview:
            first = starts[k]
            return self._build(since, until, ids[first:first + self.part_pages],
                               self._buffer(k % 2), (k, first, n))

        pending: Optional[Future] = self._worker.submit(build, 0)
        try:
            for k in range(len(starts)):
                assert pending is not None
                body = pending.result()
                # Part k+1 goes into the other buffer while part k is sent.
                pending = self._worker.submit(build, k + 1) if k + 1 < len(starts) else None
                yield wire.PART, body, k + 1 == len(starts)
        finally:
            if pending is not None:  # stopped early: the worker must be done with the
                pending.cancel()     # snapshot and the buffer before the caller lets go
                try:
                    pending.result()
                except BaseException:
                    pass


def split(delta: Delta, part_pages: int) -> Iterator[Tuple[List[Any], bool]]:
    """PART frame bodies (as pieces for wire.send_frame, and whether it is the last) of a
    delta already built, such as a commit's, without copying or hashing its pages: each
    part gets a new header and index (the delta's page checksums, resealed), and its pages
    are a view of the delta's buffer. The delta must be uncompressed and outlive them."""
    n, ps = delta.n_pages, delta.page_size
    ids, versions, sums = delta.page_ids, delta.versions, delta.checksums
    header = bytes(memoryview(delta.encode())[:_core.HEADER_SIZE])
    payload = delta.payload
    for seq, first in enumerate(range(0, n, part_pages)):
        end = min(n, first + part_pages)
        index = np.concatenate([ids[first:end], versions[first:end], sums[first:end]])
        head = bytearray(header)
        struct.pack_into("<H", head, _OFF_COMPRESSION, 0)
        struct.pack_into("<Q", head, _OFF_N_PAGES, end - first)
        struct.pack_into("<Q", head, _OFF_PAYLOAD_BYTES, (end - first) * ps)
        struct.pack_into("<Q", head, _OFF_INDEX_SUM, _core.page_checksum(index.view(np.uint8)))
        struct.pack_into("<Q", head, _OFF_HEADER_SUM, _core.page_checksum(head[:_OFF_HEADER_SUM]))
        prefix = wire.PART_HEADER.pack(seq, first, n, 0) + bytes(head) + index.tobytes()
        yield [prefix, payload[first * ps:end * ps]], end == n


# Fields of the delta header (csrc/statecore.h, sc_header) that differ between parts.
_OFF_COMPRESSION, _OFF_N_PAGES, _OFF_PAYLOAD_BYTES, _OFF_INDEX_SUM, _OFF_HEADER_SUM = (
    _core.HEADER_OFFSETS[f] for f in ("compression", "n_pages", "payload_bytes",
                                      "index_checksum", "header_checksum"))


# ---- follower side --------------------------------------------------------------------------
class PartApplier:
    """The follower's side of PART frames: hands out the buffer the next frame is received
    into, checks that parts follow one another, verifies each part (Delta.decode) as it
    arrives and has a worker thread apply it while the next is received. At most two
    parts are in flight, so a buffer is never received into while its part is still
    being applied."""

    N_BUFFERS = 3

    def __init__(self, store: Store, part_pages: int, apply: Callable[[Store, Delta], Any],
                 on_failure: Callable[[], None]) -> None:
        """apply(store, delta) applies one verified part; on_failure() is called from the
        worker when a part fails, to stop the receiving side (which may be blocked in a
        receive) at once: it then raises that failure (raise_failure)."""
        self.store = store
        self.part_pages = part_pages
        self.limit = wire.part_frame_limit(part_pages, store.page_size)
        self._apply = apply
        self._on_failure = on_failure
        self.failure: Optional[BaseException] = None
        self._buffers = [wire.RecvBuffer() for _ in range(self.N_BUFFERS)]
        self._next = 0
        self._inflight: Deque[Future] = deque()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="statecore-part-apply")
        self._failed = threading.Event()
        # The transfer in progress: (base, target, total), the next seq and first page.
        self._transfer: Optional[Tuple[int, int, int]] = None
        self._seq = 0
        self._first = 0
        self._bytes = 0
        self._last_id = -1  # the highest page id of the parts taken so far
        self.parts_applied = 0

    @property
    def in_transfer(self) -> bool:
        return self._transfer is not None

    def buffer(self) -> wire.RecvBuffer:
        """The buffer to receive the next frame into (waits until it is free)."""
        while len(self._inflight) >= self.N_BUFFERS - 1:
            self._inflight.popleft().result()
        return self._buffers[self._next % self.N_BUFFERS]

    def part(self, body: memoryview, resume_epoch: int
             ) -> Optional[Tuple[int, int]]:
        """Take a PART frame's body (received into buffer()). Returns (target epoch, bytes
        of the whole delta) once its last part is applied, else None. Raises
        ProtocolError for a part out of sequence, CorruptDelta for one that fails
        validation (nothing of it is applied), or the error of an earlier part's apply."""
        f = wire.part_fields(body)
        n = f.n_pages
        if f.reserved or f.compression != 0:
            raise wire.ProtocolError("PART frame with reserved bits set or compressed pages")
        if not 1 <= n <= self.part_pages:
            raise wire.ProtocolError(f"PART carries {n} pages; parts carry 1 to "
                                     f"{self.part_pages}")
        if self._transfer is None:
            if f.seq != 0 or f.first != 0:
                raise wire.ProtocolError(f"PART {f.seq} (first page {f.first}) does not "
                                         "start a delta")
            self._transfer = (f.base, f.target, f.total)
            self._seq = self._first = self._bytes = 0
            self._last_id = -1
            # From here the store may hold pages newer than resume_epoch: a follower that
            # starts over on it must resume from resume_epoch (see the module docstring).
            self.store._replica_resume = resume_epoch
        elif (f.seq, f.first, (f.base, f.target, f.total)) != (self._seq, self._first,
                                                               self._transfer):
            raise wire.ProtocolError(
                f"PART {f.seq} (first page {f.first}, delta ({f.base}, {f.target}] of "
                f"{f.total} pages) out of sequence: expected PART {self._seq} (first page "
                f"{self._first}) of ({self._transfer[0]}, {self._transfer[1]}] of "
                f"{self._transfer[2]} pages")
        if self._first + n > f.total:
            raise wire.ProtocolError(f"PART {f.seq} runs past the {f.total} pages announced")
        # Verified here, while the part is hot in this core's cache; applied by the worker.
        delta = Delta.decode(memoryview(body)[wire.PART_HEADER_SIZE:], copy=False)
        if (delta.base_epoch, delta.target_epoch, delta.n_pages) != (f.base, f.target, n):
            raise wire.ProtocolError("PART delta header differs from the frame's")
        ids = delta.page_ids
        if int(ids[0]) <= self._last_id:
            raise wire.ProtocolError(f"PART {f.seq} repeats or reorders pages (page "
                                     f"{int(ids[0])} after {self._last_id})")
        self._last_id = int(ids[-1])
        self._seq += 1
        self._first += n
        self._bytes += wire.HEADER_SIZE + memoryview(body).nbytes
        self._next += 1
        self._inflight.append(self._worker.submit(self._apply_part, delta))
        if self._first < f.total:
            return None
        self.drain()  # the last part: everything applied (or the first error raised here)
        target, nbytes = self._transfer[1], self._bytes
        self._transfer = None
        return target, nbytes

    def _apply_part(self, delta: Delta) -> None:
        if self._failed.is_set():
            return  # an earlier part failed: the session is ending, apply nothing more
        try:
            self._apply(self.store, delta)
            self.parts_applied += 1
        except BaseException as e:
            if not self._failed.is_set():
                # Without the locals of the frames below (the delta): see replication._kept.
                traceback.clear_frames(e.__traceback__.tb_next if e.__traceback__ else None)
                self.failure = e
                self._failed.set()
                self._on_failure()
            raise

    def raise_failure(self) -> None:
        """Raise the failure of a part, if one failed (the real reason a session ends)."""
        if self.failure is not None:
            raise self.failure

    def drain(self) -> None:
        """Wait for every part in flight; raises the first failure."""
        while self._inflight:
            self._inflight.popleft().result()

    def close(self) -> None:
        """End of the session: no part is applied after this returns."""
        self._failed.set()
        for fut in self._inflight:
            fut.cancel()
        for fut in self._inflight:
            try:
                fut.result()
            except BaseException:
                pass  # the session already ends with the error that stopped it
        self._inflight.clear()
        self._worker.shutdown(wait=True)
        if self.failure is not None:  # its frames have all finished now
            traceback.clear_frames(self.failure.__traceback__)


def resume_marker(store: Store) -> Optional[int]:
    """The epoch a store left in the middle of a delta in parts resumes from, or None."""
    return getattr(store, "_replica_resume", None)


def clear_resume_marker(store: Store) -> None:
    if getattr(store, "_replica_resume", None) is not None:
        store._replica_resume = None

