"""`statecore demo`: the whole engine end to end, with what each step cost.

A writer process builds real state in a DurableStore, serves it as a Primary, writes under
load while taking snapshots, commits and checkpoints. This process follows it over a
loopback socket, SIGKILLs the writer, recovers its directory, lets the follower catch up
with the recovered primary, and checks the two byte for byte."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import numpy as np

from .progress import human_bytes

if TYPE_CHECKING:
    from .durable import DurableStore
    from .replication import Primary

# ---- the writer (child process) -------------------------------------------------------------


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def run_writer(directory: str, size: int, seconds: float, seed: int) -> None:
    """Child side: fill, then write under load until killed."""
    from .durable import DurableStore
    from .replication import Primary

    ds = DurableStore(directory, size=size)
    primary = Primary(ds)
    _emit("address", host=primary.address[0], port=primary.address[1], uuid=ds.uuid.hex())
    rng = np.random.default_rng(seed)
    chunk = min(64 << 20, size)
    block = rng.integers(0, 2**63, chunk // 8, dtype=np.uint64)
    t0 = time.perf_counter()
    for i, off in enumerate(range(0, size, chunk)):
        n = min(chunk, size - off)
        ds.write(off, (block[:n // 8] + np.uint64(i)))  # distinct chunks, cheap to make
    fill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    epoch = ds.commit()
    _emit("filled", seconds=fill_s, bytes=size, commit_seconds=time.perf_counter() - t0,
          epoch=epoch, t=time.monotonic())
    _write_under_load(ds, rng, seconds)


WRITE_RATE = 1_000_000     # int64 writes per second: a busy service, not a memory benchmark
HOT_BYTES = 4 << 20        # the working set most writes go to
HOT_SHARE = 0.999


def _write_indices(rng: np.random.Generator, n: int, count: int) -> np.ndarray:
    """Skewed like real keyed state: nearly every write lands in a hot 4 MiB, the rest
    anywhere (a page-granular delta carries whole pages, so locality is what keeps deltas
    small)."""
    hot = max(1, min(n, HOT_BYTES // 8))
    idx = rng.integers(0, n, count)
    is_hot = rng.random(count) < HOT_SHARE
    idx[is_hot] = rng.integers(0, hot, int(is_hot.sum()))
    return idx


def _write_under_load(ds: Any, rng: np.random.Generator, seconds: float) -> None:
    arr = ds.array("int64")
    n = arr.size
    pauses: List[float] = []
    live: List[Any] = []
    writes = 0
    checkpoint: Optional[Any] = None
    t_start = time.perf_counter()
    next_snap = next_commit = t_start
    batch = 4096
    while True:
        idx = _write_indices(rng, n, batch)
        arr[idx] = idx
        writes += len(idx)
        now = time.perf_counter()
        pace = t_start + writes / WRITE_RATE - now if t_start != float("inf") else 0.0
        if pace > 0:
            time.sleep(pace)
            now = time.perf_counter()
        if now >= next_snap:
            t = time.perf_counter()
            live.append(ds.snapshot())  # a reader's consistent view, kept for the next 50 ms
            pauses.append(time.perf_counter() - t)
            if len(live) > 1:
                live.pop(0).release()
            next_snap = now + 0.05
        if now >= next_commit:
            epoch = ds.commit()
            _emit("commit", t=time.monotonic(), **ds.last_commit)
            next_commit = now + 0.1
        if checkpoint is None and now - t_start > seconds * 0.3:
            t_ck = time.perf_counter()
            checkpoint = ds.checkpoint()
            checkpoint.add_done_callback(lambda f, t_ck=t_ck: _emit(
                "checkpoint", epoch=f.result(), seconds=time.perf_counter() - t_ck))
        if now - t_start > seconds and checkpoint is not None and checkpoint.done():
            _emit("loaded", writes=writes, seconds=now - t_start,
                  snapshot_pauses=sorted(pauses), stats=ds.stats())
            t_start = float("inf")  # report once, keep writing until killed


# ---- the driver (this process) ---------------------------------------------------------------

class _Events:
    """Reads the writer's JSON lines in a thread; wait_for(event) blocks until seen."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.by_kind: Dict[str, List[dict]] = {}
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            with self.cond:
                self.by_kind.setdefault(ev["event"], []).append(ev)
                self.cond.notify_all()
        with self.cond:
            self.by_kind.setdefault("exit", []).append({})
            self.cond.notify_all()

    def wait_for(self, kind: str, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        with self.cond:
            while kind not in self.by_kind:
                if "exit" in self.by_kind:
                    raise RuntimeError(f"writer exited before '{kind}' "
                                       f"(code {self.proc.poll()})")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"writer did not report '{kind}' in {timeout} s")
                self.cond.wait(left)
            return self.by_kind[kind][-1]

    def all(self, kind: str) -> List[dict]:
        with self.cond:
            return list(self.by_kind.get(kind, []))


def run_demo(size: int = 1 << 30, seconds: float = 5.0, seed: int = 1,
             directory: Optional[str] = None, log: Any = print) -> Dict[str, Any]:
    """Run the whole scenario; returns the measurements (also logged as it goes)."""
    from .replication import Follower
    from .store import Store

    tmp = None
    if directory is None:
        tmp = tempfile.TemporaryDirectory(prefix="statecore-demo-")
        directory = tmp.name
    primary_dir = os.path.join(directory, "primary")
    proc = subprocess.Popen([sys.executable, "-m", "statecore", "_demo-writer", primary_dir,
                             str(size), str(seconds), str(seed)], stdout=subprocess.PIPE,
                            text=True)
    events = _Events(proc)
    results: Dict[str, Any] = {"size": size}
    try:
        addr = events.wait_for("address", 60)
        log(f"writer pid {proc.pid} serving on {addr['host']}:{addr['port']}, filling "
            f"{human_bytes(size)}")
        replica = Store(size=size)
        applied: Dict[int, float] = {}
        follower = Follower(replica, (addr["host"], addr["port"]),
                            on_apply=lambda e, n: applied.__setitem__(e, time.monotonic()))
        filled = events.wait_for("filled")
        results.update(fill_seconds=filled["seconds"], first_commit_seconds=filled["commit_seconds"])
        follower.wait_for(filled["epoch"], timeout=600)
        results["full_sync_seconds"] = applied[min(e for e in applied if e >= filled["epoch"])] - filled["t"]
        log(f"filled in {filled['seconds']:.2f} s; replica in sync after "
            f"{results['full_sync_seconds']:.2f} s; writing under load for {seconds:.0f} s")
        loaded = events.wait_for("loaded", seconds * 20 + 120)
        ckpt = events.wait_for("checkpoint", 600)
        time.sleep(0.05 + np.random.default_rng().random() * 0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        commits = events.all("commit")
        last_done = max(c["epoch"] for c in commits)
        log(f"SIGKILLed the writer after {len(commits)} commits (last reported epoch {last_done})")
        _summarize_load(results, loaded, ckpt, commits, applied)

        ds, new_primary = _restart_primary(primary_dir, addr["port"], last_done, results, log)
        follower.wait_for(ds.committed_epoch, timeout=120)
        equal = bytes(np.asarray(ds)) == bytes(np.asarray(replica))
        results.update(replica_epoch=follower.epoch, replica_equal=equal)
        follower.close()
        new_primary.close()
        ds.close()
        if not equal:
            raise AssertionError("replica differs from the recovered primary")
        log("replica and recovered primary are byte-for-byte equal")
        return results
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if tmp is not None:
            tmp.cleanup()


def _restart_primary(primary_dir: str, port: int, last_done: int, results: Dict[str, Any],
                     log: Any) -> Tuple["DurableStore", "Primary"]:
    """Recover the killed writer's directory and serve it again on its port. The recovered
    epoch is read before the new Primary, whose first commit publishes the recovered
    state as the next epoch."""
    from .durable import DurableStore
    from .replication import Primary

    t0 = time.perf_counter()
    ds = DurableStore(primary_dir)
    results["recovery"] = ds.recovery
    results["recovery_seconds"] = time.perf_counter() - t0
    recovered = ds.committed_epoch
    results.update(recovered_epoch=recovered, last_reported_commit=last_done)
    try:
        if recovered < last_done:
            raise AssertionError(f"recovered epoch {recovered} is older than the last "
                                 f"reported commit {last_done}")
        log(f"recovered: {ds.recovery}")
        return ds, Primary(ds, port=port)
    except BaseException:
        ds.close()
        raise


def _summarize_load(results: Dict[str, Any], loaded: dict, ckpt: dict, commits: List[dict],
                    applied: Dict[int, float]) -> None:
    pauses = np.array(loaded["snapshot_pauses"]) * 1e6
    lags = [applied[c["epoch"]] - c["t"] for c in commits if c["epoch"] in applied]
    under_load = [c for c in commits[1:]]
    results.update(
        writes_per_second=loaded["writes"] / loaded["seconds"],
        snapshots=len(pauses),
        snapshot_pause_us_p50=float(np.percentile(pauses, 50)),
        snapshot_pause_us_p99=float(np.percentile(pauses, 99)),
        commits=len(commits),
        delta_bytes_mean=float(np.mean([c["bytes"] for c in under_load])) if under_load else 0.0,
        commit_ms_p50=float(np.percentile([c["seconds"] * 1e3 for c in under_load], 50))
        if under_load else 0.0,
        checkpoint_seconds=ckpt["seconds"],
        follower_lag_ms_p50=float(np.percentile(lags, 50) * 1e3) if lags else float("nan"),
        follower_lag_ms_p99=float(np.percentile(lags, 99) * 1e3) if lags else float("nan"),
        preserved_pages_at_end=loaded["stats"]["preserved_pages"],
    )


def format_table(r: Dict[str, Any]) -> str:
    rec = r["recovery"]
    rows = [
        ("state", human_bytes(r["size"])),
        ("fill (store.write, 64 MiB at a time)", f"{r['fill_seconds']:.2f} s"),
        ("first commit (whole state to journal, fsync)", f"{r['first_commit_seconds']:.2f} s"),
        ("full sync to follower over loopback", f"{r['full_sync_seconds']:.2f} s"),
        ("int64 writes under load (paced, 99.9% to a hot 4 MiB)",
         f"{r['writes_per_second'] / 1e6:.2f} M/s"),
        (f"snapshot pause p50 / p99 ({r['snapshots']} snapshots)",
         f"{r['snapshot_pause_us_p50']:.0f} / {r['snapshot_pause_us_p99']:.0f} us"),
        (f"commit every 100 ms: delta size mean ({r['commits']} commits)",
         human_bytes(r["delta_bytes_mean"])),
        ("commit latency p50", f"{r['commit_ms_p50']:.1f} ms"),
        ("background checkpoint under load", f"{r['checkpoint_seconds']:.2f} s"),
        ("follower lag p50 / p99", f"{r['follower_lag_ms_p50']:.1f} / "
                                   f"{r['follower_lag_ms_p99']:.1f} ms"),
        ("recovery after SIGKILL", f"{r['recovery_seconds']:.2f} s "
         f"(checkpoint {rec.checkpoint_epoch} + {rec.deltas_replayed} deltas, "
         f"{human_bytes(rec.bytes)})"),
        ("replay throughput", f"{human_bytes(rec.bytes / max(rec.seconds, 1e-9))}/s"),
        ("recovered epoch vs last reported commit",
         f"{r['recovered_epoch']} >= {r['last_reported_commit']}"),
        ("replica == recovered primary", "yes, byte for byte" if r["replica_equal"] else "NO"),
    ]
    w = max(len(a) for a, _ in rows)
    lines = [f"| {'step':<{w}} | cost |", f"|{'-' * (w + 2)}|------|"]
    lines += [f"| {a:<{w}} | {b} |" for a, b in rows]
    return "\n".join(lines)
