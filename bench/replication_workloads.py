"""Issue 5 (replication): the cases and rows behind bench/test_bench_replication.py, added
to bench/workloads.py's registries on import (report.py imports this module).

Everything runs over loopback TCP on 127.0.0.1 inside this process, and each figure is set
against a baseline from the same run:

- full sync: a fresh sc.Follower on an empty Store taking a primary's whole state;
- delta streaming: a caught-up follower receiving many publishes of changed pages (each
  round rewrites every page once, in disjoint chunks, so coalescing cannot shrink it);
  both against raw loopback TCP moving the same number of bytes between two threads
  (sendall of a bytes buffer, recv_into a preallocated, touched buffer);
- follower lag under a DurableStore committing every 10 ms: commit times against
  Follower(on_apply=...) times, both time.monotonic().
"""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional

import numpy as np

import statecore as sc
from statecore import wire
from statecore.compare.common import fill, fill_array

import workloads as W
from durable_workloads import scratch_dir
from workloads import MiB, GiB, PAGE, SEED, Case, Row, Scale, T, case, free_memory, human_bytes


@dataclass(frozen=True)
class ReplScale:
    full_sync: int            # primary state taken by a fresh follower
    stream_store: int         # every page rewritten once per round ...
    stream_commits: int       # ... in this many publishes
    lag_store: int
    lag_seconds: float        # timed writer run
    lag_interval: float = 0.010
    lag_writes: int = 256     # random int64 writes per commit (~ that many dirty pages)
    lag_budget_ms: float = 100.0


REPLICATION: Dict[str, ReplScale] = {
    "small": ReplScale(full_sync=128 * MiB, stream_store=128 * MiB, stream_commits=128,
                       lag_store=128 * MiB, lag_seconds=2.0),
    "full": ReplScale(full_sync=1 * GiB, stream_store=1 * GiB, stream_commits=256,
                      lag_store=1 * GiB, lag_seconds=5.0),
}


def rscale(scale: Scale) -> ReplScale:
    return REPLICATION[scale.name]


def timeout_for(nbytes: int) -> float:
    return max(60.0, nbytes / (20 * MiB))


def frame_bytes(n_pages: int) -> int:
    """Bytes on the wire for one DELTA frame of n 4 KiB pages, uncompressed."""
    return wire.HEADER_SIZE + sc._core.HEADER_SIZE + n_pages * (24 + PAGE)


def stream_chunks(n_pages: int, commits: int) -> List[np.ndarray]:
    perm = np.random.default_rng(SEED + 50).permutation(n_pages)
    k = n_pages // commits
    return [np.sort(perm[i * k:(i + 1) * k]).astype(np.uint64) for i in range(commits)]


# ---- the raw socket baseline ----------------------------------------------------------------
class RawLink:
    """Loopback TCP between a sender thread, which sendall()s `nbytes` of incompressible
    bytes each time it is triggered, and the caller, which receives them with recv_into
    into a preallocated, touched buffer."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.payload = fill_array(np.empty(nbytes, dtype=np.uint8)).tobytes()
        self.buf = np.ones(nbytes, dtype=np.uint8)
        self.view = memoryview(self.buf)
        self._go = threading.Semaphore(0)
        self._closing = False
        self.error: Optional[BaseException] = None
        with socket.create_server(("127.0.0.1", 0)) as listener:
            self._tx = socket.create_connection(listener.getsockname()[:2])
            self._rx, _ = listener.accept()
        self._thread = threading.Thread(target=self._send_loop, name="bench-raw-sender",
                                        daemon=True)
        self._thread.start()

    def _send_loop(self) -> None:
        try:
            while True:
                self._go.acquire()
                if self._closing:
                    return
                self._tx.sendall(self.payload)
        except OSError as e:
            self.error = e

    def transfer(self, into: Optional[memoryview] = None) -> None:
        """Have the sender send once; return when every byte has been received (into the
        link's own touched buffer, or `into`)."""
        self._go.release()
        got, view, n = 0, self.view if into is None else into, self.nbytes
        while got < n:
            k = self._rx.recv_into(view[got:], n - got)
            if k == 0:
                raise ConnectionError(f"raw sender stopped: {self.error}")
            got += k

    def close(self) -> None:
        self._closing = True
        self._go.release()
        self._thread.join(timeout=30)
        for s in (self._tx, self._rx):
            s.close()
        self.view.release()



def _raw_case(scale: Scale, nbytes: int, n_rounds: int) -> Iterator[Case]:
    link = RawLink(nbytes)
    try:
        link.transfer()  # connection warmed up, buffers faulted in
        yield Case(run=link.transfer, rounds=W.rounds(scale, n_rounds), warmup=1,
                   metrics={"bytes_moved": nbytes})
    finally:
        link.close()
        del link
        free_memory()


# ---- full sync --------------------------------------------------------------------------------
@case("replica.full_sync")
def _full_sync(scale: Scale) -> Iterator[Case]:
    size = rscale(scale).full_sync
    store = sc.Store(size=size)
    fill(store.write, size)
    primary = sc.Primary(store)
    held: List[sc.Follower] = []
    c = Case(run=None, rounds=W.rounds(scale, 5), warmup=1)  # type: ignore[arg-type]

    def setup() -> tuple:
        return (sc.Store(size=size),)  # empty: fresh mapping, as a new replica's

    def run(replica: sc.Store) -> None:
        f = sc.Follower(replica, primary.address, reconnect=False)
        held.append(f)
        f.wait_for(primary.epoch, timeout=timeout_for(size))

    def teardown(replica: sc.Store) -> None:
        f = held.pop()
        c.metrics.update(bytes_moved=f.bytes_received, deltas=f.deltas_applied)
        f.close()
        if "verified" not in c.metrics:  # once: the replica holds the primary's bytes
            if not np.array_equal(np.asarray(replica), np.asarray(store)):
                raise AssertionError("full sync: replica differs from the primary")
            c.metrics["verified"] = 1
        replica.close()
        free_memory()

    c.run, c.setup, c.teardown = run, setup, teardown
    try:
        yield c
    finally:
        for f in held:
            f.close()
        primary.close()
        store.close()
        del store
        free_memory()


@case("replica.full_sync_raw")
def _full_sync_raw(scale: Scale) -> Iterator[Case]:
    n_pages = rscale(scale).full_sync // PAGE
    yield from _raw_case(scale, frame_bytes(n_pages), 5)


@case("replica.full_sync_raw_fresh")
def _full_sync_raw_fresh(scale: Scale) -> Iterator[Case]:
    """Raw TCP received into fresh memory, as a new replica's store is: every page the
    receive touches is mapped and zeroed by the kernel first."""
    link = RawLink(frame_bytes(rscale(scale).full_sync // PAGE))
    try:
        link.transfer()  # connection warmed up
        yield Case(run=link.transfer, rounds=W.rounds(scale, 5), warmup=1,
                   setup=lambda: (np.empty(link.nbytes, dtype=np.uint8).data,),  # untouched
                   teardown=lambda buf: (buf.release(), free_memory()))
    finally:
        link.close()
        del link
        free_memory()


# ---- delta streaming ---------------------------------------------------------------------------
@case("replica.stream")
def _stream(scale: Scale) -> Iterator[Case]:
    p = rscale(scale)
    store = W.touched_store(p.stream_store)
    primary = sc.Primary(store)
    replica = sc.Store(size=p.stream_store)
    follower = sc.Follower(replica, primary.address, reconnect=False)
    chunks = stream_chunks(store.n_pages, p.stream_commits)
    data = W.compressible_pages(len(chunks[0])).copy()
    tmo = timeout_for(p.stream_store)
    state: Dict[str, int] = {}
    c = Case(run=None, rounds=W.rounds(scale, 5), warmup=1,  # type: ignore[arg-type]
             metrics={"publishes": p.stream_commits})

    def setup() -> tuple:
        follower.wait_for(primary.epoch, timeout=tmo)  # caught up before the clock starts
        state.update(b0=follower.bytes_received, d0=follower.deltas_applied)
        data[:, 0] += 1  # new content every round
        return ()

    def run() -> None:
        last = 0
        for ids in chunks:
            store.write_pages(ids, data)
            last = primary.publish()
        follower.wait_for(last, timeout=tmo)

    def teardown() -> None:
        c.metrics.update(bytes_moved=follower.bytes_received - state["b0"],
                         frames=follower.deltas_applied - state["d0"])

    c.run, c.setup, c.teardown = run, setup, teardown
    try:
        follower.wait_for(primary.epoch, timeout=timeout_for(p.stream_store))
        yield c
        if not np.array_equal(np.asarray(replica), np.asarray(store)):
            raise AssertionError("delta streaming: replica differs from the primary")
    finally:
        follower.close()
        primary.close()
        replica.close()
        store.close()
        del store, replica
        free_memory()


@case("replica.stream_raw")
def _stream_raw(scale: Scale) -> Iterator[Case]:
    p = rscale(scale)
    per = p.stream_store // PAGE // p.stream_commits
    yield from _raw_case(scale, p.stream_commits * frame_bytes(per), 5)


# ---- follower lag under a committing writer ----------------------------------------------------
@case("replica.lag")
def _lag(scale: Scale) -> Iterator[Case]:
    p = rscale(scale)
    rng = np.random.default_rng(SEED + 51)
    with scratch_dir("lag") as d:
        ds = sc.DurableStore(d, size=p.lag_store, keep_checkpoints=1)
        arr = ds.array("int64")
        arr[:] = 1
        # Commit times: taken in the committing thread once the commit is durable, just
        # before the primary (whose listener comes next) publishes it. A timestamp taken
        # after commit() returns can be late by a GIL switch interval (5 ms) while the
        # follower's threads run, and would hide lag.
        committed: List[tuple] = []  # (epoch, monotonic seconds)
        ds.add_commit_listener(lambda delta, snap: committed.append((snap.epoch,
                                                                     time.monotonic())))
        primary = sc.Primary(ds)  # commits, and publishes every later commit
        replica = sc.Store(size=p.lag_store)
        applies: List[tuple] = []  # (epoch, monotonic seconds), from the follower's thread
        follower = sc.Follower(replica, primary.address, reconnect=False,
                               on_apply=lambda e, n: applies.append((e, time.monotonic())))
        batches = [(rng.integers(0, arr.size, p.lag_writes, dtype=np.int64),
                    rng.integers(0, 1 << 40, p.lag_writes, dtype=np.int64))
                   for _ in range(64)]
        c = Case(run=None, rounds=1, warmup=0,  # type: ignore[arg-type]
                 metrics={"lag_budget_ms": p.lag_budget_ms,
                          "commit_interval_ms": p.lag_interval * 1e3, "one_epoch": 1})
        out: Dict[str, Any] = {}

        def drive(n: int) -> None:
            """n commits, one every lag_interval (no catching up after a late one)."""
            applies.clear()
            committed.clear()
            t0 = time.monotonic()
            last = 0
            for i in range(n):
                idx, vals = batches[i % len(batches)]
                arr[idx] = vals
                last = ds.commit()
                delay = t0 + (i + 1) * p.lag_interval - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            follower.wait_for(last, timeout=30)
            out.update(commits=list(committed), applies=list(applies),
                       seconds=time.monotonic() - t0)

        def teardown() -> None:
            c.metrics.update(_lag_metrics(out["commits"], out["applies"]))
            c.metrics["commits_per_s"] = round(len(out["commits"]) / out["seconds"], 1)

        c.run = lambda: drive(int(round(p.lag_seconds / p.lag_interval)))
        c.teardown = teardown
        try:
            follower.wait_for(primary.epoch, timeout=timeout_for(p.lag_store))
            drive(30)  # warm-up: connections, pools, first journal appends
            yield c
        finally:
            follower.close()
            primary.close()
            replica.close()
            del arr
            ds.close()
            del ds, replica
            free_memory()


def _lag_metrics(commits: List[tuple], applies: List[tuple]) -> Dict[str, float]:
    """Per commit: time until the follower applied it (or a later, coalesced epoch), and
    how many committed epochs it lacked at the instant of the commit."""
    ce = np.array([e for e, _ in commits], dtype=np.int64)
    ct = np.array([t for _, t in commits])
    ae = np.array([e for e, _ in applies], dtype=np.int64)  # non-decreasing
    at = np.array([t for _, t in applies])
    j = np.searchsorted(ae, ce, side="left")
    if (j >= len(ae)).any():
        raise AssertionError("a commit was never applied by the follower")
    lag_s = np.maximum(at[j] - ct, 0.0)
    k = np.searchsorted(at, ct, side="right")  # applies done by each commit's instant
    held = np.where(k > 0, ae[np.maximum(k - 1, 0)], ce[0] - 1)
    lag_epochs = ce - held
    return {"commits": len(ce), "lag_p50_ms": round(float(np.percentile(lag_s, 50)) * 1e3, 3),
            "lag_p99_ms": round(float(np.percentile(lag_s, 99)) * 1e3, 3),
            "lag_max_ms": round(float(lag_s.max()) * 1e3, 3),
            "lag_max_epochs": int(lag_epochs.max()), "applies": len(ae)}


# ---- rows -------------------------------------------------------------------------------------
def _lbl(fmt: str):
    def label(s: Scale) -> str:
        p = rscale(s)
        return fmt.format(fs=human_bytes(p.full_sync), ss=human_bytes(p.stream_store),
                          sc=p.stream_commits,
                          sp=human_bytes(p.stream_store // p.stream_commits),
                          ls=human_bytes(p.lag_store), lsec=f"{p.lag_seconds:g}",
                          li=f"{p.lag_interval * 1e3:g}", lw=p.lag_writes,
                          lb=f"{p.lag_budget_ms:g}")
    return label


ROWS: List[Row] = [
    Row(5, _lbl("full sync of {fs} to a fresh Follower over loopback vs raw TCP of the "
                "same bytes"),
        ("replica.full_sync", T), ("replica.full_sync_raw", T), 2.0,
        "brief: replication at no less than half the speed of the socket"),
    Row(5, _lbl("(info) full sync of {fs} to a fresh Follower vs raw TCP of the same bytes "
                "into fresh memory (the kernel maps and zeroes each page, as for a new "
                "replica's store)"),
        ("replica.full_sync", T), ("replica.full_sync_raw_fresh", T), None),
    Row(5, _lbl("delta streaming: {sc} publishes of {sp} of changed pages ({ss}) to a "
                "caught-up Follower vs raw TCP of the same bytes"),
        ("replica.stream", T), ("replica.stream_raw", T), 2.0,
        "brief: replication at no less than half the speed of the socket"),
    Row(5, _lbl("(info) DELTA frames received per round vs publishes (a lagging follower "
                "gets one coalesced delta)"),
        ("replica.stream", "frames"), ("replica.stream", "publishes"), None),
    Row(5, _lbl("follower lag p99, ms, vs {lb} ms: commit every {li} ms for {lsec} s "
                "({lw} random int64 writes each, {ls})"),
        ("replica.lag", "lag_p99_ms"), ("replica.lag", "lag_budget_ms"), 1.0,
        "brief: p99 lag under 100 ms"),
    Row(5, _lbl("(info) follower lag p50, ms, vs the {li} ms commit interval"),
        ("replica.lag", "lag_p50_ms"), ("replica.lag", "commit_interval_ms"), None),
    Row(5, _lbl("(info) follower max lag, ms, vs {lb} ms"),
        ("replica.lag", "lag_max_ms"), ("replica.lag", "lag_budget_ms"), None),
    Row(5, _lbl("(info) follower max lag in epochs (commits behind), vs 1"),
        ("replica.lag", "lag_max_epochs"), ("replica.lag", "one_epoch"), None),
]


def register() -> None:
    """Add these rows to workloads.ROWS once (the cases registered on import)."""
    if not any(r.num[0].startswith("replica.") for r in W.ROWS):
        W.ROWS.extend(ROWS)


register()
