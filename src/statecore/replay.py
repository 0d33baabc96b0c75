"""sc.replay: apply many deltas as one coalesced, vectorized, parallel pass."""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

from . import _core
from ._args import as_int
from .checkpoint import reporting
from .delta import as_delta

MAX_THREADS = _core.MAX_THREADS  # more would be capped by the core

if TYPE_CHECKING:
    from .store import Store


@dataclass(frozen=True)
class ReplayStats:
    deltas: int
    pages: int             # distinct pages written
    bytes: int             # bytes written into the store
    pages_in: int          # pages carried by all deltas
    pages_superseded: int  # carried, but a later delta had the page too
    pages_skipped: int     # the store already had that version or newer
    seconds: float

    @property
    def bytes_per_second(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else float("inf")


def replay(store: "Store", deltas: Iterable[Any], *, allow_gap: bool = False,
           threads: int = 0, progress: Optional[Callable[[int, int], None]] = None) -> ReplayStats:
    """Bring `store` to the newest state the deltas describe.

    Deltas (Delta objects or encoded buffers, each fully validated first) are sorted by
    base epoch; a gap between what the store has and what the deltas start from raises
    sc.EpochGap before anything is written. Each page is written once, with its newest
    content; pages the store already has are skipped, so replay is idempotent.
    `threads` 0 picks a count by size."""
    n_threads = as_int("threads", threads)
    if not 0 <= n_threads <= MAX_THREADS:
        raise ValueError(f"threads must be in [0, {MAX_THREADS}] (0 picks by size), got "
                         f"{n_threads}")
    t0 = time.perf_counter()
    # By base: the core's gap check walks them in order, and only base order never sees a
    # gap that the set as a whole does not have (target order would put a delta nested
    # in an earlier, wider one first and call it a gap).
    ds = sorted((as_delta(d) for d in deltas), key=lambda d: (d.base_epoch, d.target_epoch))
    # A DurableStore journals what is applied to it (durable.py).
    journaled = getattr(store, "_journaled_apply", None)
    with (journaled() if journaled is not None else nullcontext([])) as applied:
        applied.extend(ds)  # before: a replay that fails half-way keeps what it wrote
        store._begin_write()
        try:
            with reporting(progress) as counter:
                pages_in, written, superseded, skipped = store._replay(
                    [d._view for d in ds], bool(allow_gap), n_threads, counter)
        finally:
            store._write_lock.release()
        if not written:
            applied.clear()  # nothing to make durable

    nbytes = written * store.page_size
    stats = ReplayStats(deltas=len(ds), pages=written, bytes=nbytes, pages_in=pages_in,
                        pages_superseded=superseded, pages_skipped=skipped,
                        seconds=time.perf_counter() - t0)
    store._last_replay = stats
    return stats
