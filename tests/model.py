"""A pure-Python reference model of a statecore Store, for tests to compare against.

It follows DESIGN.md literally and knows nothing of the native core:
- the state is a bytearray; a new store is at epoch 1; every write belongs to `epoch`;
- a page's version is the epoch of its last write (0: never written);
- `snapshot()` closes the open epoch E: the snapshot is a copy of the bytes and versions
  at that moment, with epoch E, and later writes belong to E + 1;
- a page is preserved (copied once) by the first write to it while a live snapshot still
  needs its current content, i.e. while some live snapshot S has version <= S; the copy
  is freed when no live snapshot in [version, epoch of the overwriting write) remains.
  The counters `preserved_pages` and `pages_preserved_total` follow from that.

Writes through `ArrayModel` mark exactly the pages holding the elements the numpy key
selects, which is what the store's StateArray promises for every key shape the model
tests use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import numpy as np


@dataclass(frozen=True)
class SnapshotModel:
    epoch: int
    data: bytes
    versions: tuple

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset:offset + length]


@dataclass
class PreservedModel:
    page: int
    version: int
    until: int


class StoreModel:
    def __init__(self, size: int, page_size: int = 4096, epoch: int = 1) -> None:
        assert size > 0 and size % page_size == 0
        self.size = size
        self.page_size = page_size
        self.n_pages = size // page_size
        self.data = bytearray(size)
        self.versions = [0] * self.n_pages
        self.epoch = epoch
        self.snapshots: dict[int, SnapshotModel] = {}
        self.preserved: list[PreservedModel] = []
        self.pages_preserved_total = 0

    # ---- page bookkeeping --------------------------------------------------------
    def pages_of_range(self, offset: int, length: int) -> range:
        if length <= 0:
            return range(0)
        return range(offset // self.page_size, (offset + length - 1) // self.page_size + 1)

    def touch(self, pages: Iterable[int]) -> None:
        """Record a write to `pages` in the open epoch (before the bytes change)."""
        newest = max(self.snapshots, default=0)
        for p in sorted(set(int(p) for p in pages)):
            v = self.versions[p]
            if v == self.epoch:
                continue
            if newest and v <= newest:
                self.preserved.append(PreservedModel(p, v, self.epoch))
                self.pages_preserved_total += 1
            self.versions[p] = self.epoch

    def _still_needed(self, node: PreservedModel) -> bool:
        return any(node.version <= s < node.until for s in self.snapshots)

    # ---- writes --------------------------------------------------------------------
    def write(self, offset: int, data: Any) -> None:
        b = bytes(memoryview(data).cast("B")) if not isinstance(data, bytes) else data
        assert 0 <= offset and offset + len(b) <= self.size
        self.touch(self.pages_of_range(offset, len(b)))
        self.data[offset:offset + len(b)] = b

    def write_pages(self, page_ids: Iterable[int], data: Any) -> None:
        ids = [int(p) for p in np.asarray(page_ids).reshape(-1)]
        b = bytes(memoryview(np.ascontiguousarray(data)).cast("B"))
        ps = self.page_size
        assert len(b) == len(ids) * ps
        self.touch(ids)
        for i, p in enumerate(ids):  # in order: a repeated id keeps its last content
            self.data[p * ps:(p + 1) * ps] = b[i * ps:(i + 1) * ps]

    def array(self, dtype: Any, *, offset: int = 0, shape: Any = None) -> "ArrayModel":
        return ArrayModel(self, dtype, offset=offset, shape=shape)

    # ---- snapshots -------------------------------------------------------------------
    def snapshot(self) -> int:
        e = self.epoch
        self.snapshots[e] = SnapshotModel(e, bytes(self.data), tuple(self.versions))
        self.epoch = e + 1
        return e

    def release(self, epoch: int) -> None:
        del self.snapshots[epoch]
        self.preserved = [n for n in self.preserved if self._still_needed(n)]

    # ---- reads -----------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset:offset + length])

    def page(self, page: int) -> bytes:
        ps = self.page_size
        return bytes(self.data[page * ps:(page + 1) * ps])

    def snapshot_read(self, epoch: int, offset: int, length: int) -> bytes:
        return self.snapshots[epoch].read(offset, length)

    def snapshot_read_pages(self, epoch: int, page_ids: Iterable[int]) -> tuple[bytes, np.ndarray]:
        snap = self.snapshots[epoch]
        ps = self.page_size
        ids = [int(p) for p in page_ids]
        data = b"".join(snap.data[p * ps:(p + 1) * ps] for p in ids)
        return data, np.array([snap.versions[p] for p in ids], dtype=np.uint64)

    def changed_pages(self, since: int, until: Optional[int] = None) -> np.ndarray:
        """Pages whose version as of snapshot `until` (None: the live state) is in
        (since, until]."""
        versions = self.versions if until is None else self.snapshots[until].versions
        top = self.epoch if until is None else until
        return np.array([p for p, v in enumerate(versions) if since < v <= top],
                        dtype=np.uint64)

    def stats(self) -> dict:
        return {
            "epoch": self.epoch,
            "live_snapshots": len(self.snapshots),
            "oldest_snapshot": min(self.snapshots, default=None),
            "preserved_pages": len(self.preserved),
            "preserved_bytes": len(self.preserved) * self.page_size,
            "pages_preserved_total": self.pages_preserved_total,
            "dirty_pages": sum(1 for v in self.versions if v),
            "size": self.size,
            "page_size": self.page_size,
            "n_pages": self.n_pages,
        }


class ArrayModel:
    """The numpy view a StateArray stands for, with page tracking on every write."""

    def __init__(self, model: StoreModel, dtype: Any, *, offset: int = 0,
                 shape: Any = None) -> None:
        self.model = model
        self.dtype = np.dtype(dtype)
        self.offset = offset
        if shape is None:
            shape = ((model.size - offset) // self.dtype.itemsize,)
        elif not isinstance(shape, tuple):
            shape = (shape,)
        self.shape = tuple(int(d) for d in shape)
        self.size = int(np.prod(self.shape, dtype=np.int64))

    def view(self) -> np.ndarray:
        """A writable numpy view of the model's bytes (writes through it are untracked)."""
        return np.frombuffer(self.model.data, dtype=self.dtype, count=self.size,
                             offset=self.offset).reshape(self.shape)

    def __getitem__(self, key: Any) -> Any:
        out = self.view()[key]
        return out.copy() if isinstance(out, np.ndarray) else out

    def to_numpy(self) -> np.ndarray:
        return self.view().copy()

    def element_pages(self, elements: Any) -> set:
        """Pages under the flat element indices `elements`."""
        flat = np.asarray(elements, dtype=np.int64).reshape(-1)
        first = (self.offset + flat * self.dtype.itemsize) // self.model.page_size
        last = (self.offset + (flat + 1) * self.dtype.itemsize - 1) // self.model.page_size
        return set(first.tolist()) | set(last.tolist())

    def selected(self, key: Any) -> np.ndarray:
        """Flat indices of the elements `view[key]` selects."""
        return np.asarray(np.arange(self.size, dtype=np.int64).reshape(self.shape)[key])

    def __setitem__(self, key: Any, value: Any) -> None:
        view = self.view()
        values = np.asarray(value, dtype=self.dtype)
        self.model.touch(self.element_pages(self.selected(key)))
        view[key] = values

    def add_at(self, idx: Any, values: Any) -> None:
        key = np.asarray(idx)
        if isinstance(idx, slice):
            key = np.arange(*idx.indices(self.shape[0]))
        elif key.dtype == bool:
            key = np.flatnonzero(key)
        elif key.size == 0:  # an empty list selects nothing, as in numpy
            key = key.astype(np.intp)
        self.model.touch(self.element_pages(self.selected(key)))
        np.add.at(self.view(), key, np.asarray(values, dtype=self.dtype))


STAT_KEYS = ("epoch", "live_snapshots", "oldest_snapshot", "preserved_pages",
             "preserved_bytes", "pages_preserved_total", "dirty_pages")


def assert_same_state(store: Any, model: StoreModel, snapshots: Optional[dict] = None) -> None:
    """Compare a Store (and its live Snapshot objects, by epoch) with the model: live
    bytes, epoch, counters, and each snapshot's bytes and page versions."""
    assert store.epoch == model.epoch
    live = store.read(0, model.size)
    if live != bytes(model.data):
        raise AssertionError(f"live state differs from the model in pages "
                             f"{differing_pages(live, model.data, model.page_size)}")
    stats = store.stats()
    expected = model.stats()
    assert {k: stats[k] for k in STAT_KEYS} == {k: expected[k] for k in STAT_KEYS}
    for epoch, snap in (snapshots or {}).items():
        assert snap.epoch == epoch
        want = model.snapshots[epoch]
        got = snap.read(0, model.size)
        if got != want.data:
            raise AssertionError(f"snapshot {epoch} differs from the model in pages "
                                 f"{differing_pages(got, want.data, model.page_size)}")
        data, versions = snap.read_pages(np.arange(model.n_pages))
        assert data == want.data
        assert versions.tolist() == list(want.versions)


def differing_pages(a: Any, b: Any, page_size: int) -> list:
    x = np.frombuffer(bytes(a), dtype=np.uint8).reshape(-1, page_size)
    y = np.frombuffer(bytes(b), dtype=np.uint8).reshape(-1, page_size)
    return np.flatnonzero((x != y).any(axis=1)).tolist()


def pattern(n: int, seed: int = 0) -> bytes:
    """Deterministic random bytes."""
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def filled(store: Any, seed: int = 1) -> "StoreModel":
    """Fill the store with random bytes in one write; the model that matches it."""
    model = StoreModel(store.size, store.page_size)
    data = pattern(store.size, seed)
    store.write(0, data)
    model.write(0, data)
    return model
