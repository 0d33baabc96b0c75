"""Section 2 of `statecore bench`: time and size of a backup, `snap.save()` vs py-lmdb
`env.copy()` vs Redis BGSAVE vs `np.save` (which blocks writers), idle and, for statecore
and Redis, under a concurrent writer."""
from __future__ import annotations

import logging
import os
from typing import Any, Dict

import numpy as np

from ..store import Store
from . import lmdb_peer, redis_peer
from .common import MiB, collect, file_bytes, filled_store, fsync_path, now
from .run import Run
from .writer import ArrayWriter, under_writer

log = logging.getLogger("statecore")


def section_backup(run: Run) -> None:
    out = run.res["backup"]
    store = filled_store(run.size)
    try:
        with run.guard("backup/statecore"):
            log.info("statecore bench: [2] statecore snap.save")
            out["statecore"] = _statecore(run, store)
        if run.on("numpy"):
            run.measure("backup", "numpy", "[2] np.save", lambda: _numpy(run, store))
        if run.on("lmdb"):
            run.measure("backup", "lmdb", "[2] LMDB load and env.copy",
                        lambda: _lmdb(run, store))
        if run.on("redis"):
            run.measure("backup", "redis", "[2] Redis load and BGSAVE",
                        lambda: _redis(run, store))
        with run.guard("backup/statecore under writes"):
            log.info("statecore bench: [2] statecore snap.save under a writer")
            out.setdefault("statecore", {}).update(_statecore_under_writer(run, store))
    finally:
        collect()
        store.close()


def _statecore(run: Run, store: Store) -> Dict[str, Any]:
    snap = store.snapshot()
    try:
        t0 = now()
        nbytes = snap.save(run.path("state.ckpt"))
        secs = now() - t0
    finally:
        snap.release()
    return {"save_s": secs, "file_bytes": nbytes}


def _statecore_under_writer(run: Run, store: Store) -> Dict[str, Any]:
    arr = store.array("int64")
    path = run.path("state-under-writes.ckpt")
    box: Dict[str, Any] = {}

    def action() -> None:
        snap = store.snapshot()
        try:
            t0 = now()
            snap.save(path)
            box["save_s"] = now() - t0
            box["preserved_bytes"] = store.stats()["preserved_bytes"]
        finally:
            snap.release()
    try:
        r = under_writer(ArrayWriter(arr, run.thread_batches), run.idle_window, action)
    finally:
        del arr
        if os.path.exists(path):
            os.unlink(path)
    r.pop("result")
    return {"under_writes": dict(r, **box)}


def _numpy(run: Run, store: Store) -> Dict[str, Any]:
    path = run.path("state.npy")
    view = np.asarray(store)
    try:
        t0 = now()
        with open(path, "wb") as f:
            np.save(f, view, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        secs = now() - t0
    finally:
        del view
    return {"save_s": secs, "file_bytes": os.path.getsize(path),
            "note": "blocking: writers must pause for a consistent dump"}


def _lmdb(run: Run, store: Store) -> Dict[str, Any]:
    import lmdb
    src, dst = run.path("lmdb"), run.path("lmdb-copy")
    os.makedirs(dst)
    env = lmdb.open(src, map_size=4 * run.size + 256 * MiB, subdir=True, max_dbs=0)
    try:
        view = memoryview(store)
        try:
            t0 = now()
            lmdb_peer.load_values(env, view, run.n_pages)
            load_s = now() - t0
        finally:
            view.release()
        entries = env.stat()["entries"]
        if entries != run.n_pages:
            raise RuntimeError(f"LMDB holds {entries} values, expected {run.n_pages}")
        t0 = now()
        env.copy(dst)
        fsync_path(os.path.join(dst, "data.mdb"))  # copy may not fsync; count it anyway
        copy_s = now() - t0
    finally:
        env.close()
    return {"load_s": load_s, "copy_s": copy_s,
            "env_file": file_bytes(os.path.join(src, "data.mdb")),
            "file_bytes": os.path.getsize(os.path.join(dst, "data.mdb"))}


def _redis(run: Run, store: Store) -> Dict[str, Any]:
    r: Dict[str, Any] = {}
    rdir = run.path("redis")
    os.makedirs(rdir)
    run.redis = redis = redis_peer.RedisServer(run.enabled["redis_binary"], rdir)
    redis.start(timeout=60)
    conn = redis.conn
    assert conn is not None
    view = memoryview(store)
    try:
        t0 = now()
        redis_peer.load_values(conn, view, run.n_pages)
        r["load_s"] = now() - t0
    finally:
        view.release()
    if conn.call("DBSIZE") != run.n_pages:
        raise RuntimeError("Redis DBSIZE does not match the pages loaded")
    mem = conn.info("memory")
    r["used_memory"] = int(mem["used_memory"])
    r["used_memory_rss"] = int(mem["used_memory_rss"])
    timeout = redis_peer.redis_timeout(run.size)
    r.update(redis_peer.bgsave(conn, timeout))
    if run.redis_writer:
        loaded = under_writer(redis_peer.RedisWriter(redis.port, run.n_pages),
                              run.idle_window, lambda: redis_peer.bgsave(conn, timeout))
        res = loaded.pop("result")
        r["under_writes"] = dict(loaded, bgsave_s=res["bgsave_s"], fork_s=res["fork_s"],
                                 cow_bytes=res["cow_bytes"])
    r["file_bytes"] = os.path.getsize(os.path.join(rdir, "dump.rdb"))
    return r
