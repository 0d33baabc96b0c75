"""Keyed-state benchmarks: sc.KVStore against dict, py-lmdb and (when redis-server is
installed) Redis pipelined, in one run on one machine. Used by bench/test_bench_kv.py
(pytest-benchmark cases registered in workloads.CASES/ROWS) and bench/kv_report.py.

Workload (the issue's): 16-byte random keys, 64-byte and 1 KiB values, N keys.
- put: N inserts into an empty map; get: N lookups of existing keys in random order;
  mixed: N operations on random existing keys, 80% get / 20% overwrite (same size);
- each through single calls (kv[k] = v, kv[k]) and batch calls (put_many/get_many in
  batches of B keys; LMDB cursor putmulti/getmulti; Redis pipelines; dict.update and map);
- delta: store.delta between snapshots around an update of 1% of the keys;
- pause: the longest single put while loading N keys (the table grows meanwhile).

Fairness: LMDB runs in the fastest mode it offers (writemap, no sync, no lock, one write
transaction for a whole load, on tmpfs when /dev/shm has ample room, else in the temporary
directory's page cache, never synced); KVStore runs on an anonymous store. Values come from a pool of 4096 distinct values (so the data set itself stays small
at 10M keys); every system still copies each value. Garbage collection is off while timing.
"""
from __future__ import annotations

import gc
import os
import resource
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

import statecore as sc

KEY_BYTES = 16
VALUE_POOL = 4096
MIXED_WRITE_SHARE = 0.2
SEED = 20240611
MiB = 1 << 20

try:
    import lmdb
except ImportError:  # pragma: no cover - the report says it is missing
    lmdb = None
try:
    import redis as redis_py
except ImportError:  # pragma: no cover
    redis_py = None


# ---- data --------------------------------------------------------------------------------
@dataclass
class Dataset:
    n: int
    vlen: int
    keys: List[bytes]          # unique, insertion order
    values: List[bytes]        # values[i] for keys[i] (shared objects from a pool)
    lookup: List[bytes]        # the keys in random order
    ops: List[Tuple[bytes, Optional[bytes]]]   # mixed: (key, None) get, (key, value) put
    update_keys: List[bytes]   # 1% of the keys (delta workload)
    update_values: List[bytes]
    _batches: Optional[Tuple[int, list]] = None

    def mixed_batches(self, b: int) -> List[Tuple[List[bytes], List[bytes], List[bytes]]]:
        """The mixed operations in batches of b: (keys read, keys written, values written)
        each. Made once, untimed: an application arrives with its batch of reads and
        writes already separated."""
        if self._batches is None or self._batches[0] != b:
            out = []
            for chunk in chunks(self.ops, b):
                out.append(([k for k, v in chunk if v is None],
                            [k for k, v in chunk if v is not None],
                            [v for _, v in chunk if v is not None]))
            self._batches = (b, out)
        return self._batches[1]


_DATA: Dict[Tuple[int, int], Dataset] = {}


def dataset(n: int, vlen: int) -> Dataset:
    """Built once per (n, vlen) and kept: generating 10M keys takes seconds."""
    if (n, vlen) in _DATA:
        return _DATA[(n, vlen)]
    for k in list(_DATA):          # one data set at a time (memory)
        del _DATA[k]
    gc.collect()
    rng = np.random.default_rng(SEED + vlen)
    raw = rng.integers(0, 256, (n, KEY_BYTES), dtype=np.uint8)
    # Unique and in random order: the first 8 bytes are a bijective mix (splitmix64's
    # finalizer) of the index. (A counter there would hand a B-tree sorted inserts.)
    z = np.arange(n, dtype=np.uint64) + np.uint64(SEED)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    raw[:, :8] = z.view(np.uint8).reshape(n, 8)
    blob = raw.tobytes()
    keys = [blob[i * KEY_BYTES:(i + 1) * KEY_BYTES] for i in range(n)]
    del blob, raw
    pool_blob = rng.integers(0, 256, (2 * VALUE_POOL, vlen), dtype=np.uint8).tobytes()
    pool = [pool_blob[i * vlen:(i + 1) * vlen] for i in range(2 * VALUE_POOL)]
    idx = rng.integers(0, VALUE_POOL, n)
    values = [pool[i] for i in idx]
    lookup = [keys[i] for i in rng.permutation(n)]
    which = rng.integers(0, n, n)
    writes = rng.random(n) < MIXED_WRITE_SHARE
    wval = rng.integers(VALUE_POOL, 2 * VALUE_POOL, n)
    ops = [(keys[w], pool[v] if is_w else None) for w, is_w, v in zip(which, writes, wval)]
    upd = rng.choice(n, max(1, n // 100), replace=False)
    d = Dataset(n, vlen, keys, values, lookup, ops, [keys[i] for i in upd],
                [pool[VALUE_POOL + (i % VALUE_POOL)] for i in upd])
    _DATA[(n, vlen)] = d
    return d


def chunks(seq: List[Any], size: int) -> Iterator[List[Any]]:
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


@contextmanager
def no_gc() -> Iterator[None]:
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def timed(fn: Callable[[], Any]) -> float:
    with no_gc():
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def scratch_dir(expected_bytes: int = 0) -> str:
    """tmpfs when the database fits comfortably (no disk in the measurement), else the
    temporary directory (a big one on tmpfs would compete for RAM on a shared machine)."""
    base = None
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        st = os.statvfs("/dev/shm")
        if expected_bytes * 4 < st.f_bavail * st.f_frsize:
            base = "/dev/shm"
    return tempfile.mkdtemp(prefix="statecore-kvbench-", dir=base)


# ---- systems -------------------------------------------------------------------------------
# What a run should disclose next to its ratios, by system name: where a database lived,
# how large it grew, and major page faults while measured (a system whose data outgrew the
# page cache reads from disk: its times are then not memory-speed figures).
NOTES: Dict[str, Dict[str, Any]] = {}


class System:
    """One key-value system holding (at most) one data set."""
    name = "?"
    has_single = True

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def put_single(self, keys: List[bytes], values: List[bytes]) -> None: raise NotImplementedError
    def get_single(self, keys: List[bytes]) -> None: raise NotImplementedError
    def mixed_single(self, ops) -> None: raise NotImplementedError
    def put_batch(self, keys: List[bytes], values: List[bytes], b: int) -> None: raise NotImplementedError
    def get_batch(self, keys: List[bytes], b: int) -> None: raise NotImplementedError

    def mixed_batch(self, batches, b: int) -> None:
        for reads, wk, wv in batches:
            self.get_batch(reads, len(reads) or 1)
            self.put_batch(wk, wv, len(wk) or 1)

    def check(self, keys: List[bytes], values: List[bytes]) -> None:
        """A sanity check that the system holds the data (not timed)."""

    def close(self) -> None:
        pass


class KVSystem(System):
    name = "statecore"

    PREFAULT_LIMIT = 4 << 30

    def __init__(self, data: Dataset, prefault: bool = False) -> None:
        super().__init__(data)
        # a record per key (16-byte head + key + value, in 16-byte units) and the table at
        # load 1/2 (128-byte buckets of 7 slots), whose segments double: up to 80 B/key
        rec = (16 + KEY_BYTES + data.vlen + 15) // 16 * 16
        size = (data.n * (rec + 80) * 11 // 10 // 4096 + 16384) * 4096
        self.store = sc.Store(size=size)
        # Page faults of fresh memory out of the way (the pause measurement), while that
        # stays affordable; above the limit the pauses include first-touch faults.
        self.prefaulted = prefault and size <= self.PREFAULT_LIMIT
        if self.prefaulted:
            self.store.array("uint64")[:] = 0
        self.kv = sc.KVStore(self.store)

    def put_single(self, keys, values):
        kv = self.kv
        for k, v in zip(keys, values):
            kv[k] = v

    def get_single(self, keys):
        kv = self.kv
        for k in keys:
            kv[k]

    def mixed_single(self, ops):
        kv = self.kv
        for k, v in ops:
            if v is None:
                kv[k]
            else:
                kv[k] = v

    def put_batch(self, keys, values, b):
        put = self.kv.put_many
        for i in range(0, len(keys), b):
            put(keys[i:i + b], values[i:i + b])

    def get_batch(self, keys, b):
        get = self.kv.get_many
        for i in range(0, len(keys), b):
            get(keys[i:i + b])

    def check(self, keys, values):
        assert len(self.kv) == len(set(keys))
        assert self.kv[keys[-1]] == values[-1]

    def close(self):
        self.kv.close()
        self.store.close()


class DictSystem(System):
    name = "dict"

    def __init__(self, data: Dataset) -> None:
        super().__init__(data)
        self.d: Dict[bytes, bytes] = {}

    def put_single(self, keys, values):
        d = self.d
        for k, v in zip(keys, values):
            d[k] = v

    def get_single(self, keys):
        d = self.d
        for k in keys:
            d[k]

    def mixed_single(self, ops):
        d = self.d
        for k, v in ops:
            if v is None:
                d[k]
            else:
                d[k] = v

    def put_batch(self, keys, values, b):
        for i in range(0, len(keys), b):
            self.d.update(zip(keys[i:i + b], values[i:i + b]))

    def get_batch(self, keys, b):
        get = self.d.__getitem__
        for i in range(0, len(keys), b):
            list(map(get, keys[i:i + b]))

    def check(self, keys, values):
        assert self.d[keys[-1]] == values[-1]

    def close(self):
        self.d.clear()


class LmdbSystem(System):
    name = "py-lmdb"

    def __init__(self, data: Dataset) -> None:
        super().__init__(data)
        # ~2x the data for a B-tree, up to 2x again for pages copied by overwrites
        self.dir = scratch_dir(data.n * (KEY_BYTES + data.vlen + 40) * 2)
        self.on_tmpfs = self.dir.startswith("/dev/shm")
        # Overwrites inside one long write transaction keep every replaced page until the
        # commit: leave room (the file is sparse on tmpfs; unused room costs nothing).
        map_size = data.n * (KEY_BYTES + data.vlen + 64) * 8 + 512 * MiB
        self.env = lmdb.open(self.dir, map_size=map_size, writemap=True, sync=False,
                             metasync=False, lock=False, readahead=False, max_dbs=0)

    def put_single(self, keys, values):
        with self.env.begin(write=True) as txn:
            put = txn.put
            for k, v in zip(keys, values):
                put(k, v)

    def get_single(self, keys):
        with self.env.begin() as txn:
            get = txn.get
            for k in keys:
                get(k)

    def mixed_single(self, ops):
        with self.env.begin(write=True) as txn:
            get, put = txn.get, txn.put
            for k, v in ops:
                if v is None:
                    get(k)
                else:
                    put(k, v)

    def put_batch(self, keys, values, b):
        with self.env.begin(write=True) as txn:
            cur = txn.cursor()
            for i in range(0, len(keys), b):
                cur.putmulti(zip(keys[i:i + b], values[i:i + b]))

    def get_batch(self, keys, b):
        with self.env.begin() as txn:
            cur = txn.cursor()
            for i in range(0, len(keys), b):
                cur.getmulti(keys[i:i + b])

    def mixed_batch(self, batches, b):
        with self.env.begin(write=True) as txn:
            cur = txn.cursor()
            for reads, wk, wv in batches:
                cur.getmulti(reads)
                cur.putmulti(zip(wk, wv))

    def check(self, keys, values):
        with self.env.begin() as txn:
            assert txn.get(keys[-1]) == values[-1]

    def close(self):
        self.env.close()
        try:  # bytes allocated (the file itself is as long as the map: sparse)
            size = os.stat(os.path.join(self.dir, "data.mdb")).st_blocks * 512
        except OSError:
            size = 0
        note = NOTES.setdefault(self.name, {})
        note["where"] = "tmpfs" if self.on_tmpfs else "the temporary directory (disk page cache)"
        note["max_bytes"] = max(note.get("max_bytes", 0), size)
        shutil.rmtree(self.dir, ignore_errors=True)


def redis_available() -> Optional[str]:
    """None when Redis can be benchmarked, else why not."""
    if not shutil.which("redis-server"):
        return "redis-server is not installed"
    if redis_py is None:
        return "the redis Python package is not installed"
    return None


class RedisSystem(System):
    """A private redis-server (no persistence) on a Unix socket, driven through pipelines."""
    name = "Redis (pipelined)"
    has_single = False

    def __init__(self, data: Dataset) -> None:
        super().__init__(data)
        self.dir = tempfile.mkdtemp(prefix="statecore-kvbench-redis-")
        self.sock = os.path.join(self.dir, "redis.sock")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", "0", "--unixsocket", self.sock, "--save", "",
             "--appendonly", "no", "--dir", self.dir], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.sock):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)
        self.r = redis_py.Redis(unix_socket_path=self.sock)
        self.r.ping()

    def put_batch(self, keys, values, b):
        for i in range(0, len(keys), b):
            p = self.r.pipeline(transaction=False)
            for k, v in zip(keys[i:i + b], values[i:i + b]):
                p.set(k, v)
            p.execute()

    def get_batch(self, keys, b):
        for i in range(0, len(keys), b):
            p = self.r.pipeline(transaction=False)
            for k in keys[i:i + b]:
                p.get(k)
            p.execute()

    def check(self, keys, values):
        assert self.r.get(keys[-1]) == values[-1]

    def close(self):
        try:
            self.proc.terminate()
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


SYSTEMS: Dict[str, Callable[[Dataset], System]] = {
    "statecore": KVSystem, "dict": DictSystem, "py-lmdb": LmdbSystem, "redis": RedisSystem}


def available_systems() -> Dict[str, Optional[str]]:
    """name -> None if it can run, else why not."""
    return {"statecore": None, "dict": None,
            "py-lmdb": None if lmdb is not None else "py-lmdb is not installed (pip install lmdb)",
            "redis": redis_available()}


# ---- measurements ---------------------------------------------------------------------------
def measure_system(name: str, data: Dataset, batch: int, read_rounds: int = 2,
                   log: Callable[[str], None] = lambda s: None) -> Dict[str, float]:
    """All timings of one system on one data set, in seconds per operation (best of
    read_rounds for the read-only workloads). Loads twice: by single calls, then (a fresh
    instance) by batch calls."""
    out: Dict[str, float] = {}
    make = SYSTEMS[name]
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    s = make(data)
    try:
        if s.has_single:
            out["put"] = timed(lambda: s.put_single(data.keys, data.values))
            s.check(data.keys, data.values)
            out["get"] = min(timed(lambda: s.get_single(data.lookup)) for _ in range(read_rounds))
        else:
            s.put_batch(data.keys, data.values, batch)
        out["get_batch"] = min(timed(lambda: s.get_batch(data.lookup, batch))
                               for _ in range(read_rounds))
        if s.has_single:
            out["mixed"] = timed(lambda: s.mixed_single(data.ops))
        batches = data.mixed_batches(batch)
        out["mixed_batch"] = timed(lambda: s.mixed_batch(batches, batch))
    finally:
        s.close()
        del s
        gc.collect()
    s = make(data)
    try:
        out["put_batch"] = timed(lambda: s.put_batch(data.keys, data.values, batch))
        s.check(data.keys, data.values)
    finally:
        s.close()
        del s
        gc.collect()
    NOTES.setdefault(name, {})["major_faults"] = (
        resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults0)
    log(", ".join(f"{k} {v:.2f} s" for k, v in out.items()))
    n_ops = {"put": data.n, "get": data.n, "get_batch": data.n, "put_batch": data.n,
             "mixed": len(data.ops), "mixed_batch": len(data.ops)}
    return {k: v / n_ops[k] for k, v in out.items()}


def measure_delta(data: Dataset) -> Dict[str, float]:
    """Delta size after updating 1% of the keys (same-size values: rewritten in place)."""
    s = KVSystem(data)
    try:
        s.kv.put_many(data.keys, data.values)
        store = s.store
        with store.snapshot() as s0:
            for k, v in zip(data.update_keys, data.update_values):
                s.kv[k] = v
            with store.snapshot() as s1:
                d = store.delta(s0, s1)
                lz4 = len(d.encode("lz4"))
                none = len(d.encode("none"))
        st = s.kv.stats()
        state = st["region_bytes"] - st["wilderness_bytes"]
        return {"keys_updated": len(data.update_keys), "delta_pages": len(d.page_ids),
                "delta_bytes": none, "delta_lz4_bytes": lz4, "state_bytes": state,
                "state_pages": -(-state // store.page_size),
                "changed_bytes": len(data.update_keys) * (KEY_BYTES + data.vlen)}
    finally:
        s.close()
        gc.collect()


def measure_pause(name: str, data: Dataset) -> Dict[str, float]:
    """Latency of every single put while loading the data set: the longest is the longest
    pause growth causes (dict: a resize; KVStore: at most two bucket splits). The store's
    memory is faulted in first, so page faults of fresh memory are not counted."""
    s = KVSystem(data, prefault=True) if name == "statecore" else DictSystem(data)
    lat = np.empty(data.n, dtype=np.int64)
    clock = time.perf_counter_ns
    try:
        target = s.kv if name == "statecore" else s.d
        if name == "statecore":
            # Create the map first: on a region whose pages were written (the prefault),
            # creating it checks the whole region is zero, once, which is not growth.
            s.kv[b"\0"] = b""
            del s.kv[b"\0"]
        with no_gc():
            for i, (k, v) in enumerate(zip(data.keys, data.values)):
                t0 = clock()
                target[k] = v
                lat[i] = clock() - t0
        out = {"max_ns": float(lat.max()), "p9999_ns": float(np.percentile(lat, 99.99)),
               "p999_ns": float(np.percentile(lat, 99.9)), "median_ns": float(np.median(lat))}
        if name == "statecore":
            out["splits"] = s.kv.stats()["splits"]
            out["prefaulted"] = float(s.prefaulted)
        return out
    finally:
        s.close()
        gc.collect()


# ---- ratio rows ----------------------------------------------------------------------------
@dataclass(frozen=True)
class KVRow:
    label: str
    num: Tuple[str, str]      # (system, workload)
    den: Tuple[str, str]
    target: Optional[float]   # time ratio must be <= target; None: information


KV_ROWS: List[KVRow] = [
    KVRow("put, single calls: statecore vs py-lmdb", ("statecore", "put"), ("py-lmdb", "put"), 0.5),
    KVRow("get, single calls: statecore vs py-lmdb", ("statecore", "get"), ("py-lmdb", "get"), 0.5),
    KVRow("mixed 80/20, single calls: statecore vs py-lmdb", ("statecore", "mixed"),
          ("py-lmdb", "mixed"), 0.5),
    KVRow("put, batch calls: statecore vs py-lmdb", ("statecore", "put_batch"),
          ("py-lmdb", "put_batch"), 0.2),
    KVRow("get, batch calls: statecore vs py-lmdb", ("statecore", "get_batch"),
          ("py-lmdb", "get_batch"), 0.2),
    KVRow("mixed 80/20, batch calls: statecore vs py-lmdb", ("statecore", "mixed_batch"),
          ("py-lmdb", "mixed_batch"), 0.2),
    KVRow("(info) put, single: statecore vs dict", ("statecore", "put"), ("dict", "put"), None),
    KVRow("(info) get, single: statecore vs dict", ("statecore", "get"), ("dict", "get"), None),
    KVRow("(info) mixed, single: statecore vs dict", ("statecore", "mixed"), ("dict", "mixed"), None),
    KVRow("(info) put, batch: statecore vs dict.update", ("statecore", "put_batch"),
          ("dict", "put_batch"), None),
    KVRow("(info) get, batch: statecore vs dict map", ("statecore", "get_batch"),
          ("dict", "get_batch"), None),
    KVRow("(info) put, batch: statecore vs Redis pipelined", ("statecore", "put_batch"),
          ("redis", "put_batch"), None),
    KVRow("(info) get, batch: statecore vs Redis pipelined", ("statecore", "get_batch"),
          ("redis", "get_batch"), None),
    KVRow("(info) mixed, batch: statecore vs Redis pipelined", ("statecore", "mixed_batch"),
          ("redis", "mixed_batch"), None),
]


def human_ns(ns: float) -> str:
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.1f} µs"
    return f"{ns:.0f} ns"


def evaluate(times: Dict[str, Dict[str, float]]):
    """(row, ratio or None, verdict) for rows whose systems ran."""
    out = []
    for row in KV_ROWS:
        a = times.get(row.num[0], {}).get(row.num[1])
        b = times.get(row.den[0], {}).get(row.den[1])
        if a is None or b is None:
            continue
        ratio = a / b if b else None
        verdict = "info" if row.target is None else (
            "?" if ratio is None else "pass" if ratio <= row.target else "FAIL")
        out.append((row, ratio, verdict))
    return out


def render(n: int, vlen: int, times: Dict[str, Dict[str, float]]) -> str:
    """times: system -> workload -> seconds per operation."""
    lines = [f"| {n:,} keys, {vlen}-byte values | statecore | baseline | ratio (time) | "
             "speed-up | target | result |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row, ratio, verdict in evaluate(times):
        a = times[row.num[0]][row.num[1]] * 1e9
        b = times[row.den[0]][row.den[1]] * 1e9
        tgt = "info" if row.target is None else f"<= {row.target:g} ({1 / row.target:g}x)"
        r = "?" if ratio is None else f"{ratio:.3f}"
        sp = "?" if not ratio else f"{1 / ratio:.1f}x"
        lines.append(f"| {row.label} | {human_ns(a)}/op | {human_ns(b)}/op | {r} | {sp} | "
                     f"{tgt} | {'-' if verdict == 'info' else verdict} |")
    return "\n".join(lines)


def render_extras(n: int, vlen: int, delta: Optional[Dict[str, float]],
                  pauses: Dict[str, Dict[str, float]]) -> str:
    from workloads import human_bytes
    lines = []
    if delta:
        lines.append(
            f"- delta after updating 1% of {n:,} keys ({delta['keys_updated']:,} values of "
            f"{vlen} B rewritten): {human_bytes(delta['delta_bytes'])} uncompressed "
            f"({delta['delta_pages']:,} of {delta['state_pages']:,} pages, "
            f"{delta['delta_bytes'] / delta['state_bytes']:.1%} of the "
            f"{human_bytes(delta['state_bytes'])} map), {human_bytes(delta['delta_lz4_bytes'])} "
            f"with lz4; the changed keys and values themselves are "
            f"{human_bytes(delta['changed_bytes'])} "
            f"({delta['delta_bytes'] / delta['changed_bytes']:.1f}x: whole pages travel)")
    if "statecore" in pauses and "dict" in pauses:
        k, d = pauses["statecore"], pauses["dict"]
        lines.append(
            f"- longest single put while loading {n:,} keys: statecore {human_ns(k['max_ns'])} "
            f"(p99.99 {human_ns(k['p9999_ns'])}, p99.9 {human_ns(k['p999_ns'])}, median "
            f"{human_ns(k['median_ns'])}; {int(k['splits']):,} bucket splits, at most 2 per "
            f"put; {'store pre-faulted' if k.get('prefaulted') else 'first-touch page faults included'}) "
            f"vs dict {human_ns(d['max_ns'])} (p99.99 {human_ns(d['p9999_ns'])}; its "
            f"resizes rehash everything)")
    return "\n".join(lines)


def render_notes(notes: Dict[str, Dict[str, Any]]) -> str:
    """Where each system's data lived and the major page faults while it was measured."""
    from workloads import human_bytes
    lines = []
    for name, note in notes.items():
        parts = []
        if "where" in note:
            parts.append(f"database in {note['where']}, up to {human_bytes(note['max_bytes'])}")
        if "major_faults" in note:
            parts.append(f"{note['major_faults']:,} major page faults while measured")
        if parts:
            lines.append(f"- {name}: " + "; ".join(parts))
    return ("\n" + "\n".join(lines)) if lines else ""


# ---- pytest-benchmark cases (bench/test_bench_kv.py) ----------------------------------------
SCALE_KEYS = {"small": 200_000, "full": 10_000_000}
BATCH = 10_000
WORKLOADS = ("put", "get", "mixed", "put_batch", "get_batch", "mixed_batch")
VALUE_SIZES = (64, 1024)


def scale_keys(scale: Any) -> int:
    return SCALE_KEYS.get(getattr(scale, "name", "small"), SCALE_KEYS["small"])


def _system_case(vlen: int, system: str, workload: str, scale: Any) -> Iterator[Any]:
    import workloads as W
    why = available_systems().get(system)
    if system == "redis" and scale_keys(scale) > 1_000_000:
        why = "its time per operation is client-bound; kv_report.py measures it on a sample"
    if why:
        import pytest
        pytest.skip(f"{system}: {why}")
    data = dataset(scale_keys(scale), vlen)
    make = SYSTEMS[system]
    if workload in ("put", "put_batch"):
        def setup() -> tuple:
            gc.collect()
            return (make(data),)

        def run(s: System) -> None:
            if workload == "put":
                s.put_single(data.keys, data.values)
            else:
                s.put_batch(data.keys, data.values, BATCH)

        def teardown(s: System) -> None:
            s.close()

        yield W.Case(run=run, setup=setup, teardown=teardown, rounds=W.rounds(scale, 2),
                     warmup=0, metrics={"ops": data.n})
        return
    s = make(data)
    try:
        s.put_batch(data.keys, data.values, BATCH)
        fn = {"get": lambda: s.get_single(data.lookup),
              "get_batch": lambda: s.get_batch(data.lookup, BATCH),
              "mixed": lambda: s.mixed_single(data.ops),
              "mixed_batch": lambda: s.mixed_batch(data.mixed_batches(BATCH), BATCH)}[workload]
        yield W.Case(run=fn, rounds=W.rounds(scale, 3), warmup=1, metrics={"ops": data.n})
    finally:
        s.close()


def _delta_case(vlen: int, scale: Any) -> Iterator[Any]:
    """Times the update of 1% of the keys; metrics: the delta it leaves."""
    import workloads as W
    data = dataset(scale_keys(scale), vlen)
    s = KVSystem(data)
    state: Dict[str, Any] = {}
    try:
        s.kv.put_many(data.keys, data.values)
        c = W.Case(run=None, rounds=1, warmup=0)

        def setup() -> tuple:
            state["s0"] = s.store.snapshot()
            return ()

        def run() -> None:
            kv = s.kv
            for k, v in zip(data.update_keys, data.update_values):
                kv[k] = v

        def teardown() -> None:
            with s.store.snapshot() as s1:
                d = s.store.delta(state["s0"], s1)
                st = s.kv.stats()
                c.metrics.update(delta_bytes=len(d.encode("none")),
                                 delta_lz4_bytes=len(d.encode("lz4")),
                                 state_bytes=st["region_bytes"] - st["wilderness_bytes"],
                                 changed_bytes=len(data.update_keys) * (KEY_BYTES + vlen))
            state.pop("s0").release()

        c.run, c.setup, c.teardown = run, setup, teardown
        yield c
    finally:
        s.close()


def _pause_case(vlen: int, system: str, scale: Any) -> Iterator[Any]:
    """Loads the keys timing every put; metrics: the longest and the 99.99th percentile."""
    import workloads as W
    data = dataset(scale_keys(scale), vlen)
    c = W.Case(run=None, rounds=1, warmup=0)

    def run() -> None:
        c.metrics.update(measure_pause(system, data))

    c.run = run
    yield c


def register(W: Any) -> None:
    """Add the KV cases and ratio rows to bench/workloads.py's registries (idempotent)."""
    from functools import partial
    for vlen in VALUE_SIZES:
        for system in SYSTEMS:
            for wl in WORKLOADS:
                W.CASES[f"kv{vlen}.{system}.{wl}"] = contextmanager(
                    partial(_system_case, vlen, system, wl))
        W.CASES[f"kv{vlen}.statecore.delta"] = contextmanager(partial(_delta_case, vlen))
        for system in ("statecore", "dict"):
            W.CASES[f"kv{vlen}.{system}.pause"] = contextmanager(partial(_pause_case, vlen, system))
    if any(str(r.issue) == "kv" for r in W.ROWS):
        return
    for vlen in VALUE_SIZES:
        for row in KV_ROWS:
            def label(s: Any, row: KVRow = row, vlen: int = vlen) -> str:
                return f"{row.label} ({scale_keys(s):,} keys, {vlen} B values)"
            W.ROWS.append(W.Row("kv", label, (f"kv{vlen}.{row.num[0]}.{row.num[1]}", W.T),
                                (f"kv{vlen}.{row.den[0]}.{row.den[1]}", W.T), row.target))
        W.ROWS.append(W.Row("kv", lambda s, v=vlen: f"(info) delta after updating 1% of the "
                            f"keys vs the map's bytes ({v} B values)",
                            (f"kv{vlen}.statecore.delta", "delta_bytes"),
                            (f"kv{vlen}.statecore.delta", "state_bytes"), None))
        W.ROWS.append(W.Row("kv", lambda s, v=vlen: f"(info) same delta vs the changed keys "
                            f"and values themselves ({v} B values)",
                            (f"kv{vlen}.statecore.delta", "delta_bytes"),
                            (f"kv{vlen}.statecore.delta", "changed_bytes"), None))
        W.ROWS.append(W.Row("kv", lambda s, v=vlen: f"(info) longest single put while "
                            f"growing: statecore vs dict (ns; {v} B values)",
                            (f"kv{vlen}.statecore.pause", "max_ns"),
                            (f"kv{vlen}.dict.pause", "max_ns"), None))
