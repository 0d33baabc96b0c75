"""`statecore bench`: statecore side by side with its peers, in one run on the same data.

The state is `size` bytes of 4 KiB pages (values) of incompressible bytes. Four sections:

1. snapshot: `store.snapshot()` latency vs `os.fork()` of this process holding the same
   touched state; 2M random 8-byte writes with a live snapshot (first pass: every touched
   page is preserved) vs without, and the same writes on a numpy array while a forked child
   holding the old state is alive vs with no child; memory growth of each (RSS; PSS of
   parent + child for fork).
2. backup: `snap.save()` vs py-lmdb `env.copy()` vs Redis BGSAVE vs `np.save` (which blocks
   writers), idle and, for statecore and Redis, under a concurrent writer; file sizes.
3. recovery: `Store.load(checkpoint)` and a `DurableStore` reopen (checkpoint + journal)
   vs restarting Redis from its RDB vs reopening the LMDB copy and reading every value vs
   `np.load` of a full dump. Every input file is read once first (warm page cache for all).
4. incremental: bytes and seconds to bring a replica up to date after 1% of pages change:
   `store.delta(snap)` + `replica.apply(encoded)` vs a full copy (`np.copyto`).

Ratios are peer / statecore for figures where lower is better (> 1: statecore better).
Redis, py-lmdb and matplotlib are optional: a missing one is reported as "not installed".
Peers can be turned off with `skip=` or STATECORE_BENCH_SKIP (comma-separated: fork,
redis, lmdb, numpy).
"""
from __future__ import annotations

import gc
import json
import logging
import os
import resource
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .durable import DurableStore
from .progress import human_bytes
from .store import Store

log = logging.getLogger("statecore")

PAGE = 4096
WRITES = 2_000_000           # random 8-byte writes per pass
BATCH = 65536                # indices per fancy assignment
THREAD_BATCH = 8192          # smaller batches for the writer threads (finer rate sampling)
CHANGE_FRACTION = 0.01       # section 4: pages changed per round
JOURNAL_COMMITS = 10         # section 3: commits after the DurableStore checkpoint
SEED = 20240611
PEERS = ("fork", "redis", "lmdb", "numpy")
SHORT = {"fork": "fork", "redis": "Redis", "lmdb": "LMDB", "numpy": "numpy"}
MiB = 1 << 20

Batches = List[Tuple[np.ndarray, np.ndarray]]


# ---- small helpers ---------------------------------------------------------------------------

def _now() -> float:
    return time.perf_counter()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _pss(pid: int) -> int:
    """Proportional set size of a process (shared pages split among their users)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _median(xs: Sequence[float]) -> float:
    return float(np.median(np.asarray(xs, dtype=float)))


def _fill(write: Callable[[int, np.ndarray], None], size: int, seed: int = SEED) -> None:
    """Deterministic incompressible content, written chunk by chunk (no full copy held)."""
    bits = np.random.PCG64(seed)
    chunk = 64 * MiB
    for off in range(0, size, chunk):
        n = min(chunk, size - off)
        write(off, bits.random_raw(n // 8).view(np.uint8))


def _write_batches(n_slots: int, writes: int, batch: int, seed: int = SEED + 1) -> Batches:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_slots, size=writes, dtype=np.int64)
    vals = rng.integers(-(1 << 62), 1 << 62, size=writes, dtype=np.int64)
    return [(idx[i:i + batch], vals[i:i + batch]) for i in range(0, writes, batch)]


def _run_writes(target: Any, batches: Batches) -> float:
    t0 = _now()
    for idx, vals in batches:
        target[idx] = vals
    return _now() - t0


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _warm(*paths: str) -> None:
    """Read files once so every recovery starts from the page cache, not the disk."""
    buf = bytearray(16 * MiB)
    for root in paths:
        files = [root] if os.path.isfile(root) else [
            os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
        for path in files:
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


def _file_bytes(path: str) -> Dict[str, int]:
    st = os.stat(path)
    return {"apparent": st.st_size, "allocated": st.st_blocks * 512}


def _fork_quietly() -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "multi-threaded fork" (3.12+)
        return os.fork()


def _collect() -> None:
    gc.collect()


class _Writer(threading.Thread):
    """Repeats write batches on `target` until stopped; counts writes done."""

    def __init__(self, target: Any, batches: Batches) -> None:
        super().__init__(name="statecore-bench-writer", daemon=True)
        self.target, self.batches = target, batches
        self.done = 0
        self.stop = threading.Event()
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            i = 0
            while not self.stop.is_set():
                idx, vals = self.batches[i % len(self.batches)]
                self.target[idx] = vals
                self.done += len(idx)
                i += 1
        except BaseException as e:  # reported by the caller
            self.error = e

    def sample(self) -> Tuple[int, float]:
        return self.done, _now()

    def finish(self) -> None:
        self.stop.set()
        self.join()
        if self.error is not None:
            raise self.error


def _rate(a: Tuple[int, float], b: Tuple[int, float]) -> Optional[float]:
    writes, secs = b[0] - a[0], b[1] - a[1]
    return writes / secs if writes > 0 and secs > 0 else None


def _under_writer(writer: Any, idle_window: float, action: Callable[[], Any]) -> Dict[str, Any]:
    """Run `action` while `writer` keeps writing; rates before and during."""
    writer.start()
    try:
        time.sleep(min(0.3, idle_window / 3))
        s0 = writer.sample()
        time.sleep(idle_window)
        s1 = writer.sample()
        out = action()
        s2 = writer.sample()
    finally:
        writer.finish()
    idle, during = _rate(s0, s1), _rate(s1, s2)
    return {"result": out, "writes_per_s_idle": idle, "writes_per_s_during": during,
            "seconds": s2[1] - s1[1],
            "writer_slowdown": idle / during if idle and during else None}


# ---- Redis, spoken to in RESP over a plain socket (no client library needed) -------------------

class RedisError(RuntimeError):
    pass


def _resp(*args: Any) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, int):
            a = b"%d" % a
        n = a.nbytes if isinstance(a, memoryview) else len(a)
        out += [b"$%d\r\n" % n, a, b"\r\n"]
    return b"".join(out)


def _read_reply(f: Any) -> Any:
    line = f.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RedisError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else f.read(n + 2)[:-2]
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read_reply(f) for _ in range(n)]
    raise RedisError(f"unexpected reply {line[:60]!r}")


class _Conn:
    def __init__(self, port: int, timeout: float = 60.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile = self.sock.makefile("rb", buffering=1 << 20)

    def call(self, *args: Any) -> Any:
        self.sock.sendall(_resp(*args))
        return _read_reply(self.rfile)

    def pipeline(self, blob: bytes, n: int, reply: bytes) -> None:
        """Send n commands at once; each must answer exactly `reply`."""
        self.sock.sendall(blob)
        got = self.rfile.read(len(reply) * n)
        if got != reply * n:
            bad = next((got[i:i + 80] for i in range(0, len(got), len(reply))
                        if got[i:i + len(reply)] != reply), got[:80])
            raise RedisError(f"unexpected pipelined reply {bad!r}")

    def info(self, section: str) -> Dict[str, str]:
        text = self.call("INFO", section).decode()
        return dict(line.split(":", 1) for line in text.splitlines()
                    if ":" in line and not line.startswith("#"))

    def close(self) -> None:
        for c in (self.rfile, self.sock):
            try:
                c.close()
            except OSError:
                pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Redis:
    """A private redis-server on 127.0.0.1 with persistence off except explicit BGSAVE."""

    def __init__(self, binary: str, directory: str) -> None:
        self.binary, self.dir = binary, directory
        self.proc: Optional[subprocess.Popen] = None
        self.port = 0
        self.conn: Optional[_Conn] = None

    def start(self, timeout: float) -> float:
        """Start (loading dump.rdb if present); seconds until PING answers and loading:0."""
        for attempt in range(3):
            self.port = _free_port()
            args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                    "--protected-mode", "yes", "--save", "", "--appendonly", "no",
                    "--dir", self.dir, "--dbfilename", "dump.rdb", "--daemonize", "no",
                    "--hz", "100", "--logfile", os.path.join(self.dir, "redis.log")]
            t0 = _now()
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                self._wait_ready(t0 + timeout)
                return _now() - t0
            except _Exited:
                if attempt == 2:
                    raise RuntimeError(f"redis-server exited: {self._log_tail()}") from None
        raise AssertionError("unreachable")

    def _wait_ready(self, deadline: float) -> None:
        assert self.proc is not None
        while True:
            if self.proc.poll() is not None:
                raise _Exited()
            try:
                if self.conn is None:
                    self.conn = _Conn(self.port)
                if self.conn.call("PING") == "PONG" and \
                        self.conn.info("persistence").get("loading") == "0":
                    return
            except RedisError as e:
                if not str(e).startswith("LOADING"):
                    raise
            except OSError:
                if self.conn is not None:
                    self.conn.close()
                    self.conn = None
            if _now() > deadline:
                raise TimeoutError("redis-server did not become ready in time")
            time.sleep(0.002)

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self.dir, "redis.log")) as f:
                return " | ".join(f.read().strip().splitlines()[-3:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SHUTDOWN NOSAVE, or kill; idempotent."""
        if self.conn is not None:
            try:
                self.conn.call("SHUTDOWN", "NOSAVE")
            except (OSError, RedisError):
                pass
            self.conn.close()
            self.conn = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


class _Exited(Exception):
    pass


def _redis_key(p: int) -> bytes:
    return b"p:%08d" % p


class _RedisWriter(threading.Thread):
    """Random 8-byte SETRANGE writes into the 4 KiB values, pipelined in batches."""

    def __init__(self, port: int, n_pages: int, batch: int = 2048, batches: int = 64) -> None:
        super().__init__(name="statecore-bench-redis-writer", daemon=True)
        rng = np.random.default_rng(SEED + 2)
        keys = rng.integers(0, n_pages, size=batch * batches)
        offs = rng.integers(0, PAGE // 8, size=batch * batches) * 8
        self.blobs = []
        for b in range(batches):
            parts = []
            for k, o in zip(keys[b * batch:(b + 1) * batch], offs[b * batch:(b + 1) * batch]):
                o_s = b"%d" % o
                parts.append(b"*4\r\n$8\r\nSETRANGE\r\n$10\r\n%s\r\n$%d\r\n%s\r\n$8\r\nABCDEFGH\r\n"
                             % (_redis_key(int(k)), len(o_s), o_s))
            self.blobs.append(b"".join(parts))
        self.batch = batch
        self.reply = b":%d\r\n" % PAGE
        self.port = port
        self.done = 0
        self.stop = threading.Event()
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        conn = None
        try:
            conn = _Conn(self.port)
            i = 0
            while not self.stop.is_set():
                conn.pipeline(self.blobs[i % len(self.blobs)], self.batch, self.reply)
                self.done += self.batch
                i += 1
        except BaseException as e:
            self.error = e
        finally:
            if conn is not None:
                conn.close()

    sample = _Writer.sample
    finish = _Writer.finish


# ---- the run -----------------------------------------------------------------------------------

class _Run:
    def __init__(self, size: int, tmp: str, enabled: Dict[str, str], writes: int,
                 redis_writer: bool) -> None:
        self.size = size
        self.redis_writer = redis_writer
        self.n_pages = size // PAGE
        self.tmp = tmp
        self.enabled = enabled        # peer -> version, "not installed" or "disabled"
        self.writes = writes
        self.errors: List[str] = []
        self.res: Dict[str, Dict[str, Any]] = {"snapshot": {}, "backup": {}, "recovery": {},
                                               "incremental": {}}
        self.batches = _write_batches(size // 8, writes, BATCH)
        self.thread_batches = _write_batches(size // 8, writes, THREAD_BATCH)
        self.redis: Optional[_Redis] = None
        self.idle_window = 1.0 if size >= 256 * MiB else 0.3

    def on(self, peer: str) -> bool:
        v = self.enabled.get(peer, "")
        return bool(v) and not v.startswith(("not installed", "disabled"))

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except Exception as e:
            log.exception("statecore bench: %s failed", what)
            self.errors.append(f"{what}: {type(e).__name__}: {e}")
        finally:
            _collect()

    def path(self, *parts: str) -> str:
        return os.path.join(self.tmp, *parts)

    # ---- 1. snapshot pause and writer slowdown ------------------------------------------------
    def section_snapshot(self) -> None:
        out = self.res["snapshot"]
        idx_all = np.concatenate([i for i, _ in self.batches])
        out["writes"] = self.writes
        out["pages_touched"] = int(np.unique((idx_all * 8) // PAGE).size)
        del idx_all
        with self.guard("snapshot/statecore"):
            log.info("statecore bench: [1] statecore snapshot pause and writer slowdown")
            out["statecore"] = self._snapshot_statecore()
        if self.on("fork"):
            with self.guard("snapshot/fork"):
                log.info("statecore bench: [1] fork() pause and writer slowdown")
                out["fork"] = self._snapshot_fork()

    def _snapshot_statecore(self) -> Dict[str, Any]:
        r: Dict[str, Any] = {}
        store = Store(size=self.size)
        try:
            _fill(store.write, self.size)
            arr = store.array("int64")
            pauses = []
            for _ in range(51):
                t0 = _now()
                snap = store.snapshot()
                pauses.append(_now() - t0)
                snap.release()
            r["pause_s"], r["pause_min_s"] = _median(pauses), min(pauses)
            r["writes_s"] = min(_run_writes(arr, self.batches) for _ in range(3))
            live, growth, preserved = [], [], []
            for _ in range(3):
                _collect()
                rss0 = _rss()
                snap = store.snapshot()
                try:
                    live.append(_run_writes(arr, self.batches))
                    growth.append(_rss() - rss0)
                    preserved.append(store.stats()["preserved_bytes"])
                finally:
                    snap.release()
            # The first round also grows the store's pool of preserved pages (fresh memory);
            # later rounds reuse it, as a service taking snapshots repeatedly does.
            r["writes_live_rounds_s"] = live
            r["writes_live_first_s"] = live[0]
            r["writes_live_snapshot_s"] = _median(live)
            r["writer_slowdown"] = r["writes_live_snapshot_s"] / r["writes_s"]
            r["memory_growth_bytes"] = max(growth)
            r["preserved_bytes"] = max(preserved)
            del arr
        finally:
            store.close()
        return r

    def _snapshot_fork(self) -> Dict[str, Any]:
        r: Dict[str, Any] = {}
        a = np.empty(self.size, dtype=np.uint8)

        def put(off: int, data: np.ndarray) -> None:
            a[off:off + data.nbytes] = data
        _fill(put, self.size)
        a64 = a.view(np.int64)
        try:
            ret, full = [], []
            for _ in range(7):
                t0 = _now()
                pid = _fork_quietly()
                if pid == 0:
                    os._exit(0)
                t1 = _now()
                os.waitpid(pid, 0)
                ret.append(t1 - t0)
                full.append(_now() - t0)
            r["pause_s"], r["pause_min_s"] = _median(ret), min(ret)
            r["fork_exit_wait_s"] = _median(full)
            r["writes_s"] = min(_run_writes(a64, self.batches) for _ in range(3))
            live, growth = [], []
            for _ in range(3):
                _collect()
                pss_before = _pss(os.getpid())
                rfd, wfd = os.pipe()
                pid = _fork_quietly()
                if pid == 0:  # the child holds the old state until the parent says go
                    try:
                        os.close(wfd)
                        os.read(rfd, 1)
                    finally:
                        os._exit(0)
                os.close(rfd)
                try:
                    live.append(_run_writes(a64, self.batches))
                    growth.append(_pss(os.getpid()) + _pss(pid) - pss_before)
                finally:
                    os.close(wfd)
                    os.waitpid(pid, 0)
            r["writes_live_rounds_s"] = live
            r["writes_live_first_s"] = live[0]
            r["writes_live_child_s"] = _median(live)
            r["writer_slowdown"] = r["writes_live_child_s"] / r["writes_s"]
            r["memory_growth_bytes"] = max(growth)
            r["memory_measure"] = "PSS parent + child"
        finally:
            del a64, a
        _collect()
        r["pause_small_pages_s"] = self._fork_pause_small_pages()
        return r

    def _fork_pause_small_pages(self) -> Optional[float]:
        """fork() latency when the state is in 4 KiB pages (numpy and statecore ask for
        transparent huge pages; Redis turns them off): page tables are 512x larger."""
        core = getattr(np, "_core", None) or getattr(np, "core", None)
        setter = getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)
        if setter is None:
            return None
        old = setter(False)
        try:
            a = np.empty(self.size, dtype=np.uint8)
        finally:
            setter(old)
        try:
            def put(off: int, data: np.ndarray) -> None:
                a[off:off + data.nbytes] = data
            _fill(put, self.size)
            ret = []
            for _ in range(5):
                t0 = _now()
                pid = _fork_quietly()
                if pid == 0:
                    os._exit(0)
                ret.append(_now() - t0)
                os.waitpid(pid, 0)
            return _median(ret)
        finally:
            del a

    # ---- 2. backup time and memory --------------------------------------------------------------
    def section_backup(self) -> None:
        out = self.res["backup"]
        store = Store(size=self.size)
        try:
            _fill(store.write, self.size)
            with self.guard("backup/statecore"):
                log.info("statecore bench: [2] statecore snap.save")
                snap = store.snapshot()
                try:
                    t0 = _now()
                    nbytes = snap.save(self.path("state.ckpt"))
                    secs = _now() - t0
                finally:
                    snap.release()
                out["statecore"] = {"save_s": secs, "file_bytes": nbytes}
            if self.on("numpy"):
                with self.guard("backup/numpy"):
                    log.info("statecore bench: [2] np.save")
                    out["numpy"] = self._backup_numpy(store)
            if self.on("lmdb"):
                with self.guard("backup/lmdb"):
                    log.info("statecore bench: [2] LMDB load and env.copy")
                    out["lmdb"] = self._backup_lmdb(store)
            if self.on("redis"):
                with self.guard("backup/redis"):
                    log.info("statecore bench: [2] Redis load and BGSAVE")
                    out["redis"] = self._backup_redis(store)
            with self.guard("backup/statecore under writes"):
                log.info("statecore bench: [2] statecore snap.save under a writer")
                out.setdefault("statecore", {}).update(self._save_under_writer(store))
        finally:
            _collect()
            store.close()

    def _backup_numpy(self, store: Store) -> Dict[str, Any]:
        path = self.path("state.npy")
        view = np.asarray(store)
        try:
            t0 = _now()
            with open(path, "wb") as f:
                np.save(f, view, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            secs = _now() - t0
        finally:
            del view
        return {"save_s": secs, "file_bytes": os.path.getsize(path),
                "note": "blocking: writers must pause for a consistent dump"}

    def _backup_lmdb(self, store: Store) -> Dict[str, Any]:
        import lmdb
        src, dst = self.path("lmdb"), self.path("lmdb-copy")
        os.makedirs(dst)
        env = lmdb.open(src, map_size=4 * self.size + 256 * MiB, subdir=True, max_dbs=0)
        try:
            view = memoryview(store)
            try:
                t0 = _now()
                per_txn = 16384
                for start in range(0, self.n_pages, per_txn):
                    stop = min(start + per_txn, self.n_pages)
                    with env.begin(write=True) as txn:
                        txn.cursor().putmulti(
                            ((p.to_bytes(8, "big"), view[p * PAGE:(p + 1) * PAGE])
                             for p in range(start, stop)), append=True)
                load_s = _now() - t0
            finally:
                view.release()
            entries = env.stat()["entries"]
            if entries != self.n_pages:
                raise RuntimeError(f"LMDB holds {entries} values, expected {self.n_pages}")
            t0 = _now()
            env.copy(dst)
            _fsync_path(os.path.join(dst, "data.mdb"))  # copy may not fsync; count it anyway
            copy_s = _now() - t0
        finally:
            env.close()
        return {"load_s": load_s, "copy_s": copy_s,
                "env_file": _file_bytes(os.path.join(src, "data.mdb")),
                "file_bytes": os.path.getsize(os.path.join(dst, "data.mdb"))}

    def _backup_redis(self, store: Store) -> Dict[str, Any]:
        r: Dict[str, Any] = {}
        rdir = self.path("redis")
        os.makedirs(rdir)
        self.redis = redis = _Redis(self.enabled["redis_binary"], rdir)
        redis.start(timeout=60)
        conn = redis.conn
        assert conn is not None
        view = memoryview(store)
        try:
            t0 = _now()
            per = 1024
            for start in range(0, self.n_pages, per):
                stop = min(start + per, self.n_pages)
                blob = b"".join(_resp("SET", _redis_key(p), view[p * PAGE:(p + 1) * PAGE])
                                for p in range(start, stop))
                conn.pipeline(blob, stop - start, b"+OK\r\n")
            r["load_s"] = _now() - t0
        finally:
            view.release()
        if conn.call("DBSIZE") != self.n_pages:
            raise RuntimeError("Redis DBSIZE does not match the pages loaded")
        mem = conn.info("memory")
        r["used_memory"] = int(mem["used_memory"])
        r["used_memory_rss"] = int(mem["used_memory_rss"])
        r.update(self._bgsave(conn))
        if self.redis_writer:
            loaded = _under_writer(_RedisWriter(redis.port, self.n_pages), self.idle_window,
                                   lambda: self._bgsave(conn))
            res = loaded.pop("result")
            r["under_writes"] = dict(loaded, bgsave_s=res["bgsave_s"], fork_s=res["fork_s"],
                                     cow_bytes=res["cow_bytes"])
        r["file_bytes"] = os.path.getsize(os.path.join(rdir, "dump.rdb"))
        return r

    def _bgsave(self, conn: _Conn) -> Dict[str, Any]:
        deadline = _now() + max(120.0, self.size / (20 * MiB))
        t0 = _now()
        reply = conn.call("BGSAVE")
        if "started" not in reply:
            raise RedisError(f"BGSAVE: {reply}")
        while True:
            p = conn.info("persistence")
            if p.get("rdb_bgsave_in_progress") == "0":
                break
            if _now() > deadline:
                raise TimeoutError("BGSAVE did not finish in time")
            time.sleep(0.003)
        secs = _now() - t0
        if p.get("rdb_last_bgsave_status") != "ok":
            raise RedisError(f"BGSAVE failed: {p.get('rdb_last_bgsave_status')}")
        fork_us = int(conn.info("stats")["latest_fork_usec"])
        return {"bgsave_s": secs, "fork_s": fork_us / 1e6,
                "cow_bytes": int(p.get("rdb_last_cow_size", 0))}

    def _save_under_writer(self, store: Store) -> Dict[str, Any]:
        arr = store.array("int64")
        path = self.path("state-under-writes.ckpt")
        box: Dict[str, Any] = {}

        def action() -> None:
            snap = store.snapshot()
            try:
                t0 = _now()
                snap.save(path)
                box["save_s"] = _now() - t0
                box["preserved_bytes"] = store.stats()["preserved_bytes"]
            finally:
                snap.release()
        try:
            r = _under_writer(_Writer(arr, self.thread_batches), self.idle_window, action)
        finally:
            del arr
            if os.path.exists(path):
                os.unlink(path)
        r.pop("result")
        return {"under_writes": dict(r, **box)}

    # ---- 3. recovery --------------------------------------------------------------------------
    def section_recovery(self) -> Optional[Store]:
        out = self.res["recovery"]
        if self.redis is not None:
            with self.guard("recovery/redis"):
                log.info("statecore bench: [3] Redis restart from RDB")
                out["redis"] = self._recover_redis()
        if self.on("lmdb") and os.path.exists(self.path("lmdb-copy", "data.mdb")):
            with self.guard("recovery/lmdb"):
                log.info("statecore bench: [3] LMDB reopen and read every value")
                out["lmdb"] = self._recover_lmdb()
        if self.on("numpy") and os.path.exists(self.path("state.npy")):
            with self.guard("recovery/numpy"):
                log.info("statecore bench: [3] np.load")
                out["numpy"] = self._recover_numpy()
        primary = None
        if os.path.exists(self.path("state.ckpt")):
            with self.guard("recovery/statecore"):
                log.info("statecore bench: [3] Store.load")
                _warm(self.path("state.ckpt"))
                t0 = _now()
                primary = Store.load(self.path("state.ckpt"))
                out["statecore"] = {"load_s": _now() - t0,
                                    "file_bytes": os.path.getsize(self.path("state.ckpt"))}
                for f in ("state.ckpt", "state.npy"):  # no longer needed: free the disk
                    if os.path.exists(self.path(f)):
                        os.unlink(self.path(f))
        if primary is not None:
            with self.guard("recovery/durable"):
                log.info("statecore bench: [3] DurableStore reopen (checkpoint + journal)")
                out.setdefault("statecore", {}).update(self._recover_durable(primary))
        return primary

    def _recover_redis(self) -> Dict[str, Any]:
        redis = self.redis
        assert redis is not None
        try:
            redis.stop()
            _warm(os.path.join(redis.dir, "dump.rdb"))
            secs = redis.start(timeout=max(120.0, self.size / (20 * MiB)))
            assert redis.conn is not None
            keys = redis.conn.call("DBSIZE")
            if keys != self.n_pages:
                raise RuntimeError(f"Redis restarted with {keys} keys, expected {self.n_pages}")
            mem = redis.conn.info("memory")
            return {"restart_s": secs, "keys": keys, "used_memory_rss": int(mem["used_memory_rss"])}
        finally:
            redis.stop()
            self.redis = None
            shutil.rmtree(redis.dir, ignore_errors=True)

    def _recover_lmdb(self) -> Dict[str, Any]:
        import lmdb
        path = self.path("lmdb-copy")
        shutil.rmtree(self.path("lmdb"), ignore_errors=True)
        _warm(path)
        t0 = _now()
        env = lmdb.open(path, readonly=True, lock=False, subdir=True)
        try:
            dst = np.empty(self.size, dtype=np.uint8)
            mv = memoryview(dst)
            n = 0
            with env.begin(buffers=True) as txn:
                for k, v in txn.cursor():
                    p = int.from_bytes(k, "big")
                    mv[p * PAGE:(p + 1) * PAGE] = v
                    n += 1
            secs = _now() - t0
            mv.release()
            del dst
        finally:
            env.close()
            shutil.rmtree(path, ignore_errors=True)
        if n != self.n_pages:
            raise RuntimeError(f"read {n} LMDB values, expected {self.n_pages}")
        return {"reopen_read_s": secs}

    def _recover_numpy(self) -> Dict[str, Any]:
        path = self.path("state.npy")
        _warm(path)
        t0 = _now()
        x = np.load(path)
        secs = _now() - t0
        ok = x.nbytes == self.size
        del x
        if not ok:
            raise RuntimeError("np.load returned the wrong size")
        return {"load_s": secs}

    def _recover_durable(self, primary: Store) -> Dict[str, Any]:
        d = self.path("durable")
        rng = np.random.default_rng(SEED + 3)
        k = max(1, int(self.n_pages * CHANGE_FRACTION))
        ds = DurableStore(d, size=self.size, keep_checkpoints=1)
        try:
            view = np.asarray(primary)
            try:
                ds.write(0, view)
            finally:
                del view
            ds.checkpoint().result()
            for _ in range(JOURNAL_COMMITS):
                ids = np.sort(rng.choice(self.n_pages, size=k, replace=False)).astype(np.uint64)
                ds.write_pages(ids, np.random.PCG64(int(rng.integers(1 << 30))).random_raw(
                    k * PAGE // 8))
                ds.commit()
        finally:
            ds.close()
        _collect()
        _warm(d)
        t0 = _now()
        ds = DurableStore(d)
        secs = _now() - t0
        rep = ds.recovery
        ds.close()
        shutil.rmtree(d, ignore_errors=True)
        if rep.deltas_replayed < JOURNAL_COMMITS:
            raise RuntimeError(f"reopen replayed {rep.deltas_replayed} deltas, expected "
                               f">= {JOURNAL_COMMITS}")
        return {"durable_reopen_s": secs, "durable_checkpoint_bytes": rep.checkpoint_bytes,
                "durable_journal_bytes": rep.journal_bytes,
                "durable_deltas_replayed": rep.deltas_replayed,
                "durable_pages_replayed": rep.pages_replayed}

    # ---- 4. incremental transfer --------------------------------------------------------------
    def section_incremental(self, primary: Optional[Store]) -> None:
        out = self.res["incremental"]
        with self.guard("incremental/statecore"):
            log.info("statecore bench: [4] delta + apply vs full copy")
            if primary is None:
                primary = Store(size=self.size)
                _fill(primary.write, self.size)
            out["statecore"] = self._incremental(primary)
        if primary is not None and self.on("numpy"):
            with self.guard("incremental/full copy"):
                out["full_copy"] = self._full_copy(primary)
        if primary is not None:
            _collect()
            primary.close()

    def _incremental(self, primary: Store) -> Dict[str, Any]:
        r: Dict[str, Any] = {}
        rng = np.random.default_rng(SEED + 4)
        k = max(1, int(self.n_pages * CHANGE_FRACTION))
        base = primary.snapshot()
        replica = Store(size=self.size)
        try:
            t0 = _now()
            full = primary.delta(0, base)
            enc = full.encode()
            r["full_sync_bytes"] = memoryview(enc).nbytes
            replica.apply(enc)
            r["full_sync_s"] = _now() - t0
            del enc, full
            _collect()
            times, sizes, pages = [], [], []
            for _ in range(3):
                ids = np.sort(rng.choice(self.n_pages, size=k, replace=False)).astype(np.uint64)
                primary.write_pages(ids, np.random.PCG64(int(rng.integers(1 << 30))).random_raw(
                    k * PAGE // 8))
                t0 = _now()
                nxt = primary.snapshot()
                d = primary.delta(base, nxt)
                enc = d.encode()
                replica.apply(enc)
                times.append(_now() - t0)
                sizes.append(memoryview(enc).nbytes)
                pages.append(d.n_pages)
                del enc, d
                base.release()
                base = nxt
            a, b = np.asarray(primary), np.asarray(replica)
            try:
                r["replica_equal"] = bool(np.array_equal(a, b))
            finally:
                del a, b
            if not r["replica_equal"]:
                raise RuntimeError("replica differs from the primary after applying deltas")
            r["pages_changed"] = k
            r["delta_pages"] = int(_median(pages))
            r["delta_bytes"] = int(_median(sizes))
            r["delta_apply_s"] = _median(times)
            r["delta_apply_min_s"] = min(times)
        finally:
            base.release()
            _collect()
            replica.close()
        return r

    def _full_copy(self, primary: Store) -> Dict[str, Any]:
        dst = np.empty(self.size, dtype=np.uint8)
        dst.fill(1)  # touched: page faults are not what is measured
        src = np.asarray(primary)
        try:
            times = []
            for _ in range(3):
                t0 = _now()
                np.copyto(dst, src)
                times.append(_now() - t0)
        finally:
            del src, dst
        return {"copy_s": min(times), "bytes": self.size}


# ---- rows, table, chart --------------------------------------------------------------------

def _get(d: Dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _rows(run: _Run) -> List[Dict[str, Any]]:
    R = run.res
    rows: List[Dict[str, Any]] = []

    def row(section: str, measure: str, unit: str, sc_val: Any, peer: str, peer_label: str,
            peer_val: Any) -> None:
        state = run.enabled.get(peer_label.split()[0], "")
        ratio = None
        if isinstance(sc_val, (int, float)) and isinstance(peer_val, (int, float)) \
                and sc_val > 0 and peer_val > 0:
            ratio = peer_val / sc_val
        if ratio is None:
            better = "-"
        elif ratio >= 1.1:
            better = "statecore"
        elif ratio <= 1 / 1.1:
            better = SHORT.get(peer_label, peer_label)
        else:
            better = "tie"
        missing = None
        if peer_val is None:
            missing = state if state.startswith(("not installed", "disabled")) else "error"
        rows.append({"section": section, "measure": measure, "unit": unit,
                     "statecore": sc_val, "peer": peer, "peer_value": peer_val,
                     "peer_missing": missing, "ratio": ratio, "better": better})

    S, F = _get(R, "snapshot", "statecore") or {}, _get(R, "snapshot", "fork") or {}
    w = f"{run.writes / 1e6:g}M random 8-B writes"
    row("1 snapshot", "pause to take a snapshot", "s", S.get("pause_s"),
        "fork() (return in parent)", "fork", F.get("pause_s"))
    row("1 snapshot", "pause to take a snapshot", "s", S.get("pause_s"),
        "fork(), 4 KiB pages (THP off)", "fork", F.get("pause_small_pages_s"))
    row("1 snapshot", "pause incl. child exit + reap", "s", S.get("pause_s"),
        "fork()+_exit+waitpid", "fork", F.get("fork_exit_wait_s"))
    row("1 snapshot", f"{w}, snapshot/child live (median of 3)", "s",
        S.get("writes_live_snapshot_s"), "fork() child alive", "fork",
        F.get("writes_live_child_s"))
    row("1 snapshot", f"{w}, first snapshot/fork of the process", "s",
        S.get("writes_live_first_s"), "fork() child alive", "fork",
        F.get("writes_live_first_s"))
    row("1 snapshot", "writer slowdown (live ÷ none)", "x", S.get("writer_slowdown"),
        "fork() child alive", "fork", F.get("writer_slowdown"))
    row("1 snapshot", "memory growth during those writes", "B", S.get("memory_growth_bytes"),
        "fork() (PSS parent+child)", "fork", F.get("memory_growth_bytes"))

    B = R["backup"]
    sb = B.get("statecore") or {}
    row("2 backup", "backup time, idle (snap.save)", "s", sb.get("save_s"),
        "LMDB env.copy", "lmdb", _get(B, "lmdb", "copy_s"))
    row("2 backup", "backup time, idle (snap.save)", "s", sb.get("save_s"),
        "Redis BGSAVE", "redis", _get(B, "redis", "bgsave_s"))
    row("2 backup", "backup time, idle (snap.save)", "s", sb.get("save_s"),
        "np.save (blocks writers)", "numpy", _get(B, "numpy", "save_s"))
    if run.redis_writer:  # statecore's own figures under a writer are in the notes
        row("2 backup", "backup time under a writer", "s", _get(sb, "under_writes", "save_s"),
            "Redis BGSAVE + SETRANGE writer", "redis",
            _get(B, "redis", "under_writes", "bgsave_s"))
        row("2 backup", "writer slowdown during backup", "x",
            _get(sb, "under_writes", "writer_slowdown"),
            "Redis BGSAVE + SETRANGE writer", "redis",
            _get(B, "redis", "under_writes", "writer_slowdown"))
        sc_during = _get(sb, "under_writes", "writes_per_s_during")
        rd_during = _get(B, "redis", "under_writes", "writes_per_s_during")
        row("2 backup", "time per 1M 8-B writes during backup", "s",
            1e6 / sc_during if sc_during else None,
            "Redis SETRANGE (pipelined client)", "redis",
            1e6 / rd_during if rd_during else None)
    row("2 backup", "pause to start the backup", "s", S.get("pause_s"),
        "Redis fork (latest_fork_usec)", "redis", _get(B, "redis", "fork_s"))
    for peer, label, key in (("LMDB copy", "lmdb", "lmdb"), ("Redis RDB", "redis", "redis"),
                             ("np.save .npy", "numpy", "numpy")):
        row("2 backup", "backup file size", "B", sb.get("file_bytes"), peer, label,
            _get(B, key, "file_bytes"))

    C = R["recovery"]
    sr = C.get("statecore") or {}
    for peer, label, val in (
            ("Redis restart from RDB", "redis", _get(C, "redis", "restart_s")),
            ("LMDB reopen + read all", "lmdb", _get(C, "lmdb", "reopen_read_s")),
            ("np.load full dump", "numpy", _get(C, "numpy", "load_s"))):
        row("3 recovery", "restore full state (Store.load)", "s", sr.get("load_s"), peer,
            label, val)
    row("3 recovery", f"DurableStore reopen (ckpt + {JOURNAL_COMMITS} commits)", "s",
        sr.get("durable_reopen_s"), "Redis restart from RDB", "redis",
        _get(C, "redis", "restart_s"))

    I = R["incremental"]
    si, fc = I.get("statecore") or {}, I.get("full_copy") or {}
    pct = f"{CHANGE_FRACTION * 100:g}%"
    row("4 incremental", f"bytes to update a replica ({pct} changed)", "B",
        si.get("delta_bytes"), "full copy", "numpy", fc.get("bytes"))
    row("4 incremental", f"seconds to update a replica ({pct} changed)", "s",
        si.get("delta_apply_s"), "full copy (np.copyto)", "numpy", fc.get("copy_s"))
    row("4 incremental", "fresh replica: delta(0)+apply vs copy", "s",
        si.get("full_sync_s"), "full copy (np.copyto)", "numpy", fc.get("copy_s"))
    return rows


def _fmt(v: Any, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "s":
        if v < 1e-3:
            return f"{v * 1e6:.1f} µs"
        return f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.2f} s"
    if unit == "B":
        return human_bytes(v)
    if unit == "x":
        return f"{v:.2f}x"
    return str(v)


def _fmt_ratio(r: Optional[float]) -> str:
    if r is None:
        return "-"
    return f"{r:,.0f}x" if r >= 100 else (f"{r:.1f}x" if r >= 10 else f"{r:.2f}x")


def format_table(result: Dict[str, Any]) -> str:
    lines = [
        f"## statecore vs peers: {human_bytes(result['size'])} as {result['n_pages']:,} "
        f"pages/values of {PAGE} B",
        "",
        f"Machine: {result['machine']['cpus']} CPUs, THP {result['machine']['thp']}, load "
        f"{result['machine']['load_before']} -> {result['machine']['load_after']}. Peers: "
        + ", ".join(f"{k}: {v}" for k, v in result["peers"].items()) + ". "
        f"Run took {result['seconds']:.0f} s; peak RSS of this process "
        f"{human_bytes(result['peak_rss'])}.",
        "",
        "Ratio = peer ÷ statecore; every figure is lower-is-better, so > 1 means statecore "
        "is better.",
        "",
        "| section | measure | statecore | peer | peer figure | ratio | better |",
        "| --- | --- | ---: | --- | ---: | ---: | --- |",
    ]
    for r in result["rows"]:
        peer_fig = _fmt(r["peer_value"], r["unit"]) if r["peer_value"] is not None \
            else (r["peer_missing"] or "-")
        lines.append(f"| {r['section']} | {r['measure']} | {_fmt(r['statecore'], r['unit'])} | "
                     f"{r['peer']} | {peer_fig} | {_fmt_ratio(r['ratio'])} | {r['better']} |")
    notes = _notes(result)
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    if result["errors"]:
        lines += ["", "Errors:", *[f"- {e}" for e in result["errors"]]]
    return "\n".join(lines)


def _notes(result: Dict[str, Any]) -> List[str]:
    n: List[str] = []
    s = result["snapshot"]
    sc1 = s.get("statecore") or {}
    if sc1:
        n.append(f"[1] {s['writes']:,} writes touched {s['pages_touched']:,} pages; statecore "
                 f"preserved {human_bytes(sc1['preserved_bytes'])}, writes took "
                 f"{_fmt(sc1['writes_s'], 's')} without a snapshot; with a live snapshot "
                 f"rounds took " + ", ".join(_fmt(x, "s") for x in sc1["writes_live_rounds_s"])
                 + " (the first also grows the store's pool of preserved pages).")
    fk = s.get("fork") or {}
    if fk:
        n.append(f"[1] fork: the same writes took {_fmt(fk['writes_s'], 's')} with no child; "
                 f"with a child alive " + ", ".join(_fmt(x, "s") for x in fk["writes_live_rounds_s"])
                 + ".")
    b = result["backup"]
    uw = _get(b, "statecore", "under_writes") or {}
    if uw:
        n.append(f"[2] statecore snap.save under a writer (StateArray, 8-B random writes in "
                 f"batches of {THREAD_BATCH}): {_fmt(uw.get('save_s'), 's')}, preserved "
                 f"{human_bytes(uw.get('preserved_bytes') or 0)}; writer "
                 f"{(uw.get('writes_per_s_idle') or 0) / 1e6:.1f}M -> "
                 f"{(uw.get('writes_per_s_during') or 0) / 1e6:.1f}M writes/s during the save "
                 f"(first pass in a new store: every page touched is preserved once, into a "
                 f"pool that grows from fresh memory).")
    rd = b.get("redis") or {}
    if rd:
        n.append(f"[2] Redis: load {_fmt(rd['load_s'], 's')}, used_memory "
                 f"{human_bytes(rd['used_memory'])} (RSS {human_bytes(rd['used_memory_rss'])}); "
                 f"idle BGSAVE COW {human_bytes(rd['cow_bytes'])}; Redis defaults "
                 f"(rdbcompression, rdbchecksum, rdb-save-incremental-fsync: fsync every 4 MiB).")
        ru = rd.get("under_writes") or {}
        if ru:
            n.append(f"[2] Redis BGSAVE under a pipelined SETRANGE writer: COW "
                     f"{human_bytes(ru.get('cow_bytes') or 0)}, fork "
                     f"{_fmt(ru.get('fork_s'), 's')}, "
                     f"{(ru.get('writes_per_s_idle') or 0) / 1e3:.0f}K -> "
                     f"{(ru.get('writes_per_s_during') or 0) / 1e3:.0f}K SETRANGE/s. The writer "
                     f"is a Python client, bound by itself and the server's command "
                     f"processing, so its slowdown says little about fork/COW cost.")
    lm = b.get("lmdb") or {}
    if lm:
        n.append(f"[2] LMDB: load {_fmt(lm['load_s'], 's')}; env file "
                 f"{human_bytes(lm['env_file']['apparent'])} for {human_bytes(result['size'])} "
                 f"of values (a 4 KiB value needs 2 overflow pages); env.copy writes with "
                 f"O_DIRECT, snap.save and np.save through the page cache + fsync.")
    r = result["recovery"].get("statecore") or {}
    if "durable_reopen_s" in r:
        n.append(f"[3] DurableStore reopen replayed {r['durable_deltas_replayed']} deltas "
                 f"({human_bytes(r['durable_journal_bytes'])} journal) after a "
                 f"{human_bytes(r['durable_checkpoint_bytes'])} checkpoint.")
    i = result["incremental"].get("statecore") or {}
    if i:
        n.append(f"[4] {i['pages_changed']:,} pages changed per round; replica verified equal: "
                 f"{i['replica_equal']}; fresh replica full sync moved "
                 f"{human_bytes(i['full_sync_bytes'])}.")
    return n


def write_chart(result: Dict[str, Any], path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("statecore bench: matplotlib not installed; no chart written")
        return False
    rows = [r for r in result["rows"] if r["ratio"]]
    if not rows:
        return False
    labels = [f"{r['section'][0]}. {r['measure']}\nvs {r['peer']}" for r in rows]
    ratios = [r["ratio"] for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(rows) + 1.5))
    y = np.arange(len(rows))[::-1]
    colors = {"statecore": "tab:green", "tie": "tab:gray"}
    ax.barh(y, [v - 1 for v in ratios], left=1,
            color=[colors.get(r["better"], "tab:red") for r in rows])
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    for yy, v in zip(y, ratios):
        ax.text(v, yy, f" {_fmt_ratio(v)} " if v >= 1 else f"{_fmt_ratio(v)} ",
                va="center", ha="left" if v >= 1 else "right", fontsize=7)
    ax.set_xlabel("peer ÷ statecore (log; > 1: statecore better)")
    ax.set_title(f"statecore vs peers, {human_bytes(result['size'])} of {PAGE} B pages")
    lo, hi = min(ratios + [1.0]), max(ratios + [1.0])
    ax.set_xlim(lo / 8, hi * 8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---- entry point -----------------------------------------------------------------------------

def _peers(skip: Sequence[str]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    bad = set(skip) - set(PEERS)
    if bad:
        raise ValueError(f"skip must name peers among {PEERS}, got {sorted(bad)}")
    out["fork"] = "disabled" if "fork" in skip else "os.fork"
    out["numpy"] = "disabled" if "numpy" in skip else f"numpy {np.__version__}"
    if "lmdb" in skip:
        out["lmdb"] = "disabled"
    else:
        try:
            import lmdb
            out["lmdb"] = f"py-lmdb {lmdb.__version__} (LMDB {'.'.join(map(str, lmdb.version()))})"
        except ImportError:
            out["lmdb"] = "not installed"
    if "redis" in skip:
        out["redis"] = "disabled"
    else:
        binary = os.environ.get("STATECORE_REDIS_SERVER") or shutil.which("redis-server")
        if not binary:
            out["redis"] = "not installed"
        else:
            try:
                v = subprocess.run([binary, "--version"], capture_output=True, text=True,
                                   timeout=10).stdout.split()
                out["redis"] = "Redis " + next((x.split("=", 1)[1] for x in v
                                                if x.startswith("v=")), "?")
                out["redis_binary"] = binary
            except (OSError, subprocess.SubprocessError) as e:
                log.warning("statecore bench: cannot run %s: %s", binary, e)
                out["redis"] = "not installed"
    return out


def _machine() -> Dict[str, Any]:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp = next((w.strip("[]") for w in f.read().split() if w.startswith("[")), "?")
    except OSError:
        thp = "?"
    return {"cpus": os.cpu_count(), "thp": thp, "load_before": _load()}


def _load() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def compare(size: int, *, skip: Sequence[str] = (), writes: int = WRITES,
            tmp_dir: Optional[str] = None, redis_writer: Optional[bool] = None) -> Dict[str, Any]:
    """Run the four sections and return the results (see the module docstring).

    redis_writer (default: env STATECORE_BENCH_REDIS_WRITER=1): also time a BGSAVE while a
    client writes. Off by default: with Redis' default fsync every 4 MiB, a BGSAVE of 1 GiB
    takes tens of seconds on a busy small machine, and twice that under a writer."""
    if redis_writer is None:
        redis_writer = os.environ.get("STATECORE_BENCH_REDIS_WRITER", "") not in ("", "0")
    size = int(size) - int(size) % PAGE
    if size < 1 * MiB:
        raise ValueError(f"size must be at least 1 MiB, got {size} bytes")
    if writes < BATCH:
        raise ValueError(f"writes must be at least {BATCH}, got {writes}")
    env_skip = [s.strip() for s in os.environ.get("STATECORE_BENCH_SKIP", "").split(",")
                if s.strip()]
    enabled = _peers(list(skip) + env_skip)
    machine = _machine()
    t_start = _now()
    with ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(
            prefix="statecore-bench-", dir=tmp_dir or os.environ.get("STATECORE_BENCH_TMP")))
        run = _Run(size, tmp, enabled, writes, redis_writer)
        stack.callback(lambda: run.redis.stop() if run.redis is not None else None)
        log.info("statecore bench: %s in %s, peers %s", human_bytes(size), tmp, enabled)
        run.section_snapshot()
        _collect()
        run.section_backup()
        _collect()
        primary = run.section_recovery()
        _collect()
        run.section_incremental(primary)
        del primary
        _collect()
    machine["load_after"] = _load()
    result: Dict[str, Any] = {
        "size": size, "page_size": PAGE, "n_pages": size // PAGE, "writes": writes,
        "machine": machine,
        "peers": {k: v for k, v in enabled.items() if k in PEERS},
        **run.res,
        "errors": run.errors,
        "seconds": _now() - t_start,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    result["rows"] = _rows(run)
    return result


def run_comparison(size: int, json_out: bool = False, chart: Optional[str] = None, *,
                   skip: Sequence[str] = (), writes: int = WRITES,
                   redis_writer: Optional[bool] = None) -> int:
    """The `statecore bench` command: run, print the markdown table (or JSON with
    json_out), optionally write a PNG chart. 0 on success, 1 if a measurement failed."""
    result = compare(size, skip=skip, writes=writes, redis_writer=redis_writer)
    if chart:
        result["chart"] = chart if write_chart(result, chart) else None
    if json_out:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(format_table(result))
        if chart:
            print(f"\nChart: {result['chart'] or 'not written (matplotlib not installed)'}")
    return 1 if result["errors"] else 0
