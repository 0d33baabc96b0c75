"""Issue 4 (durable store): the cases and rows behind bench/test_bench_durable.py, added to
bench/workloads.py's registries on import (report.py imports this module).

Same rules as workloads.py: every figure is a ratio against a baseline measured in the
same run, each case builds its own state and frees it (memory and scratch files) on exit.
Scratch directories go under $STATECORE_BENCH_DIR, else under the repository (on disk:
/tmp may be tmpfs, where fsync costs nothing), and are removed afterwards.

- recovery: reopening a DurableStore (newest checkpoint + journal replay) against reading
  the same files sequentially into a preallocated buffer, both from a warm page cache;
  and against restarting redis-server from an RDB of the same state, when installed.
- commit latency: ds.commit() of 1 MiB of dirty pages against write()+fdatasync() of 1 MiB
  appended to a file in the same directory (p50 and p99).
- writer throughput while ds.checkpoint() runs, against the same writer with none running.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List

import numpy as np

import statecore as sc
from statecore.compare import redis_peer
from statecore.compare.common import fill, fill_array, warm

import workloads as W
from workloads import MiB, GiB, PAGE, SEED, Case, Row, Scale, T, case, free_memory, human_bytes

REDIS = shutil.which("redis-server")


# ---- sizes per scale ---------------------------------------------------------------------
@dataclass(frozen=True)
class DurableScale:
    recovery_checkpoint: int   # state size: the checkpoint holds all of it
    recovery_journal: int      # page bytes committed after the checkpoint
    journal_record: int        # page bytes per journal record (commit)
    commit_store: int          # commit latency: store size (touched, checkpointed)
    commit_dirty: int          # dirty bytes per commit
    commit_rounds: int         # commits timed (p50 / p99 over these)
    ckpt_store: int            # writer during checkpoint: store size
    idle_window: float         # seconds the writer runs alone per round


DURABLE: Dict[str, DurableScale] = {
    "small": DurableScale(recovery_checkpoint=128 * MiB, recovery_journal=32 * MiB,
                          journal_record=1 * MiB, commit_store=128 * MiB,
                          commit_dirty=1 * MiB, commit_rounds=100, ckpt_store=256 * MiB,
                          idle_window=0.5),
    "full": DurableScale(recovery_checkpoint=1 * GiB, recovery_journal=256 * MiB,
                         journal_record=1 * MiB, commit_store=1 * GiB,
                         commit_dirty=1 * MiB, commit_rounds=100, ckpt_store=1 * GiB,
                         idle_window=1.0),
}


def dscale(scale: Scale) -> DurableScale:
    return DURABLE[scale.name]


# ---- scratch directories -----------------------------------------------------------------
def scratch_root() -> str:
    """On a real disk: $STATECORE_BENCH_DIR, else the repository's directory."""
    return (os.environ.get("STATECORE_BENCH_DIR")
            or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@contextmanager
def scratch_dir(tag: str) -> Iterator[str]:
    d = tempfile.mkdtemp(prefix=f".statecore-bench-{tag}-", dir=scratch_root())
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def dir_files(d: str) -> List[str]:
    return sorted(os.path.join(d, f) for f in os.listdir(d)
                  if os.path.isfile(os.path.join(d, f)))


def percentile_ms(xs: List[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(xs), q)) * 1e3, 3)


def random_pages(rng: np.random.Generator, n_pages: int, k: int) -> np.ndarray:
    return np.sort(rng.choice(n_pages, size=k, replace=False)).astype(np.uint64)


# ---- issue 4: recovery --------------------------------------------------------------------
def build_recovery_dir(d: str, ds_: DurableScale) -> Dict[str, float]:
    """A durable directory holding one checkpoint of `recovery_checkpoint` bytes of
    incompressible state, then `recovery_journal` bytes of page writes committed in
    records of `journal_record` bytes (random distinct pages each)."""
    size = ds_.recovery_checkpoint
    n_pages, k = size // PAGE, ds_.journal_record // PAGE
    commits = ds_.recovery_journal // ds_.journal_record
    rng = np.random.default_rng(SEED + 40)
    bits = np.random.PCG64(SEED + 41)
    ds = sc.DurableStore(d, size=size, keep_checkpoints=1)
    try:
        fill(ds.write, size)
        ds.checkpoint().result()  # journal before it is trimmed: keep_checkpoints=1
        for _ in range(commits):
            ds.write_pages(random_pages(rng, n_pages, k), bits.random_raw(k * PAGE // 8))
            ds.commit()
    finally:
        ds.close()
    files = dir_files(d)
    return {"journal_commits": commits, "file_bytes": sum(os.path.getsize(f) for f in files)}


@case("durable.recovery")
def _recovery_statecore(scale: Scale) -> Iterator[Case]:
    ds_ = dscale(scale)
    with scratch_dir("recovery") as d:
        info = build_recovery_dir(d, ds_)
        free_memory()
        warm(d)
        held: List[sc.DurableStore] = []
        c = Case(run=lambda: held.append(sc.DurableStore(d)), rounds=W.rounds(scale, 5),
                 warmup=1, metrics=dict(info, bytes_moved=info["file_bytes"]))

        def teardown() -> None:
            ds = held.pop()
            rep = ds.recovery
            c.metrics.update(deltas_replayed=rep.deltas_replayed,
                             checkpoint_bytes=rep.checkpoint_bytes,
                             journal_bytes=rep.journal_bytes,
                             recovery_seconds=round(min(rep.seconds, c.metrics.get(
                                 "recovery_seconds", rep.seconds)), 6),
                             discarded=len(rep.discarded))
            ds.close()
            free_memory()  # the next round maps a fresh store: no leftovers to reuse

        c.teardown = teardown
        try:
            yield c
        finally:
            for ds in held:
                ds.close()
            held.clear()
            free_memory()


@case("durable.recovery_read")
def _recovery_read(scale: Scale) -> Iterator[Case]:
    # The same files (built the same way), read sequentially into one preallocated,
    # touched buffer: what any recovery must at least do with them.
    with scratch_dir("recovery-read") as d:
        info = build_recovery_dir(d, dscale(scale))
        free_memory()
        files = dir_files(d)
        sizes = [os.path.getsize(f) for f in files]
        buf = np.ones(sum(sizes), dtype=np.uint8)
        mv = memoryview(buf)
        warm(d)

        def run() -> None:
            pos = 0
            for path, size in zip(files, sizes):
                fd = os.open(path, os.O_RDONLY)
                try:
                    end = pos + size
                    while pos < end:
                        n = os.readv(fd, [mv[pos:end]])
                        if n <= 0:
                            raise RuntimeError(f"{path}: short read")
                        pos += n
                finally:
                    os.close(fd)

        try:
            yield Case(run=run, rounds=W.rounds(scale, 5), warmup=1,
                       metrics=dict(info, bytes_moved=info["file_bytes"]))
        finally:
            mv.release()
            del buf
            free_memory()


@case("durable.recovery_redis")
def _recovery_redis(scale: Scale) -> Iterator[Case]:
    # redis-server restarting from an RDB holding the same state as 4 KiB values (no
    # journal on the Redis side: the statecore reopen also replays one on top).
    if REDIS is None:
        raise RuntimeError("redis-server is not on PATH")
    size = dscale(scale).recovery_checkpoint
    n_pages = size // PAGE
    with scratch_dir("redis") as d:
        server = redis_peer.RedisServer(REDIS, d)
        try:
            server.start(timeout=60)
            assert server.conn is not None
            data = np.empty(size, dtype=np.uint8)
            fill_array(data)
            redis_peer.load_values(server.conn, memoryview(data), n_pages)
            del data
            free_memory()
            redis_peer.bgsave(server.conn, redis_peer.redis_timeout(size))
            server.stop()
            rdb = os.path.join(d, "dump.rdb")
            warm(rdb)
            c = Case(run=lambda: server.start(timeout=redis_peer.redis_timeout(size)),
                     rounds=W.rounds(scale, 5), warmup=1,
                     metrics={"rdb_bytes": os.path.getsize(rdb),
                              "bytes_moved": os.path.getsize(rdb)})

            def teardown() -> None:
                assert server.conn is not None
                c.metrics["keys"] = server.conn.call("DBSIZE")
                if c.metrics["keys"] != n_pages:
                    raise RuntimeError(f"Redis restarted with {c.metrics['keys']} keys, "
                                       f"expected {n_pages}")
                server.stop()

            c.teardown = teardown
            yield c
        finally:
            server.stop()
            free_memory()


# ---- issue 4: commit latency ----------------------------------------------------------------
@case("durable.commit")
def _commit_statecore(scale: Scale) -> Iterator[Case]:
    ds_ = dscale(scale)
    rng = np.random.default_rng(SEED + 42)
    k = ds_.commit_dirty // PAGE
    with scratch_dir("commit") as d:
        ds = sc.DurableStore(d, size=ds_.commit_store, keep_checkpoints=1)
        try:
            ds.array("int64")[:] = 1            # every page mapped and written once
            ds.checkpoint().result()            # ... and checkpointed: the journal is empty
            data = compressible(k)
            times: List[float] = []
            c = Case(run=None, rounds=ds_.commit_rounds, warmup=5,  # type: ignore[arg-type]
                     metrics={"dirty_bytes": ds_.commit_dirty})

            def setup() -> tuple:
                data[:, 0] += 1
                ds.write_pages(random_pages(rng, ds.n_pages, k), data)
                return ()

            def run() -> None:
                t0 = time.perf_counter()
                ds.commit()
                times.append(time.perf_counter() - t0)

            def teardown() -> None:
                last = times[-c.rounds:]
                c.metrics.update(p50_ms=percentile_ms(last, 50), p99_ms=percentile_ms(last, 99),
                                 record_bytes=ds.last_commit["bytes"] if ds.last_commit else 0)

            c.run, c.setup, c.teardown = run, setup, teardown
            yield c
        finally:
            ds.close()
            del ds
            free_memory()


@case("durable.commit_fdatasync")
def _commit_fdatasync(scale: Scale) -> Iterator[Case]:
    ds_ = dscale(scale)
    buf = compressible(ds_.commit_dirty // PAGE).tobytes()
    with scratch_dir("fdatasync") as d:
        fd = os.open(os.path.join(d, "append.log"),
                     os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        times: List[float] = []
        c = Case(run=None, rounds=ds_.commit_rounds, warmup=5,  # type: ignore[arg-type]
                 metrics={"dirty_bytes": len(buf)})

        def run() -> None:
            t0 = time.perf_counter()
            if os.write(fd, buf) != len(buf):
                raise RuntimeError("short write")
            os.fdatasync(fd)
            times.append(time.perf_counter() - t0)

        def teardown() -> None:
            last = times[-c.rounds:]
            c.metrics.update(p50_ms=percentile_ms(last, 50), p99_ms=percentile_ms(last, 99))

        c.run, c.teardown = run, teardown
        try:
            yield c
        finally:
            os.close(fd)
            free_memory()


def compressible(n_pages: int) -> np.ndarray:
    return W.compressible_pages(n_pages).copy()


# ---- issue 4: writer throughput while a checkpoint runs -----------------------------------
class BatchWriter(threading.Thread):
    """Random int64 writes through a StateArray in batches of 10k until stopped. 64
    distinct batches (640k indices): over 1 GiB they reach ~90% of the pages, so a live
    snapshot keeps costing page copies instead of only the first few batches."""

    def __init__(self, arr: Any, seed: int = SEED + 43, batches: int = 64) -> None:
        super().__init__(daemon=True, name="bench-batch-writer")
        rng = np.random.default_rng(seed)
        self.arr = arr
        self.batches = [(rng.integers(0, arr.size, 10_000, dtype=np.int64),
                         rng.integers(0, 1 << 40, 10_000, dtype=np.int64))
                        for _ in range(batches)]
        self.stop_event = threading.Event()
        self.writes = 0
        self.t0 = self.t1 = 0.0

    def run(self) -> None:
        i = 0
        self.t0 = time.perf_counter()
        while not self.stop_event.is_set():
            idx, vals = self.batches[i % len(self.batches)]
            self.arr[idx] = vals
            self.writes += len(idx)
            i += 1
            time.sleep(0)  # hand the GIL over promptly
        self.t1 = time.perf_counter()

    def stop(self) -> float:
        """Stop; returns nanoseconds per write over the writer's whole run."""
        self.stop_event.set()
        self.join()
        return (self.t1 - self.t0) * 1e9 / max(1, self.writes)


def _writer_case(scale: Scale, during_checkpoint: bool) -> Iterator[Case]:
    ds_ = dscale(scale)
    with scratch_dir("ckpt-writer") as d:
        ds = sc.DurableStore(d, size=ds_.ckpt_store, keep_checkpoints=1)
        arr = ds.array("int64")
        state: Dict[str, Any] = {}
        try:
            arr[:] = 1
            ds.checkpoint().result()
            c = Case(run=None, rounds=W.rounds(scale, 5), warmup=1,  # type: ignore[arg-type]
                     metrics={"store_bytes": ds.size})
            per_write: List[float] = []

            def setup() -> tuple:
                if not during_checkpoint:
                    W.new_epoch(ds)  # each round starts a fresh epoch, as after a commit
                state["w"] = w = BatchWriter(arr)
                w.start()
                return ()

            def run() -> None:
                if during_checkpoint:
                    ds.checkpoint().result()
                else:
                    time.sleep(ds_.idle_window)

            def teardown() -> None:
                per_write.append(state.pop("w").stop())
                c.metrics["ns_per_write"] = round(min(per_write), 2)
                c.metrics["writes_per_s"] = round(1e9 / min(per_write))
                if during_checkpoint:
                    # Commit what the writer wrote meanwhile (untimed): the next round's
                    # checkpoint then starts from an almost clean commit, like this one.
                    ds.commit()
                    c.metrics["preserved_total"] = ds.stats()["pages_preserved_total"]

            c.run, c.setup, c.teardown = run, setup, teardown
            yield c
        finally:
            w = state.pop("w", None)
            if w is not None:
                w.stop()
            del arr
            ds.close()
            del ds
            free_memory()


case("durable.writer_idle")(lambda scale: _writer_case(scale, False))
case("durable.writer_checkpoint")(lambda scale: _writer_case(scale, True))


# ---- rows -----------------------------------------------------------------------------------
def _lbl(fmt: str):
    def label(s: Scale) -> str:
        p = dscale(s)
        return fmt.format(ck=human_bytes(p.recovery_checkpoint),
                          jn=human_bytes(p.recovery_journal),
                          jr=human_bytes(p.journal_record),
                          cd=human_bytes(p.commit_dirty), cr=p.commit_rounds,
                          cs=human_bytes(p.ckpt_store))
    return label


ROWS: List[Row] = [
    Row(4, _lbl("DurableStore reopen: {ck} checkpoint + {jn} journal ({jr} records) vs "
                "reading the same files into a buffer (warm cache)"),
        ("durable.recovery", T), ("durable.recovery_read", T), 2.0,
        "brief: recovery at no less than half the speed of reading its files"),
    Row(4, _lbl("(info) recover() alone (ds.recovery.seconds, s) vs reading the files"),
        ("durable.recovery", "recovery_seconds"), ("durable.recovery_read", T), None),
    Row(4, _lbl("{cd} commit() p50 (ms) vs write+fdatasync of {cd} appended in the same dir"),
        ("durable.commit", "p50_ms"), ("durable.commit_fdatasync", "p50_ms"), 3.0,
        "brief: a commit adds a delta gather and a checksum pass to the append and fsync"),
    Row(4, _lbl("(info) same, p99 (ms) vs p99, {cr} commits each"),
        ("durable.commit", "p99_ms"), ("durable.commit_fdatasync", "p99_ms"), None),
    Row(4, _lbl("random int64 writer over {cs}: ns/write while checkpoint() runs vs none "
                "(<= 2: throughput at least half)"),
        ("durable.writer_checkpoint", "ns_per_write"), ("durable.writer_idle", "ns_per_write"),
        2.0, "brief: writers keep at least half their throughput during a checkpoint"),
]
if REDIS is not None:
    ROWS.append(Row(
        4, _lbl("DurableStore reopen ({ck} + {jn} journal) vs Redis restart from an RDB of "
                "the same {ck} state (warm cache)"),
        ("durable.recovery", T), ("durable.recovery_redis", T), 0.333,
        "brief: at least 3x faster than Redis loading its RDB"))


def register() -> None:
    """Add these rows to workloads.ROWS once (the cases registered on import)."""
    if not any(r.num[0].startswith("durable.") for r in W.ROWS):
        W.ROWS.extend(ROWS)


register()
