"""The measurements behind bench/test_bench_*.py and bench/report.py, written once.

Every figure is a ratio against a baseline measured in the same run on the same machine
(the development machines are small and shared, so absolute numbers mean little). A
*case* is one timed thing (statecore or its baseline) with its state; a *row* divides one
case's figure by another's and checks it against a target.

A case factory is a context manager `factory(scale) -> Case` that builds the state the
case needs, touched (every page written, so page faults are not what is measured), and
frees it on exit. The pytest suites run one case per test through pytest-benchmark's
pedantic mode; report.py runs the same cases with time.perf_counter.
"""
from __future__ import annotations

import ctypes
import gc
import os
import statistics
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import lz4.block
import numpy as np

import statecore as sc

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PAGE = 4096
SEED = 20240611


# ---- scales ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Scale:
    name: str
    snap_sizes: Tuple[int, int]      # snapshot()/fork() latency: small and large touched state
    write_pages_store: int
    write_pages_bytes: int           # bytes written by one write_pages call
    random_store: int                # StateArray random int64 writes
    random_writes: int
    memory_store: int                # memory held by a snapshot
    memory_fractions: Tuple[float, ...]
    save_store: int                  # snap.save under a writer
    delta_store: int                 # delta extract / apply
    delta_pages: int
    changed_sizes: Tuple[int, int]   # changed_pages: same dirty count in both
    changed_fraction: float          # of the larger store's pages
    replay_store: int
    replay_fraction: float
    replay_deltas: int
    rounds: float = 1.0              # multiplies the default round counts


SCALES: Dict[str, Scale] = {
    "small": Scale(
        name="small", snap_sizes=(64 * MiB, 1 * GiB),
        write_pages_store=256 * MiB, write_pages_bytes=64 * MiB,
        random_store=256 * MiB, random_writes=1_000_000,
        memory_store=256 * MiB, memory_fractions=(0.1, 1.0),
        save_store=256 * MiB,
        delta_store=256 * MiB, delta_pages=4096,
        changed_sizes=(256 * MiB, 1 * GiB), changed_fraction=0.001,
        replay_store=256 * MiB, replay_fraction=0.01, replay_deltas=100),
    "full": Scale(
        name="full", snap_sizes=(64 * MiB, 4 * GiB),
        write_pages_store=1 * GiB, write_pages_bytes=256 * MiB,
        random_store=2 * GiB, random_writes=1_000_000,
        memory_store=1 * GiB, memory_fractions=(0.1, 1.0),
        save_store=1 * GiB,
        delta_store=1 * GiB, delta_pages=32768,
        changed_sizes=(1 * GiB, 4 * GiB), changed_fraction=0.001,
        replay_store=1 * GiB, replay_fraction=0.01, replay_deltas=100,
        rounds=0.6),  # big cases vary less; keeps a full run within ~5 minutes
}


def get_scale(name: Optional[str] = None) -> Scale:
    name = name or os.environ.get("STATECORE_BENCH_SCALE") or "small"
    if name not in SCALES:
        raise ValueError(f"bench scale must be one of {sorted(SCALES)}, got {name!r}")
    return SCALES[name]


def human_bytes(n: float) -> str:
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= div:
            v = n / div
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n:.0f} B"


def human_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


# ---- helpers -----------------------------------------------------------------------------
_libc = ctypes.CDLL(None)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def free_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so that one measurement's
    leftovers neither inflate nor hide the next one's memory (or page faults)."""
    gc.collect()
    try:
        _libc.malloc_trim(0)
    except AttributeError:  # not glibc
        pass


def touched_store(size: int, page_size: int = PAGE) -> sc.Store:
    """An anonymous store with every page written once (epoch 1): mapped, versions set."""
    store = sc.Store(size=size, page_size=page_size)
    store.array("int64")[:] = 1
    return store


def touched_ndarray(nbytes: int, dtype: Any = np.int64) -> np.ndarray:
    a = np.empty(nbytes // np.dtype(dtype).itemsize, dtype=dtype)
    a[...] = 1
    return a


def new_epoch(store: sc.Store) -> None:
    """Close the open epoch without leaving a live snapshot: later writes do the full
    version bookkeeping again, but nothing needs preserving."""
    store.snapshot().release()


def fork_exit_wait() -> None:
    """fork(); the child _exits at once; the parent reaps it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
        pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


def fork_blocked_child() -> Tuple[int, int]:
    """fork() a child that keeps the parent's memory image alive until the returned
    pipe end is closed (what a BGSAVE child does while it writes). Returns (pid, fd)."""
    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        try:
            os.close(w)
            os.read(r, 1)
        finally:
            os._exit(0)
    os.close(r)
    return pid, w


def end_blocked_child(pid: int, fd: int) -> None:
    os.close(fd)
    os.waitpid(pid, 0)


def compressible_pages(n_pages: int, page_size: int = PAGE, seed: int = SEED) -> np.ndarray:
    """Pages of small int64 counters (what keyed state looks like): lz4 gets ~2-4x."""
    rng = np.random.default_rng(seed)
    vals = rng.integers(0, 1000, n_pages * page_size // 8, dtype=np.int64)
    return vals.view(np.uint8).reshape(n_pages, page_size)


def bench_dir() -> str:
    return os.environ.get("STATECORE_BENCH_DIR") or tempfile.gettempdir()


# ---- cases ---------------------------------------------------------------------------------
@dataclass
class Case:
    """One timed operation. `setup()` (untimed) returns the args tuple for `run`;
    `teardown(*args)` (untimed) runs after each round. `metrics` holds figures that are
    not times (bytes held, counts), filled by the case itself."""
    run: Callable[..., Any]
    setup: Optional[Callable[[], tuple]] = None
    teardown: Optional[Callable[..., None]] = None
    rounds: int = 5
    warmup: int = 1
    metrics: Dict[str, float] = field(default_factory=dict)


CASES: Dict[str, Callable[[Scale], Any]] = {}


def case(key: str) -> Callable[[Callable[[Scale], Iterator[Case]]], Callable[[Scale], Any]]:
    def register(fn: Callable[[Scale], Iterator[Case]]) -> Callable[[Scale], Any]:
        cm = contextmanager(fn)
        CASES[key] = cm
        return cm
    return register


def rounds(scale: Scale, n: int) -> int:
    return max(1, int(round(n * scale.rounds)))


def _one_round(c: Case) -> float:
    args = c.setup() if c.setup else ()
    t0 = time.perf_counter()
    c.run(*args)
    dt = time.perf_counter() - t0
    if c.teardown:
        c.teardown(*args)
    return dt  # args go here, before the next setup: big inputs (deltas) must not pile up


def run_interleaved(cases: List[Case]) -> List[List[float]]:
    """What pytest-benchmark's pedantic mode does, with perf_counter, for one case or
    several side by side: each case's warm-up rounds, then one timed round of each case in
    turn until every case has its rounds. A slow stretch of a shared host then spoils a
    round of each case alike instead of all the rounds of one."""
    for c in cases:
        for _ in range(c.warmup):
            _one_round(c)
    times: List[List[float]] = [[] for _ in cases]
    for i in range(max(c.rounds for c in cases)):
        for c, t in zip(cases, times):
            if i < c.rounds:
                t.append(_one_round(c))
    return times


# -- issue 2: snapshot() vs fork() ------------------------------------------------------------
def _snapshot_case(scale: Scale, which: int) -> Iterator[Case]:
    store = touched_store(scale.snap_sizes[which])
    held: List[sc.Snapshot] = []
    try:
        yield Case(run=lambda: held.append(store.snapshot()),
                   teardown=lambda: held.pop().release(),
                   rounds=rounds(scale, 300), warmup=20)
    finally:
        for s in held:
            s.release()
        store.close()
        del store
        free_memory()


def _fork_case(scale: Scale, which: int) -> Iterator[Case]:
    # The same process holding the same touched store: what fork() has to copy.
    store = touched_store(scale.snap_sizes[which])
    try:
        yield Case(run=fork_exit_wait, rounds=rounds(scale, 20 if which == 0 else 10),
                   warmup=2)
    finally:
        store.close()
        del store
        free_memory()


case("snapshot.lo")(lambda scale: _snapshot_case(scale, 0))
case("snapshot.hi")(lambda scale: _snapshot_case(scale, 1))
case("fork.lo")(lambda scale: _fork_case(scale, 0))
case("fork.hi")(lambda scale: _fork_case(scale, 1))


# -- issue 2: write_pages vs numpy copy -------------------------------------------------------
@case("write_pages.statecore")
def _write_pages(scale: Scale) -> Iterator[Case]:
    store = touched_store(scale.write_pages_store)
    n = scale.write_pages_bytes // PAGE
    rng = np.random.default_rng(SEED)
    ids = rng.permutation(store.n_pages)[:n].astype(np.uint64)
    data = np.frombuffer(rng.bytes(n * PAGE), dtype=np.uint8)
    try:
        yield Case(run=lambda: store.write_pages(ids, data),
                   setup=lambda: new_epoch(store) or (), rounds=rounds(scale, 10), warmup=2,
                   metrics={"bytes_moved": data.nbytes})
    finally:
        store.close()
        del store, data
        free_memory()


@case("write_pages.numpy")
def _write_pages_numpy(scale: Scale) -> Iterator[Case]:
    nbytes = scale.write_pages_bytes
    dst = touched_ndarray(nbytes, np.uint8)
    src = np.frombuffer(np.random.default_rng(SEED).bytes(nbytes), dtype=np.uint8)
    try:
        yield Case(run=lambda: np.copyto(dst, src), rounds=rounds(scale, 10), warmup=2,
                   metrics={"bytes_moved": nbytes})
    finally:
        del dst, src
        free_memory()


# -- issue 2: 1M random int64 writes ----------------------------------------------------------
def _random_writes(scale: Scale) -> Tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)
    n = scale.random_store // 8
    return (rng.integers(0, n, scale.random_writes, dtype=np.int64),
            rng.integers(0, 1 << 40, scale.random_writes, dtype=np.int64))


@case("random.statecore")
def _random_statecore(scale: Scale) -> Iterator[Case]:
    store = touched_store(scale.random_store)
    arr = store.array("int64")
    idx, vals = _random_writes(scale)
    try:
        yield Case(run=lambda: arr.__setitem__(idx, vals), setup=lambda: new_epoch(store) or (),
                   rounds=rounds(scale, 8), warmup=1)
    finally:
        store.close()
        del store, arr
        free_memory()


@case("random.statecore_snap")
def _random_statecore_snap(scale: Scale) -> Iterator[Case]:
    store = touched_store(scale.random_store)
    arr = store.array("int64")
    idx, vals = _random_writes(scale)
    distinct = len(np.unique(idx * 8 // store.page_size))
    c = Case(run=None, rounds=rounds(scale, 5), warmup=1)  # type: ignore[arg-type]
    c.metrics["pages_touched"] = distinct

    def setup() -> tuple:
        return (store.snapshot(),)  # a fresh snapshot: every touched page gets preserved

    def run(snap: sc.Snapshot) -> None:
        arr[idx] = vals

    def teardown(snap: sc.Snapshot) -> None:
        c.metrics["pages_preserved"] = store.stats()["preserved_pages"]
        snap.release()

    c.run, c.setup, c.teardown = run, setup, teardown
    try:
        yield c
    finally:
        store.close()
        del store, arr
        free_memory()


@case("random.numpy")
def _random_numpy(scale: Scale) -> Iterator[Case]:
    nd = touched_ndarray(scale.random_store)
    idx, vals = _random_writes(scale)
    try:
        yield Case(run=lambda: nd.__setitem__(idx, vals), rounds=rounds(scale, 10), warmup=2)
    finally:
        del nd
        free_memory()


def _touched_pages(scale: Scale) -> tuple:
    """An ndarray of the random-write state, the writes, its pages as rows, the pages the
    writes touch, and mapped room for one copy of each: the copy baselines' setup."""
    nd = touched_ndarray(scale.random_store)
    idx, vals = _random_writes(scale)
    pages = nd.view(np.uint8).reshape(-1, PAGE)
    touched = np.unique(idx * 8 // PAGE).astype(np.intp)
    saved = touched_ndarray(len(touched) * PAGE, np.uint8).reshape(-1, PAGE)
    return nd, idx, vals, pages, touched, saved


@case("random.numpy_copy")
def _random_numpy_copy(scale: Scale) -> Iterator[Case]:
    # The work a snapshot cannot avoid, done by numpy: copy each touched page once into
    # memory that is already mapped, then write. Scale-independent yardstick for the
    # first pass under a live snapshot.
    nd, idx, vals, pages, touched, saved = _touched_pages(scale)

    def run() -> None:
        np.take(pages, touched, axis=0, out=saved, mode="clip")  # "raise" buffers
        nd[idx] = vals

    try:
        yield Case(run=run, rounds=rounds(scale, 8), warmup=1)
    finally:
        del nd, pages, saved
        free_memory()


@case("random.copy_floor")
def _random_copy_floor(scale: Scale) -> Iterator[Case]:
    # Only the copies a first pass under a live snapshot cannot avoid (each touched page
    # once), on two threads like statecore's, with no writes and no bookkeeping: the
    # floor under the "live snapshot vs without" ratio on this machine.
    from concurrent.futures import ThreadPoolExecutor
    nd, _, _, pages, touched, saved = _touched_pages(scale)
    half = len(touched) // 2
    halves = [slice(0, half), slice(half, len(touched))]
    pool = ThreadPoolExecutor(2)

    def copy(part: slice) -> None:  # np.take releases the GIL
        np.take(pages, touched[part], axis=0, out=saved[part], mode="clip")

    try:
        yield Case(run=lambda: list(pool.map(copy, halves)), rounds=rounds(scale, 8), warmup=1)
    finally:
        pool.shutdown()
        del nd, pages, saved
        free_memory()


@case("random.numpy_4k")
def _random_numpy_4k(scale: Scale) -> Iterator[Case]:
    # numpy madvises large arrays for transparent huge pages; the store's mapping gets
    # 4 KiB pages. This baseline isolates the page-size (TLB) part of the difference.
    import mmap
    m = mmap.mmap(-1, scale.random_store)
    nd = np.frombuffer(m, dtype=np.int64)
    nd[:] = 1
    idx, vals = _random_writes(scale)
    try:
        yield Case(run=lambda: nd.__setitem__(idx, vals), rounds=rounds(scale, 10), warmup=2)
    finally:
        del nd
        m.close()
        free_memory()


@case("random.fork")
def _random_fork(scale: Scale) -> Iterator[Case]:
    # The fork()-based equivalent: a child holding the old state (blocked on a pipe, as
    # a BGSAVE child writing it out would be) while the parent writes.
    nd = touched_ndarray(scale.random_store)
    idx, vals = _random_writes(scale)
    try:
        yield Case(run=lambda pid, fd: nd.__setitem__(idx, vals), setup=fork_blocked_child,
                   teardown=end_blocked_child, rounds=rounds(scale, 5), warmup=1)
    finally:
        del nd
        free_memory()


# -- issue 2: memory held by a snapshot -------------------------------------------------------
def _memory_case(scale: Scale, fraction: float) -> Iterator[Case]:
    store = touched_store(scale.memory_store)
    arr = store.array("int64")
    n_write = max(1, int(store.n_pages * fraction))
    rng = np.random.default_rng(SEED)
    pages = rng.permutation(store.n_pages)[:n_write]
    elems = pages.astype(np.int64) * (store.page_size // 8)  # one int64 in each page
    c = Case(run=None, rounds=1, warmup=0)  # type: ignore[arg-type]
    c.metrics.update(pages=n_write, page_bytes=n_write * store.page_size,
                     bound=n_write * store.page_size + 0.01 * store.size)
    state: Dict[str, Any] = {}

    def setup() -> tuple:
        free_memory()
        state["snap"] = store.snapshot()
        state["rss0"] = rss_bytes()
        return ()

    def run() -> None:
        arr[elems] = 7

    def teardown() -> None:
        c.metrics["rss_growth"] = rss_bytes() - state["rss0"]
        c.metrics["preserved_bytes"] = store.stats()["preserved_bytes"]
        state.pop("snap").release()

    c.run, c.setup, c.teardown = run, setup, teardown
    try:
        yield c
    finally:
        state.clear()
        store.close()
        del store, arr
        free_memory()


case("memory.part")(lambda scale: _memory_case(scale, scale.memory_fractions[0]))
case("memory.all")(lambda scale: _memory_case(scale, scale.memory_fractions[-1]))


# -- issue 2: snap.save while a writer runs ---------------------------------------------------
class _Writer(threading.Thread):
    """Random int64 writes in batches of 10k through a StateArray until stopped."""

    def __init__(self, arr: sc.StateArray, seed: int = SEED) -> None:
        super().__init__(daemon=True, name="bench-writer")
        rng = np.random.default_rng(seed)
        self.arr = arr
        self.batches = [(rng.integers(0, arr.size, 10_000, dtype=np.int64),
                         rng.integers(0, 1 << 40, 10_000, dtype=np.int64)) for _ in range(8)]
        self.stop_event = threading.Event()
        self.writes = 0

    def run(self) -> None:
        i = 0
        while not self.stop_event.is_set():
            idx, vals = self.batches[i % len(self.batches)]
            self.arr[idx] = vals
            self.writes += len(idx)
            i += 1
            time.sleep(0)  # let the timed thread take the GIL back promptly

    def stop(self) -> None:
        self.stop_event.set()
        self.join()


def _save_case(scale: Scale, with_writer: bool) -> Iterator[Case]:
    store = touched_store(scale.save_store)
    arr = store.array("int64")
    path = os.path.join(bench_dir(), f"statecore-bench-{os.getpid()}.ckpt")
    c = Case(run=None, rounds=rounds(scale, 3), warmup=1,  # type: ignore[arg-type]
             metrics={"bytes_moved": store.size})
    state: Dict[str, Any] = {}

    def setup() -> tuple:
        state["snap"] = snap = store.snapshot()
        if with_writer:
            state["writer"] = w = _Writer(arr)
            w.start()
            state["t0"] = time.perf_counter()
        return (snap,)

    def run(snap: sc.Snapshot) -> None:
        c.metrics["file_bytes"] = snap.save(path)

    def teardown(snap: sc.Snapshot) -> None:
        w = state.pop("writer", None)
        if w is not None:
            w.stop()
            c.metrics["writer_writes_per_s"] = w.writes / (time.perf_counter() - state["t0"])
        c.metrics["preserved_bytes"] = store.stats()["preserved_bytes"]
        snap.release()
        os.unlink(path)

    c.run, c.setup, c.teardown = run, setup, teardown
    try:
        yield c
    finally:
        w = state.pop("writer", None)
        if w is not None:
            w.stop()
        state.clear()
        if os.path.exists(path):
            os.unlink(path)
        store.close()
        del store, arr
        free_memory()


case("save.statecore_writer")(lambda scale: _save_case(scale, True))
case("save.statecore_idle")(lambda scale: _save_case(scale, False))


@case("save.write_fsync")
def _save_baseline(scale: Scale) -> Iterator[Case]:
    data = touched_ndarray(scale.save_store, np.uint8)
    path = os.path.join(bench_dir(), f"statecore-bench-{os.getpid()}.raw")

    def run() -> None:
        with open(path, "wb", buffering=0) as f:
            f.write(memoryview(data))
            os.fsync(f.fileno())

    try:
        yield Case(run=run, teardown=lambda: os.unlink(path), rounds=rounds(scale, 3), warmup=1,
                   metrics={"bytes_moved": data.nbytes})
    finally:
        if os.path.exists(path):
            os.unlink(path)
        del data
        free_memory()


# -- issue 3: delta extraction ----------------------------------------------------------------
def _dirty_pages(n_pages: int, count: int, seed: int = SEED) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).permutation(n_pages)[:count]).astype(np.uint64)


@case("delta.extract")
def _delta_extract(scale: Scale) -> Iterator[Case]:
    store = touched_store(scale.delta_store)
    ids = _dirty_pages(store.n_pages, scale.delta_pages)
    a = store.snapshot()
    store.write_pages(ids, compressible_pages(len(ids)))
    b = store.snapshot()
    c = Case(run=lambda: store.delta(a, b), rounds=rounds(scale, 10), warmup=2)
    d = store.delta(a, b)
    page_bytes = d.n_pages * d.page_size
    c.metrics.update(pages=d.n_pages, page_bytes=page_bytes, bytes_moved=page_bytes,
                     encoded_none=len(d.encode("none")), encoded_lz4=len(d.encode("lz4")))
    del d
    try:
        yield c
    finally:
        a.release()
        b.release()
        store.close()
        del store
        free_memory()


@case("delta.extract_numpy")
def _delta_extract_numpy(scale: Scale) -> Iterator[Case]:
    # The same pages gathered out of an ndarray of the same size, into a new array (a
    # delta is a new buffer too).
    n_pages = scale.delta_store // PAGE
    nd = touched_ndarray(scale.delta_store, np.uint8).reshape(n_pages, PAGE)
    ids = _dirty_pages(n_pages, scale.delta_pages).astype(np.intp)
    try:
        yield Case(run=lambda: nd[ids], rounds=rounds(scale, 10), warmup=2,
                   metrics={"bytes_moved": len(ids) * PAGE})
    finally:
        del nd
        free_memory()


# -- issue 3: changed_pages -------------------------------------------------------------------
def _changed_case(scale: Scale, which: int) -> Iterator[Case]:
    store = touched_store(scale.changed_sizes[which])
    count = int(scale.changed_sizes[1] // PAGE * scale.changed_fraction)
    ids = _dirty_pages(store.n_pages, count)
    a = store.snapshot()
    store.array("int64")[ids.astype(np.int64) * (PAGE // 8)] = 3
    b = store.snapshot()
    c = Case(run=lambda: store.changed_pages(a, b), rounds=rounds(scale, 100), warmup=10)
    c.metrics["found"] = len(store.changed_pages(a, b))
    c.metrics["dirty"] = count
    try:
        yield c
    finally:
        a.release()
        b.release()
        store.close()
        del store
        free_memory()


case("changed.lo")(lambda scale: _changed_case(scale, 0))
case("changed.hi")(lambda scale: _changed_case(scale, 1))


@case("changed.numpy_scan")
def _changed_numpy(scale: Scale) -> Iterator[Case]:
    # What a store without summaries does: scan one version per page of the large store.
    n_pages = scale.changed_sizes[1] // PAGE
    versions = np.ones(n_pages, dtype=np.uint64)
    count = int(n_pages * scale.changed_fraction)
    versions[_dirty_pages(n_pages, count).astype(np.intp)] = 3
    try:
        yield Case(run=lambda: np.flatnonzero(versions > 2), rounds=rounds(scale, 100),
                   warmup=10)
    finally:
        del versions
        free_memory()


# -- issue 3: apply ---------------------------------------------------------------------------
class _DeltaSource:
    """A primary that rewrites the same pages each epoch, and a replica that follows.

    The replica is touched on its own and moved past the primary's first epoch, so each
    delta (a, b] the primary makes applies to it (a < replica epoch, versions newer)."""

    def __init__(self, size: int, n_dirty: int) -> None:
        self.primary = touched_store(size)
        self.replica = touched_store(size)
        new_epoch(self.replica)
        self.ids = _dirty_pages(self.primary.n_pages, n_dirty)
        self.data = compressible_pages(n_dirty)
        self.since = self.primary.snapshot()
        self.since.release()

    def next_delta(self) -> sc.Delta:
        self.data[:, 0] += 1  # new content each epoch
        self.primary.write_pages(self.ids, self.data)
        b = self.primary.snapshot()
        try:
            return self.primary.delta(self.since.epoch, b)
        finally:
            self.since = b
            b.release()

    def close(self) -> None:
        self.primary.close()
        self.replica.close()


@contextmanager
def _delta_source(size: int, n_dirty: int) -> Iterator[_DeltaSource]:
    src = _DeltaSource(size, n_dirty)
    try:
        yield src
    finally:
        src.close()
        del src
        free_memory()


def _apply_case(scale: Scale, form: str) -> Iterator[Case]:
    with _delta_source(scale.delta_store, scale.delta_pages) as src:
        replica = src.replica
        if form == "none":      # the wire form: decode validates every checksum, then apply
            c = Case(run=replica.apply, setup=lambda: (src.next_delta().encode("none"),))
        elif form == "object":  # an in-process Delta (already built, not re-validated)
            c = Case(run=replica.apply, setup=lambda: (src.next_delta(),))
        else:                   # lz4 wire form: decode (decompress + validate) + apply
            c = Case(run=lambda enc: replica.apply(sc.Delta.decode(enc)),
                     setup=lambda: (src.next_delta().encode("lz4"),))
        c.rounds, c.warmup = rounds(scale, 10), 2
        c.metrics["bytes_moved"] = len(src.ids) * PAGE
        yield c


case("apply.none")(lambda scale: _apply_case(scale, "none"))
case("apply.object")(lambda scale: _apply_case(scale, "object"))
case("apply.lz4")(lambda scale: _apply_case(scale, "lz4"))


@case("apply.memcpy")
def _apply_memcpy(scale: Scale) -> Iterator[Case]:
    src = compressible_pages(scale.delta_pages)
    dst = touched_ndarray(src.nbytes, np.uint8).reshape(src.shape)
    try:
        yield Case(run=lambda: np.copyto(dst, src), rounds=rounds(scale, 10), warmup=2,
                   metrics={"bytes_moved": src.nbytes})
    finally:
        del src, dst
        free_memory()


@case("apply.lz4_decompress")
def _apply_lz4_baseline(scale: Scale) -> Iterator[Case]:
    payload = compressible_pages(scale.delta_pages)
    packed = lz4.block.compress(payload, store_size=False)
    n = payload.nbytes
    del payload
    try:
        yield Case(run=lambda: lz4.block.decompress(packed, uncompressed_size=n),
                   rounds=rounds(scale, 10), warmup=2, metrics={"bytes_moved": n})
    finally:
        free_memory()


# -- issue 3: replay coalescing ---------------------------------------------------------------
def _replay_case(scale: Scale, k: int, wire: bool, n_rounds: int = 0) -> Iterator[Case]:
    n_dirty = int(scale.replay_store // PAGE * scale.replay_fraction)
    with _delta_source(scale.replay_store, n_dirty) as src:
        replica = src.replica

        def setup() -> tuple:
            ds = [src.next_delta() for _ in range(k)]
            return ([d.encode("none") for d in ds] if wire else ds,)

        if k == 1:
            run: Callable[..., Any] = lambda ds: replica.apply(ds[0])
        else:
            run = lambda ds: sc.replay(replica, ds)
        c = Case(run=run, setup=setup, rounds=rounds(scale, n_rounds or (8 if k > 1 else 20)),
                 warmup=1)
        c.metrics["pages_per_delta"] = n_dirty
        yield c


case("replay.many")(lambda scale: _replay_case(scale, scale.replay_deltas, False))
case("replay.one")(lambda scale: _replay_case(scale, 1, False))
case("replay.many_wire")(lambda scale: _replay_case(scale, scale.replay_deltas, True, 4))
case("replay.one_wire")(lambda scale: _replay_case(scale, 1, True))


# ---- rows: what is compared with what -------------------------------------------------------
@dataclass(frozen=True)
class Row:
    issue: int
    label: Callable[[Scale], str]
    num: Tuple[str, str]          # (case key, "time" or a metric name)
    den: Tuple[str, str]
    target: Optional[float]       # ratio must be <= target; None: for information
    why: str = ""

    def keys(self) -> Tuple[str, str]:
        return self.num[0], self.den[0]


def _lbl(fmt: str) -> Callable[[Scale], str]:
    def label(s: Scale) -> str:
        return fmt.format(
            lo=human_bytes(s.snap_sizes[0]), hi=human_bytes(s.snap_sizes[1]),
            wp=human_bytes(s.write_pages_bytes), rs=human_bytes(s.random_store),
            nw=f"{s.random_writes / 1e6:g}M", ms=human_bytes(s.memory_store),
            mp=f"{s.memory_fractions[0]:.0%}", ma=f"{s.memory_fractions[-1]:.0%}",
            ss=human_bytes(s.save_store), dp=s.delta_pages,
            dpb=human_bytes(s.delta_pages * PAGE), ds=human_bytes(s.delta_store),
            clo=human_bytes(s.changed_sizes[0]), chi=human_bytes(s.changed_sizes[1]),
            cn=int(s.changed_sizes[1] // PAGE * s.changed_fraction),
            cf=f"{s.changed_fraction:.1%}", rk=s.replay_deltas, rf=f"{s.replay_fraction:.0%}",
            rst=human_bytes(s.replay_store))
    return label


T = "time"
ROWS: List[Row] = [
    # issue 2
    Row(2, _lbl("snapshot() latency: {hi} vs {lo} of touched state"),
        ("snapshot.hi", T), ("snapshot.lo", T), 2.0,
        "snapshot() is O(1) (DESIGN invariant 2): it must not grow with the state"),
    Row(2, _lbl("snapshot() vs fork()+_exit+waitpid, {lo} touched"),
        ("snapshot.lo", T), ("fork.lo", T), 0.1, "set here: at least 10x cheaper than fork"),
    Row(2, _lbl("snapshot() vs fork()+_exit+waitpid, {hi} touched"),
        ("snapshot.hi", T), ("fork.hi", T), 0.01,
        "set here: at least 100x cheaper than fork at large state"),
    Row(2, _lbl("(info) fork() cost: {hi} vs {lo}"), ("fork.hi", T), ("fork.lo", T), None),
    Row(2, _lbl("write_pages {wp} (random page ids) vs numpy copy of the bytes"),
        ("write_pages.statecore", T), ("write_pages.numpy", T), 1.5,
        "set here: bookkeeping per 4 KiB page must stay small next to its memcpy"),
    Row(2, _lbl("{nw} random int64 writes over {rs}: StateArray vs numpy, no snapshot"),
        ("random.statecore", T), ("random.numpy", T), 2.0,
        "set here: tracking may cost at most as much as the write itself"),
    Row(2, _lbl("(info) same, numpy on 4 KiB pages (no THP) as baseline"),
        ("random.statecore", T), ("random.numpy_4k", T), None),
    Row(2, _lbl("{nw} random writes, StateArray with a live snapshot (first pass, every "
                "touched page preserved) vs numpy copying each touched page once + writing"),
        ("random.statecore_snap", T), ("random.numpy_copy", T), 2.0,
        "set here: the design allows one page copy per touched page; the baseline does "
        "that copy, and the no-snapshot allowance (2x) applies on top"),
    Row(2, _lbl("{nw} random writes, StateArray with a live snapshot (first pass, every "
                "touched page preserved) vs without"),
        ("random.statecore_snap", T), ("random.statecore", T), 4.0,
        "brief: at most 4x slower than without a snapshot"),
    Row(2, _lbl("(info) numpy copying each page those writes touch once, on two threads, "
                "nothing else, vs StateArray without a snapshot"),
        ("random.copy_floor", T), ("random.statecore", T), None),
    Row(2, _lbl("(info) StateArray with a live snapshot vs that copy alone"),
        ("random.statecore_snap", T), ("random.copy_floor", T), None),
    Row(2, _lbl("(info) same, vs numpy fancy assignment alone"),
        ("random.statecore_snap", T), ("random.numpy", T), None),
    Row(2, _lbl("{nw} random writes with a live snapshot: StateArray vs fork() child alive"),
        ("random.statecore_snap", T), ("random.fork", T), 0.5,
        "set here: the point of fork-free snapshots is to beat fork's COW faults, by 2x"),
    Row(2, _lbl("(info) fork() child alive vs numpy, no child"),
        ("random.fork", T), ("random.numpy", T), None),
    Row(2, _lbl("(check) pages preserved vs distinct pages touched"),
        ("random.statecore_snap", "pages_preserved"),
        ("random.statecore_snap", "pages_touched"), 1.0,
        "DESIGN invariant 2: one page copy per touched page per live snapshot; the test "
        "asserts equality"),
    Row(2, _lbl("snapshot memory, {mp} of {ms} written: preserved_bytes vs N*page+1%"),
        ("memory.part", "preserved_bytes"), ("memory.part", "bound"), 1.0, "brief"),
    Row(2, _lbl("snapshot memory, {mp} of {ms} written: RSS growth vs N*page+1%"),
        ("memory.part", "rss_growth"), ("memory.part", "bound"), 1.0, "brief"),
    Row(2, _lbl("snapshot memory, {ma} of {ms} written: preserved_bytes vs N*page+1%"),
        ("memory.all", "preserved_bytes"), ("memory.all", "bound"), 1.0, "brief"),
    Row(2, _lbl("snapshot memory, {ma} of {ms} written: RSS growth vs N*page+1%"),
        ("memory.all", "rss_growth"), ("memory.all", "bound"), 1.0, "brief"),
    Row(2, _lbl("snap.save {ss} with a writer thread vs write+fsync of {ss}"),
        ("save.statecore_writer", T), ("save.write_fsync", T), 2.0,
        "set here: a checkpoint adds a copy and a checksum pass to the write, and shares "
        "2 cores with the writer"),
    Row(2, _lbl("(info) snap.save {ss}, no writer, vs write+fsync"),
        ("save.statecore_idle", T), ("save.write_fsync", T), None),
    # issue 3
    Row(3, _lbl("delta() of {dp} dirty pages ({dpb}) vs numpy gather of those pages"),
        ("delta.extract", T), ("delta.extract_numpy", T), 3.0,
        "set here: a copy plus a murmur3 pass is 3x a copy at DESIGN's figures "
        "(memcpy 20 GB/s, murmur3 10 GB/s)"),
    Row(3, _lbl("changed_pages, {cf} dirty ({cn} pages) of {chi}, vs numpy scan of versions"),
        ("changed.hi", T), ("changed.numpy_scan", T), 1.0,
        "set here: must beat scanning one version per page"),
    Row(3, _lbl("changed_pages, {cn} dirty pages: {chi} vs {clo} store"),
        ("changed.hi", T), ("changed.lo", T), 1.5,
        "set here: the brief asks to show the cost does not grow with clean pages; "
        "the large store has 4x the clean pages"),
    Row(3, _lbl("(check) changed_pages found vs pages written"),
        ("changed.hi", "found"), ("changed.hi", "dirty"), 1.0,
        "exactness; the test asserts equality"),
    Row(3, _lbl("apply encoded 'none' delta of {dpb} (decode+verify+apply) vs memcpy"),
        ("apply.none", T), ("apply.memcpy", T), 3.0,
        "set here: decode verifies every page's murmur3 before one copy: 3x a copy at "
        "DESIGN's figures"),
    Row(3, _lbl("apply in-process Delta of {dpb} vs memcpy"),
        ("apply.object", T), ("apply.memcpy", T), 1.5,
        "set here: a scatter of whole pages is a memcpy plus bookkeeping"),
    Row(3, _lbl("apply lz4 delta of {dpb} (Delta.decode + apply) vs lz4.block.decompress"),
        ("apply.lz4", T), ("apply.lz4_decompress", T), 1.5,
        "set here: decompression (1 GB/s) should dominate a checksum pass and a copy"),
    Row(3, _lbl("replay {rk} deltas, each the same {rf} of {rst}, vs apply one"),
        ("replay.many", T), ("replay.one", T), 3.0, "brief (DESIGN invariant 5)"),
    Row(3, _lbl("(info) same, from {rk} encoded buffers vs one (validation is per delta)"),
        ("replay.many_wire", T), ("replay.one_wire", T), None),
    Row(3, _lbl("encoded 'none' size vs page bytes, 4 KiB pages"),
        ("delta.extract", "encoded_none"), ("delta.extract", "page_bytes"), 1.01,
        "set here: header and index within 1% of the pages"),
    Row(3, _lbl("(info) encoded 'lz4' size vs page bytes (small-int pages)"),
        ("delta.extract", "encoded_lz4"), ("delta.extract", "page_bytes"), None),
]


# ---- results and the table ------------------------------------------------------------------
@dataclass
class Result:
    times: List[float]
    metrics: Dict[str, float]

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def value(self, what: str) -> Optional[float]:
        return self.best if what == T else self.metrics.get(what)


def _cell(res: Result, what: str) -> str:
    if what == T:
        txt = f"{human_seconds(res.best)} / {human_seconds(res.median)}"
        moved = res.metrics.get("bytes_moved")
        if moved and res.best > 0:
            txt += f" ({moved / res.best / 1e9:.2f} GB/s)"
        return txt
    v = res.metrics.get(what)
    if v is None:
        return "?"
    if "bytes" in what or what in ("bound", "rss_growth") or what.startswith("encoded"):
        return human_bytes(v)
    return f"{v:g}"


def evaluate(results: Dict[str, Result]) -> List[Tuple[Row, Optional[float], str]]:
    """(row, ratio, "pass"/"FAIL"/"info"/"?") for every row whose cases were measured."""
    out = []
    for row in ROWS:
        a, b = results.get(row.num[0]), results.get(row.den[0])
        if a is None or b is None:
            continue
        va, vb = a.value(row.num[1]), b.value(row.den[1])
        ratio = va / vb if va is not None and vb else None
        if row.target is None:
            verdict = "info"
        elif ratio is None:
            verdict = "?"
        else:
            verdict = "pass" if ratio <= row.target else "FAIL"
        out.append((row, ratio, verdict))
    return out


def render_table(results: Dict[str, Result], scale: Scale) -> str:
    """Markdown table of every row whose cases were measured. Times are best / median."""
    lines = ["| issue | measurement | statecore | baseline | ratio | target | result |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row, ratio, verdict in evaluate(results):
        a, b = results[row.num[0]], results[row.den[0]]
        target = "info" if row.target is None else f"<= {row.target:g}"
        rtxt = "?" if ratio is None else (f"{ratio:.4f}" if ratio < 0.01 else f"{ratio:.3g}")
        lines.append(f"| {row.issue} | {row.label(scale)} | {_cell(a, row.num[1])} | "
                     f"{_cell(b, row.den[1])} | {rtxt} | {target} | "
                     f"{'-' if verdict == 'info' else verdict} |")
    notes = [f"- {row.label(scale)}: <= {row.target:g} ({row.why})"
             for row, _, _ in evaluate(results) if row.why and row.target is not None]
    if notes:
        lines += ["", "Targets: \"brief\" came with the task; \"set here\" are this "
                  "suite's own, with the reasoning:"] + notes
    return "\n".join(lines)


def machine_info() -> str:
    def read(path: str) -> str:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return "?"
    thp = read("/sys/kernel/mm/transparent_hugepage/enabled")
    load = read("/proc/loadavg").split()[:3]
    mem = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GiB
    return (f"{os.cpu_count()} CPUs, {mem:.0f} GiB, "
            f"THP {thp}, load average {' '.join(load)}; statecore {sc.__version__}, "
            f"numpy {np.__version__}, lz4 {lz4.library_version_string()}")
