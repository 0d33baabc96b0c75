"""Section 4 of `statecore bench`: bytes and seconds to bring a replica up to date after
1% of the pages change, `store.delta(snap)` + `replica.apply(encoded)` vs a full copy
(`np.copyto`)."""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import numpy as np

from ..store import Store
from .common import (SEED, change_random_pages, collect, filled_store, median, now,
                     pages_per_change)
from .run import Run

log = logging.getLogger("statecore")


def section_incremental(run: Run, primary: Optional[Store]) -> None:
    out = run.res["incremental"]
    with run.guard("incremental/statecore"):
        log.info("statecore bench: [4] delta + apply vs full copy")
        if primary is None:
            primary = filled_store(run.size)
        out["statecore"] = _delta_and_apply(run, primary)
    if primary is not None and run.on("numpy"):
        with run.guard("incremental/full copy"):
            out["full_copy"] = _full_copy(run, primary)
    if primary is not None:
        collect()
        primary.close()


def _delta_and_apply(run: Run, primary: Store) -> Dict[str, Any]:
    r: Dict[str, Any] = {}
    k = pages_per_change(run.n_pages)
    base = primary.snapshot()
    replica = Store(size=run.size)
    try:
        t0 = now()
        full = primary.delta(0, base)
        enc = full.encode()
        r["full_sync_bytes"] = memoryview(enc).nbytes
        replica.apply(enc)
        r["full_sync_s"] = now() - t0
        del enc, full
        collect()
        times: List[float] = []
        sizes: List[int] = []
        pages: List[int] = []
        rng = np.random.default_rng(SEED + 4)
        for _ in range(3):
            change_random_pages(primary, rng, run.n_pages, k)
            t0 = now()
            nxt = primary.snapshot()
            d = primary.delta(base, nxt)
            enc = d.encode()
            replica.apply(enc)
            times.append(now() - t0)
            sizes.append(memoryview(enc).nbytes)
            pages.append(d.n_pages)
            del enc, d
            base.release()
            base = nxt
        r["replica_equal"] = _equal(primary, replica)
        if not r["replica_equal"]:
            raise RuntimeError("replica differs from the primary after applying deltas")
        r["pages_changed"] = k
        r["delta_pages"] = int(median(pages))
        r["delta_bytes"] = int(median(sizes))
        r["delta_apply_s"] = median(times)
        r["delta_apply_min_s"] = min(times)
    finally:
        base.release()
        collect()
        replica.close()
    return r


def _equal(a_store: Store, b_store: Store) -> bool:
    a, b = np.asarray(a_store), np.asarray(b_store)
    try:
        return bool(np.array_equal(a, b))
    finally:
        del a, b


def _full_copy(run: Run, primary: Store) -> Dict[str, Any]:
    dst = np.empty(run.size, dtype=np.uint8)
    dst.fill(1)  # touched: page faults are not what is measured
    src = np.asarray(primary)
    try:
        times = []
        for _ in range(3):
            t0 = now()
            np.copyto(dst, src)
            times.append(now() - t0)
    finally:
        del src, dst
    return {"copy_s": min(times), "bytes": run.size}
