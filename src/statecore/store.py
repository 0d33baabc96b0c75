"""The Store: an mmap'd page store with tracked writes, snapshots and deltas."""
from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np

from . import _core, errors
from ._args import (DEFAULT_PAGE_SIZE, MAX_SIZE, as_int, byte_view, check_page_size,
                    check_range, check_size, page_id_array)

if TYPE_CHECKING:
    from .array import StateArray
    from .delta import Delta
    from .snapshot import Snapshot

log = logging.getLogger("statecore")

PathLike = Union[str, "os.PathLike[str]"]


class Store(_core.StoreCore):
    """State kept in pages of an anonymous or file-backed mapping.

    Every write records the page's version (the open epoch) and dirty bit; `snapshot()`
    closes the epoch in O(1) and later writes preserve the pages it still needs.
    """

    # Set by a Follower replicating into this store (replication.py, transfer.py): the
    # epoch it holds, and the one to resume from when left in the middle of a delta.
    _replica_epoch: int = 0
    _replica_resume: Optional[int] = None

    def __init__(self, path: Optional[PathLike] = None, *, size: Optional[int] = None,
                 page_size: Optional[int] = None) -> None:
        ps = check_page_size(page_size) if page_size is not None else None
        exists = path is not None and os.path.exists(path) and os.path.getsize(path) > 0
        if size is None and not exists:
            raise TypeError("size is required for a new store (bytes, a multiple of page_size)")
        if size is None:
            sz = 0
        elif ps is None and exists:
            # The file's own page size applies; the core reports a size that differs.
            sz = as_int("size", size)
            if sz <= 0 or sz > MAX_SIZE:
                raise ValueError(f"size must be in [1, {MAX_SIZE}] (a multiple of the "
                                 f"file's page_size), got {sz}")
        else:
            sz = check_size(size, ps or DEFAULT_PAGE_SIZE)
        # Held by writers and snapshot(): a snapshot must never fall between a page's
        # touch and its modification. Readers never take it.
        self._write_lock = threading.Lock()
        self._deltas_made = 0
        self._last_replay: Any = None  # ReplayStats of the last sc.replay into this store
        self._pending_releases: list[int] = []
        self._snapshots: "weakref.WeakValueDictionary[int, Snapshot]" = weakref.WeakValueDictionary()
        # Checkpoint saves of this store's snapshots now running, each as the set of ids of
        # the threads working for it (the saver, its progress callback's thread): close()
        # waits for them, except for one it is called from (it would wait for itself).
        self._saves: list[set[int]] = []
        self._saves_changed = threading.Condition(threading.Lock())
        self._closing = False
        self._open(None if path is None else os.fspath(path), sz,
                   ps if ps is not None else (0 if exists else DEFAULT_PAGE_SIZE))
        self.path = None if path is None else os.fspath(path)

    # ---- lifecycle ---------------------------------------------------------------
    def close(self) -> None:
        """Wait for running saves of its snapshots (a save started meanwhile raises
        StoreClosed), release every snapshot and unmap. Idempotent. Raises BufferError
        while a memoryview or numpy array over the store is alive."""
        if self.closed:
            return
        forked = False
        try:
            self._check()
        except errors.StoreForked:
            forked = True  # the saves ran in the parent: nothing here to wait for
        except errors.StoreClosed:
            return  # closed by another thread meanwhile
        try:
            if not forked:
                self._wait_for_saves()
            with self._write_lock:
                self._close()
                for snap in list(self._snapshots.values()):
                    snap._store_closed()
                self._snapshots.clear()
        finally:
            if not forked and not self.closed:
                with self._saves_changed:
                    self._closing = False  # refused or interrupted: the store stays usable

    def _wait_for_saves(self) -> None:
        me = threading.get_ident()
        with self._saves_changed:
            self._closing = True  # a save starting from now on raises StoreClosed
            self._saves_changed.wait_for(lambda: all(me in save for save in self._saves))

    def _save_started(self) -> set[int]:
        """Register a save; returns the set its threads add their ids to."""
        save: set[int] = set()
        with self._saves_changed:
            if self._closing:
                raise errors.StoreClosed("store is closing")
            self._saves.append(save)
        return save

    def _save_finished(self, save: set[int]) -> None:
        with self._saves_changed:
            self._saves = [s for s in self._saves if s is not save]  # by identity
            self._saves_changed.notify_all()

    def __enter__(self) -> "Store":
        self._check()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return f"<{type(self).__name__} closed>"
        where = self.path or "anonymous"
        return (f"<{type(self).__name__} {where} size={self.size} page_size={self.page_size} "
                f"epoch={self.epoch}>")

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        # numpy tries the buffer export first and, when it is refused, silently falls
        # back to a 0-d object array. Only a refused export reaches here: raise why.
        self._check()
        out = np.frombuffer(memoryview(self), dtype=np.uint8)
        return out if dtype is None else out.astype(dtype)

    def sync(self) -> None:
        """Flush a file-backed store's pages to disk (msync). No-op for anonymous memory."""
        self._sync()

    # ---- writes --------------------------------------------------------------------
    def _begin_write(self) -> None:
        # Checked first: in a forked child the lock may be held by a thread that no longer
        # exists, and the child must get StoreForked, not hang.
        self._check()
        self._write_lock.acquire()
        if self._pending_releases:
            self._drain_releases()

    def _drain_releases(self) -> None:
        while self._pending_releases:
            epoch = self._pending_releases.pop()
            self._snapshots.pop(epoch, None)
            try:
                self._release(epoch)
            except errors.StateError:
                pass  # already gone with the store

    def _unaliased(self, view: memoryview) -> memoryview:
        """`view`, or a copy of it when it is a view of this store's own bytes: the core
        copies in pieces (pages one after another, memcpy), so a piece written early
        would change the source of a later one."""
        return memoryview(bytes(view)) if self._overlaps(view) else view

    def write(self, offset: int, data: Any) -> None:
        """Write any bytes-like object at a byte offset."""
        view = byte_view(data)
        off = check_range(offset, view.nbytes, self.size, length_name="len(data)")
        view = self._unaliased(view)
        self._begin_write()
        try:
            self._write(off, view)
        finally:
            self._write_lock.release()

    def write_pages(self, page_ids: Any, data: Any) -> None:
        """Vectorized write of whole pages: data holds len(page_ids) * page_size bytes."""
        ids = page_id_array(page_ids, self.n_pages)
        view = byte_view(data)
        need = len(ids) * self.page_size
        if view.nbytes != need:
            raise ValueError(f"data must hold len(page_ids) * page_size = {need} bytes, "
                             f"got {view.nbytes}")
        view = self._unaliased(view)
        self._begin_write()
        try:
            self._write_pages(ids, view)
        finally:
            self._write_lock.release()

    def read(self, offset: int, length: int) -> bytes:
        """Copy of the live bytes [offset, offset+length)."""
        n = as_int("length", length)
        if n < 0:
            raise ValueError(f"length must be >= 0, got {n}")
        off = check_range(offset, n, self.size)
        return self._read(off, n)

    def array(self, dtype: Any, *, offset: int = 0, shape: Any = None) -> "StateArray":
        """A numpy-like typed view whose writes go through the tracked write path."""
        from .array import StateArray
        return StateArray(self, dtype, offset=offset, shape=shape)

    # ---- snapshots -------------------------------------------------------------------
    def snapshot(self) -> "Snapshot":
        """Close the open epoch and return a frozen view of the state. O(1)."""
        from .snapshot import Snapshot
        self._begin_write()
        try:
            epoch = self._snapshot()
            snap = Snapshot(self, epoch)
            self._snapshots[epoch] = snap
        finally:
            self._write_lock.release()
        return snap

    def _release_snapshot(self, epoch: int) -> None:
        self._begin_write()
        try:
            self._snapshots.pop(epoch, None)
            if not self.closed:
                self._release(epoch)
        finally:
            self._write_lock.release()

    @classmethod
    def load(cls, checkpoint_path: PathLike, path: Optional[PathLike] = None) -> "Store":
        """Restore a checkpoint written by Snapshot.save into a new store, verifying every
        page checksum (sc.CorruptCheckpoint names the first bad page)."""
        from .checkpoint import load_checkpoint
        return load_checkpoint(cls, checkpoint_path, path)

    # ---- deltas --------------------------------------------------------------------------
    def delta(self, since: Any, until: Any = None) -> "Delta":
        """The pages whose version lies in (since, until], as of `until`."""
        from .delta import make_delta
        return make_delta(self, since, until)

    def apply(self, delta: Any, *, allow_gap: bool = False) -> int:
        """Apply a Delta (or its encoded bytes); idempotent. Returns pages written."""
        from .delta import apply_delta
        return apply_delta(self, delta, allow_gap=allow_gap)

    def changed_pages(self, since: Any, until: Any = None) -> np.ndarray:
        """Sorted ids of the pages whose version lies in (since, until]."""
        from .delta import resolve_epochs
        with resolve_epochs(self, since, until) as (a, b):
            ids, _ = self._changed_pages(a, b)
            return np.frombuffer(memoryview(ids), dtype=np.uint64)

    # ---- observability -----------------------------------------------------------------
    @property
    def uuid(self) -> bytes:
        """16 bytes that identify this store's lineage (kept by checkpoints and replicas)."""
        return self._uuid()

    @property
    def schema_version(self) -> int:
        return self._schema_version()

    @schema_version.setter
    def schema_version(self, value: int) -> None:
        v = as_int("schema_version", value)
        if v < 0:
            raise ValueError(f"schema_version must be >= 0, got {v}")
        self._set_schema_version(v)

    def stats(self) -> dict:
        """Counters: epoch, live snapshots, preserved pages/bytes, dirty pages, ..."""
        if self._pending_releases:
            self._begin_write()
            self._write_lock.release()
        s = self._stats()
        last = self._last_replay
        s.update(size=self.size, page_size=self.page_size, n_pages=self.n_pages,
                 exported_buffers=self._exports_count, deltas_made=self._deltas_made,
                 replay_bytes_per_second=last.bytes_per_second if last else None)
        return s
