"""Progress bars for the CLI: bytes, rate and ETA on a terminal; silent otherwise."""
from __future__ import annotations

import re
import sys
import time
from typing import Optional, TextIO


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'1G', '64M', '4096', '1.5GiB' -> bytes; ValueError for anything else, and for sizes
    that are not positive (a store of no bytes is always a mistake)."""
    m = _SIZE.fullmatch(text.strip())
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()]) if m else 0
    if n <= 0:
        raise ValueError(f"invalid size {text!r} (e.g. 64M, 1G)")
    return n


class ProgressBar:
    """Call update(done, total) as work advances; close() when finished."""

    def __init__(self, label: str, stream: Optional[TextIO] = None,
                 enabled: Optional[bool] = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.t0 = time.perf_counter()
        self._last = 0.0

    def update(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last < 0.1 and done < total:
            return
        self._last = now
        elapsed = max(now - self.t0, 1e-9)
        rate = done / elapsed
        frac = done / total if total else 1.0
        eta = (total - done) / rate if rate > 0 else float("inf")
        bar = "#" * int(frac * 30)
        self.stream.write(f"\r{self.label:<14} [{bar:<30}] {human_bytes(done)}/{human_bytes(total)}"
                          f" {human_bytes(rate)}/s ETA {eta:5.1f}s ")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

    def __call__(self, done: int, total: int) -> None:
        self.update(done, total)
