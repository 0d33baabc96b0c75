"""DurableStore: a Store whose directory holds checkpoints and a journal of commits, and
that recovers itself on open."""
from __future__ import annotations

import fcntl
import logging
import os
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, Optional

from . import errors
from ._args import DEFAULT_PAGE_SIZE, as_int, check_page_size, check_size
from .checkpoint import fsync_directory
from .delta import Delta, as_delta
from .snapshot import Snapshot
from .journal import FLAG_REPLICATED, JournalWriter, read_segment, segment_name
from .manifest import NAME as MANIFEST_NAME
from .manifest import (Manifest, checkpoint_name, read_manifest, scan_directory,
                       write_manifest)
from .recovery import Discarded, RecoveryReport, recover
from .store import PathLike, Store

log = logging.getLogger("statecore")

LOCK_NAME = "LOCK"
_LEFTOVER_TMP = re.compile(r"^ckpt-\d{20}\.sc\.tmp-\d+$")  # checkpoint.save_checkpoint's


def _lock_directory(directory: str) -> int:
    fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise errors.StoreLocked(f"durable store {directory!r} is open in another process "
                                 "(or another DurableStore in this one)") from None
    return fd


class DurableStore(Store):
    """`commit()` makes the writes so far durable (one fsync'd journal record) and returns
    the epoch it closed; `checkpoint()` writes a full image in the background and trims the
    journal; opening an existing directory recovers it (`recovery` says how)."""

    def __init__(self, directory: PathLike, *, size: Optional[int] = None,
                 page_size: Optional[int] = None, schema_version: Optional[int] = None,
                 migrate: Optional[Callable[["DurableStore", int], None]] = None,
                 keep_checkpoints: int = 2,
                 progress: Optional[Callable[[int, int], None]] = None) -> None:
        self.directory = os.fspath(directory)
        self.keep_checkpoints = as_int("keep_checkpoints", keep_checkpoints)
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if size is None and not _holds_store(self.directory):
            raise _size_required(self.directory)  # before anything is created
        _make_directory(self.directory)
        self._lock_fd = _lock_directory(self.directory)
        try:
            self._open_directory(size, page_size, schema_version, migrate, progress)
        except BaseException:
            self._close_resources()
            raise

    # ---- opening -----------------------------------------------------------------------
    def _open_directory(self, size: Optional[int], page_size: Optional[int],
                        schema_version: Optional[int], migrate: Any,
                        progress: Optional[Callable[[int, int], None]]) -> None:
        self._append_lock = threading.Lock()
        self._sync_cond = threading.Condition()
        self._appended = self._synced = 0
        self._syncing = False
        self._broken: Optional[str] = None
        self._closing = False  # close() has started: no new commit or checkpoint
        self._listeners: List[Callable[[Delta, Snapshot], None]] = []
        self._checkpointer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="statecore-ckpt")
        self._pending: List[Future] = []
        manifest, notes = self._read_or_create_manifest(size, page_size, schema_version)
        Store.__init__(self, None, size=manifest.size, page_size=manifest.page_size)
        self._set_uuid(bytes.fromhex(manifest.uuid))
        self.manifest = manifest
        if notes is None:
            self.recovery = RecoveryReport(fresh=True)
        else:
            self.recovery, damage = recover(self, self.directory, manifest, progress)
            # Newest of the manifest's, the checkpoint's and the replayed records' schema
            # versions (_repair writes the store's back to the manifest).
            self._set_schema_version(max(manifest.schema_version, self._schema_version()))
            self.recovery.discarded[:0] = notes
            self._repair(damage)
            self._remove_leftovers()
            log.info("statecore: %s", self.recovery)
        self._set_schema_version(manifest.schema_version)
        self._last_commit = self.epoch - 1
        self._replica_epoch = self.recovery.replica_epoch if notes is not None else 0
        self.last_commit: Optional[dict] = None
        # The lowest base of deltas applied since the last commit (see _journaled_apply).
        self._unjournaled: Optional[int] = None
        self._writes_at_commit = self._stats()["pages_written"]
        self._journal = JournalWriter(os.path.join(self.directory, segment_name(manifest.segments[-1])))
        self._check_schema(schema_version, migrate)

    def _read_or_create_manifest(self, size: Optional[int], page_size: Optional[int],
                                 schema_version: Optional[int]):
        try:
            manifest = read_manifest(self.directory)
            notes: Optional[List[Discarded]] = []
        except FileNotFoundError:
            ckpts, segs = scan_directory(self.directory)
            if ckpts or segs:
                return self._rebuild_manifest(size, page_size, "manifest missing")
            return self._new_manifest(size, page_size, schema_version), None
        except errors.CorruptData as e:
            return self._rebuild_manifest(size, page_size, str(e))
        self._check_geometry(manifest, size, page_size)
        return manifest, notes

    def _new_manifest(self, size: Optional[int], page_size: Optional[int],
                      schema_version: Optional[int]) -> Manifest:
        if size is None:  # its files went away since __init__ looked
            raise _size_required(self.directory)
        ps = check_page_size(page_size) if page_size is not None else DEFAULT_PAGE_SIZE
        manifest = Manifest(size=check_size(size, ps), page_size=ps, uuid=os.urandom(16).hex(),
                            schema_version=schema_version or 0, segments=[0])
        write_manifest(self.directory, manifest)
        return manifest

    def _rebuild_manifest(self, size: Optional[int], page_size: Optional[int], why: str):
        """The manifest is damaged: rebuild it from the files present and the caller's
        size, and say so in the report."""
        ckpts, segs = scan_directory(self.directory)
        if size is None:
            raise errors.CorruptData(f"{self.directory!r}: {why}, and no size was given to "
                                     "rebuild it: pass size= and page_size=")
        ps = check_page_size(page_size) if page_size is not None else DEFAULT_PAGE_SIZE
        uuid = self._uuid_from_files(ckpts, segs) or os.urandom(16).hex()
        manifest = Manifest(size=check_size(size, ps), page_size=ps, uuid=uuid,
                            checkpoints=ckpts, segments=segs or [0])
        note = Discarded("MANIFEST", f"{why}; rebuilt from the directory listing "
                         f"({len(ckpts)} checkpoints, {len(segs)} journal segments)")
        return manifest, [note]

    def _uuid_from_files(self, ckpts: List[int], segs: List[int]) -> Optional[str]:
        """The store's identity as its files record it: a checkpoint's header that passes
        its checksum, else the first valid journal record (followers know the store by it:
        a new one would make every follower start over)."""
        from . import _core
        for epoch in reversed(ckpts):
            try:
                with open(os.path.join(self.directory, checkpoint_name(epoch)), "rb") as f:
                    head = f.read(_core.HEADER_SIZE)
            except OSError:
                continue
            sums_at = _core.HEADER_OFFSETS["header_checksum"]
            uuid_at = _core.HEADER_OFFSETS["store_uuid"]
            if len(head) == _core.HEADER_SIZE and _core.page_checksum(head[:sums_at]) == \
                    int.from_bytes(head[sums_at:sums_at + 8], "little"):
                return head[uuid_at:uuid_at + 16].hex()
        for start in segs:
            try:
                records, _, mm = read_segment(os.path.join(self.directory, segment_name(start)))
            except (OSError, errors.StateError):
                continue
            uuid = records[0][0].store_uuid.hex() if records else None
            del records
            if mm is not None:
                mm.close()
            if uuid:
                return uuid
        return None

    def _check_geometry(self, manifest: Manifest, size: Optional[int],
                        page_size: Optional[int]) -> None:
        if (size is not None and size != manifest.size) or \
                (page_size is not None and page_size != manifest.page_size):
            asked = ", ".join(f"{k}={v}" for k, v in (("size", size), ("page_size", page_size))
                              if v is not None)
            raise errors.StoreMismatch(
                f"{self.directory!r} holds a store of size={manifest.size}, "
                f"page_size={manifest.page_size}; asked for {asked} (omit them to open it "
                "as it is)")

    def _repair(self, damage: Any) -> None:
        """After a damaged journal: cut a torn tail in place; after damage in the middle,
        set the damaged segments aside and continue in a new one."""
        if damage is None:
            self._write_manifest_now()
            return
        name, dmg, at_tail = damage
        path = os.path.join(self.directory, name)
        if at_tail and dmg.offset >= 0:
            with open(path, "r+b") as f:
                f.truncate(dmg.offset)
                os.fsync(f.fileno())
            self.recovery.repairs.append(f"cut {name} to {dmg.offset} bytes")
            self._write_manifest_now()
            return
        stamp = time.strftime("%Y%m%dT%H%M%S")
        keep = [s for s in self.manifest.segments if segment_name(s) < name]
        # The damaged segment also holds the records before the damage: anchor the
        # recovered state in a checkpoint, listed before anything is moved aside, so that
        # neither a crash during the repair nor the next open falls back past it.
        snap = self.snapshot()
        try:
            snap.save(os.path.join(self.directory, checkpoint_name(snap.epoch)))
        finally:
            snap.release()
        self.manifest.checkpoints = [c for c in self.manifest.checkpoints
                                     if c < snap.epoch] + [snap.epoch]
        if self.recovery.replica_epoch:
            self.manifest.replica_epochs[str(snap.epoch)] = self.recovery.replica_epoch
        self._write_manifest_now()
        self.recovery.repairs.append(f"wrote {checkpoint_name(snap.epoch)} of the recovered state")
        for s in self.manifest.segments:
            if s not in keep and os.path.exists(os.path.join(self.directory, segment_name(s))):
                aside = f"{segment_name(s)}.damaged-{stamp}"
                os.replace(os.path.join(self.directory, segment_name(s)),
                           os.path.join(self.directory, aside))
                self.recovery.repairs.append(f"moved {segment_name(s)} aside as {aside}")
        self.manifest.segments = keep + [snap.epoch]
        self._write_manifest_now()

    def _remove_leftovers(self) -> None:
        """Delete what a crash left behind (the manifest now names every file recovery
        needs): temporary checkpoints and manifests, checkpoints saved but never listed,
        checkpoints and segments trimmed but not yet deleted. Each may be as large as the
        state, and crashes would pile them up."""
        ckpts, segs = scan_directory(self.directory)
        names = [checkpoint_name(e) for e in ckpts if e not in self.manifest.checkpoints]
        names += [segment_name(s) for s in segs if s not in self.manifest.segments]
        names += [n for n in os.listdir(self.directory)
                  if _LEFTOVER_TMP.match(n) or n == MANIFEST_NAME + ".tmp"]
        for name in names:
            _unlink_quietly(os.path.join(self.directory, name))
            self.recovery.repairs.append(f"removed {name}, left behind by a crash")

    def _write_manifest_now(self) -> None:
        self.manifest.schema_version = self._schema_version()
        write_manifest(self.directory, self.manifest)

    def _check_schema(self, wanted: Optional[int], migrate: Any) -> None:
        have = self.manifest.schema_version
        if wanted is None or wanted == have:
            return
        want = as_int("schema_version", wanted)
        if want < have:
            raise errors.SchemaMismatch(f"{self.directory!r} has schema version {have}, newer than "
                                 f"the {want} asked for; refusing to downgrade")
        if migrate is None:
            raise errors.SchemaMismatch(f"{self.directory!r} has schema version {have}, not {want}: "
                                 "pass migrate=fn(store, old_version) to upgrade it")
        migrate(self, have)
        self._set_schema_version(want)
        self.commit()
        self._write_manifest_now()
        log.info("statecore: migrated %s from schema %d to %d", self.directory, have, want)

    # ---- commits -------------------------------------------------------------------------
    def _usable(self) -> None:
        self._check()
        if self._closing:
            raise errors.StoreClosed("the durable store is closing")
        broken = self._broken or self._journal.broken
        if broken:
            raise errors.StateError(f"journal unusable: {broken}; reopen the directory "
                                    "to recover the last durable state")

    def commit(self) -> int:
        """Make every write so far durable; returns the epoch closed. Concurrent commits
        share one fsync."""
        self._usable()
        return self._commit()

    def _commit(self, closing: bool = False) -> int:
        t0 = time.perf_counter()
        with self._append_lock:
            snap, delta, ticket = self._append_commit(keep_snapshot=bool(self._listeners),
                                                      closing=closing)
        try:
            self._wait_durable(ticket)
            self.last_commit = {"epoch": snap.epoch, "pages": delta.n_pages,
                                "bytes": delta.nbytes, "seconds": time.perf_counter() - t0}
            snap._listeners_only = True  # not read here after the listeners: they may floor it
            self._publish(delta, snap)
        finally:
            snap.release()
        return snap.epoch

    def _append_commit(self, keep_snapshot: bool = False, closing: bool = False):
        # Under the append lock, so that no record follows close()'s last one.
        if self._closing and not closing:
            raise errors.StoreClosed("the durable store is closing")
        # Counted before the snapshot: a write racing with it makes close() commit once
        # more than needed, never less.
        writes = self._stats()["pages_written"]
        snap = self.snapshot()
        since = self._last_commit
        if self._unjournaled is not None:
            since = min(since, self._unjournaled)  # applied pages with older versions
        try:
            delta = self.delta(since, snap)
            self._journal.append(delta.encode())
        except BaseException:
            snap.release()
            raise
        if not keep_snapshot:
            snap.release()
        self._last_commit = snap.epoch
        self._writes_at_commit = writes
        self._unjournaled = None
        self._appended += 1
        return snap, delta, self._appended

    def _wait_durable(self, ticket: int) -> None:
        # Group commit: one thread fsyncs for everyone who appended before it started.
        with self._sync_cond:
            while self._synced < ticket:
                if self._broken:  # the failed fsync covered this record: no retry
                    raise errors.StateError(f"journal unusable: {self._broken}; reopen the "
                                            "directory to recover the last durable state")
                if self._syncing:
                    self._sync_cond.wait()
                    continue
                self._syncing = True
                target = self._appended
                self._sync_cond.release()
                try:
                    self._journal.sync()
                except OSError as e:
                    self._broken = f"fsync failed: {e}"
                    raise
                finally:
                    self._sync_cond.acquire()
                    self._syncing = False
                    self._sync_cond.notify_all()
                self._synced = max(self._synced, target)

    def _publish(self, delta: Delta, snap: Snapshot) -> None:
        for listener in list(self._listeners):
            try:
                listener(delta, snap)
            except Exception:  # a replication hook must never fail a commit
                log.exception("statecore: commit listener failed")

    def add_commit_listener(self, fn: Callable[[Delta, Snapshot], None]) -> None:
        """Call fn(delta, snapshot) after each durable commit (used by replication). The
        snapshot is live during the call; to keep it, take ownership with snapshot._retain()."""
        self._listeners.append(fn)

    def remove_commit_listener(self, fn: Callable[[Delta, Snapshot], None]) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    @property
    def committed_epoch(self) -> int:
        return self._last_commit

    # ---- replication -------------------------------------------------------------------
    @property
    def replica_epoch(self) -> int:
        """For a follower's store: the newest primary epoch it holds (0: not a replica)."""
        return self._replica_epoch

    def apply_replicated(self, delta: Delta) -> int:
        """Apply a primary's delta and journal it verbatim (durable when this returns), so a
        restarted follower resumes from the primary epoch it reached."""
        self._usable()
        with self._append_lock:
            written = Store.apply(self, delta)
            self._journal.append(delta.encode(), FLAG_REPLICATED)
            self._last_commit = max(self._last_commit, delta.target_epoch)
            self._writes_at_commit = self._stats()["pages_written"]
            self._appended += 1
            ticket = self._appended
        self._wait_durable(ticket)
        self._replica_epoch = max(self._replica_epoch, delta.target_epoch)
        return written

    # ---- deltas applied by the user -------------------------------------------------------
    def apply(self, delta: Any, *, allow_gap: bool = False) -> int:
        """Store.apply, committed (durable) when it returns if it wrote anything (see
        _journaled_apply)."""
        d = as_delta(delta)  # bad bytes raise here, before anything is committed
        with self._journaled_apply() as applied:
            applied.append(d)  # before: an apply that fails half-way keeps what it wrote
            written = Store.apply(self, d, allow_gap=allow_gap)
            if not written:
                applied.clear()  # nothing to make durable
            return written

    @contextmanager
    def _journaled_apply(self) -> Iterator[List[Delta]]:
        """Around applying deltas (apply, sc.replay): the caller lists the deltas before
        applying them, and a commit makes what they wrote durable before this exits.
        Applied pages keep the versions they have in the deltas, which may lie at or
        below the last commit, so the commits from now on start from the lowest base
        among them (_unjournaled) until one of them is in the journal. That holds also
        when the apply raised half-way (what it wrote stays) or the commit fails (the next
        one carries them), and a concurrent writer's pages are carried along as usual."""
        if not hasattr(self, "_journal"):  # recovery, while opening: nothing to journal
            yield []
            return
        self._usable()
        applied: List[Delta] = []
        try:
            yield applied
        finally:
            if applied:
                base = min(d.base_epoch for d in applied)
                with self._append_lock:
                    if self._unjournaled is None or base < self._unjournaled:
                        self._unjournaled = base
        if applied:
            self.commit()

    def adopt_identity(self, uuid: bytes) -> None:
        """Take a primary's identity before a full sync (a fresh follower only)."""
        with self._append_lock:
            self._set_uuid(uuid)
            self.manifest.uuid = uuid.hex()
            self._write_manifest_now()

    # ---- checkpoints ----------------------------------------------------------------------
    def checkpoint(self, *, progress: Optional[Callable[[int, int], None]] = None
                   ) -> "Future[int]":
        """Commit, then write a full checkpoint of that epoch in the background while
        writers and commits go on. The Future gives the checkpoint's epoch once it, and the
        manifest naming it, are durable; the journal before the oldest kept checkpoint is
        then deleted."""
        self._usable()
        with self._append_lock:
            # The checkpoint is exactly this commit's state: its snapshot stays alive for
            # the background save, and the next segment starts at its epoch.
            snap, delta, ticket = self._append_commit(keep_snapshot=True)
            try:
                self._wait_durable(ticket)
                self._rotate(snap.epoch)
            except BaseException:
                snap.release()
                raise
            # Submitted under the lock: close() waits for what was submitted before it.
            fut = self._checkpointer.submit(self._write_checkpoint, snap,
                                            self._replica_epoch, progress)
            self._pending = [f for f in self._pending if not f.done()] + [fut]
        self._publish(delta, snap)
        return fut

    def _rotate(self, epoch: int) -> None:
        """New records go to a segment starting at `epoch`; the manifest lists it before
        any record lands there."""
        self.manifest.segments.append(epoch)
        try:
            self._write_manifest_now()
            new = JournalWriter(os.path.join(self.directory, segment_name(epoch)))
        except BaseException:
            # Records keep going to the current segment: a later manifest must not list
            # this one, or recovery would stop at it as a missing segment.
            self.manifest.segments.remove(epoch)
            raise
        old = self._journal
        self._journal = new
        old.close()

    def _write_checkpoint(self, snap: Any, replica_epoch: int,
                          progress: Optional[Callable[[int, int], None]] = None) -> int:
        try:
            path = os.path.join(self.directory, checkpoint_name(snap.epoch))
            snap.save(path, progress=progress)
        finally:
            snap.release()
        with self._append_lock:
            self.manifest.checkpoints.append(snap.epoch)
            if replica_epoch:
                self.manifest.replica_epochs[str(snap.epoch)] = replica_epoch
            dropped_ckpts = self.manifest.checkpoints[:-self.keep_checkpoints]
            self.manifest.checkpoints = self.manifest.checkpoints[-self.keep_checkpoints:]
            # Until `keep` checkpoints exist, the empty state plus the whole journal is the
            # fallback, so the journal is only trimmed once the list is full.
            oldest = self.manifest.checkpoints[0]
            if len(self.manifest.checkpoints) < self.keep_checkpoints:
                oldest = 0
            dropped_segs = [s for s in self.manifest.segments if s < oldest]
            self.manifest.segments = [s for s in self.manifest.segments if s >= oldest]
            kept = {str(e) for e in self.manifest.checkpoints}
            self.manifest.replica_epochs = {k: v for k, v in self.manifest.replica_epochs.items()
                                            if k in kept}
            self._write_manifest_now()
        for e in dropped_ckpts:
            _unlink_quietly(os.path.join(self.directory, checkpoint_name(e)))
        for s in dropped_segs:
            _unlink_quietly(os.path.join(self.directory, segment_name(s)))
        self._begin_write()
        try:
            self._clear_dirty(snap.epoch)
        finally:
            self._write_lock.release()
        log.info("statecore: checkpoint at epoch %d durable", snap.epoch)
        return snap.epoch

    # ---- closing ---------------------------------------------------------------------------
    def close(self) -> None:
        """Commit what was written, finish running checkpoints, and close. Raises
        BufferError, changing nothing, while a buffer over the store is exported."""
        if self.closed:
            return
        if self._exports_count:
            # Checked first: refused halfway, the store would stay open without a journal.
            raise BufferError(f"cannot close: {self._exports_count} buffer(s) still exported "
                              "(release memoryviews / numpy arrays over the store first)")
        with self._append_lock:
            if self._closing:
                raise errors.StateError("close() is already running in another thread")
            self._closing = True  # commits and checkpoints started from now raise
        try:
            self._finish_for_close()
        except BaseException:
            self._close_resources()  # a failed last commit closes all the same, as before
            raise
        try:
            Store.close(self)  # raises, closing nothing, while a call runs elsewhere
        except BaseException:
            with self._append_lock:
                self._closing = False  # refused: the store stays open and committing
            raise
        self._close_resources()

    def _finish_for_close(self) -> None:
        """The last commit, then every fsync and checkpoint started before close()."""
        if self._broken or self._journal.broken:
            return
        pending = (self._stats()["pages_written"] != self._writes_at_commit
                   or self._unjournaled is not None)
        if pending:
            self._commit(closing=True)
        else:
            self._wait_durable(self._appended)  # commits of other threads still syncing
        for fut in list(self._pending):
            fut.exception()  # wait; a failed checkpoint leaves the journal in charge

    def _close_resources(self) -> None:
        """Everything an open (or a failed one) may hold, each closed once."""
        checkpointer = getattr(self, "_checkpointer", None)
        if checkpointer is not None:
            checkpointer.shutdown(wait=True)
        journal = getattr(self, "_journal", None)
        if journal is not None:
            journal.close()
        if not self.closed:
            Store.close(self)
        os.close(self._lock_fd)

    def __repr__(self) -> str:
        if self.closed:
            return "<DurableStore closed>"
        return (f"<DurableStore {self.directory!r} size={self.size} page_size={self.page_size} "
                f"epoch={self.epoch} committed={self._last_commit}>")


def _size_required(directory: str) -> TypeError:
    return TypeError(f"{directory!r} holds no durable store: size is required to create one")


def _holds_store(directory: str) -> bool:
    """Whether `directory` has a manifest, or files a manifest could be rebuilt from."""
    if not os.path.isdir(directory):
        return False
    ckpts, segs = scan_directory(directory)
    return bool(ckpts or segs) or os.path.exists(os.path.join(directory, MANIFEST_NAME))


def _make_directory(directory: str) -> None:
    """Create the store's directory (and parents) so that its name survives a power cut
    before the first commit returns."""
    missing = []
    path = os.path.abspath(directory)
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    for created in reversed(missing):
        fsync_directory(created)  # the entry for `created`, in its parent


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
