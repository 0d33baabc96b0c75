"""Lifecycle: no leaks over many create/write/snapshot/release/close cycles, fork safety,
and garbage collection of snapshots and stores."""
from __future__ import annotations

import gc
import os
import sys
import threading
import time
import tracemalloc
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import statecore as sc

PAGE = 4096
N_PAGES = 64
SIZE = N_PAGES * PAGE


# ---- leaks -----------------------------------------------------------------------------
def _one_cycle(data: bytes, path=None) -> None:
    with sc.Store(path, size=SIZE) as s:
        s.write(0, data)
        s.write_pages([1, 2], data[:2 * PAGE])
        arr = s.array("int64")
        arr[::100] = 1
        arr[np.array([3, -3])] = 2
        arr.add_at([5, 5, 5], 1)
        first = s.read(0, PAGE)
        snap = s.snapshot()
        s.write_pages(np.arange(N_PAGES), data)       # every page preserved once
        assert snap.read(0, PAGE) == first
        snap.read_pages([0, 1, 63])
        with s.snapshot() as inner:
            s.write(PAGE, b"x" * PAGE)
            inner.read(PAGE, 10)
        assert s.stats()["preserved_pages"] == N_PAGES
        snap.release()
        assert s.stats()["preserved_pages"] == 0
        dropped = s.snapshot()
        s.write(0, b"y")
        del dropped                                   # released by its finalizer
        s.write(0, b"z")
        st = s.stats()
        assert st["preserved_pages"] == 0 and st["live_snapshots"] == 0
        mv = memoryview(s)
        mv.release()
        for bad in (lambda: s.write(-1, b"x"), lambda: s.read(0, -1),
                    lambda: s.write_pages([N_PAGES], bytes(PAGE)), lambda: arr[[10 ** 9]],
                    lambda: arr.__setitem__(10 ** 9, 1)):
            try:
                bad()
            except (IndexError, ValueError, TypeError):
                pass
        s.snapshot()      # left live: close() must free it too


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_create_write_snapshot_release_close_does_not_leak():
    data = np.random.default_rng(0).integers(0, 256, SIZE, dtype=np.uint8).tobytes()
    for _ in range(20):                               # warm caches and free lists
        _one_cycle(data)
    gc.collect()
    tracemalloc.start()
    try:
        rss0 = _rss_bytes()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(300):
            _one_cycle(data)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
        rss_grown = _rss_bytes() - rss0
    finally:
        tracemalloc.stop()
    # One leaked Snapshot, array or bytes object per cycle would exceed this.
    assert grown < 64 * 1024, f"Python-level memory grew by {grown} bytes over 300 cycles"
    # Each cycle preserves 256 KiB of pages: leaking them would add ~75 MiB.
    assert rss_grown < 24 << 20, f"RSS grew by {rss_grown >> 20} MiB over 300 cycles"


def test_file_backed_cycles_do_not_leak_descriptors(tmp_path):
    data = bytes(range(256)) * (SIZE // 256)
    fd_dir = "/proc/self/fd"
    before = len(os.listdir(fd_dir))
    for i in range(50):
        _one_cycle(data, tmp_path / f"{i % 3}.store")
    assert len(os.listdir(fd_dir)) <= before


# ---- fork -----------------------------------------------------------------------------
def _child_checks(store, snap, arr, tmp_path):
    return [
        ("read", lambda: store.read(0, 1)),
        ("write", lambda: store.write(0, b"child")),
        ("write_pages", lambda: store.write_pages([0], bytes(PAGE))),
        ("array setitem", lambda: arr.__setitem__(0, 1)),
        ("array fancy setitem", lambda: arr.__setitem__([0, 1], 1)),
        ("array add_at", lambda: arr.add_at([0], 1)),
        ("array getitem", lambda: arr[0]),
        ("new array", lambda: store.array("uint8")),
        ("snapshot", lambda: store.snapshot()),
        ("stats", lambda: store.stats()),
        ("epoch", lambda: store.epoch),
        ("memoryview", lambda: memoryview(store)),
        ("np.asarray", lambda: np.asarray(store)),
        ("delta", lambda: store.delta(0, snap)),
        ("snap.read", lambda: snap.read(0, 1)),
        ("snap.read_pages", lambda: snap.read_pages([0])),
        ("snap.save", lambda: snap.save(tmp_path / "child.ckpt")),
        ("snap.save_async", lambda: snap.save_async(tmp_path / "child-async.ckpt").result(timeout=10)),
    ]


def _run_in_child(checks, after=None) -> int:
    """Fork; in the child run every check expecting sc.StoreForked. Exit code 0 when all
    raised it, 1 + i when check i did not raise, 64 + i when it raised something else."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            for i, (_, call) in enumerate(checks):
                try:
                    call()
                except sc.StoreForked:
                    continue
                except BaseException:
                    code = 64 + i
                    break
                code = 1 + i
                break
            if code == 0 and after is not None:
                code = after()
        except BaseException:
            code = 127
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _describe(code: int, checks) -> str:
    if code == 0:
        return "ok"
    if 1 <= code < 64:
        return f"{checks[code - 1][0]}: did not raise StoreForked"
    if 64 <= code < 127:
        return f"{checks[code - 64][0]}: raised something other than StoreForked"
    return f"child failed with exit code {code}"


@pytest.mark.parametrize("file_backed", [False, True], ids=["anonymous", "file"])
def test_child_after_fork_gets_store_forked_and_parent_is_intact(tmp_path, file_backed):
    path = tmp_path / "s.store" if file_backed else None
    store = sc.Store(path, size=SIZE)
    store.write(0, b"before snapshot")
    snap = store.snapshot()
    store.write(0, b"AFTER  SNAPSHOT")
    arr = store.array("int64")
    snap.save_async(tmp_path / "warm.ckpt").result()   # the save pool has threads now
    before = store.read(0, SIZE)
    epoch = store.epoch

    def child_after() -> int:
        # Closing the child's copy must not touch the parent's mapping or file.
        store.close()
        # A store made in the child works, including background saves.
        with sc.Store(size=4 * PAGE) as fresh:
            fresh.write(0, b"child")
            with fresh.snapshot() as s:
                s.save_async(tmp_path / "fresh.ckpt").result(timeout=10)
        return 0

    checks = _child_checks(store, snap, arr, tmp_path)
    code = _run_in_child(checks, child_after)
    assert code == 0, _describe(code, checks)
    assert (tmp_path / "fresh.ckpt").exists()
    assert not (tmp_path / "child.ckpt").exists()
    assert not (tmp_path / "child-async.ckpt").exists()
    # the parent's store and snapshot are intact and usable
    assert not store.closed
    assert store.read(0, SIZE) == before and store.epoch == epoch
    assert snap.read(0, 15) == b"before snapshot"
    store.write(0, b"parent writes on")
    arr[2] = 5
    assert store.read(0, 16) == b"parent writes on" and arr[2] == 5
    snap.release()
    store.close()
    if file_backed:
        with sc.Store(path) as reopened:
            assert reopened.read(0, 16) == b"parent writes on"
            assert reopened.epoch == epoch


def test_forked_child_can_open_its_own_file_store(tmp_path):
    with sc.Store(tmp_path / "parent.store", size=SIZE) as store:
        store.write(0, b"parent")

        def child_after() -> int:
            with sc.Store(tmp_path / "child.store", size=4 * PAGE) as own:
                own.write(0, b"child")
                return 0 if own.read(0, 5) == b"child" else 3

        checks = [("parent store read", lambda: store.read(0, 1))]
        code = _run_in_child(checks, child_after)
        assert code == 0, _describe(code, checks)
        assert store.read(0, 6) == b"parent"
    with sc.Store(tmp_path / "child.store") as own:
        assert own.read(0, 5) == b"child"


# ---- garbage collection -------------------------------------------------------------------
def test_snapshot_keeps_its_store_alive():
    snap = sc.Store(size=SIZE).snapshot()     # the store itself is not referenced
    gc.collect()
    assert snap.read(0, 4) == bytes(4)
    store_ref = weakref.ref(snap._store)
    del snap
    gc.collect()
    assert store_ref() is None                 # both freed once the snapshot is gone


def test_dropping_store_and_snapshots_frees_both():
    store = sc.Store(size=SIZE)
    store.write(0, b"x" * SIZE)
    snaps = [store.snapshot() for _ in range(3)]
    store.write(0, bytes(SIZE))
    refs = [weakref.ref(store)] + [weakref.ref(s) for s in snaps]
    del store, snaps
    gc.collect()
    assert all(r() is None for r in refs)


def test_snapshot_finalizer_after_close_is_harmless():
    store = sc.Store(size=SIZE)
    snap = store.snapshot()
    store.write(0, b"x")
    store.close()
    del snap
    gc.collect()
    assert store.closed


def test_snapshot_dropped_in_another_thread_is_released_by_the_writer():
    store = sc.Store(size=SIZE)
    store.write(0, b"x" * SIZE)
    holder = [store.snapshot() for _ in range(4)]
    store.write(0, bytes(SIZE))
    assert store.stats()["preserved_pages"] == N_PAGES
    with ThreadPoolExecutor(max_workers=2) as pool:
        pool.map(lambda i: holder.__setitem__(i, None), range(4))
    gc.collect()
    store.write(PAGE, b"next")
    st = store.stats()
    assert st["live_snapshots"] == 0 and st["preserved_pages"] == 0
    store.close()


@pytest.mark.skipif(not hasattr(sys, "getrefcount"), reason="needs CPython refcounts")
def test_reads_do_not_leak_references():
    with sc.Store(size=SIZE) as store:
        with store.snapshot() as snap:
            arr = store.array("int64")
            counts = (sys.getrefcount(store), sys.getrefcount(snap))
            for _ in range(100):
                store.read(0, 10)
                snap.read(0, 10)
                snap.read_pages([0, 1])
                arr[0:10]
                arr[3] = 1
                np.asarray(store).sum()
            assert (sys.getrefcount(store), sys.getrefcount(snap)) == counts


# ---- close racing other threads ----------------------------------------------------------
def _close_while_reading(rounds: int = 25) -> None:
    """Readers hammer a store and its snapshot while the main thread closes the store.
    close() may refuse while a call runs (StateError) and is retried; once it succeeds,
    every reader must get StoreClosed or SnapshotReleased, never freed memory."""
    size = 4 << 20
    data = bytes(range(256)) * (size // 256)
    for _ in range(rounds):
        store = sc.Store(size=size)
        store.write(0, data)
        snap = store.snapshot()
        store.write(0, bytes(size))
        started = threading.Barrier(3)
        slow_down = time.monotonic() + 0.02

        def reader(use_snapshot: bool) -> int:
            started.wait()
            n = 0
            while True:
                try:
                    if use_snapshot:
                        assert snap.read(0, size) == data
                    else:
                        store.read(0, size)
                except (sc.StoreClosed, sc.SnapshotReleased):
                    return n
                n += 1
                if time.monotonic() > slow_down:   # leave close() a way in
                    time.sleep(0.0005)

        with ThreadPoolExecutor(max_workers=2) as pool:
            readers = [pool.submit(reader, flag) for flag in (True, False)]
            started.wait()
            time.sleep(0.001)
            while True:
                try:
                    store.close()
                    break
                except sc.StateError:
                    time.sleep(0.0002)
            for f in readers:
                f.result(timeout=30)
        assert store.closed and snap.released


def test_close_while_other_threads_read_never_crashes(in_child):
    assert in_child(_close_while_reading, timeout=60) == "no exception"


def _close_while_saving(rounds: int = 20) -> None:
    """close() right after save_async waits for the save: the save completes and close
    succeeds. Never a crash, and never another exception type."""
    import tempfile
    outcomes = set()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            store = sc.Store(size=8 << 20)
            store.write(0, b"x" * (8 << 20))
            snap = store.snapshot()
            fut = snap.save_async(os.path.join(tmp, f"{i}.ckpt"))
            store.close()
            assert store.closed
            fut.result(timeout=30)  # done: close() waited for it
            outcomes.add("saved")
        assert outcomes == {"saved"}


def test_close_while_save_async_runs_never_crashes(in_child):
    assert in_child(_close_while_saving, timeout=60) == "no exception"


# ---- close() waits for running saves ------------------------------------------------------
@pytest.fixture
def gated_saves(monkeypatch):
    """Every checkpoint save waits for the returned event before it starts writing, so a
    test can hold a save "running" for as long as it needs."""
    from statecore import checkpoint
    gate = threading.Event()
    started = threading.Semaphore(0)
    real = checkpoint.save_checkpoint

    def gated(*args, **kwargs):
        started.release()
        assert gate.wait(timeout=30), "gate never opened"
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", gated)
    gate.started = started
    yield gate
    gate.set()


def _closer(store):
    """store.close() in a thread; returns (thread, outcome list)."""
    outcome: list = []

    def run():
        try:
            store.close()
            outcome.append("closed")
        except BaseException as e:  # noqa: BLE001 - reported to the test
            outcome.append(e)

    t = threading.Thread(target=run)
    t.start()
    return t, outcome


@pytest.mark.parametrize("how", ["save_async", "save in a thread"])
def test_close_waits_for_a_running_save_of_its_snapshot(tmp_path, gated_saves, how):
    store = sc.Store(size=SIZE)
    store.write(0, b"x" * SIZE)
    snap = store.snapshot()
    path = tmp_path / "s.ckpt"
    if how == "save_async":
        fut = snap.save_async(path)
    else:
        fut = ThreadPoolExecutor(1).submit(snap.save, path)
    assert gated_saves.started.acquire(timeout=10)
    snap.release()                        # deferred: the save still reads it
    closer, outcome = _closer(store)
    closer.join(timeout=0.3)
    assert closer.is_alive() and not store.closed   # waiting for the save
    with pytest.raises(sc.StoreClosed, match="closing"):
        store.snapshot().save_async(tmp_path / "late.ckpt")   # no new save while closing
    gated_saves.set()
    closer.join(timeout=30)
    assert outcome == ["closed"] and store.closed
    assert fut.result(timeout=30) == os.path.getsize(path)
    assert snap.released
    with sc.Store.load(path) as loaded:
        assert loaded.read(0, SIZE) == b"x" * SIZE
    assert not (tmp_path / "late.ckpt").exists()


def test_with_blocks_around_save_async_complete_the_save(tmp_path, gated_saves):
    # The README's pattern: leaving both blocks must not cut the save short.
    threading.Timer(0.2, gated_saves.set).start()
    with sc.Store(size=SIZE) as store:
        store.write(0, b"y" * SIZE)
        with store.snapshot() as snap:
            fut = snap.save_async(tmp_path / "w.ckpt")
    assert store.closed
    fut.result(timeout=30)
    with sc.Store.load(tmp_path / "w.ckpt") as loaded:
        assert loaded.read(0, SIZE) == b"y" * SIZE


def test_close_refused_by_an_export_after_waiting_leaves_the_store_usable(tmp_path):
    store = sc.Store(size=SIZE)
    snap = store.snapshot()
    fut = snap.save_async(tmp_path / "a.ckpt")
    view = memoryview(store)
    with pytest.raises(BufferError):
        store.close()
    assert fut.result(timeout=30) > 0
    snap.save_async(tmp_path / "b.ckpt").result(timeout=30)   # saves are allowed again
    view.release()
    store.close()
    assert store.closed


def test_close_from_a_save_progress_callback_does_not_wait_for_itself(tmp_path, monkeypatch):
    # checkpoint.reporting calls progress from a watcher thread that the save joins before
    # it ends: a close() there that waited for the save would never return.
    from statecore import checkpoint
    real = checkpoint.save_checkpoint

    def save_with_watcher(store, epoch, path, progress=None):
        watcher = threading.Thread(target=progress, args=(1, 2))
        watcher.start()
        watcher.join(timeout=5)
        if watcher.is_alive():
            raise RuntimeError("the progress callback is blocked")
        return real(store, epoch, path)

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_with_watcher)
    store = sc.Store(size=SIZE)
    snap = store.snapshot()
    closed: list = []
    with pytest.raises(sc.StoreClosed):   # closed under its own save, as before
        snap.save(tmp_path / "p.ckpt", progress=lambda done, total: closed.append(store.close()))
    assert closed == [None] and store.closed


def test_close_in_a_forked_child_does_not_wait_for_the_parents_save(tmp_path, gated_saves,
                                                                   in_child):
    store = sc.Store(size=SIZE)
    snap = store.snapshot()
    fut = snap.save_async(tmp_path / "f.ckpt")
    assert gated_saves.started.acquire(timeout=10)
    assert in_child(store.close, timeout=20) == "no exception"
    gated_saves.set()
    fut.result(timeout=30)
    snap.release()
    store.close()
