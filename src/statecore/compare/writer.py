"""Writer threads that keep writing while a backup runs, and the write rates before and
during it."""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

from .common import Batches, now

Sample = Tuple[int, float]


class WriterThread(threading.Thread):
    """Writes until stopped, counting the writes done; an error is raised by finish()."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.done = 0
        self.stop = threading.Event()
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            self.write_until_stopped()
        except BaseException as e:  # reported by finish()
            self.error = e

    def write_until_stopped(self) -> None:
        raise NotImplementedError

    def sample(self) -> Sample:
        return self.done, now()

    def finish(self) -> None:
        self.stop.set()
        self.join()
        if self.error is not None:
            raise self.error


class ArrayWriter(WriterThread):
    """Repeats write batches on `target` (a StateArray or numpy array)."""

    def __init__(self, target: Any, batches: Batches) -> None:
        super().__init__("statecore-bench-writer")
        self.target, self.batches = target, batches

    def write_until_stopped(self) -> None:
        i = 0
        while not self.stop.is_set():
            idx, vals = self.batches[i % len(self.batches)]
            self.target[idx] = vals
            self.done += len(idx)
            i += 1


def _rate(a: Sample, b: Sample) -> Optional[float]:
    writes, secs = b[0] - a[0], b[1] - a[1]
    return writes / secs if writes > 0 and secs > 0 else None


def under_writer(writer: WriterThread, idle_window: float,
                 action: Callable[[], Any]) -> Dict[str, Any]:
    """Run `action` while `writer` keeps writing; rates before and during."""
    writer.start()
    try:
        time.sleep(min(0.3, idle_window / 3))
        s0 = writer.sample()
        time.sleep(idle_window)
        s1 = writer.sample()
        out = action()
        s2 = writer.sample()
    finally:
        writer.finish()
    idle, during = _rate(s0, s1), _rate(s1, s2)
    return {"result": out, "writes_per_s_idle": idle, "writes_per_s_during": during,
            "seconds": s2[1] - s1[1],
            "writer_slowdown": idle / during if idle and during else None}
