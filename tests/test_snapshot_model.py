"""Model-based test: random writes through every write path, snapshots, releases (explicit
and by garbage collection), snapshot reads and checkpoints, run on a Store and on the
pure-Python model in tests/model.py, compared after every step: the live bytes, the
counters, and every live snapshot's bytes and page versions."""
from __future__ import annotations

import gc
import shutil
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import statecore as sc

from model import StoreModel, assert_same_state

PAGE = 512
N_PAGES = 16
SIZE = PAGE * N_PAGES
MAX_LIVE = 5

# Typed views the machine writes through: (dtype, offset, shape).
N64 = SIZE // 8
FLAT = ("int64", 0, (N64,))
STRADDLING = ("int64", 4, ((SIZE - 8) // 8,))       # element 63 spans pages 0 and 1
BYTES = ("uint8", 3, (SIZE - 3,))
ROWS = ("int32", 0, (32, PAGE // 8))               # two 256-byte rows per page
WIDE_ROWS = ("int16", 0, (4, SIZE // 8))           # rows of 4 pages each

values = st.integers(-(1 << 15), (1 << 15) - 1)


def int_arrays(n: int, max_size: int = 12):
    return st.lists(st.integers(-n, n - 1), max_size=max_size).map(
        lambda xs: np.array(xs, dtype=np.int64))


def masks(n: int):
    return st.tuples(st.integers(0, 1 << 16), st.sampled_from([0.0, 0.002, 0.02, 0.3, 1.0])).map(
        lambda t: np.random.default_rng(t[0]).random(n) < t[1])


def first_axis_keys(n: int):
    return st.one_of(st.integers(-n, n - 1), st.slices(n), int_arrays(n), masks(n))


def keys_for(shape: tuple):
    if len(shape) == 1:
        return first_axis_keys(shape[0])
    rows, cols = shape
    same_len = st.integers(0, 10).flatmap(lambda k: st.tuples(
        st.lists(st.integers(-rows, rows - 1), min_size=k, max_size=k),
        st.lists(st.integers(-cols, cols - 1), min_size=k, max_size=k))).map(
        lambda t: (np.array(t[0], dtype=np.int64), np.array(t[1], dtype=np.int64)))
    return st.one_of(
        first_axis_keys(rows),                                   # whole rows
        same_len,                                                # fancy on every axis
        st.tuples(st.slices(rows), st.slices(cols)),             # a (strided) block
        st.tuples(st.integers(-rows, rows - 1), st.slices(cols)),
        st.tuples(st.slices(rows), st.integers(-cols, cols - 1)),
    )


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store = sc.Store(size=SIZE, page_size=PAGE)
        self.model = StoreModel(SIZE, PAGE)
        self.snaps: dict[int, sc.Snapshot] = {}
        self.dir = Path(tempfile.mkdtemp(prefix="statecore-model-"))
        self.saves = 0

    def teardown(self) -> None:
        try:
            if not self.store.closed:
                # A last snapshot exposes every live page version to the comparison.
                snap = self.store.snapshot()
                self.snaps[self.model.snapshot()] = snap
                assert_same_state(self.store, self.model, self.snaps)
                for e in list(self.snaps):
                    self.snaps.pop(e).release()
                    self.model.release(e)
                assert self.store.stats()["preserved_pages"] == 0
        finally:
            self.snaps.clear()
            self.store.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    # ---- writes ----------------------------------------------------------------------
    @rule(offset=st.integers(0, SIZE), payload=st.binary(max_size=3 * PAGE))
    def write(self, offset, payload):
        payload = payload[:SIZE - offset]
        self.store.write(offset, payload)
        self.model.write(offset, payload)

    @rule(ids=st.lists(st.integers(0, N_PAGES - 1), max_size=6), seed=st.integers(0, 255))
    def write_pages(self, ids, seed):
        data = (np.arange(len(ids) * PAGE, dtype=np.int64) * 31 + seed).astype(np.uint8)
        self.store.write_pages(ids, data)
        self.model.write_pages(ids, data)

    @rule(data=st.data(), view=st.sampled_from([FLAT, STRADDLING, BYTES, ROWS, WIDE_ROWS]),
          value=values)
    def array_setitem(self, data, view, value):
        dtype, offset, shape = view
        key = data.draw(keys_for(shape), label="key")
        if dtype == "uint8":
            value &= 0xFF
        self.store.array(dtype, offset=offset, shape=shape)[key] = value
        self.model.array(dtype, offset=offset, shape=shape)[key] = value

    @rule(data=st.data(), view=st.sampled_from([FLAT, STRADDLING, ROWS]))
    def array_setitem_array_values(self, data, view):
        dtype, offset, shape = view
        key = data.draw(keys_for(shape), label="key")
        ref = self.model.array(dtype, offset=offset, shape=shape)
        target = ref.selected(key).shape
        vals = (np.arange(int(np.prod(target)), dtype=np.int64) - 7).reshape(target)
        self.store.array(dtype, offset=offset, shape=shape)[key] = vals
        ref[key] = vals

    @rule(view=st.sampled_from([FLAT, STRADDLING, ROWS]), seed=st.integers(0, 2**32 - 1),
          n=st.integers(1024, 3000))
    def array_setitem_many_rows(self, view, seed, n):
        """1024 rows or more: the core's sorted path (pages prepared in address order, rows
        written per window behind the copies), with many repeats."""
        dtype, offset, shape = view
        rng = np.random.default_rng(seed)
        idx = rng.integers(-shape[0], shape[0], n)
        vals = rng.integers(-1000, 1000, (n,) + shape[1:])
        self.store.array(dtype, offset=offset, shape=shape)[idx] = vals
        self.model.array(dtype, offset=offset, shape=shape)[idx] = vals

    @rule(view=st.sampled_from([FLAT, STRADDLING, ROWS]), data=st.data(), value=values)
    def add_at(self, view, data, value):
        dtype, offset, shape = view
        n = shape[0]
        idx = data.draw(st.one_of(
            int_arrays(n),
            st.lists(st.sampled_from([0, 1, n - 1]), max_size=8),   # many repeats
            st.integers(-n, n - 1)), label="idx")
        self.store.array(dtype, offset=offset, shape=shape).add_at(idx, value)
        self.model.array(dtype, offset=offset, shape=shape).add_at(idx, value)

    # ---- snapshots -------------------------------------------------------------------
    @precondition(lambda self: len(self.snaps) < MAX_LIVE)
    @rule()
    def snapshot(self):
        snap = self.store.snapshot()
        epoch = self.model.snapshot()
        assert snap.epoch == epoch
        self.snaps[epoch] = snap

    def _pick(self, data):
        return data.draw(st.sampled_from(sorted(self.snaps)), label="snapshot")

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def release(self, data):
        e = self._pick(data)
        snap = self.snaps.pop(e)
        snap.release()
        self.model.release(e)
        assert snap.released

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def drop_snapshot(self, data):
        """Lose the last reference: the finalizer releases it (at the next write-side
        call, which stats() in the invariant is)."""
        e = self._pick(data)
        del self.snaps[e]
        gc.collect(0)  # a snapshot is in no cycle: refcounting alone must free it
        self.model.release(e)

    @precondition(lambda self: self.snaps)
    @rule(data=st.data(), offset=st.integers(0, SIZE), length=st.integers(0, 3 * PAGE))
    def snapshot_read(self, data, offset, length):
        e = self._pick(data)
        length = min(length, SIZE - offset)
        assert self.snaps[e].read(offset, length) == self.model.snapshot_read(e, offset, length)

    @precondition(lambda self: self.snaps)
    @rule(data=st.data(), ids=st.lists(st.integers(0, N_PAGES - 1), max_size=6))
    def snapshot_read_pages(self, data, ids):
        e = self._pick(data)
        got, versions = self.snaps[e].read_pages(ids)
        want, want_versions = self.model.snapshot_read_pages(e, ids)
        assert got == want
        assert versions.tolist() == want_versions.tolist()

    @precondition(lambda self: self.snaps)
    @rule(data=st.data(), since=st.integers(0, 64))
    def changed_pages(self, data, since):
        e = self._pick(data)
        since = min(since, e)
        got = self.store.changed_pages(since, self.snaps[e])
        assert got.tolist() == self.model.changed_pages(since, e).tolist()

    @precondition(lambda self: self.snaps and self.saves < 3)
    @rule(data=st.data())
    def save_and_load(self, data):
        e = self._pick(data)
        self.saves += 1
        path = self.dir / f"{self.saves}.ckpt"
        self.snaps[e].save(path)
        with sc.Store.load(path) as loaded:
            assert loaded.read(0, SIZE) == self.model.snapshots[e].data
            assert loaded.epoch == e + 1

    # ---- after every step ----------------------------------------------------------------
    @invariant()
    def same_state(self):
        assert_same_state(self.store, self.model, self.snaps)


TestStoreMachine = StoreMachine.TestCase
