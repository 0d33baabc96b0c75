"""Section 3 of `statecore bench`: time to get the full state back after a restart.
`Store.load(checkpoint)` and a `DurableStore` reopen (checkpoint + journal) vs restarting
Redis from its RDB vs reopening the LMDB copy and reading every value vs `np.load` of a full
dump. Every input file is read once first, so all start from a warm page cache."""
from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Dict, Optional

import numpy as np

from ..durable import DurableStore
from ..store import Store
from . import lmdb_peer
from .common import (JOURNAL_COMMITS, SEED, change_random_pages, collect, now,
                     pages_per_change, warm)
from .redis_peer import redis_timeout
from .run import Run

log = logging.getLogger("statecore")


def section_recovery(run: Run) -> Optional[Store]:
    """Returns the store loaded from the checkpoint (the primary of section 4), if any."""
    out = run.res["recovery"]
    if run.redis is not None:
        run.measure("recovery", "redis", "[3] Redis restart from RDB", lambda: _redis(run))
    if run.on("lmdb") and os.path.exists(run.path("lmdb-copy", "data.mdb")):
        run.measure("recovery", "lmdb", "[3] LMDB reopen and read every value",
                    lambda: _lmdb(run))
    if run.on("numpy") and os.path.exists(run.path("state.npy")):
        run.measure("recovery", "numpy", "[3] np.load", lambda: _numpy(run))
    primary = None
    if os.path.exists(run.path("state.ckpt")):
        primary = _load_checkpoint(run)
    if primary is not None:
        with run.guard("recovery/durable"):
            log.info("statecore bench: [3] DurableStore reopen (checkpoint + journal)")
            out.setdefault("statecore", {}).update(_durable(run, primary))
    return primary


def _load_checkpoint(run: Run) -> Optional[Store]:
    primary = None
    with run.guard("recovery/statecore"):
        log.info("statecore bench: [3] Store.load")
        warm(run.path("state.ckpt"))
        t0 = now()
        primary = Store.load(run.path("state.ckpt"))
        run.res["recovery"]["statecore"] = {
            "load_s": now() - t0, "file_bytes": os.path.getsize(run.path("state.ckpt"))}
        for f in ("state.ckpt", "state.npy"):  # no longer needed: free the disk
            if os.path.exists(run.path(f)):
                os.unlink(run.path(f))
    return primary


def _redis(run: Run) -> Dict[str, Any]:
    redis = run.redis
    assert redis is not None
    try:
        redis.stop()
        warm(os.path.join(redis.dir, "dump.rdb"))
        secs = redis.start(timeout=redis_timeout(run.size))
        assert redis.conn is not None
        keys = redis.conn.call("DBSIZE")
        if keys != run.n_pages:
            raise RuntimeError(f"Redis restarted with {keys} keys, expected {run.n_pages}")
        mem = redis.conn.info("memory")
        return {"restart_s": secs, "keys": keys, "used_memory_rss": int(mem["used_memory_rss"])}
    finally:
        redis.stop()
        run.redis = None
        shutil.rmtree(redis.dir, ignore_errors=True)


def _lmdb(run: Run) -> Dict[str, Any]:
    import lmdb
    path = run.path("lmdb-copy")
    shutil.rmtree(run.path("lmdb"), ignore_errors=True)
    warm(path)
    t0 = now()
    env = lmdb.open(path, readonly=True, lock=False, subdir=True)
    try:
        dst = np.empty(run.size, dtype=np.uint8)
        mv = dst.data
        n = lmdb_peer.read_values(env, mv)
        secs = now() - t0
        mv.release()
        del dst
    finally:
        env.close()
        shutil.rmtree(path, ignore_errors=True)
    if n != run.n_pages:
        raise RuntimeError(f"read {n} LMDB values, expected {run.n_pages}")
    return {"reopen_read_s": secs}


def _numpy(run: Run) -> Dict[str, Any]:
    path = run.path("state.npy")
    warm(path)
    t0 = now()
    x = np.load(path)
    secs = now() - t0
    ok = x.nbytes == run.size
    del x
    if not ok:
        raise RuntimeError("np.load returned the wrong size")
    return {"load_s": secs}


def _durable(run: Run, primary: Store) -> Dict[str, Any]:
    d = run.path("durable")
    _write_durable(run, primary, d)
    collect()
    warm(d)
    t0 = now()
    ds = DurableStore(d)
    secs = now() - t0
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


def _write_durable(run: Run, primary: Store, d: str) -> None:
    """A DurableStore in `d` holding the primary's state as a checkpoint, then
    JOURNAL_COMMITS commits of changed pages in its journal."""
    rng = np.random.default_rng(SEED + 3)
    k = pages_per_change(run.n_pages)
    ds = DurableStore(d, size=run.size, keep_checkpoints=1)
    try:
        view = np.asarray(primary)
        try:
            ds.write(0, view)
        finally:
            del view
        ds.checkpoint().result()
        for _ in range(JOURNAL_COMMITS):
            change_random_pages(ds, rng, run.n_pages, k)
            ds.commit()
    finally:
        ds.close()
