"""The LMDB peer (py-lmdb, optional): every page stored as one value under its big-endian
page number, loaded in large transactions and read back with a cursor."""
from __future__ import annotations

from typing import Any

from .common import PAGE

VALUES_PER_TXN = 16384


def lmdb_version() -> str:
    """The py-lmdb and LMDB versions; ImportError when py-lmdb is not installed."""
    import lmdb
    return f"py-lmdb {lmdb.__version__} (LMDB {'.'.join(map(str, lmdb.version()))})"


def load_values(env: Any, view: memoryview, n_pages: int) -> None:
    for start in range(0, n_pages, VALUES_PER_TXN):
        stop = min(start + VALUES_PER_TXN, n_pages)
        with env.begin(write=True) as txn:
            txn.cursor().putmulti(
                ((p.to_bytes(8, "big"), view[p * PAGE:(p + 1) * PAGE])
                 for p in range(start, stop)), append=True)


def read_values(env: Any, dst: memoryview) -> int:
    """Copy every value to its page in `dst`; returns how many values were read."""
    n = 0
    with env.begin(buffers=True) as txn:
        for k, v in txn.cursor():
            p = int.from_bytes(k, "big")
            dst[p * PAGE:(p + 1) * PAGE] = v
            n += 1
    return n
