"""Snapshot: a frozen, point-in-time view of a store at one epoch."""
from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from . import errors
from ._args import as_int, check_range, page_id_array

if TYPE_CHECKING:
    from .store import PathLike, Store

_saver: Optional[ThreadPoolExecutor] = None
_saver_lock = threading.Lock()


def _forget_save_pool_in_child() -> None:
    # A forked child inherits the pool object but none of its threads: work submitted
    # to it would never run (and the lock may have been held by a parent thread).
    global _saver, _saver_lock
    _saver = None
    _saver_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_save_pool_in_child)


def _save_pool() -> ThreadPoolExecutor:
    global _saver
    with _saver_lock:
        if _saver is None:
            _saver = ThreadPoolExecutor(max_workers=2, thread_name_prefix="statecore-save")
        return _saver


class Snapshot:
    """Reads exactly the bytes the store held when it was taken, whatever is written
    later. Holds preserved pages until released (release(), `with`, or garbage collection).
    """

    def __init__(self, store: "Store", epoch: int) -> None:
        self._store: Optional["Store"] = store
        self.epoch = epoch
        self._lock = threading.Lock()
        self._users = 0   # calls reading it right now (a release waits for them)
        self._refs = 1    # owners; the last owner's release() frees it
        self._release_wanted = False
        self._released = False
        self._listeners_only = False  # DurableStore: read by commit listeners only

    # ---- lifetime ------------------------------------------------------------------
    def __enter__(self) -> "Snapshot":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:
        store = getattr(self, "_store", None)
        if store is not None and not self._released and not store.closed:
            # Any thread may run a finalizer: defer the release to the store's next
            # write-side call instead of taking its lock here.
            store._pending_releases.append(self.epoch)

    def __repr__(self) -> str:
        state = "released" if self._released else "live"
        return f"<Snapshot epoch={self.epoch} {state}>"

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Free the pages only this snapshot needed. Idempotent; waits for a running
        save to finish first."""
        with self._lock:
            if self._released or self._release_wanted:
                return
            self._refs -= 1
            if self._refs:
                return  # another owner still holds it
            self._release_wanted = True
            if self._users:
                return  # the last user releases
        self._do_release()

    def _retain(self) -> "Snapshot":
        """Add an owner (internal: replication keeps a commit's snapshot this way)."""
        with self._lock:
            if self._released or self._release_wanted:
                raise errors.SnapshotReleased(f"snapshot at epoch {self.epoch} was released")
            self._refs += 1
        return self

    def _set_floor(self, floor: int) -> bool:
        """Internal (replication): from now on this snapshot is read only for pages whose
        version is above `floor`, so writes skip copying older pages. Raising needs the
        caller to be its only reader; lowering returns False when a write already skipped
        a copy (see sc_snapshot_set_floor)."""
        store = self._acquire()
        try:
            return store._set_floor(self.epoch, floor)
        finally:
            self._done()

    def _do_release(self) -> None:
        store = self._store
        self._released = True
        if store is not None and not store.closed:
            store._release_snapshot(self.epoch)
        self._store = None

    def _store_closed(self) -> None:
        self._released = True
        self._store = None

    def _acquire(self) -> "Store":
        with self._lock:
            store = self._store
            if self._released or self._release_wanted or store is None:
                raise errors.SnapshotReleased(f"snapshot at epoch {self.epoch} was released")
            self._users += 1
            return store

    def _done(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._users == 0 and self._release_wanted and not self._released
        if last:
            self._do_release()

    # ---- reads ---------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) as of this snapshot's epoch."""
        store = self._acquire()
        try:
            n = as_int("length", length)
            if n < 0:
                raise ValueError(f"length must be >= 0, got {n}")
            off = check_range(offset, n, store.size)
            return store._snap_read(self.epoch, off, n)
        finally:
            self._done()

    def read_pages(self, page_ids: Any) -> tuple[bytes, np.ndarray]:
        """Whole pages as of this snapshot, and each page's version."""
        store = self._acquire()
        try:
            ids = page_id_array(page_ids, store.n_pages)
            data, versions = store._snap_read_pages(self.epoch, ids)
            return data, np.frombuffer(versions, dtype=np.uint64)
        finally:
            self._done()

    # ---- checkpoints -----------------------------------------------------------------
    def save(self, path: "PathLike", *, progress: Optional[Callable[[int, int], None]] = None) -> int:
        """Write a checkpoint file (written to a temporary name, fsync'd, renamed, directory
        fsync'd). Writers may continue meanwhile. Returns the file's size in bytes."""
        store = self._acquire()
        try:
            store._check()  # closed or forked: before registering with the store
            save = store._save_started()  # store.close() waits for it
            save.add(threading.get_ident())
            try:
                report = progress
                if progress is not None:
                    def report(done: int, total: int) -> None:
                        save.add(threading.get_ident())  # the callback's thread works for it
                        progress(done, total)
                from .checkpoint import save_checkpoint
                return save_checkpoint(store, self.epoch, path, progress=report)
            finally:
                store._save_finished(save)
        finally:
            self._done()

    def save_async(self, path: "PathLike") -> "Future[int]":
        """Like save(), in a background thread. The snapshot stays readable meanwhile;
        a release() or the store's close() waits until the save is done."""
        store = self._acquire()  # held until the save finishes
        try:
            store._check()  # closed or forked: raise here, not in the Future
            save = store._save_started()  # closing: StoreClosed here too
        except BaseException:
            self._done()
            raise

        def run() -> int:
            save.add(threading.get_ident())
            try:
                from .checkpoint import save_checkpoint
                return save_checkpoint(store, self.epoch, path)
            finally:
                # Released (if release() was called meanwhile) before close() goes on.
                try:
                    self._done()
                finally:
                    store._save_finished(save)

        try:
            return _save_pool().submit(run)
        except BaseException:
            try:
                self._done()
            finally:
                store._save_finished(save)
            raise
