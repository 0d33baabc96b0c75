"""What every section of `statecore bench` shares: the constants, timing, memory readings,
the deterministic data written, and small file and process helpers."""
from __future__ import annotations

import gc
import os
import time
import warnings
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np

from ..store import Store

PAGE = 4096
WRITES = 2_000_000           # random 8-byte writes per pass
BATCH = 65536                # indices per fancy assignment
THREAD_BATCH = 8192          # smaller batches for the writer threads (finer rate sampling)
CHANGE_FRACTION = 0.01       # sections 3 and 4: pages changed per round
JOURNAL_COMMITS = 10         # section 3: commits after the DurableStore checkpoint
SEED = 20240611
PEERS = ("fork", "redis", "lmdb", "numpy")
SHORT = {"fork": "fork", "redis": "Redis", "lmdb": "LMDB", "numpy": "numpy"}
MiB = 1 << 20

Batches = List[Tuple[np.ndarray, np.ndarray]]


def now() -> float:
    return time.perf_counter()


def median(xs: Sequence[float]) -> float:
    return float(np.median(np.asarray(xs, dtype=float)))


def collect() -> None:
    gc.collect()


# ---- memory -----------------------------------------------------------------------------------

def _resident(pid: str) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    return _resident("self")


def pss(pid: int) -> int:
    """Proportional set size of a process (shared pages split among their users)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _resident(str(pid))


# ---- the data --------------------------------------------------------------------------------

def fill(write: Callable[[int, np.ndarray], None], size: int, seed: int = SEED) -> None:
    """Deterministic incompressible content, written chunk by chunk (no full copy held)."""
    bits = np.random.PCG64(seed)
    chunk = 64 * MiB
    for off in range(0, size, chunk):
        n = min(chunk, size - off)
        write(off, bits.random_raw(n // 8).view(np.uint8))


def filled_store(size: int) -> Store:
    """A new Store holding the deterministic content; closed again if filling fails."""
    store = Store(size=size)
    try:
        fill(store.write, size)
    except BaseException:
        store.close()
        raise
    return store


def fill_array(a: np.ndarray) -> np.ndarray:
    """Fill a uint8 array in place with the same content a filled store holds."""
    def put(off: int, data: np.ndarray) -> None:
        a[off:off + data.nbytes] = data
    fill(put, a.nbytes)
    return a


def write_batches(n_slots: int, writes: int, batch: int, seed: int = SEED + 1) -> Batches:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_slots, size=writes, dtype=np.int64)
    vals = rng.integers(-(1 << 62), 1 << 62, size=writes, dtype=np.int64)
    return [(idx[i:i + batch], vals[i:i + batch]) for i in range(0, writes, batch)]


def run_writes(target: Any, batches: Batches) -> float:
    t0 = now()
    for idx, vals in batches:
        target[idx] = vals
    return now() - t0


def pages_per_change(n_pages: int) -> int:
    return max(1, int(n_pages * CHANGE_FRACTION))


def change_random_pages(target: Any, rng: np.random.Generator, n_pages: int, k: int) -> None:
    """Overwrite k distinct random pages of `target` with fresh random bytes."""
    ids = np.sort(rng.choice(n_pages, size=k, replace=False)).astype(np.uint64)
    target.write_pages(ids, np.random.PCG64(int(rng.integers(1 << 30))).random_raw(
        k * PAGE // 8))


# ---- files and processes ---------------------------------------------------------------------

def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def warm(*paths: str) -> None:
    """Read files once so every recovery starts from the page cache, not the disk."""
    buf = bytearray(16 * MiB)
    for root in paths:
        files = [root] if os.path.isfile(root) else [
            os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
        for path in files:
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


def file_bytes(path: str) -> Dict[str, int]:
    st = os.stat(path)
    return {"apparent": st.st_size, "allocated": st.st_blocks * 512}


def fork_quietly() -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "multi-threaded fork" (3.12+)
        return os.fork()
