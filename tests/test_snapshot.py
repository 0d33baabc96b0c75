"""Snapshots: epoch arithmetic, frozen reads through every write path, preserved-page
accounting, release (explicit, `with`, garbage collection), and checkpoints (save,
save_async, Store.load, corrupt files)."""
from __future__ import annotations

import gc
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest

import statecore as sc

from model import StoreModel, assert_same_state, filled, pattern

PAGE = 4096
N_PAGES = 16
SIZE = PAGE * N_PAGES
HEADER = 128



# ---- epochs ------------------------------------------------------------------------------
def test_epoch_arithmetic(store):
    assert store.epoch == 1                         # a new store is at epoch 1
    store.write(0, b"a")                            # belongs to epoch 1
    s1 = store.snapshot()
    assert s1.epoch == 1 and store.epoch == 2       # snapshot closes E; writes go to E + 1
    store.write(PAGE, b"b")                         # belongs to epoch 2
    s2 = store.snapshot()
    assert s2.epoch == 2 and store.epoch == 3
    s3 = store.snapshot()                           # an empty epoch still closes
    assert s3.epoch == 3 and store.epoch == 4
    _, v = s3.read_pages([0, 1, 2])
    assert v.tolist() == [1, 2, 0]
    _, v = s1.read_pages([0, 1, 2])
    assert v.tolist() == [1, 0, 0]
    # epoch 0 names the empty state: (0, s] carries every page written up to s
    assert store.changed_pages(0, s1).tolist() == [0]
    assert store.changed_pages(0, s3).tolist() == [0, 1]
    assert store.changed_pages(s1, s2).tolist() == [1]
    assert store.changed_pages(s2, s3).tolist() == []
    assert store.stats()["oldest_snapshot"] == 1 and store.stats()["live_snapshots"] == 3
    for s in (s1, s2, s3):
        s.release()
    assert store.stats()["oldest_snapshot"] is None and store.epoch == 4


def test_taking_a_snapshot_copies_nothing(store):
    filled(store)
    with store.snapshot() as snap:
        st = store.stats()
        assert st["preserved_pages"] == 0 and st["pages_preserved_total"] == 0
        assert snap.read(0, SIZE) == store.read(0, SIZE)


def test_snapshot_cost_does_not_grow_with_the_state():
    # Invariant 2. 16 GiB of (sparse) state against 1 MiB: an O(n) snapshot would cost
    # milliseconds to seconds at 16 GiB; an O(1) one costs the same microseconds.
    def best_time(size: int) -> float:
        with sc.Store(size=size) as s:
            s.write(size - PAGE, b"x" * PAGE)
            s.snapshot().release()  # first snapshot allocates the chain heads
            best = float("inf")
            for _ in range(30):
                t0 = time.perf_counter()
                snap = s.snapshot()
                best = min(best, time.perf_counter() - t0)
                snap.release()
            return best
    small, big = best_time(1 << 20), best_time(16 << 30)
    assert big < small * 20 + 200e-6, (small, big)


# ---- frozen reads through every write path ------------------------------------------------
def _arr1d(s):
    return s.array("int64")


def _arr2d(s):
    return s.array("int32", shape=(N_PAGES * 2, PAGE // 8))


WRITE_PATHS = {
    "write": lambda s: s.write(PAGE - 3, b"spans two pages"),
    "write whole store": lambda s: s.write(0, pattern(SIZE, 7)),
    "write_pages": lambda s: s.write_pages([1, 14, 3], pattern(3 * PAGE, 8)),
    "array int": lambda s: _arr1d(s).__setitem__(600, -5),
    "array slice": lambda s: _arr1d(s).__setitem__(slice(10, 3000), 6),
    "array step slice": lambda s: _arr1d(s).__setitem__(slice(1, None, 700), 7),
    "array negative step": lambda s: _arr1d(s).__setitem__(slice(-1, None, -1100), 8),
    "array int array": lambda s: _arr1d(s).__setitem__(np.array([-1, 0, 4097, -4097]), 9),
    "array mask": lambda s: _arr1d(s).__setitem__(np.arange(SIZE // 8) % 999 == 0, 10),
    "array 2-d rows": lambda s: _arr2d(s).__setitem__(np.array([0, 31, 7]), 11),
    "array 2-d fancy": lambda s: _arr2d(s).__setitem__((np.array([2, 9]), np.array([0, -1])), 12),
    "array 2-d block": lambda s: _arr2d(s).__setitem__((slice(4, 9), slice(None, None, 100)), 13),
    "add_at": lambda s: _arr1d(s).add_at(np.array([5, 5, 5, 6000, -1]), 3),
}


@pytest.mark.parametrize("write", WRITE_PATHS.values(), ids=WRITE_PATHS.keys())
def test_snapshot_reads_the_bytes_at_snapshot_time(store, write):
    model = filled(store)
    snap = store.snapshot()
    s = model.snapshot()
    write(store)
    write(model)
    assert store.read(0, SIZE) == bytes(model.data)
    assert snap.read(0, SIZE) == model.snapshots[s].data
    assert snap.read(PAGE - 5, 10) == model.snapshots[s].data[PAGE - 5:PAGE + 5]
    assert_same_state(store, model, {s: snap})
    write(store)                        # the same write again, same epoch: no new copies
    write(model)
    assert_same_state(store, model, {s: snap})
    snap.release()
    model.release(s)
    assert_same_state(store, model)
    assert store.stats()["preserved_pages"] == 0


def test_several_live_snapshots_each_read_their_own_state(store):
    model = StoreModel(SIZE, PAGE)
    snaps = {}
    rng = np.random.default_rng(3)

    def random_writes(i: int) -> None:
        pages = rng.choice(N_PAGES, 4, replace=False)
        data = rng.integers(0, 256, 4 * PAGE, dtype=np.uint8)
        store.write_pages(pages, data)
        model.write_pages(pages, data)
        off = int(rng.integers(0, SIZE - 100))
        store.write(off, bytes([i]) * 100)
        model.write(off, bytes([i]) * 100)

    for i in range(6):
        random_writes(i)
        snap = store.snapshot()
        snaps[model.snapshot()] = snap
        assert snap.epoch == i + 1
    assert_same_state(store, model, snaps)
    for e in (3, 1, 6, 2):              # release out of order; the others stay exact
        snaps.pop(e).release()
        model.release(e)
        random_writes(e)
        assert_same_state(store, model, snaps)
    for e in list(snaps):
        snaps.pop(e).release()
        model.release(e)
    assert_same_state(store, model)
    assert store.stats()["preserved_pages"] == 0


@pytest.mark.parametrize("path", ["array", "write_pages"])
def test_large_writes_under_live_snapshots_preserve_every_page(path):
    """Vectorized writes that preserve several 16 MiB batches of pages (a helper thread
    copies one batch while the writer prepares the next) leave every live snapshot exact."""
    size = 64 << 20
    rng = np.random.default_rng(11)
    with sc.Store(size=size) as big:
        arr = big.array("int64")
        arr[:] = np.arange(size // 8, dtype=np.int64)
        expected, snaps = [], []
        for round_ in range(3):
            snaps.append(big.snapshot())
            expected.append(np.asarray(big).copy())
            if path == "array":
                idx = rng.integers(0, size // 8, 400_000)
                arr[idx] = rng.integers(0, 1 << 40, len(idx))
            else:
                ids = rng.permutation(big.n_pages)[:12_000]
                big.write_pages(ids, rng.integers(0, 256, (len(ids), big.page_size),
                                                  dtype=np.uint8))
            for snap, want in zip(snaps, expected):
                assert np.array_equal(np.frombuffer(snap.read(0, size), np.uint8), want)
        # each round preserved more than two batches' worth for its newest snapshot
        assert big.stats()["preserved_pages"] > 2 * (16 << 20) // big.page_size
        for snap in snaps:
            snap.release()
        assert big.stats()["preserved_pages"] == 0


# ---- preserved pages ----------------------------------------------------------------------
def test_a_page_is_preserved_once_per_snapshot_that_needs_it(store):
    model = filled(store)
    old = model.page(3)
    a = store.snapshot()
    for write in (lambda s: s.write(3 * PAGE, b"1"),
                  lambda s: s.write_pages([3], bytes([2]) * PAGE),
                  lambda s: s.array("uint8").__setitem__(3 * PAGE + 5, 3),
                  lambda s: s.array("uint8").add_at([3 * PAGE, 3 * PAGE], 1),
                  lambda s: s.write(3 * PAGE + 100, b"5" * 100)):
        write(store)
        st = store.stats()
        assert st["pages_preserved_total"] == 1 and st["preserved_pages"] == 1
        assert st["preserved_bytes"] == PAGE
    assert a.read(3 * PAGE, PAGE) == old
    # A second snapshot needs the content written in a's successor epoch: one more copy,
    # and only one however often the page is written afterwards.
    mid = store.read(3 * PAGE, PAGE)
    b = store.snapshot()
    for i in range(3):
        store.write(3 * PAGE + i, b"x")
    st = store.stats()
    assert st["pages_preserved_total"] == 2 and st["preserved_pages"] == 2
    assert a.read(3 * PAGE, PAGE) == old and b.read(3 * PAGE, PAGE) == mid
    b.release()
    assert store.stats()["preserved_pages"] == 1
    assert a.read(3 * PAGE, PAGE) == old
    a.release()
    assert store.stats()["preserved_pages"] == 0


def test_snapshots_without_writes_between_share_one_copy(store):
    model = filled(store)
    old = model.page(9)
    snaps = [store.snapshot() for _ in range(4)]
    store.write_pages([9], bytes(PAGE))
    store.write(9 * PAGE, b"again")
    st = store.stats()
    assert st["pages_preserved_total"] == 1 and st["preserved_pages"] == 1
    for i in (3, 0, 2):  # the copy outlives every snapshot but the last that needs it
        snaps[i].release()
        assert store.stats()["preserved_pages"] == 1
        assert snaps[1].read(9 * PAGE, PAGE) == old
    snaps[1].release()
    assert store.stats()["preserved_pages"] == 0


def test_pages_written_before_a_snapshot_are_not_preserved_for_older_ones(store):
    a = store.snapshot()            # epoch 1
    store.write(0, b"new")          # page 0 at version 2, copied for a (version 0 <= 1)
    b = store.snapshot()            # epoch 2
    a.release()                     # the copy of version 0 is no longer needed
    assert store.stats()["preserved_pages"] == 0
    store.write(PAGE, b"x")         # page 1: version 0 <= 2, b needs it
    store.write(0, b"NEW")          # page 0: version 2 <= 2, b needs it
    assert store.stats()["preserved_pages"] == 2
    assert b.read(0, 3) == b"new" and b.read(PAGE, 1) == b"\0"
    b.release()
    c = store.snapshot()
    d = store.snapshot()
    c.release()                     # only d (epoch 4) is live, page 5 is at version 0
    store.write(5 * PAGE, b"y")
    assert store.stats()["pages_preserved_total"] == 4
    assert d.read(5 * PAGE, 1) == b"\0"
    d.release()


# ---- release -----------------------------------------------------------------------------
def test_release_frees_preserved_memory(store):
    filled(store)
    snap = store.snapshot()
    store.write_pages(range(N_PAGES), bytes(SIZE))
    assert store.stats()["preserved_pages"] == N_PAGES
    assert store.stats()["preserved_bytes"] == SIZE
    snap.release()
    st = store.stats()
    assert st["preserved_pages"] == 0 and st["preserved_bytes"] == 0
    assert st["live_snapshots"] == 0
    assert snap.released
    snap.release()  # idempotent


def test_with_block_releases(store):
    filled(store)
    with store.snapshot() as snap:
        store.write(0, bytes(2 * PAGE))
        assert store.stats()["preserved_pages"] == 2
        assert not snap.released
    assert snap.released
    assert store.stats()["preserved_pages"] == 0 and store.stats()["live_snapshots"] == 0


def test_garbage_collected_snapshot_is_freed_at_the_next_write(store):
    filled(store)
    snap = store.snapshot()
    store.write(0, b"changed")
    assert store.stats()["preserved_pages"] == 1
    del snap
    gc.collect()
    store.write(PAGE, b"next write")    # no live snapshot may need this page any more
    st = store.stats()
    assert st["preserved_pages"] == 0 and st["live_snapshots"] == 0
    assert st["pages_preserved_total"] == 1


def test_unreferenced_snapshot_preserves_nothing(store):
    filled(store)
    store.snapshot()                    # dropped at once
    store.write_pages(range(N_PAGES), bytes(SIZE))
    st = store.stats()
    assert st["live_snapshots"] == 0 and st["preserved_pages"] == 0
    assert st["pages_preserved_total"] == 0


def test_snapshot_in_a_reference_cycle_is_released_by_gc(store):
    filled(store)
    snap = store.snapshot()
    holder = {"snap": snap}
    holder["self"] = holder
    store.write(0, b"x")
    del snap, holder
    gc.collect()
    store.write(PAGE, b"y")
    assert store.stats()["preserved_pages"] == 0
    assert store.stats()["live_snapshots"] == 0


RELEASED_CALLS = {
    "read": lambda s, p: s.read(0, 1),
    "read empty": lambda s, p: s.read(0, 0),
    "read_pages": lambda s, p: s.read_pages([0]),
    "save": lambda s, p: s.save(p),
    "save_async": lambda s, p: s.save_async(p),
}


@pytest.mark.parametrize("call", RELEASED_CALLS.values(), ids=RELEASED_CALLS.keys())
def test_released_snapshot_raises_snapshot_released(store, tmp_path, call):
    snap = store.snapshot()
    snap.release()
    with pytest.raises(sc.SnapshotReleased):
        call(snap, tmp_path / "x.ckpt")
    assert not (tmp_path / "x.ckpt").exists()
    assert issubclass(sc.SnapshotReleased, sc.StateError)


SNAP_BAD_INPUT = [
    ("read negative offset", lambda s: s.read(-1, 1), IndexError, rf"offset -1 .*\[0, {SIZE - 1}\]"),
    ("read past end", lambda s: s.read(SIZE - 1, 2), IndexError, rf"\[0, {SIZE - 2}\]"),
    ("read negative length", lambda s: s.read(0, -1), ValueError, "length must be >= 0"),
    ("read bool offset", lambda s: s.read(True, 1), TypeError, "offset must be an integer, got bool"),
    ("read_pages id too big", lambda s: s.read_pages([N_PAGES]), IndexError, rf"\[0, {N_PAGES - 1}\]"),
    ("read_pages negative id", lambda s: s.read_pages([-1]), IndexError, rf"\[0, {N_PAGES - 1}\]"),
    ("read_pages float ids", lambda s: s.read_pages([1.5]), TypeError, "page_ids"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in SNAP_BAD_INPUT],
                         ids=[c[0] for c in SNAP_BAD_INPUT])
def test_snapshot_bad_input(store, call, exc, match):
    model = filled(store)
    with store.snapshot() as snap:
        s = model.snapshot()
        with pytest.raises(exc, match=match):
            call(snap)
        assert not snap.released
        assert_same_state(store, model, {s: snap})


def test_read_pages_returns_content_and_versions(store):
    model = filled(store)
    with store.snapshot() as snap:
        s = model.snapshot()
        store.write_pages([4, 2], bytes(2 * PAGE))
        ids = [4, 2, 4, 0]
        data, versions = snap.read_pages(ids)
        assert (data, versions.tolist()) == (model.snapshot_read_pages(s, ids)[0], [1, 1, 1, 1])
        assert versions.dtype == np.uint64
        empty, v = snap.read_pages([])
        assert empty == b"" and len(v) == 0


# ---- checkpoints ---------------------------------------------------------------------------
def written_store(store: sc.Store, pages=(2, 5, 11)) -> dict:
    """Write recognisable pages; return {page id: content}."""
    content = {p: bytes([p + 1]) * PAGE for p in pages}
    store.write_pages(list(content), b"".join(content.values()))
    return content


@pytest.mark.parametrize("into_path", [False, True], ids=["anonymous", "path"])
def test_save_and_load_round_trip(store, tmp_path, into_path):
    model = filled(store)
    store.snapshot().release()
    store.write(5 * PAGE, b"second epoch")
    model.snapshot()
    model.write(5 * PAGE, b"second epoch")
    store.schema_version = 7
    snap = store.snapshot()
    s = model.snapshot()
    store.write(0, bytes(SIZE))          # later writes are not in the checkpoint
    progress = []
    nbytes = snap.save(tmp_path / "c.ckpt", progress=lambda done, total: progress.append((done, total)))
    assert nbytes == os.path.getsize(tmp_path / "c.ckpt")
    # progress(done, total): never past the total, never backwards, and complete at the end
    assert progress and progress[-1][0] == progress[-1][1] > 0
    assert all(d <= t for d, t in progress)
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert [f for f in os.listdir(tmp_path)] == ["c.ckpt"]   # no temporary left behind
    target = tmp_path / "restored.store" if into_path else None
    with sc.Store.load(tmp_path / "c.ckpt", target) as loaded:
        assert (loaded.size, loaded.page_size) == (SIZE, PAGE)
        assert loaded.read(0, SIZE) == model.snapshots[s].data == snap.read(0, SIZE)
        assert loaded.epoch == snap.epoch + 1
        assert loaded.uuid == store.uuid and loaded.schema_version == 7
        assert loaded.path == (None if target is None else os.fspath(target))
        with loaded.snapshot() as ls:
            _, versions = ls.read_pages(range(N_PAGES))
        assert versions.tolist() == list(model.snapshots[s].versions)
    if into_path:
        with sc.Store(target) as reopened:
            assert reopened.read(0, SIZE) == model.snapshots[s].data
    snap.release()


def test_checkpoint_of_an_untouched_store(store, tmp_path):
    with store.snapshot() as snap:
        snap.save(tmp_path / "empty.ckpt")
    with sc.Store.load(tmp_path / "empty.ckpt") as loaded:
        assert loaded.read(0, SIZE) == bytes(SIZE) and loaded.epoch == 2


def test_save_while_a_writer_thread_keeps_writing(tmp_path):
    n = 2048
    with sc.Store(size=n * PAGE) as store:
        store.write(0, pattern(n * PAGE, 11))
        snap = store.snapshot()
        expected = store.read(0, n * PAGE)
        stop = threading.Event()
        writes = [0]

        def writer() -> None:
            rng = np.random.default_rng(12)
            while not stop.is_set():
                ids = rng.integers(0, n, 8)
                store.write_pages(ids, rng.integers(0, 256, 8 * PAGE, dtype=np.uint8))
                writes[0] += 1

        t = threading.Thread(target=writer)
        t.start()
        try:
            while writes[0] < 50:
                time.sleep(0.001)
            before = writes[0]
            snap.save(tmp_path / "busy.ckpt")
            during = writes[0] - before
        finally:
            stop.set()
            t.join()
        assert store.read(0, n * PAGE) != expected
        assert during > 0 or writes[0] > before  # the writer was not blocked out
        with sc.Store.load(tmp_path / "busy.ckpt") as loaded:
            assert loaded.read(0, n * PAGE) == expected
        assert snap.read(0, n * PAGE) == expected
        snap.release()


def test_save_async_returns_a_future_of_a_loadable_checkpoint(store, tmp_path):
    model = filled(store)
    snap = store.snapshot()
    s = model.snapshot()
    fut = snap.save_async(tmp_path / "a.ckpt")
    store.write(0, bytes(SIZE))          # writers go on while the save runs
    assert isinstance(fut, Future)
    nbytes = fut.result(timeout=30)
    assert nbytes == os.path.getsize(tmp_path / "a.ckpt")
    with sc.Store.load(tmp_path / "a.ckpt") as loaded:
        assert loaded.read(0, SIZE) == model.snapshots[s].data
        assert loaded.epoch == s + 1
    assert snap.read(0, SIZE) == model.snapshots[s].data   # still readable afterwards
    snap.release()


def test_concurrent_saves_to_one_path_leave_one_whole_checkpoint(tmp_path):
    # Each save goes through its own temporary file and an atomic rename: whichever
    # lands last, the file is one complete checkpoint, and no save fails.
    size = 1 << 22
    path = tmp_path / "same.ckpt"
    with sc.Store(size=size) as store:
        for r in range(8):
            store.write(0, bytes([r]) * size)
            a = store.snapshot()
            store.write(0, bytes([r + 100]) * size)
            b = store.snapshot()
            with ThreadPoolExecutor(max_workers=2) as pool:
                sizes = [f.result(timeout=30) for f in
                         [pool.submit(a.save, path), pool.submit(b.save_async(path).result)]]
            assert sizes[0] == sizes[1] == os.path.getsize(path)
            with sc.Store.load(path) as loaded:
                content = loaded.read(0, size)
            assert content in (bytes([r]) * size, bytes([r + 100]) * size)
            a.release()
            b.release()
    assert os.listdir(tmp_path) == ["same.ckpt"]


def test_release_during_save_async_waits_for_the_save(store, tmp_path):
    model = filled(store)
    snap = store.snapshot()
    s = model.snapshot()
    store.write(0, bytes(SIZE))
    futs = [snap.save_async(tmp_path / f"{i}.ckpt") for i in range(3)]
    snap.release()                       # deferred until the saves are done
    with pytest.raises(sc.SnapshotReleased):
        snap.read(0, 1)
    for i, fut in enumerate(futs):
        fut.result(timeout=30)
        with sc.Store.load(tmp_path / f"{i}.ckpt") as loaded:
            assert loaded.read(0, SIZE) == model.snapshots[s].data
    deadline = time.monotonic() + 10
    while not snap.released and time.monotonic() < deadline:
        time.sleep(0.001)
    assert snap.released
    store.write(PAGE, b"x")
    assert store.stats()["preserved_pages"] == 0 and store.stats()["live_snapshots"] == 0


def _checkpoint(store: sc.Store, path) -> tuple[bytes, list]:
    content = written_store(store)
    with store.snapshot() as snap:
        snap.save(path)
    return path.read_bytes(), sorted(content)


@pytest.mark.parametrize("entry,byte", [(0, 0), (1, 100), (2, PAGE - 1)])
def test_corrupt_payload_byte_names_the_page(store, tmp_path, entry, byte):
    raw, ids = _checkpoint(store, tmp_path / "c.ckpt")
    payload = HEADER + 24 * len(ids)
    assert len(raw) == payload + len(ids) * PAGE
    bad = bytearray(raw)
    bad[payload + entry * PAGE + byte] ^= 0x10
    (tmp_path / "bad.ckpt").write_bytes(bad)
    with pytest.raises(sc.CorruptCheckpoint, match=rf"page {ids[entry]}\b"):
        sc.Store.load(tmp_path / "bad.ckpt")
    with pytest.raises(sc.CorruptCheckpoint, match=rf"page {ids[entry]}\b"):
        sc.Store.load(tmp_path / "bad.ckpt", tmp_path / "into.store")
    assert not (tmp_path / "into.store").exists()


@pytest.mark.parametrize("into_path", [False, True], ids=["anonymous", "path"])
def test_a_failed_restore_leaves_the_store_empty(store, tmp_path, into_path):
    # Pages are verified as they are copied, so the first good pages are already in the
    # store when the last one fails: the restore must wipe them again.
    from statecore.checkpoint import read_checkpoint, restore_into
    raw, ids = _checkpoint(store, tmp_path / "c.ckpt")
    bad = bytearray(raw)
    bad[-1] ^= 0x01  # the last page's last byte
    (tmp_path / "bad.ckpt").write_bytes(bad)
    target = sc.Store(tmp_path / "t.store" if into_path else None, size=SIZE)
    try:
        with pytest.raises(sc.CorruptCheckpoint, match=rf"page {ids[-1]}\b"):
            restore_into(target, read_checkpoint(tmp_path / "bad.ckpt", verify_pages=False),
                         tmp_path / "bad.ckpt")
        assert target.read(0, SIZE) == bytes(SIZE)
        assert target.epoch == 1 and target.stats()["dirty_pages"] == 0
        # Still empty, so the good checkpoint restores into it: what recovery's fallback does.
        restore_into(target, read_checkpoint(tmp_path / "c.ckpt", verify_pages=False),
                     tmp_path / "c.ckpt")
        assert target.read(0, SIZE) == store.read(0, SIZE)
    finally:
        target.close()


def test_restore_refuses_a_store_that_holds_state(store, tmp_path):
    from statecore.checkpoint import read_checkpoint, restore_into
    _checkpoint(store, tmp_path / "c.ckpt")
    view = read_checkpoint(tmp_path / "c.ckpt")
    with pytest.raises(ValueError, match="empty store"):
        restore_into(store, view, tmp_path / "c.ckpt")
    with sc.Store(size=SIZE) as other, other.snapshot():
        with pytest.raises(ValueError, match="empty store"):
            restore_into(other, view, tmp_path / "c.ckpt")


def _corruptions(raw: bytes, n: int):
    payload = HEADER + 24 * n
    for cut in (1, 8, 64, HEADER - 1, HEADER, HEADER + 8, payload - 1, payload,
                payload + 1, len(raw) - PAGE, len(raw) - 1):
        yield f"truncated to {cut}", raw[:cut]
    yield "one byte appended", raw + b"\0"
    for off in (0, 8, 10, 16, 24, 40, 48, 64, 72, 88, 120):   # header fields
        b = bytearray(raw)
        b[off] ^= 0x01
        yield f"header byte {off} flipped", bytes(b)
    for off in (HEADER, HEADER + 8 * n, HEADER + 16 * n + 3):  # ids, versions, checksums
        b = bytearray(raw)
        b[off] ^= 0x80
        yield f"index byte {off} flipped", bytes(b)
    yield "garbage", pattern(len(raw), 99)
    yield "garbage header", pattern(HEADER, 98) + raw[HEADER:]


def test_truncated_flipped_and_garbage_checkpoints_raise_corrupt_checkpoint(store, tmp_path):
    raw, ids = _checkpoint(store, tmp_path / "c.ckpt")
    for what, data in _corruptions(raw, len(ids)):
        path = tmp_path / "bad.ckpt"
        path.write_bytes(data)
        with pytest.raises(sc.CorruptCheckpoint):
            sc.Store.load(path)
            pytest.fail(f"{what}: loaded")
        with pytest.raises(sc.CorruptCheckpoint):
            sc.Store.load(path, tmp_path / "into.store")
        assert not (tmp_path / "into.store").exists(), what


def test_empty_checkpoint_file_raises_corrupt_checkpoint(tmp_path):
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(sc.CorruptCheckpoint, match="empty"):
        sc.Store.load(tmp_path / "empty.ckpt")


def test_a_delta_is_not_a_checkpoint(store, tmp_path):
    written_store(store)
    with store.snapshot() as snap:
        (tmp_path / "d.ckpt").write_bytes(bytes(store.delta(0, snap).encode()))
    with pytest.raises(sc.CorruptCheckpoint, match="magic"):
        sc.Store.load(tmp_path / "d.ckpt")


def test_missing_checkpoint_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        sc.Store.load(tmp_path / "nope.ckpt")


def test_load_onto_an_existing_path_raises_file_exists(store, tmp_path):
    _checkpoint(store, tmp_path / "c.ckpt")
    existing = tmp_path / "existing.store"
    with sc.Store(existing, size=4 * PAGE) as other:
        other.write(0, b"precious")
    before = existing.read_bytes()
    with pytest.raises(FileExistsError, match="existing.store"):
        sc.Store.load(tmp_path / "c.ckpt", existing)
    assert existing.read_bytes() == before


def test_save_into_a_missing_directory_raises_and_leaves_nothing(store, tmp_path):
    with store.snapshot() as snap:
        with pytest.raises(FileNotFoundError):
            snap.save(tmp_path / "no" / "such" / "dir.ckpt")
        snap.save(tmp_path / "ok.ckpt")   # the snapshot is still usable
    assert os.listdir(tmp_path) == ["ok.ckpt"]
