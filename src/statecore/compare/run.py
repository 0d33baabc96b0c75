"""One `statecore bench` run: its settings, scratch directory, results and errors, shared by
the four sections."""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional

from .common import BATCH, PAGE, THREAD_BATCH, MiB, collect, write_batches
from .redis_peer import RedisServer

log = logging.getLogger("statecore")


class Run:
    def __init__(self, size: int, tmp: str, enabled: Dict[str, str], writes: int,
                 redis_writer: bool) -> None:
        self.size = size
        self.redis_writer = redis_writer
        self.n_pages = size // PAGE
        self.tmp = tmp
        self.enabled = enabled        # peer -> version, "not installed" or "disabled"
        self.writes = writes
        self.errors: List[str] = []
        self.res: Dict[str, Dict[str, Any]] = {"snapshot": {}, "backup": {}, "recovery": {},
                                               "incremental": {}}
        self.batches = write_batches(size // 8, writes, BATCH)
        self.thread_batches = write_batches(size // 8, writes, THREAD_BATCH)
        # Set by the backup section, restarted and stopped by the recovery section.
        self.redis: Optional[RedisServer] = None
        self.idle_window = 1.0 if size >= 256 * MiB else 0.3

    def on(self, peer: str) -> bool:
        v = self.enabled.get(peer, "")
        return bool(v) and not v.startswith(("not installed", "disabled"))

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """A failed measurement is logged and recorded in `errors`; the run goes on."""
        try:
            yield
        except Exception as e:
            log.exception("statecore bench: %s failed", what)
            self.errors.append(f"{what}: {type(e).__name__}: {e}")
        finally:
            collect()

    def measure(self, section: str, peer: str, message: str,
                measurement: Callable[[], Dict[str, Any]]) -> None:
        """Run one measurement under guard(); its result becomes res[section][peer]."""
        with self.guard(f"{section}/{peer}"):
            log.info("statecore bench: %s", message)
            self.res[section][peer] = measurement()

    def path(self, *parts: str) -> str:
        return os.path.join(self.tmp, *parts)
