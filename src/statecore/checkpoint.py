"""Checkpoint files: a full image of a snapshot, with per-page checksums.

On disk a checkpoint is delta(0, S) with its own magic: header (format version, page
size, store size, epoch, schema version, store identity, checksums), the index of the
pages ever written (id, version, murmur3 checksum) and their bytes."""
from __future__ import annotations

import itertools
import mmap
import os
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Type, TypeVar

from . import _core, errors

if TYPE_CHECKING:
    from .store import PathLike, Store

S = TypeVar("S", bound="Store")

_tmp_serial = itertools.count()


def fsync_directory(path: "PathLike") -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(store: "Store", epoch: int, path: "PathLike",
                    progress: Optional[Callable[[int, int], None]] = None) -> int:
    """Write the snapshot at `epoch` atomically to `path`; returns the file size."""
    path = os.fspath(path)
    # A temporary name of its own, created exclusively: two saves to one path (from two
    # threads) must not write into one file. Digits only after ".tmp-": durable.py's
    # crash cleanup recognises leftovers by that shape.
    while True:
        tmp = f"{path}.tmp-{os.getpid()}{next(_tmp_serial):06d}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            break
        except FileExistsError:  # left by a crashed process that had our pid
            continue
    try:
        try:
            with reporting(progress) as counter:
                nbytes = store._checkpoint_save(epoch, fd, counter)  # fsyncs the file
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_directory(path)
    return nbytes


@contextmanager
def reporting(progress: Optional[Callable[[int, int], None]]) -> Iterator[Any]:
    """A core progress counter, polled every 0.1 s into `progress(done, total)` while the
    call runs (the core never calls back into Python), and once more at the end."""
    if progress is None:
        yield None
        return
    counter = _core.Progress()
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.1):
            if counter.total:
                progress(counter.done, counter.total)

    watcher = threading.Thread(target=poll, name="statecore-progress", daemon=True)
    watcher.start()
    try:
        yield counter
    finally:
        stop.set()
        watcher.join()
    progress(counter.done, counter.total)


def open_readonly_mmap(path: "PathLike") -> mmap.mmap:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise errors.CorruptCheckpoint(f"{os.fspath(path)!r} is empty")
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def read_checkpoint(checkpoint_path: "PathLike", verify_pages: bool = True
                    ) -> "_core.DeltaView":
    """Map a checkpoint file and validate it: header and index always, every page checksum
    unless verify_pages is False (restore_into then checks each page as it copies it)."""
    mm = open_readonly_mmap(checkpoint_path)
    try:
        return _core.parse(mm, _core.KIND_CHECKPOINT, verify_pages, errors.CorruptCheckpoint)
    except errors.CorruptCheckpoint as e:
        raise _naming(checkpoint_path, e) from None


def _naming(checkpoint_path: "PathLike", e: errors.CorruptCheckpoint) -> errors.CorruptCheckpoint:
    return errors.CorruptCheckpoint(f"{os.fspath(checkpoint_path)!r}: {e}")


def load_checkpoint(cls: Type[S], checkpoint_path: "PathLike",
                    path: Optional["PathLike"] = None) -> S:
    if path is not None and os.path.exists(path) and os.path.getsize(path) > 0:
        raise FileExistsError(f"path {os.fspath(path)!r} exists: Store.load restores into a "
                              "new store file (remove it first or pick another path)")
    view = read_checkpoint(checkpoint_path, verify_pages=False)
    store = cls(path, size=view.store_pages * view.page_size, page_size=view.page_size)
    try:
        restore_into(store, view, checkpoint_path)
    except BaseException:
        store.close()
        if path is not None:
            os.unlink(path)
        raise
    return store


def restore_into(store: "Store", view: "_core.DeltaView", checkpoint_path: "PathLike") -> None:
    """Write a checkpoint into an empty store, checking every page checksum as it goes, and
    adopt its identity. A bad page raises CorruptCheckpoint and leaves the store empty."""
    store._begin_write()
    try:
        try:
            store._restore(view, errors.CorruptCheckpoint)
        except errors.CorruptCheckpoint as e:
            raise _naming(checkpoint_path, e) from None
        store._set_epoch(view.target_epoch + 1)
        store._set_uuid(view.store_uuid)
        store._set_schema_version(view.schema_version)
    finally:
        store._write_lock.release()
