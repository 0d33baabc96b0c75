"""Threaded stress: one writer, concurrent snapshot readers and savers.

Every page always holds one "fill": all its 8-byte words equal (page id << 40 | counter).
The writer bumps counters through every write path and takes snapshots, recording the
counters at each snapshot's epoch; readers and savers check that every snapshot (read,
read_pages, save, save_async + Store.load) equals the record of its epoch, and that no
page ever mixes two fills (a torn copy).
"""
from __future__ import annotations

import gc
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import statecore as sc

PAGE = 4096
WORDS = PAGE // 8
COUNTER_BITS = 40
DURATION = 1.5          # seconds per scenario
MAX_LIVE = 6


def fills(pages: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """The (len(pages), WORDS) uint64 content of `pages` at `counters`."""
    words = (pages.astype(np.uint64) << np.uint64(COUNTER_BITS)) | counters.astype(np.uint64)
    return np.repeat(words[:, None], WORDS, axis=1)


def decode(data: bytes, pages) -> np.ndarray:
    """Counters of whole pages read back, checking each is one consistent fill."""
    words = np.frombuffer(data, dtype=np.uint64).reshape(len(pages), WORDS)
    first = words[:, :1]
    torn = np.flatnonzero((words != first).any(axis=1))
    if len(torn):
        raise AssertionError(f"torn pages {np.asarray(pages)[torn].tolist()}")
    owner = (first[:, 0] >> np.uint64(COUNTER_BITS)).astype(np.int64)
    if not np.array_equal(owner, np.asarray(pages, dtype=np.int64)):
        raise AssertionError(f"pages hold another page's fill: {owner.tolist()} "
                             f"for {np.asarray(pages).tolist()}")
    return (first[:, 0] & np.uint64((1 << COUNTER_BITS) - 1)).astype(np.int64)


class Shared:
    """What the writer publishes to the other threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live: list = []               # snapshots readers may use
        self.expected: dict = {}           # epoch -> counters at that epoch
        self.released: set = set()         # epochs released explicitly (set before release)
        self.stop = threading.Event()


def writer(store: sc.Store, shared: Shared, n_pages: int, hot: int, seed: int) -> dict:
    rng = random.Random(seed)
    counters = np.zeros(n_pages, dtype=np.int64)
    rows = store.array("uint64", shape=(n_pages, WORDS))
    ops = snaps = 0
    deadline = time.monotonic() + DURATION
    try:
        while time.monotonic() < deadline:
            k = rng.randint(1, 4)
            pages = np.array(rng.sample(range(hot), k), dtype=np.int64)
            path = rng.randrange(6)
            if path == 5:
                # 1024+ rows at once (the core's sorted way, rows written per window):
                # earlier repeats carry the old fill, each page's last one the new
                head = np.array(rng.choices(range(hot), k=1100), dtype=np.int64)
                tail = np.array(rng.sample(range(hot), hot), dtype=np.int64)
                stale = fills(head, counters[head])
                counters[tail] += 1
                rows[np.concatenate([head, tail])] = np.concatenate(
                    [stale, fills(tail, counters[tail])])
            elif path == 3:
                # add_at keeps a fill a fill: every word of the page gets the same delta
                delta = rng.randint(1, 3)
                counters[pages] += delta
                rows.add_at(pages, np.uint64(delta))
            else:
                counters[pages] += 1
                data = fills(pages, counters[pages])
                if path == 0:
                    for i, p in enumerate(pages):
                        store.write(int(p) * PAGE, data[i])
                elif path == 1:
                    store.write_pages(pages, data)
                elif path == 2:
                    rows[pages] = data
                else:
                    rows[int(pages[0])] = data[0]
                    counters[pages[1:]] -= 1        # only the first page was written
            ops += 1
            if ops % 15 == 0:
                snap = store.snapshot()
                snaps += 1
                with shared.lock:
                    shared.expected[snap.epoch] = counters.copy()
                    shared.live.append(snap)
                    old = shared.live.pop(0) if len(shared.live) > MAX_LIVE else None
                    explicit = old is not None and rng.random() < 0.7
                    if explicit:
                        shared.released.add(old.epoch)
                if explicit:
                    old.release()
                # otherwise the last reference may die in any thread: its finalizer
                # must hand the release back to the writer side
                del old, snap
    finally:
        shared.stop.set()
    return {"ops": ops, "snapshots": snaps, "counters": counters}


def pick(shared: Shared, rng: random.Random):
    with shared.lock:
        if not shared.live:
            return None, None
        snap = rng.choice(shared.live)
        return snap, shared.expected[snap.epoch]


def reader(shared: Shared, n_pages: int, hot: int, seed: int) -> int:
    rng = random.Random(seed)
    checks = 0
    while not shared.stop.is_set() or checks == 0:
        snap, expected = pick(shared, rng)
        if snap is None:
            time.sleep(0.0005)
            continue
        try:
            if rng.random() < 0.5:
                ids = [rng.randrange(hot) for _ in range(rng.randint(1, 8))]
                data, versions = snap.read_pages(ids)
                assert (versions <= snap.epoch).all()
            else:
                first = rng.randrange(hot)
                count = rng.randint(1, min(4, n_pages - first))
                ids = list(range(first, first + count))
                data = snap.read(first * PAGE, count * PAGE)
                # an unaligned read across the same pages agrees byte for byte
                part = snap.read(first * PAGE + 12, count * PAGE - 20)
                assert part == data[12:-8]
        except sc.SnapshotReleased:
            assert snap.epoch in shared.released, f"snapshot {snap.epoch} vanished"
            continue
        got = decode(data, ids)
        want = expected[ids]
        if not np.array_equal(got, want):
            raise AssertionError(f"snapshot {snap.epoch}: pages {ids} hold counters "
                                 f"{got.tolist()}, expected {want.tolist()}")
        checks += 1
    return checks


def saver(shared: Shared, n_pages: int, tmp_path, seed: int) -> int:
    rng = random.Random(seed)
    saves = 0
    while not shared.stop.is_set() or saves == 0:
        snap, expected = pick(shared, rng)
        if snap is None:
            time.sleep(0.001)
            continue
        path = tmp_path / f"ckpt-{seed}-{saves}"
        try:
            if saves % 2:
                snap.save_async(path).result(timeout=30)
            else:
                snap.save(path)
        except sc.SnapshotReleased:
            assert snap.epoch in shared.released
            continue
        with sc.Store.load(path) as loaded:
            assert loaded.epoch == snap.epoch + 1
            got = decode(loaded.read(0, n_pages * PAGE), range(n_pages))
        path.unlink()
        if not np.array_equal(got, expected):
            bad = np.flatnonzero(got != expected)
            raise AssertionError(f"checkpoint of snapshot {snap.epoch} differs in pages "
                                 f"{bad.tolist()}")
        saves += 1
    return saves


@pytest.mark.parametrize("n_pages,hot", [(256, 256), (64, 6)], ids=["spread", "hot-pages"])
def test_snapshots_stay_exact_under_concurrent_writes(tmp_path, n_pages, hot):
    shared = Shared()
    with sc.Store(size=n_pages * PAGE) as store:
        pages = np.arange(n_pages)
        store.write_pages(pages, fills(pages, np.zeros(n_pages)))
        with ThreadPoolExecutor(max_workers=5) as pool:
            w = pool.submit(writer, store, shared, n_pages, hot, 1)
            readers = [pool.submit(reader, shared, n_pages, hot, 10 + i) for i in range(3)]
            savers = [pool.submit(saver, shared, n_pages, tmp_path, 20)]
            try:
                result = w.result(timeout=60)
            finally:
                shared.stop.set()
            checks = [f.result(timeout=60) for f in readers]
            saves = [f.result(timeout=60) for f in savers]
        assert result["snapshots"] >= 5 and result["ops"] >= 75
        assert all(c > 0 for c in checks) and all(s > 0 for s in saves)
        # the live state is exactly the writer's final record
        assert np.array_equal(decode(store.read(0, n_pages * PAGE), range(n_pages)),
                              result["counters"])
        for snap in shared.live:
            assert np.array_equal(decode(snap.read(0, n_pages * PAGE), range(n_pages)),
                                  shared.expected[snap.epoch])
        del snap
        shared.live.clear()
        gc.collect()
        store.write(0, store.read(0, PAGE))      # a write-side call runs deferred releases
        st = store.stats()
        assert st["live_snapshots"] == 0 and st["preserved_pages"] == 0


# Bulk writes of 4 MiB or more copy with streaming stores (csrc/stream_copy.c), which the
# CPU may make visible before the page's new stamp unless fenced; from 8 MiB an apply
# copies on two threads. "streamed" cases take those paths.
STREAMED_PAGES = (9 << 20) // PAGE


class ViaApply:
    """Rewrites pages of `store` by applying deltas of a source store, as a replica does."""

    def __init__(self, store: sc.Store, n_pages: int) -> None:
        self.store = store
        self.source = sc.Store(size=n_pages * PAGE)
        self.since = 0
        # Pages carry the source's epochs: start them past the versions the store already
        # has, or the first apply is skipped as already applied.
        while self.source.epoch <= store.epoch:
            self.source.snapshot().release()

    def __call__(self, pages: np.ndarray, data: np.ndarray) -> None:
        self.source.write_pages(pages, data)
        with self.source.snapshot() as snap:
            self.store.apply(self.source.delta(self.since, snap), allow_gap=True)
            self.since = snap.epoch


# Writes preserving more than one 16 MiB batch copy one on a helper thread while the
# writer prepares the next (csrc/prep_copier.c): "pipelined" takes that path.
PIPELINED_PAGES = (40 << 20) // PAGE


@pytest.mark.parametrize("n_pages,path", [(8, "write_pages"), (STREAMED_PAGES, "write_pages"),
                                          (STREAMED_PAGES, "apply"),
                                          (PIPELINED_PAGES, "write_pages")],
                         ids=["small", "streamed", "streamed-apply", "pipelined"])
def test_one_snapshot_read_by_many_threads_while_its_pages_change(n_pages, path):
    """All threads hammer the same pages of the same snapshot while the writer rewrites
    exactly those pages: the seqlock fallback to the preserved copy is exercised."""
    with sc.Store(size=n_pages * PAGE) as store:
        pages = np.arange(n_pages)
        store.write_pages(pages, fills(pages, np.full(n_pages, 7)))
        write = store.write_pages if path == "write_pages" else ViaApply(store, n_pages)
        try:
            rewrite_while_read(store, pages, write)
        finally:
            if isinstance(write, ViaApply):
                write.source.close()


def rewrite_while_read(store: sc.Store, pages: np.ndarray, write) -> None:
    """`write(pages, data)` rewrites the pages over and over while three threads read: a
    snapshot taken before, which must always read 7s, and the newest snapshot, taken
    before each rewrite, which must read the counters of its epoch while the rewrite
    moves its pages (the seqlock's live-page race, every round)."""
    n_pages = len(pages)
    stop = threading.Event()
    lock = threading.Lock()
    newest: list = [None, None]  # the snapshot before the current rewrite, its counters

    def rewrite() -> int:
        counters = np.full(n_pages, 7)
        rounds = 0
        deadline = time.monotonic() + DURATION / 2
        while time.monotonic() < deadline or rounds < 60:
            with lock:
                old, newest[:] = newest[0], [store.snapshot(), counters.copy()]
            if old is not None:
                old.release()
            counters += 1
            write(pages, fills(pages, counters))
            rounds += 1
        stop.set()
        with lock:
            newest[0].release()
        # the writes landed (an apply that skipped pages as already applied would not)
        assert (decode(store.read(0, n_pages * PAGE), pages) == counters).all()
        return rounds

    def read_newest(rng: random.Random) -> bool:
        with lock:
            snap, want = newest
        if snap is None:
            return False
        ids = sorted(rng.sample(range(n_pages), min(n_pages, 64)))
        try:
            data, _ = snap.read_pages(ids)
        except sc.SnapshotReleased:
            return False
        assert (decode(data, ids) == want[ids]).all()
        return True

    with store.snapshot() as first:
        def read(seed: int) -> int:
            rng = random.Random(seed)
            n = checked = 0
            while not stop.is_set() or n == 0:
                data, _ = first.read_pages(pages)
                assert (decode(data, pages) == 7).all()
                assert (decode(first.read(0, n_pages * PAGE), pages) == 7).all()
                checked += read_newest(rng)
                n += 1
            return checked

        with ThreadPoolExecutor(max_workers=4) as pool:
            w = pool.submit(rewrite)
            rs = [pool.submit(read, i) for i in range(3)]
            assert w.result(timeout=60) >= 60
            assert sum(r.result(timeout=60) for r in rs) > 0
        assert store.stats()["preserved_pages"] == n_pages
    assert store.stats()["preserved_pages"] == 0
