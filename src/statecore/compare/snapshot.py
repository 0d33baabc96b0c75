"""Section 1 of `statecore bench`: the pause to take a snapshot, and what a live snapshot
costs a writer in time and memory, for statecore and for fork() of this process."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..store import Store
from .common import (PAGE, Batches, collect, fill_array, filled_store, fork_quietly, median,
                     now, pss, rss, run_writes)
from .run import Run


def section_snapshot(run: Run) -> None:
    out = run.res["snapshot"]
    idx_all = np.concatenate([i for i, _ in run.batches])
    out["writes"] = run.writes
    out["pages_touched"] = int(np.unique((idx_all * 8) // PAGE).size)
    del idx_all
    run.measure("snapshot", "statecore", "[1] statecore snapshot pause and writer slowdown",
                lambda: _statecore(run))
    if run.on("fork"):
        run.measure("snapshot", "fork", "[1] fork() pause and writer slowdown",
                    lambda: _fork(run))


def _live_figures(r: Dict[str, Any], live: List[float], growth: List[int],
                  live_key: str) -> None:
    r["writes_live_rounds_s"] = live
    r["writes_live_first_s"] = live[0]
    r[live_key] = median(live)
    r["writer_slowdown"] = r[live_key] / r["writes_s"]
    r["memory_growth_bytes"] = max(growth)


# ---- statecore -------------------------------------------------------------------------------

def _statecore(run: Run) -> Dict[str, Any]:
    r: Dict[str, Any] = {}
    store = filled_store(run.size)
    try:
        arr = store.array("int64")
        pauses = []
        for _ in range(51):
            t0 = now()
            snap = store.snapshot()
            pauses.append(now() - t0)
            snap.release()
        r["pause_s"], r["pause_min_s"] = median(pauses), min(pauses)
        r["writes_s"] = min(run_writes(arr, run.batches) for _ in range(3))
        live, growth, preserved = _writes_with_snapshot(store, arr, run.batches)
        # The first round also grows the store's pool of preserved pages (fresh memory);
        # later rounds reuse it, as a service taking snapshots repeatedly does.
        _live_figures(r, live, growth, "writes_live_snapshot_s")
        r["preserved_bytes"] = max(preserved)
        del arr
    finally:
        store.close()
    return r


def _writes_with_snapshot(store: Store, arr: Any,
                          batches: Batches) -> Tuple[List[float], List[int], List[int]]:
    """Three rounds of the writes, each with a live snapshot: seconds, RSS growth and the
    store's preserved bytes."""
    live, growth, preserved = [], [], []
    for _ in range(3):
        collect()
        rss0 = rss()
        snap = store.snapshot()
        try:
            live.append(run_writes(arr, batches))
            growth.append(rss() - rss0)
            preserved.append(store.stats()["preserved_bytes"])
        finally:
            snap.release()
    return live, growth, preserved


# ---- fork() ----------------------------------------------------------------------------------

def _fork_exit_times(rounds: int) -> Tuple[List[float], List[float]]:
    """fork() a child that exits at once: seconds until fork() returns in the parent, and
    until the child has exited and been reaped."""
    ret, full = [], []
    for _ in range(rounds):
        t0 = now()
        pid = fork_quietly()
        if pid == 0:
            os._exit(0)
        t1 = now()
        os.waitpid(pid, 0)
        ret.append(t1 - t0)
        full.append(now() - t0)
    return ret, full


def _fork(run: Run) -> Dict[str, Any]:
    r: Dict[str, Any] = {}
    a = fill_array(np.empty(run.size, dtype=np.uint8))
    a64 = a.view(np.int64)
    try:
        ret, full = _fork_exit_times(7)
        r["pause_s"], r["pause_min_s"] = median(ret), min(ret)
        r["fork_exit_wait_s"] = median(full)
        r["writes_s"] = min(run_writes(a64, run.batches) for _ in range(3))
        live, growth = _writes_with_child(a64, run.batches)
        _live_figures(r, live, growth, "writes_live_child_s")
        r["memory_measure"] = "PSS parent + child"
    finally:
        del a64, a
    collect()
    r["pause_small_pages_s"] = _fork_pause_small_pages(run.size)
    return r


def _writes_with_child(a64: np.ndarray, batches: Batches) -> Tuple[List[float], List[int]]:
    """Three rounds of the writes, each while a forked child holds the old state: seconds,
    and the growth of PSS of parent + child."""
    live, growth = [], []
    for _ in range(3):
        collect()
        pss_before = pss(os.getpid())
        rfd, wfd = os.pipe()
        pid = fork_quietly()
        if pid == 0:  # the child holds the old state until the parent says go
            try:
                os.close(wfd)
                os.read(rfd, 1)
            finally:
                os._exit(0)
        os.close(rfd)
        try:
            live.append(run_writes(a64, batches))
            growth.append(pss(os.getpid()) + pss(pid) - pss_before)
        finally:
            os.close(wfd)
            os.waitpid(pid, 0)
    return live, growth


def _fork_pause_small_pages(size: int) -> Optional[float]:
    """fork() latency when the state is in 4 KiB pages (numpy and statecore ask for
    transparent huge pages; Redis turns them off): page tables are 512x larger."""
    core = getattr(np, "_core", None) or getattr(np, "core", None)
    setter = getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)
    if setter is None:
        return None
    old = setter(False)
    try:
        a = np.empty(size, dtype=np.uint8)
    finally:
        setter(old)
    try:
        fill_array(a)
        return median(_fork_exit_times(5)[0])
    finally:
        del a
