"""DurableStore fault injection: bit flips and truncations of every file kind (checkpoints,
manifests, journal records), a full disk (a small tmpfs) and failing writes and fsyncs
(monkeypatched os functions). Each damage must be detected, reported in ds.recovery, and
recovered to the newest state that can be proven correct; each failing write must raise a
clear exception and leave the previous durable state intact."""
from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import threading
import time

import pytest

import statecore as sc
from statecore import journal
from statecore.snapshot import Snapshot

from _durable_util import (MANIFEST_NAME, Model, checkpoint_files, checkpoint_name,
                           files_fingerprint, flip_bit, random_writes, read_manifest,
                           record_spans, segment_files, state_hash, truncate)

PS = 512
SIZE = 32 * PS


def _commits(rng, ds, model, n, writes=3):
    for _ in range(n):
        random_writes(rng, ds, model, writes)
        model.committed(ds.commit())


class Golden:
    """A closed durable directory and the model of every committed epoch."""

    def __init__(self, directory, model, last, **info):
        self.directory, self.model, self.last = str(directory), model, last
        self.__dict__.update(info)

    def copy(self, dest) -> str:
        dest = str(dest)
        shutil.copytree(self.directory, dest)
        return dest


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """keep_checkpoints=2: checkpoints c1 < c2, segments starting at c1 and c2."""
    d = tmp_path_factory.mktemp("golden") / "two"
    rng = random.Random(11)
    model = Model(SIZE, PS)
    ds = sc.DurableStore(d, size=SIZE, page_size=PS, keep_checkpoints=2)
    ckpts = []
    for _ in range(3):
        _commits(rng, ds, model, 4)
        random_writes(rng, ds, model, 3)
        e = ds.checkpoint().result()
        model.committed(e)
        ckpts.append(e)
    _commits(rng, ds, model, 6)
    last = ds.committed_epoch
    ds.close()
    assert read_manifest(str(d)).checkpoints == ckpts[-2:]
    return Golden(d, model, last, c1=ckpts[-2], c2=ckpts[-1])


@pytest.fixture(scope="module")
def unfinished_checkpoint(tmp_path_factory):
    """No checkpoint: one was started (the journal rotated at its epoch) but its save
    failed, so recovery starts from the empty state and reads two segments."""
    d = tmp_path_factory.mktemp("golden") / "unfinished"
    rng = random.Random(12)
    model = Model(SIZE, PS)
    ds = sc.DurableStore(d, size=SIZE, page_size=PS)
    _commits(rng, ds, model, 6)
    real_save = Snapshot.save

    def failing_save(self, path, **kw):
        raise OSError(errno.EIO, "injected checkpoint failure")

    Snapshot.save = failing_save
    try:
        random_writes(rng, ds, model, 3)
        rotated = ds.epoch
        fut = ds.checkpoint()
        assert isinstance(fut.exception(timeout=30), OSError)
        model.committed(rotated)
    finally:
        Snapshot.save = real_save
    _commits(rng, ds, model, 6)
    last = ds.committed_epoch
    ds.close()
    m = read_manifest(str(d))
    assert m.checkpoints == [] and m.segments == [0, rotated]
    return Golden(d, model, last, rotated=rotated)


def _offsets(rng, size, fixed=()):
    picks = set(o for o in fixed if 0 <= o < size)
    picks.update(rng.sample(range(size), min(size, 14)))
    return sorted(picks)


def _only_discarded(ds, name):
    whats = [x.what for x in ds.recovery.discarded]
    assert len(whats) == 1 and whats[0].startswith(name), ds.recovery.discarded
    return ds.recovery.discarded[0]


# ---- checkpoints ----------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_newest_checkpoint_is_detected_and_the_previous_one_used(
        tmp_path, two_checkpoints, damage):
    g = two_checkpoints
    name = checkpoint_name(g.c2)
    size = os.path.getsize(os.path.join(g.directory, name))
    n_entries = (size - 128) // (24 + PS)
    index_end = 128 + 24 * n_entries
    rng = random.Random(f"ckpt-{damage}")
    fixed = (0, 8, 10, 119, 120, 127, 128, index_end - 1, index_end, size - 1)
    for i, off in enumerate(_offsets(rng, size, fixed)):
        d = g.copy(tmp_path / f"{i}")
        path = os.path.join(d, name)
        if damage == "flip":
            flip_bit(path, off, rng.randrange(8))
        else:
            truncate(path, off)
        with sc.DurableStore(d) as ds:
            bad = _only_discarded(ds, name)
            assert bad.reason, f"offset {off}: no reason given"
            assert ds.recovery.checkpoint_epoch == g.c1, f"offset {off}"
            assert ds.recovery.committed_epoch == g.last, f"offset {off}"
            assert state_hash(ds) == g.model.at[g.last], f"{damage} at {off}: wrong state"
        shutil.rmtree(d)


def test_both_checkpoints_damaged_without_the_journal_raises(tmp_path, two_checkpoints):
    g = two_checkpoints
    d = g.copy(tmp_path / "d")
    flip_bit(os.path.join(d, checkpoint_name(g.c1)), 300)
    truncate(os.path.join(d, checkpoint_name(g.c2)), 1000)
    before = files_fingerprint(d)
    with pytest.raises(sc.CorruptCheckpoint) as info:
        sc.DurableStore(d)
    msg = str(info.value)
    assert checkpoint_name(g.c1) in msg and checkpoint_name(g.c2) in msg
    assert files_fingerprint(d) == before


# ---- manifests --------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_manifest_is_detected_and_rebuilt(tmp_path, two_checkpoints, damage):
    g = two_checkpoints
    size = os.path.getsize(os.path.join(g.directory, MANIFEST_NAME))
    rng = random.Random(f"manifest-{damage}")
    offsets = [None] if damage == "delete" else _offsets(rng, size, (0, 7, 8, 15, 16, size - 1))
    for i, off in enumerate(offsets):
        d = g.copy(tmp_path / f"{i}")
        path = os.path.join(d, MANIFEST_NAME)
        if damage == "flip":
            flip_bit(path, off, rng.randrange(8))
        elif damage == "truncate":
            truncate(path, off)
        else:
            os.unlink(path)
        # Rebuilding needs the geometry, which lived in the manifest: a clear error.
        with pytest.raises(sc.CorruptData, match="size"):
            sc.DurableStore(d)
        with sc.DurableStore(d, size=SIZE, page_size=PS) as ds:
            bad = _only_discarded(ds, MANIFEST_NAME)
            assert "rebuilt" in bad.reason, f"offset {off}: {bad}"
            assert ds.recovery.checkpoint_epoch == g.c2
            assert state_hash(ds) == g.model.at[g.last], f"{damage} at {off}: wrong state"
        # The rebuilt manifest is whole again.
        with sc.DurableStore(d) as ds:
            assert ds.recovery.discarded == []
            assert state_hash(ds) == g.model.at[g.last]
        shutil.rmtree(d)


def test_schema_version_survives_a_rebuilt_manifest(tmp_path):
    """Without a checkpoint, only the journal records remember the schema version."""
    d = str(tmp_path / "d")
    with sc.DurableStore(d, size=SIZE, page_size=PS, schema_version=4) as ds:
        ds.write(0, b"v4")
    os.unlink(os.path.join(d, MANIFEST_NAME))
    calls = []
    with sc.DurableStore(d, size=SIZE, page_size=PS, schema_version=4,
                         migrate=lambda s, old: calls.append(old)) as ds:
        assert ds.schema_version == 4
        assert ds.read(0, 2) == b"v4"
    assert calls == [], "migration ran again on migrated data"


# ---- journal records ----------------------------------------------------------------------------
def _expected_after_damage(spans, off):
    """Epoch recovery must reach when byte `off` of a segment is damaged: the records
    wholly before the damaged one."""
    for start, end, base, target in spans:
        if start <= off < end:
            return base, start
    raise AssertionError(f"offset {off} outside every record")


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_last_segment_recovers_the_records_before_the_damage(
        tmp_path, two_checkpoints, damage):
    g = two_checkpoints
    seg = journal.segment_name(g.c2)
    spans = record_spans(os.path.join(g.directory, seg))
    size = spans[-1][1]
    rng = random.Random(f"journal-{damage}")
    fixed = [s[0] for s in spans[:2]] + [spans[-1][0] + 31, spans[-1][0] + 32, size - 1]
    for i, off in enumerate(_offsets(rng, size, fixed)):
        d = g.copy(tmp_path / f"{i}")
        path = os.path.join(d, seg)
        if damage == "flip":
            flip_bit(path, off, rng.randrange(8))
        else:
            truncate(path, off)
        epoch, start = _expected_after_damage(spans, off)
        with sc.DurableStore(d) as ds:
            r = ds.recovery
            if damage == "truncate" and off == start:
                assert r.discarded == [], f"cut at a record boundary {off} is no damage"
            else:
                bad = _only_discarded(ds, seg)
                assert f"offset {start}" in bad.what, f"{damage} at {off}: {bad}"
                assert bad.bytes == (size if damage == "flip" else off) - start
            assert r.checkpoint_epoch == g.c2
            assert r.committed_epoch == epoch, f"{damage} at {off}"
            assert state_hash(ds) == g.model.at[epoch], f"{damage} at {off}: wrong state"
            assert os.path.getsize(path) == start
            # The repaired directory takes new commits, and keeps them.
            ds.write(0, b"after repair")
            e = ds.commit()
            h = state_hash(ds)
        with sc.DurableStore(d) as ds:
            assert ds.recovery.discarded == []
            assert ds.recovery.committed_epoch == e
            assert state_hash(ds) == h
        shutil.rmtree(d)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_middle_segment_recovers_the_records_before_the_damage(
        tmp_path, unfinished_checkpoint, damage):
    g = unfinished_checkpoint
    seg = journal.segment_name(0)
    spans = record_spans(os.path.join(g.directory, seg))
    size = spans[-1][1]
    rng = random.Random(f"middle-{damage}")
    offsets = [0] if damage == "delete" else _offsets(rng, size, (0, spans[-1][0], size - 1))
    for i, off in enumerate(offsets):
        d = g.copy(tmp_path / f"{i}")
        path = os.path.join(d, seg)
        if damage == "flip":
            flip_bit(path, off, rng.randrange(8))
        elif damage == "truncate":
            truncate(path, off)
        else:
            os.unlink(path)
        epoch, start = _expected_after_damage(spans, off)
        with sc.DurableStore(d) as ds:
            if damage == "truncate" and off == start:
                # Cut at a record boundary: the segment looks whole; the next one starts
                # after a gap.
                bad = _only_discarded(ds, journal.segment_name(g.rotated))
                assert "gap" in bad.reason, bad
            else:
                bad = _only_discarded(ds, seg)
            assert "lost" in bad.reason, bad
            assert ds.recovery.committed_epoch == epoch, f"{damage} at {off}"
            assert state_hash(ds) == g.model.at[epoch], f"{damage} at {off}: wrong state"
            recovered = state_hash(ds)
            assert ds.recovery.repairs, "the damaged segments were set aside"
            ds.write(0, b"after repair")
            e = ds.commit()
            h = state_hash(ds)
        assert recovered == g.model.at[epoch]
        # After the repair, the recovered state and every later commit are durable.
        with sc.DurableStore(d) as ds:
            assert ds.recovery.discarded == [], ds.recovery
            assert ds.recovery.committed_epoch == e
            assert state_hash(ds) == h, f"{damage} at {off}: commits after a repair lost"
        shutil.rmtree(d)


# ---- failing writes and fsyncs (injected) -----------------------------------------------------------
def _fd_path(fd):
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


@pytest.fixture
def store_dir(tmp_path):
    d = str(tmp_path / "d")
    rng = random.Random(5)
    model = Model(SIZE, PS)
    ds = sc.DurableStore(d, size=SIZE, page_size=PS)
    _commits(rng, ds, model, 3)
    yield d, ds, model, rng
    if not ds.closed:
        try:
            ds.close()
        except Exception:
            pass


def _reopen_matches(d, model, epoch):
    with sc.DurableStore(d) as ds:
        assert ds.recovery.discarded == [], ds.recovery
        assert ds.recovery.committed_epoch == epoch
        assert state_hash(ds) == model.at[epoch]


def test_failing_journal_write_raises_and_keeps_the_journal_whole(store_dir, monkeypatch):
    d, ds, model, rng = store_dir
    seg = os.path.join(d, journal.segment_name(0))
    size = os.path.getsize(seg)
    last = ds.committed_epoch

    def writev(fd, buffers):
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    monkeypatch.setattr(journal.os, "writev", writev)
    random_writes(rng, ds, model, 3)
    with pytest.raises(OSError) as info:
        ds.commit()
    assert info.value.errno == errno.ENOSPC
    assert os.path.getsize(seg) == size
    assert ds.committed_epoch == last
    with pytest.raises(OSError):
        ds.checkpoint()
    assert checkpoint_files(d) == []
    monkeypatch.undo()
    # The store is still usable: the next commit carries the writes of the failed one.
    e = ds.commit()
    model.committed(e)
    ds.close()
    _reopen_matches(d, model, e)


def test_short_write_then_failure_cuts_the_torn_record_back(store_dir, monkeypatch):
    d, ds, model, rng = store_dir
    seg = os.path.join(d, journal.segment_name(0))
    size = os.path.getsize(seg)
    real_write = os.write

    def writev(fd, buffers):
        data = b"".join(bytes(b) for b in buffers)
        return real_write(fd, data[:len(data) // 2])  # half the record reaches the file

    def write(fd, data):
        raise OSError(errno.EIO, "I/O error (injected)")

    monkeypatch.setattr(journal.os, "writev", writev)
    monkeypatch.setattr(journal.os, "write", write)
    random_writes(rng, ds, model, 3)
    with pytest.raises(OSError) as info:
        ds.commit()
    assert info.value.errno == errno.EIO
    assert os.path.getsize(seg) == size, "half a record left in the journal"
    monkeypatch.undo()
    e = ds.commit()
    model.committed(e)
    ds.close()
    _reopen_matches(d, model, e)


def test_failing_fsync_raises_and_makes_the_journal_unusable(store_dir, monkeypatch):
    d, ds, model, rng = store_dir
    before = ds.committed_epoch

    def fdatasync(fd):
        raise OSError(errno.EIO, "I/O error (injected)")

    monkeypatch.setattr(journal.os, "fdatasync", fdatasync)
    random_writes(rng, ds, model, 3)
    failed = ds.epoch
    model.committed(failed)
    with pytest.raises(OSError):
        ds.commit()
    monkeypatch.undo()
    # After a failed fsync nothing can be promised about the journal: refuse commits.
    random_writes(rng, ds, model, 1)
    with pytest.raises(sc.StateError, match="unusable"):
        ds.commit()
    with pytest.raises(sc.StateError, match="unusable"):
        ds.checkpoint()
    ds.close()  # does not try to commit; releases the lock
    with sc.DurableStore(d) as ds2:
        # The record was written, only its fsync failed: either state is allowed.
        got = ds2.recovery.committed_epoch
        assert got in (before, failed)
        assert state_hash(ds2) == model.at[got]


def test_failing_fsync_fails_every_commit_it_covered(store_dir, monkeypatch):
    """Group commit: a commit waiting on a fsync that failed must not report success by
    fsyncing again (the kernel may have dropped the failed pages and report the retry
    clean)."""
    d, ds, model, rng = store_dir
    real_fdatasync, real_writev = os.fdatasync, os.writev
    in_sync, b_appended = threading.Event(), threading.Event()
    calls = []

    def writev(fd, buffers):
        n = real_writev(fd, buffers)
        if in_sync.is_set():
            b_appended.set()
        return n

    def fdatasync(fd):
        calls.append(fd)
        if len(calls) == 1:
            in_sync.set()
            b_appended.wait(10)
            time.sleep(0.05)  # let B reach the wait for this fsync
            raise OSError(errno.EIO, "I/O error (injected)")
        return real_fdatasync(fd)  # a retry reports success, as Linux does

    monkeypatch.setattr(journal.os, "writev", writev)
    monkeypatch.setattr(journal.os, "fdatasync", fdatasync)
    outcome = {}

    def commit(name):
        try:
            ds.write(0 if name == "a" else PS, name.encode() * 8)
            outcome[name] = ds.commit()
        except Exception as e:
            outcome[name] = e

    a = threading.Thread(target=commit, args=("a",))
    a.start()
    assert in_sync.wait(10)
    b = threading.Thread(target=commit, args=("b",))
    b.start()
    a.join(10)
    b.join(10)
    assert b_appended.is_set()
    assert isinstance(outcome["a"], OSError)
    assert isinstance(outcome["b"], Exception), (
        f"commit returned epoch {outcome['b']} although the fsync covering it failed")


def test_failing_manifest_fsync_during_checkpoint_keeps_later_commits(store_dir, monkeypatch):
    """checkpoint() fails while rotating the journal (the manifest's fsync); later
    checkpoints and commits must still all be recovered."""
    d, ds, model, rng = store_dir
    real_fsync = os.fsync
    armed = [True]

    def fsync(fd):
        if armed[0] and _fd_path(fd).endswith(MANIFEST_NAME + ".tmp"):
            armed[0] = False
            raise OSError(errno.EIO, "I/O error (injected)")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    random_writes(rng, ds, model, 3)
    e = ds.epoch
    with pytest.raises(OSError):
        ds.checkpoint()
    assert not armed[0]
    model.committed(e)  # the commit part was durable before the rotation failed
    monkeypatch.undo()
    _commits(rng, ds, model, 3)

    # A later checkpoint whose save fails (its rename), so recovery needs the journal.
    real_replace = os.replace

    def replace(src, dst, **kw):
        if ".tmp-" in os.fspath(src) and os.path.basename(os.fspath(dst)).startswith("ckpt-"):
            raise OSError(errno.EIO, "I/O error (injected)")
        return real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "replace", replace)
    random_writes(rng, ds, model, 3)
    e = ds.epoch
    assert isinstance(ds.checkpoint().exception(timeout=30), OSError)
    model.committed(e)
    monkeypatch.undo()
    _commits(rng, ds, model, 3)
    last = ds.committed_epoch
    ds.close()
    _reopen_matches(d, model, last)


def test_failing_checkpoint_directory_fsync_keeps_the_state(store_dir, monkeypatch):
    d, ds, model, rng = store_dir
    real_fsync = os.fsync

    def fsync(fd):
        if os.path.isdir(_fd_path(fd)) and threading.current_thread().name.startswith(
                "statecore-ckpt"):
            raise OSError(errno.EIO, "I/O error (injected)")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    random_writes(rng, ds, model, 3)
    e = ds.epoch
    fut = ds.checkpoint()
    assert isinstance(fut.exception(timeout=30), OSError)
    model.committed(e)
    monkeypatch.undo()
    assert read_manifest(d).checkpoints == [], "an unsynced checkpoint must not be listed"
    _commits(rng, ds, model, 2)
    last = ds.committed_epoch
    ds.close()
    _reopen_matches(d, model, last)


def test_failing_manifest_write_on_open_leaves_the_directory_usable(store_dir, monkeypatch):
    d, ds, model, rng = store_dir
    last = ds.committed_epoch
    ds.close()
    real_replace = os.replace

    def replace(src, dst, **kw):
        if os.fspath(dst).endswith(MANIFEST_NAME):
            raise OSError(errno.EIO, "I/O error (injected)")
        return real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        sc.DurableStore(d)
    monkeypatch.undo()
    _reopen_matches(d, model, last)


# ---- a full disk (tmpfs) -----------------------------------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=640k", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()}); the injected-error "
                    "tests above cover failing writes")
    try:
        yield str(mnt)
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(directory, leave):
    """Fill the filesystem, then free `leave` bytes."""
    path = os.path.join(directory, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (65536, 4096, 512):
            try:
                while True:
                    os.write(fd, b"\xff" * chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    truncate(path, max(0, os.path.getsize(path) - leave))
    return path


def test_full_disk_during_commit_and_checkpoint(small_tmpfs):
    page = 4096
    size = 32 * page
    d = os.path.join(small_tmpfs, "d")
    rng = random.Random(9)
    model = Model(size, page)
    ds = sc.DurableStore(d, size=size, page_size=page, keep_checkpoints=1)
    try:
        model.write_pages(ds, list(range(32)), rng.randbytes(size))
        model.committed(ds.commit())
        random_writes(rng, ds, model, 3)
        c = ds.checkpoint().result()
        model.committed(c)
        _commits(rng, ds, model, 2)
        last = ds.committed_epoch
        manifest = open(os.path.join(d, MANIFEST_NAME), "rb").read()

        # 1. A commit larger than the free space: ENOSPC, journal unchanged.
        filler = _fill(small_tmpfs, 16 * 1024)
        seg = os.path.join(d, segment_files(d)[-1])
        seg_size = os.path.getsize(seg)
        model.write_pages(ds, list(range(32)), rng.randbytes(size))
        with pytest.raises(OSError) as info:
            ds.commit()
        assert info.value.errno == errno.ENOSPC, info.value
        assert os.path.getsize(seg) == seg_size
        assert ds.committed_epoch == last
        with pytest.raises(OSError) as info:  # its commit part fails the same way
            ds.checkpoint()
        assert info.value.errno == errno.ENOSPC
        assert open(os.path.join(d, MANIFEST_NAME), "rb").read() == manifest

        # 2. Space again: the next commit carries the failed commit's writes.
        os.unlink(filler)
        model.committed(ds.commit())

        # 3. A checkpoint that does not fit: its commit succeeds, the save fails.
        filler = _fill(small_tmpfs, 40 * 1024)
        random_writes(rng, ds, model, 1)
        e = ds.epoch
        fut = ds.checkpoint()
        model.committed(e)
        err = fut.exception(timeout=30)
        assert isinstance(err, OSError) and err.errno == errno.ENOSPC, err
        assert read_manifest(d).checkpoints == [c]
        assert [n for n in os.listdir(d) if ".tmp" in n] == [], "temporary file left behind"
        last = ds.committed_epoch

        # 4. Closing on a full disk with uncommitted writes: a clear error, lock released.
        truncate(filler, 0)
        filler = _fill(small_tmpfs, 0)
        model.write_pages(ds, list(range(32)), rng.randbytes(size))
        with pytest.raises(OSError) as info:
            ds.close()
        assert info.value.errno == errno.ENOSPC
        assert ds.closed
        os.unlink(filler)
    finally:
        if not ds.closed:
            ds.close()
    _reopen_matches(d, model, last)


def test_failure_after_the_migration_commit_does_not_migrate_twice(tmp_path, monkeypatch):
    """The migration's commit is durable but the manifest naming the new schema version
    is not written (failure or crash): the next open must not migrate again."""
    d = str(tmp_path / "d")
    with sc.DurableStore(d, size=SIZE, page_size=PS, schema_version=1) as ds:
        ds.write(0, b"old")
    calls = []

    def migrate(store, old):
        calls.append(old)
        store.write(0, b"new")

    real_replace = os.replace

    def replace(src, dst, **kw):
        if calls and os.fspath(dst).endswith(MANIFEST_NAME):
            raise OSError(errno.EIO, "I/O error (injected)")
        return real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        sc.DurableStore(d, schema_version=2, migrate=migrate)
    monkeypatch.undo()
    assert calls == [1]
    with sc.DurableStore(d, schema_version=2, migrate=migrate) as ds:
        assert calls == [1], "migrated twice"
        assert ds.schema_version == 2
        assert ds.read(0, 3) == b"new"


def test_a_failed_cut_back_makes_the_journal_unusable_not_lossy(store_dir, monkeypatch):
    """A torn record that cannot be cut away stops recovery: any record after it would be
    lost although its commit returned, so no commit may follow it."""
    d, ds, model, rng = store_dir
    last = ds.committed_epoch
    real_write = os.write

    def writev(fd, buffers):
        data = b"".join(bytes(b) for b in buffers)
        return real_write(fd, data[:len(data) // 2])

    def fail(*args):
        raise OSError(errno.EIO, "I/O error (injected)")

    monkeypatch.setattr(journal.os, "writev", writev)
    monkeypatch.setattr(journal.os, "write", fail)
    monkeypatch.setattr(journal.os, "ftruncate", fail)
    random_writes(rng, ds, model, 3)
    with pytest.raises(OSError):
        ds.commit()
    monkeypatch.undo()
    for attempt in (ds.commit, ds.checkpoint):
        with pytest.raises(sc.StateError, match="could not be cut back"):
            attempt()
    ds.close()  # commits nothing more: the journal is unusable
    with sc.DurableStore(d) as again:
        assert again.recovery.committed_epoch == last
        assert state_hash(again) == model.at[last]


def test_a_new_segment_is_durable_in_its_directory_before_a_commit_returns(tmp_path,
                                                                           monkeypatch):
    """fdatasync makes a record durable, not the name of the file holding it: a segment's
    directory entry, and the store's directory itself, are fsynced when created."""
    synced = []
    real = journal.fsync_directory

    def spy(path):
        synced.append(os.path.basename(path))
        real(path)

    monkeypatch.setattr(journal, "fsync_directory", spy)
    import statecore.durable as durable
    monkeypatch.setattr(durable, "fsync_directory", spy)
    d = tmp_path / "new" / "store"
    ds = sc.DurableStore(d, size=SIZE, page_size=PS)
    try:
        assert "new" in synced and "store" in synced  # both directories created here
        assert journal.segment_name(0) in synced
        synced.clear()
        ds.write(0, b"x")
        ds.commit()
        e = ds.checkpoint().result()
        assert journal.segment_name(e) in synced  # the rotated segment too
    finally:
        ds.close()


def test_a_failed_open_leaks_no_file_descriptor(tmp_path):
    d = tmp_path / "d"
    with sc.DurableStore(d, size=SIZE, page_size=PS, schema_version=2):
        pass
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(sc.SchemaMismatch):
            sc.DurableStore(d, schema_version=1)
    assert len(os.listdir("/proc/self/fd")) <= before


def test_close_refused_for_an_exported_buffer_changes_nothing(tmp_path):
    d = tmp_path / "d"
    ds = sc.DurableStore(d, size=SIZE, page_size=PS)
    ds.write(0, b"one")
    view = memoryview(ds)
    with pytest.raises(BufferError):
        ds.close()
    ds.write(100, b"two")  # still open, and still committing
    e = ds.commit()
    view.release()
    ds.close()
    with sc.DurableStore(d) as again:
        assert again.recovery.committed_epoch == e
        assert again.read(0, 3) == b"one" and again.read(100, 3) == b"two"


def test_a_rebuilt_manifest_keeps_the_identity_the_journal_records(tmp_path):
    """Followers know a store by its identity: without a checkpoint, the journal's
    records give it back when the manifest is rebuilt."""
    d = tmp_path / "d"
    with sc.DurableStore(d, size=SIZE, page_size=PS) as ds:
        ds.write(0, b"hello")
        ds.commit()
        uuid = ds.uuid
    os.unlink(os.path.join(d, MANIFEST_NAME))
    with sc.DurableStore(d, size=SIZE, page_size=PS) as ds:
        assert ds.uuid == uuid
        assert ds.read(0, 5) == b"hello"


@pytest.mark.parametrize("field,value", [
    ("size", "65536"), ("size", -512), ("page_size", 0), ("page_size", 1000),
    ("uuid", "zz"), ("uuid", None), ("checkpoints", ["7"]), ("checkpoints", [5, 3]),
    ("segments", None), ("segments", []), ("replica_epochs", []),
    ("replica_epochs", {"1": "x"}), ("schema_version", True)])
def test_manifest_fields_that_make_no_sense_are_corrupt_data(tmp_path, field, value):
    """The manifest's checksum says its bytes are the ones written, not that they make
    sense: each field is checked, and a bad one is damage (rebuilt from the files)."""
    from statecore.manifest import Manifest
    good = Manifest(size=SIZE, page_size=PS, uuid="ab" * 16, segments=[0])
    raw = {**good.__dict__, field: value}
    with pytest.raises(sc.CorruptData, match="manifest fields invalid"):
        Manifest.decode(Manifest(**raw).encode())
    assert Manifest.decode(good.encode()) == good
