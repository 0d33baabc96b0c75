"""DurableStore: commits, epochs, recovery reports, format versions, schema migration,
the directory lock, group commit from many threads, checkpoints under load, journal
trimming and checkpoint fallback."""
from __future__ import annotations

import multiprocessing
import os
import random
import struct
import subprocess
import sys
import threading
import time

import pytest

import statecore as sc
from statecore import _core, journal
from statecore.snapshot import Snapshot

from _durable_util import (Model, checkpoint_files, checkpoint_name, craft_manifest,
                           files_fingerprint, flip_bit, random_writes, read_manifest,
                           record_spans, segment_files, state_hash, truncate)

PS = 4096
SIZE = 16 * PS


@pytest.fixture
def opened():
    """open(directory, **kw) -> DurableStore, closed at teardown if the test did not."""
    stores = []

    def open_(directory, **kw):
        ds = sc.DurableStore(directory, **kw)
        stores.append(ds)
        return ds

    yield open_
    for ds in stores:
        if not ds.closed:
            try:
                ds.close()
            except Exception:
                pass


def _seg(directory, start=0):
    return os.path.join(directory, journal.segment_name(start))


def _ckpt(directory, epoch):
    return os.path.join(directory, checkpoint_name(epoch))


# ---- basics and epoch arithmetic ----------------------------------------------------------
def test_fresh_store_reports_fresh_and_starts_at_epoch_1(tmp_path, opened):
    ds = opened(tmp_path / "d", size=SIZE, page_size=PS)
    assert ds.recovery.fresh
    assert ds.epoch == 1
    assert (ds.size, ds.page_size, ds.n_pages) == (SIZE, PS, 16)
    assert ds.read(0, SIZE) == bytes(SIZE)
    assert "new" in str(ds.recovery)


def test_size_is_required_to_create(tmp_path):
    with pytest.raises(TypeError, match="size"):
        sc.DurableStore(tmp_path / "d")
    # The failed open released the directory lock.
    sc.DurableStore(tmp_path / "d", size=SIZE).close()


def test_commit_returns_the_epoch_it_closed(tmp_path, opened):
    d = tmp_path / "d"
    ds = opened(d, size=SIZE, page_size=PS)
    returned = []
    for i in range(5):
        before = ds.epoch
        ds.write(i * 100, b"x" * (i + 1))
        e = ds.commit()
        assert e == before, "commit() returns the open epoch it closed"
        assert ds.epoch == e + 1
        assert ds.committed_epoch == e
        returned.append(e)
    assert returned == list(range(1, 6))
    # A commit with nothing written still closes the open epoch.
    e = ds.commit()
    assert e == 6 and ds.epoch == 7
    ds.close()
    ds = opened(d)
    assert ds.recovery.committed_epoch == 6
    assert ds.epoch == 7
    for i in range(5):
        assert ds.read(i * 100, i + 2) == b"x" * (i + 1) + (b"\0" if i < 4 else b"\0")


def test_reopen_recovers_exactly_the_committed_state(tmp_path, opened):
    d = tmp_path / "d"
    rng = random.Random(1)
    ds = opened(d, size=SIZE, page_size=PS)
    model = Model(SIZE, PS)
    for i in range(30):
        random_writes(rng, ds, model, 4)
        if i % 10 == 9:
            c = ds.checkpoint().result()
            model.committed(c)
        else:
            model.committed(ds.commit())
    last = ds.committed_epoch
    ds.close()
    ds = opened(d)
    assert ds.recovery.committed_epoch == last
    assert state_hash(ds) == model.hash()
    # The reopened store goes on committing where it stopped.
    random_writes(rng, ds, model, 3)
    assert ds.commit() == last + 1
    ds.close()
    ds = opened(d)
    assert state_hash(ds) == model.hash()


def test_clean_close_commits_what_was_written(tmp_path, opened):
    d = tmp_path / "d"
    ds = opened(d, size=SIZE, page_size=PS)
    ds.write(0, b"committed")
    e = ds.commit()
    ds.write(5000, b"written after the last commit")
    ds.array("int64", offset=8192, shape=(4,))[:] = [1, 2, 3, 4]
    ds.close()
    assert ds.closed
    ds.close()  # idempotent
    with pytest.raises(sc.StoreClosed):
        ds.commit()
    ds = opened(d)
    assert ds.recovery.committed_epoch == e + 1
    assert ds.read(0, 9) == b"committed"
    assert ds.read(5000, 29) == b"written after the last commit"
    assert struct.unpack("<4q", ds.read(8192, 32)) == (1, 2, 3, 4)


def test_geometry_mismatch_and_bad_arguments(tmp_path, opened):
    d = tmp_path / "d"
    opened(d, size=SIZE, page_size=PS).close()
    with pytest.raises(sc.StoreMismatch, match="size"):
        sc.DurableStore(d, size=2 * SIZE)
    with pytest.raises(sc.StoreMismatch, match="page_size"):
        sc.DurableStore(d, size=SIZE, page_size=512)
    with pytest.raises(ValueError, match="keep_checkpoints"):
        sc.DurableStore(tmp_path / "e", size=SIZE, keep_checkpoints=0)
    ds = opened(d)  # no geometry needed to reopen; the failed opens released the lock
    assert (ds.size, ds.page_size) == (SIZE, PS)


# ---- the recovery report ------------------------------------------------------------------
def test_recovery_report_contents(tmp_path, opened):
    d = str(tmp_path / "d")
    rng = random.Random(2)
    ds = opened(d, size=SIZE, page_size=PS)
    model = Model(SIZE, PS)
    for _ in range(4):
        random_writes(rng, ds, model, 3)
        ds.commit()
    random_writes(rng, ds, model, 3)
    c = ds.checkpoint().result()
    for _ in range(5):
        random_writes(rng, ds, model, 3)
        ds.commit()
    last = ds.committed_epoch
    ds.close()
    spans = [s for s in record_spans(_seg(d, c)) if s[3] > c]
    ds = opened(d)
    r = ds.recovery
    assert not r.fresh
    assert r.checkpoint_epoch == c
    assert r.checkpoint_file == checkpoint_name(c)
    assert r.checkpoint_bytes == os.path.getsize(_ckpt(d, c))
    assert r.deltas_replayed == len(spans) == 5
    assert r.committed_epoch == last
    journal_bytes = sum(end - start - journal.FRAME_SIZE for start, end, _, _ in spans)
    assert r.journal_bytes == journal_bytes
    assert r.bytes == r.checkpoint_bytes + journal_bytes
    assert 0 < r.seconds < 10
    assert r.discarded == []
    text = str(r)
    assert f"recovered epoch {last}" in text and f"checkpoint {c}" in text
    assert state_hash(ds) == model.hash()


def test_recovery_report_names_a_torn_tail(tmp_path, opened):
    d = str(tmp_path / "d")
    ds = opened(d, size=SIZE, page_size=PS)
    for i in range(4):
        ds.write(i * PS, bytes([i + 1]) * 10)
        ds.commit()
    ds.close()
    seg = _seg(d)
    spans = record_spans(seg)
    start, end, base, target = spans[-1]
    truncate(seg, end - 7)
    ds = opened(d)
    r = ds.recovery
    assert r.checkpoint_epoch is None
    assert r.committed_epoch == base
    assert r.deltas_replayed == len(spans) - 1
    assert len(r.discarded) == 1
    what = r.discarded[0]
    assert journal.segment_name(0) in what.what and str(start) in what.what
    assert "torn" in what.reason
    assert what.bytes == end - 7 - start
    assert any("cut" in x for x in r.repairs)
    assert os.path.getsize(seg) == start
    assert ds.read(3 * PS, 10) == bytes(10)
    assert ds.read(2 * PS, 10) == bytes([3]) * 10
    assert "discarded" in str(r)


# ---- format versions ----------------------------------------------------------------------
def _store_with_history(d, opened, checkpoint=True):
    ds = opened(d, size=SIZE, page_size=PS)
    for i in range(3):
        ds.write(i * PS, bytes([i + 1]) * 64)
        ds.commit()
    if checkpoint:
        ds.checkpoint().result()
    for i in range(3):
        ds.write(i * PS + 100, bytes([i + 7]) * 64)
        ds.commit()
    ds.close()


def _reseal_delta_header(buf: bytearray, at: int) -> None:
    struct.pack_into("<Q", buf, at + 120, _core.page_checksum(bytes(buf[at:at + 120])))


def test_newer_manifest_format_raises_unsupported(tmp_path, opened):
    d = str(tmp_path / "d")
    _store_with_history(d, opened)
    craft_manifest(d, format_version=2)
    before = files_fingerprint(d)
    with pytest.raises(sc.UnsupportedFormat, match="manifest"):
        sc.DurableStore(d, size=SIZE, page_size=PS)
    assert files_fingerprint(d) == before, "a newer format must be left untouched"
    # The same change without a valid checksum is damage, not a newer format: rebuilt.
    craft_manifest(d, format_version=1)
    flip_bit(os.path.join(d, "MANIFEST"), 30)
    ds = opened(d, size=SIZE, page_size=PS)
    assert ds.recovery.discarded[0].what == "MANIFEST"


def test_newer_journal_record_frame_raises_unsupported(tmp_path, opened):
    d = str(tmp_path / "d")
    _store_with_history(d, opened, checkpoint=False)
    seg = _seg(d)
    start = record_spans(seg)[-1][0]
    with open(seg, "r+b") as f:
        buf = bytearray(f.read())
        struct.pack_into("<H", buf, start + 4, journal.FORMAT_VERSION + 1)
        struct.pack_into("<Q", buf, start + 24, _core.page_checksum(bytes(buf[start:start + 24])))
        f.seek(0)
        f.write(buf)
    before = files_fingerprint(d)
    with pytest.raises(sc.UnsupportedFormat, match="journal record format"):
        sc.DurableStore(d)
    assert files_fingerprint(d) == before, "a newer record must not be cut as a torn tail"


def test_newer_delta_inside_journal_record_raises_unsupported(tmp_path, opened):
    """A record whose frame is version 1 but whose delta is a newer delta format, with
    every checksum valid: that is a newer format, not damage to cut away."""
    d = str(tmp_path / "d")
    _store_with_history(d, opened, checkpoint=False)
    seg = _seg(d)
    start, end, _, _ = record_spans(seg)[-1]
    body = start + journal.FRAME_SIZE
    with open(seg, "r+b") as f:
        buf = bytearray(f.read())
    struct.pack_into("<H", buf, body + 8, _core.FORMAT_VERSION + 1)
    _reseal_delta_header(buf, body)
    n = struct.unpack_from("<Q", buf, body + 48)[0]
    digest = _core.page_checksum(bytes(buf[body:body + _core.HEADER_SIZE + 24 * n]))
    struct.pack_into("<Q", buf, start + 16, digest)
    struct.pack_into("<Q", buf, start + 24, _core.page_checksum(bytes(buf[start:start + 24])))
    with open(seg, "wb") as f:
        f.write(buf)
    before = files_fingerprint(d)
    with pytest.raises(sc.UnsupportedFormat):
        sc.DurableStore(d)
    assert files_fingerprint(d) == before, "a newer record must not be cut as a torn tail"


def test_newer_checkpoint_format_raises_unsupported(tmp_path, opened):
    d = str(tmp_path / "d")
    _store_with_history(d, opened)
    (ckpt,) = checkpoint_files(d)
    path = os.path.join(d, ckpt)
    with open(path, "rb") as f:
        buf = bytearray(f.read())
    original = bytes(buf)
    struct.pack_into("<H", buf, 8, _core.FORMAT_VERSION + 1)
    _reseal_delta_header(buf, 0)
    with open(path, "wb") as f:
        f.write(buf)
    before = files_fingerprint(d)
    with pytest.raises(sc.UnsupportedFormat):
        sc.DurableStore(d)
    assert files_fingerprint(d) == before
    # Without the resealed checksum the bumped version is corruption: the checkpoint is
    # passed over (the journal reaches back to epoch 0) and the state is still exact.
    buf = bytearray(original)
    struct.pack_into("<H", buf, 8, _core.FORMAT_VERSION + 1)
    with open(path, "wb") as f:
        f.write(buf)
    ds = opened(d)
    assert ds.recovery.checkpoint_epoch is None
    assert ds.recovery.discarded[0].what == ckpt
    assert ds.read(PS + 100, 64) == bytes([8]) * 64


# ---- schema versions ------------------------------------------------------------------------
def test_schema_version_mismatch_migrate_and_downgrade(tmp_path, opened):
    d = str(tmp_path / "d")
    ds = opened(d, size=SIZE, page_size=PS, schema_version=1)
    assert ds.schema_version == 1
    ds.write(0, b"v1 data")
    ds.close()

    with pytest.raises(sc.SchemaMismatch, match="migrate"):
        sc.DurableStore(d, schema_version=2)
    ds = opened(d, schema_version=1)  # unchanged, and the failed open released the lock
    assert ds.schema_version == 1
    ds.close()

    calls = []

    def migrate(store, old):
        calls.append((store, old))
        assert store.schema_version == old
        assert store.read(0, 7) == b"v1 data"
        store.write(0, b"v2 data")

    ds = opened(d, schema_version=2, migrate=migrate)
    assert [old for _, old in calls] == [1] and calls[0][0] is ds
    assert ds.schema_version == 2
    assert ds.read(0, 7) == b"v2 data"
    ds.close()

    # Upgraded durably: reopening at 2 does not migrate again, and None accepts anything.
    ds = opened(d, schema_version=2, migrate=migrate)
    assert len(calls) == 1 and ds.schema_version == 2 and ds.read(0, 7) == b"v2 data"
    ds.close()
    ds = opened(d)
    assert ds.schema_version == 2
    ds.close()

    # Downgrade refused, with or without migrate; migrate is not called.
    for kw in ({}, {"migrate": migrate}):
        with pytest.raises(sc.SchemaMismatch, match="downgrade"):
            sc.DurableStore(d, schema_version=1, **kw)
    assert len(calls) == 1


def test_failed_migration_leaves_the_old_version(tmp_path, opened):
    d = str(tmp_path / "d")
    opened(d, size=SIZE, page_size=PS, schema_version=3).close()

    def bad(store, old):
        store.write(0, b"half-migrated")
        raise RuntimeError("migration failed")

    with pytest.raises(RuntimeError, match="migration failed"):
        sc.DurableStore(d, schema_version=4, migrate=bad)
    ds = opened(d, schema_version=3)
    assert ds.schema_version == 3
    assert ds.read(0, 13) == bytes(13), "a failed migration's writes are not committed"


def test_schema_version_survives_reopen_after_checkpoint(tmp_path, opened):
    d = str(tmp_path / "d")
    ds = opened(d, size=SIZE, page_size=PS, schema_version=5)
    ds.write(0, b"a")
    ds.checkpoint().result()
    ds.write(1, b"b")
    ds.close()
    ds = opened(d, schema_version=5)
    assert ds.schema_version == 5


# ---- the directory lock ---------------------------------------------------------------------
def test_second_open_in_this_process_raises_store_locked(tmp_path, opened):
    d = tmp_path / "d"
    ds = opened(d, size=SIZE, page_size=PS)
    ds.write(0, b"mine")
    with pytest.raises(sc.StoreLocked):
        sc.DurableStore(d)
    with pytest.raises(sc.StoreLocked):
        sc.DurableStore(d, size=SIZE, page_size=PS)
    # The refused open changed nothing for the owner.
    assert ds.commit() == 1
    ds.close()
    ds2 = opened(d)
    assert ds2.read(0, 4) == b"mine"


_LOCK_CHILD = """
import sys
import statecore as sc
try:
    sc.DurableStore(sys.argv[1]).close()
    print("opened")
except sc.StoreLocked:
    print("StoreLocked")
"""


def test_open_in_another_process_raises_store_locked(tmp_path, opened):
    d = tmp_path / "d"
    ds = opened(d, size=SIZE, page_size=PS)

    def child():
        return subprocess.run([sys.executable, "-c", _LOCK_CHILD, str(d)], capture_output=True,
                              text=True, timeout=60)

    out = child()
    assert out.stdout.strip() == "StoreLocked", out.stderr
    ds.close()
    out = child()
    assert out.stdout.strip() == "opened", out.stderr


def _fork_child_open(directory, conn):
    try:
        sc.DurableStore(directory).close()
        conn.send("opened")
    except sc.StoreLocked:
        conn.send("StoreLocked")
    except BaseException as e:  # pragma: no cover - reported to the parent
        conn.send(f"{type(e).__name__}: {e}")


def test_open_in_a_forked_child_raises_store_locked(tmp_path, opened):
    d = str(tmp_path / "d")
    opened(d, size=SIZE, page_size=PS)
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_fork_child_open, args=(d, child))
    p.start()
    assert parent.poll(30)
    assert parent.recv() == "StoreLocked"
    p.join(30)


# ---- concurrency --------------------------------------------------------------------------------
def test_concurrent_commits_share_fsyncs_and_each_returned_epoch_is_durable(
        tmp_path, opened, monkeypatch):
    d = str(tmp_path / "d")
    n_threads, per_thread = 6, 20
    ds = opened(d, size=2 * n_threads * PS, page_size=PS)
    seg = _seg(d)
    real_fdatasync = os.fdatasync
    lock = threading.Lock()
    durable = {"size": 0, "syncs": 0}

    def fdatasync(fd):
        size = os.fstat(fd).st_size  # everything appended before the call is covered
        time.sleep(0.002)            # a slow disk, so commits pile up behind one fsync
        real_fdatasync(fd)
        with lock:
            durable["size"] = max(durable["size"], size)
            durable["syncs"] += 1

    monkeypatch.setattr(journal.os, "fdatasync", fdatasync)
    results = []
    errors = []
    start = threading.Barrier(n_threads)

    def worker(tid):
        try:
            start.wait()
            for it in range(per_thread):
                ds.write(2 * tid * PS, bytes([tid + 1, it]) * PS)
                e = ds.commit()
                with lock:
                    results.append((e, durable["size"], tid, it))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(results) == n_threads * per_thread
    epochs = [r[0] for r in results]
    assert len(set(epochs)) == len(epochs), "every commit closes its own epoch"
    assert sorted(epochs) == list(range(1, len(epochs) + 1))
    assert durable["syncs"] < len(results), "group commit: concurrent commits share fsyncs"
    # Every epoch a commit returned was inside the fsync'd prefix of the journal by then.
    ends = {target: end for _, end, _, target in record_spans(seg)}
    for e, synced, tid, it in results:
        assert ends[e] <= synced, f"commit returned epoch {e} before its record was fsync'd"
    ds.close()
    ds = opened(d)
    assert ds.recovery.committed_epoch == max(epochs)
    for tid in range(n_threads):
        assert ds.read(2 * tid * PS, 2 * PS) == bytes([tid + 1, per_thread - 1]) * PS


def test_checkpoint_while_a_writer_thread_keeps_committing(tmp_path, opened, monkeypatch):
    d = str(tmp_path / "d")
    size = 256 * PS
    ds = opened(d, size=size, page_size=PS)
    model = Model(size, PS)
    mlock = threading.Lock()
    commits = [0]
    overlapped = []
    stop = threading.Event()
    failures = []
    real_save = Snapshot.save

    def slow_save(self, path, **kw):
        # Hold the background save until the writer has committed twice more: the save
        # must still write exactly the snapshot's state.
        first = commits[0]
        deadline = time.monotonic() + 10
        while commits[0] < first + 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        overlapped.append(commits[0] - first)
        return real_save(self, path, **kw)

    monkeypatch.setattr(Snapshot, "save", slow_save)

    def writer():
        rng = random.Random(7)
        try:
            while not stop.is_set():
                with mlock:
                    random_writes(rng, ds, model, 4)
                    model.committed(ds.commit())
                    commits[0] += 1
        except BaseException as e:  # pragma: no cover - reported below
            failures.append(e)

    t = threading.Thread(target=writer)
    t.start()
    taken = []
    try:
        for _ in range(4):
            time.sleep(0.005)
            with mlock:
                expect = ds.epoch
                fut = ds.checkpoint()
                model.committed(expect)
            assert fut.result(timeout=30) == expect
            taken.append(expect)
            with sc.Store.load(_ckpt(d, expect)) as s:
                assert s.epoch == expect + 1
                assert state_hash(s) == model.at[expect], "checkpoint is not its snapshot"
    finally:
        stop.set()
        t.join(30)
    assert not failures, failures
    assert all(n >= 2 for n in overlapped), f"writer blocked during checkpoints: {overlapped}"
    last = ds.committed_epoch
    ds.close()
    ds = opened(d)
    assert ds.recovery.checkpoint_epoch == taken[-1]
    assert ds.recovery.committed_epoch == last
    assert state_hash(ds) == model.hash() == model.at[last]


# ---- journal trimming and checkpoint fallback --------------------------------------------------
@pytest.mark.parametrize("keep", [1, 2, 3])
def test_journal_trimming_keeps_what_fallback_needs(tmp_path, opened, keep):
    d = str(tmp_path / "d")
    rng = random.Random(keep)
    ds = opened(d, size=SIZE, page_size=PS, keep_checkpoints=keep)
    model = Model(SIZE, PS)
    ckpts = []
    for _ in range(5):
        random_writes(rng, ds, model, 3)
        model.committed(ds.commit())
        random_writes(rng, ds, model, 3)
        e = ds.epoch
        assert ds.checkpoint().result() == e
        model.committed(e)
        ckpts.append(e)
        random_writes(rng, ds, model, 3)
        model.committed(ds.commit())
        kept = ckpts[-keep:]
        m = read_manifest(d)
        assert m.checkpoints == kept
        assert checkpoint_files(d) == [checkpoint_name(c) for c in kept]
        # Segments start at each checkpoint; the journal reaches back to the oldest kept
        # checkpoint, or to epoch 0 while fewer than `keep` exist.
        starts = [0] + ckpts if len(ckpts) < keep else [c for c in ckpts if c >= kept[0]]
        assert m.segments == starts
        assert segment_files(d) == [journal.segment_name(s) for s in starts]
    last = ds.committed_epoch
    ds.close()
    ds = opened(d)
    assert ds.recovery.checkpoint_epoch == ckpts[-1]
    assert state_hash(ds) == model.at[last]


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_plus_longer_journal(
        tmp_path, opened):
    d = str(tmp_path / "d")
    rng = random.Random(3)
    ds = opened(d, size=SIZE, page_size=PS, keep_checkpoints=2)
    model = Model(SIZE, PS)
    ckpts = []
    for _ in range(3):
        for _ in range(3):
            random_writes(rng, ds, model, 3)
            model.committed(ds.commit())
        random_writes(rng, ds, model, 2)
        ckpts.append(ds.checkpoint().result())
    for _ in range(3):
        random_writes(rng, ds, model, 3)
        model.committed(ds.commit())
    last = ds.committed_epoch
    ds.close()
    prev, newest = ckpts[-2], ckpts[-1]
    after_prev = sum(1 for s in record_spans(_seg(d, prev)) + record_spans(_seg(d, newest))
                     if s[3] > prev)
    path = _ckpt(d, newest)
    flip_bit(path, os.path.getsize(path) - 1, 3)  # the last page's bytes
    ds = opened(d)
    r = ds.recovery
    assert r.checkpoint_epoch == prev
    assert r.committed_epoch == last
    assert r.deltas_replayed == after_prev
    assert [x.what for x in r.discarded] == [checkpoint_name(newest)]
    assert "checksum" in r.discarded[0].reason
    assert r.discarded[0].bytes == os.path.getsize(path)
    assert state_hash(ds) == model.at[last]
    # The store goes on from there.
    random_writes(rng, ds, model, 3)
    model.committed(ds.commit())
    ds.close()
    ds = opened(d)
    assert state_hash(ds) == model.hash()


def test_no_provable_state_raises_and_leaves_the_directory_alone(tmp_path, opened):
    d = str(tmp_path / "d")
    ds = opened(d, size=SIZE, page_size=PS, keep_checkpoints=1)
    ds.write(0, b"a")
    ds.checkpoint().result()
    ds.write(0, b"b")
    c = ds.checkpoint().result()
    ds.write(1, b"c")
    ds.close()
    assert journal.segment_name(0) not in segment_files(d)
    flip_bit(_ckpt(d, c), 200)
    before = files_fingerprint(d)
    for _ in range(2):  # and the refused open released the lock
        with pytest.raises(sc.CorruptCheckpoint, match="cannot be proven"):
            sc.DurableStore(d)
    assert files_fingerprint(d) == before


# ---- deltas applied to a durable store ---------------------------------------------------------
def _crash_copy(ds: sc.DurableStore, tmp_path, name: str = "crashed") -> str:
    """The directory as a power cut would leave it now: what is on disk, the open store's
    memory lost."""
    import shutil
    dst = str(tmp_path / name)
    shutil.copytree(ds.directory, dst)
    return dst


def _source_deltas():
    """Deltas (0, a] and (a, b] of another store, and its bytes at b."""
    src = sc.Store(size=SIZE, page_size=PS)
    try:
        src.write(PS * 3, b"first")
        with src.snapshot() as a:
            src.write(PS * 3 + 100, b"second")
            src.write(PS * 9, b"ninth page")
            with src.snapshot() as b:
                return src.delta(0, a), src.delta(a, b), src.read(0, SIZE)
    finally:
        src.close()


def _committed_three_times(ds: sc.DurableStore) -> sc.DurableStore:
    """A store whose own epochs run ahead of _source_deltas' (its commits 1 to 3)."""
    for _ in range(3):
        ds.write(0, b"local")
        ds.commit()
    return ds


@pytest.mark.parametrize("how", ["apply", "replay"])
def test_applied_deltas_are_durable_once_applied(tmp_path, opened, how):
    """Applied pages keep the versions they have in the delta, which can lie below the
    last commit: a commit would skip them. apply and replay journal the deltas instead."""
    first, second, expected = _source_deltas()
    ds = _committed_three_times(opened(tmp_path / "d", size=SIZE, page_size=PS))
    if how == "apply":
        assert ds.apply(first) == 1
        assert ds.apply(second.encode()) == 2
    else:
        sc.replay(ds, [second, first])
    assert ds.read(PS, SIZE - PS) == expected[PS:]
    crashed = opened(_crash_copy(ds, tmp_path))
    assert crashed.read(0, 5) == b"local"
    assert crashed.read(PS, SIZE - PS) == expected[PS:]
    assert crashed.recovery.committed_epoch == ds.committed_epoch


def test_local_writes_and_applied_deltas_interleave_durably(tmp_path, opened):
    """Writes not yet committed, and epochs closed by snapshots alone, are committed
    before an applied delta's record, so recovery replays both in order."""
    first, second, expected = _source_deltas()
    ds = opened(tmp_path / "d", size=SIZE, page_size=PS)
    ds.write(0, b"before")        # not committed
    with ds.snapshot(), ds.snapshot():
        pass                       # epochs closed, nothing committed
    ds.apply(first)
    ds.write(PS * 12, b"between")
    ds.apply(second)
    ds.write(PS * 13, b"after")    # committed by close
    ds.close()
    again = opened(tmp_path / "d")
    assert again.read(0, 6) == b"before"
    assert again.read(PS * 12, 7) == b"between" and again.read(PS * 13, 5) == b"after"
    assert again.read(PS * 3, PS) == expected[PS * 3:PS * 4]
    assert again.read(PS * 9, PS) == expected[PS * 9:PS * 10]
    # Applying them again changes nothing, and stays so after a reopen.
    epoch = again.committed_epoch
    assert again.apply(first) == 0 and again.apply(second) == 0
    crashed = opened(_crash_copy(again, tmp_path))
    assert crashed.read(0, SIZE) == again.read(0, SIZE)
    assert crashed.recovery.committed_epoch >= epoch


def test_an_apply_whose_commit_fails_is_carried_by_the_next_commit(tmp_path, opened,
                                                                   monkeypatch):
    first, second, expected = _source_deltas()
    ds = _committed_three_times(opened(tmp_path / "d", size=SIZE, page_size=PS))

    def writev(fd, buffers):
        raise OSError(28, "No space left on device (injected)")

    monkeypatch.setattr(journal.os, "writev", writev)
    with pytest.raises(OSError):
        ds.apply(first)
    monkeypatch.undo()
    ds.commit()  # nothing written since: still carries the applied pages
    crashed = opened(_crash_copy(ds, tmp_path))
    assert crashed.read(PS * 3, PS) == b"first".ljust(PS, b"\0")  # as of `first`


def test_a_write_racing_an_apply_is_committed_with_it(tmp_path, opened, monkeypatch):
    """A writer in another thread may write between the apply and its commit: the commit
    carries both (one record from the lowest base)."""
    first, second, expected = _source_deltas()
    ds = _committed_three_times(opened(tmp_path / "d", size=SIZE, page_size=PS))
    real = sc.Store.apply

    def apply_then_a_write_elsewhere(store, delta, **kw):
        written = real(store, delta, **kw)
        store.write(PS * 14, b"racing writer")
        return written

    monkeypatch.setattr(sc.Store, "apply", apply_then_a_write_elsewhere)
    ds.apply(first)
    monkeypatch.undo()
    crashed = opened(_crash_copy(ds, tmp_path))
    assert crashed.read(PS * 14, 13) == b"racing writer"
    assert crashed.read(PS * 3, PS) == b"first".ljust(PS, b"\0")  # as of `first`


def test_applying_bad_bytes_commits_nothing(tmp_path, opened):
    ds = opened(tmp_path / "d", size=SIZE, page_size=PS)
    ds.write(0, b"uncommitted")
    epoch = ds.committed_epoch
    size = os.path.getsize(_seg(ds.directory))
    with pytest.raises(sc.CorruptDelta):
        ds.apply(b"not a delta")
    assert ds.committed_epoch == epoch and os.path.getsize(_seg(ds.directory)) == size


def test_an_apply_that_fails_half_way_is_still_committed_next(tmp_path, opened, monkeypatch):
    """What an apply wrote before it failed (out of memory half-way, say) stays in the
    store: the next commit must carry it, as it carries any write."""
    first, second, expected = _source_deltas()
    ds = _committed_three_times(opened(tmp_path / "d", size=SIZE, page_size=PS))
    real = sc.Store.apply

    def apply_then_fail(store, delta, **kw):
        real(store, delta, **kw)
        raise MemoryError("injected after the pages were written")

    monkeypatch.setattr(sc.Store, "apply", apply_then_fail)
    with pytest.raises(MemoryError):
        ds.apply(first)
    monkeypatch.undo()
    ds.commit()
    crashed = opened(_crash_copy(ds, tmp_path))
    assert crashed.read(PS * 3, PS) == b"first".ljust(PS, b"\0")  # as of `first`


def test_a_caught_up_follower_gets_what_its_durable_primary_applied(tmp_path, opened):
    """The commit that follows an apply starts below the follower's epoch: its delta
    carries the applied pages, which a delta computed by version from that epoch
    would miss."""
    first, second, expected = _source_deltas()
    ds = opened(tmp_path / "p", size=SIZE, page_size=PS)
    for i in range(5):
        ds.write(PS, b"local%d" % i)
        ds.commit()
    replica = sc.Store(size=SIZE, page_size=PS)
    with sc.Primary(ds) as primary:
        follower = sc.Follower(replica, primary.address)
        try:
            follower.wait_for(ds.committed_epoch, timeout=30)
            ds.apply(first)
            follower.wait_for(ds.committed_epoch, timeout=30)
            assert replica.read(0, SIZE) == ds.read(0, SIZE)
        finally:
            follower.close()
            replica.close()


def test_opening_nothing_without_a_size_creates_nothing(tmp_path):
    d = tmp_path / "new" / "store"
    with pytest.raises(TypeError, match="size is required"):
        sc.DurableStore(d)
    assert not (tmp_path / "new").exists()  # a call that raises changes nothing
    (tmp_path / "empty").mkdir()
    with pytest.raises(TypeError, match="size is required"):
        sc.DurableStore(tmp_path / "empty")
    assert os.listdir(tmp_path / "empty") == []


def test_a_geometry_mismatch_says_what_the_directory_holds(tmp_path, opened):
    d = tmp_path / "d"
    opened(d, size=SIZE, page_size=PS).close()
    with pytest.raises(sc.StoreMismatch) as info:
        sc.DurableStore(d, size=2 * SIZE)
    assert f"size={SIZE}, page_size={PS}" in str(info.value)
    assert f"asked for size={2 * SIZE}" in str(info.value)


def test_close_while_other_threads_commit_and_checkpoint(tmp_path):
    """close() racing commit() and checkpoint(): the others get StoreClosed (not an
    OSError from a closed journal, nor a RuntimeError from a stopped checkpointer), close()
    succeeds, and the directory reopens at a committed state."""
    import random as _random
    for it in range(8):
        d = tmp_path / f"d{it}"
        ds = sc.DurableStore(d, size=SIZE, page_size=PS)
        unexpected: list = []

        def worker(kind: str, seed: int) -> None:
            r = _random.Random(seed)
            while True:
                try:
                    ds.write(r.randrange(SIZE // PS) * PS, os.urandom(64))
                    ds.checkpoint().result() if kind == "ckpt" else ds.commit()
                except (sc.StoreClosed, sc.SnapshotReleased):
                    return
                except BaseException as e:  # anything else is the bug
                    unexpected.append(repr(e))
                    return

        threads = [threading.Thread(target=worker, args=(k, it * 10 + i))
                   for i, k in enumerate(("commit", "commit", "ckpt", "ckpt"))]
        for t in threads:
            t.start()
        time.sleep(0.02 + 0.02 * it)
        ds.close()
        for t in threads:
            t.join(30)
        assert ds.closed and not unexpected, unexpected
        with sc.DurableStore(d) as again:
            assert again.recovery.discarded == []
