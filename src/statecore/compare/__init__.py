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

One module per concern: `common` (constants, timing, memory, data), `writer` (writer
threads), `redis_peer` and `lmdb_peer`, `environment` (peers present, machine), `run` (one
run's state), a module per section (`snapshot`, `backup`, `recovery`, `incremental`),
`rows` (what is compared with what) and `report` (table, JSON, chart).
"""
from __future__ import annotations

import logging
import os
import resource
import tempfile
from contextlib import ExitStack
from typing import Any, Dict, Optional, Sequence

from ..progress import human_bytes
from .backup import section_backup
from .common import (BATCH, CHANGE_FRACTION, JOURNAL_COMMITS, PAGE, PEERS, SEED, SHORT,
                     THREAD_BATCH, WRITES, MiB, collect, now)
from .environment import detect_peers, loadavg, machine
from .incremental import section_incremental
from .recovery import section_recovery
from .redis_peer import RedisError
from .report import format_table, print_result, write_chart
from .rows import ratio_rows
from .run import Run
from .snapshot import section_snapshot

__all__ = ["run_comparison", "compare", "format_table", "write_chart", "RedisError",
           "PAGE", "WRITES", "BATCH", "THREAD_BATCH", "CHANGE_FRACTION", "JOURNAL_COMMITS",
           "SEED", "PEERS", "SHORT", "MiB"]

log = logging.getLogger("statecore")


def _run_sections(run: Run) -> None:
    section_snapshot(run)
    collect()
    section_backup(run)
    collect()
    primary = section_recovery(run)
    collect()
    section_incremental(run, primary)
    del primary
    collect()


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
    enabled = detect_peers(list(skip) + env_skip)
    where = machine()
    t_start = now()
    with ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(
            prefix="statecore-bench-", dir=tmp_dir or os.environ.get("STATECORE_BENCH_TMP")))
        run = Run(size, tmp, enabled, writes, redis_writer)
        stack.callback(lambda: run.redis.stop() if run.redis is not None else None)
        log.info("statecore bench: %s in %s, peers %s", human_bytes(size), tmp, enabled)
        _run_sections(run)
    where["load_after"] = loadavg()
    result: Dict[str, Any] = {
        "size": size, "page_size": PAGE, "n_pages": size // PAGE, "writes": writes,
        "machine": where,
        "peers": {k: v for k, v in enabled.items() if k in PEERS},
        **run.res,
        "errors": run.errors,
        "seconds": now() - t_start,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    result["rows"] = ratio_rows(run)
    return result


def run_comparison(size: int, json_out: bool = False, chart: Optional[str] = None, *,
                   skip: Sequence[str] = (), writes: int = WRITES,
                   redis_writer: Optional[bool] = None) -> int:
    """The `statecore bench` command: run, print the markdown table (or JSON with
    json_out), optionally write a PNG chart. 0 on success, 1 if a measurement failed."""
    result = compare(size, skip=skip, writes=writes, redis_writer=redis_writer)
    if chart:
        result["chart"] = chart if write_chart(result, chart) else None
    print_result(result, json_out, chart)
    return 1 if result["errors"] else 0
