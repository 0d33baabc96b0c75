"""Snapshot floors (internal, used by replication): a snapshot read only for pages changed
after its floor lets writes skip copying older pages, and can lower its floor only while no
write has skipped a copy since it was raised."""
from __future__ import annotations

import threading
import time

import numpy as np
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import statecore as sc

from model import StoreModel

PS = 4096
N = 64


def page(fill: int) -> bytes:
    return bytes([fill]) * PS


def store_with_versions(n: int = N) -> "tuple[sc.Store, np.ndarray]":
    """A store whose page i was last written at epoch 1 + i % 8 (versions 1..8)."""
    store = sc.Store(size=n * PS)
    versions = np.zeros(n, dtype=np.int64)
    for k in range(8):
        ids = np.arange(k, n, 8, dtype=np.uint64)
        store.write_pages(ids, np.full(len(ids) * PS, k + 1, dtype=np.uint8))
        versions[ids.astype(np.int64)] = store.epoch
        store.snapshot().release()  # closes the epoch
    return store, versions


def rewrite_every_page(store: sc.Store, fill: int) -> None:
    store.write_pages(np.arange(N, dtype=np.uint64), np.full(N * PS, fill, dtype=np.uint8))


def assert_kept(snap: sc.Snapshot, expected: bytes, pages) -> None:
    """Each of these pages reads from the snapshot as `expected` (the state it was taken of)."""
    for p in pages:
        assert snap.read(int(p) * PS, PS) == expected[p * PS:(p + 1) * PS], p


def test_writes_skip_copies_at_or_below_the_floor_and_keep_those_above():
    store, versions = store_with_versions()
    snap = store.snapshot()
    expected = bytes(store.read(0, store.size))
    assert snap._set_floor(4)
    before = store.stats()["pages_preserved_total"]
    rewrite_every_page(store, 0xEE)
    preserved = store.stats()["pages_preserved_total"] - before
    assert preserved == int((versions > 4).sum())
    # What the floor promises to read is intact, through reads and through a delta.
    assert_kept(snap, expected, np.flatnonzero(versions > 4))
    delta = store.delta(4, snap)
    assert sorted(delta.page_ids.tolist()) == np.flatnonzero(versions > 4).tolist()
    replica = sc.Store(size=N * PS)
    replica.apply(delta, allow_gap=True)  # only the pages above the floor
    for p in np.flatnonzero(versions > 4):
        assert replica.read(int(p) * PS, PS) == expected[p * PS:(p + 1) * PS]
    snap.release()
    store.close()
    replica.close()


def test_a_snapshot_without_a_floor_keeps_every_page():
    store, versions = store_with_versions()
    floored = store.snapshot()
    assert floored._set_floor(8)
    whole = store.snapshot()  # floor 0: reads every page
    expected = bytes(store.read(0, store.size))
    rewrite_every_page(store, 0xEE)
    assert whole.read(0, store.size) == expected
    whole.release()
    # Released: only the floored snapshot is left, so old pages are no longer copied.
    before = store.stats()["pages_preserved_total"]
    rewrite_every_page(store, 0xEF)
    assert store.stats()["pages_preserved_total"] == before
    floored.release()
    store.close()


def test_lowering_applies_while_no_copy_was_skipped_and_is_refused_after():
    store, versions = store_with_versions()
    snap = store.snapshot()
    expected = bytes(store.read(0, store.size))
    assert snap._set_floor(8)
    assert snap._set_floor(3)  # nothing written yet: the pages above 3 are all intact
    store.write(0, page(0x11))  # page 0 has version 1 <= 3: its copy is skipped
    assert not snap._set_floor(0)
    # The refused floor stays 3: pages above it are still kept.
    rewrite_every_page(store, 0xEE)
    assert_kept(snap, expected, np.flatnonzero(versions > 3))
    snap.release()
    store.close()


def test_raising_again_keeps_counting_skips_from_the_first_raise():
    store, versions = store_with_versions()
    snap = store.snapshot()
    expected = bytes(store.read(0, store.size))
    assert snap._set_floor(5)
    store.write(0, page(0x22))  # page 0 (version 1): copy skipped
    assert snap._set_floor(5) and snap._set_floor(6)  # raises apply ...
    assert not snap._set_floor(0)  # ... but do not forget the skip
    assert_kept(snap, expected, np.flatnonzero(versions > 6))
    snap.release()
    store.close()


def test_lowering_races_with_a_writer_and_never_loses_a_page_it_then_reads():
    """One vectorized write (GIL released) first rewrites the pages above floor 4 (copied)
    and then those at or below it (copies skipped), while this thread lowers the floor to
    0. Lowering may land before the first skip (applied: from then on the writer must copy
    every page) or after (refused): whichever it reports, every page the floor it leaves
    covers must read as it was at the snapshot."""
    rng = np.random.default_rng(7)
    n = 16384  # the copies above the floor take a few ms: room for the lowering to land
    outcomes = set()
    for trial in range(24):
        store, versions = store_with_versions(n)
        snap = store.snapshot()
        expected = np.frombuffer(store.read(0, store.size), dtype=np.uint8).reshape(n, PS)
        assert snap._set_floor(4)
        above = np.flatnonzero(versions > 4)
        order = np.concatenate([rng.permutation(above),
                                rng.permutation(np.flatnonzero(versions <= 4))])
        data = np.full(n * PS, 0xA0 + trial % 16, dtype=np.uint8)
        t = threading.Thread(target=store.write_pages, args=(order.astype(np.uint64), data))
        if trial == 0:  # once before the write: lowering with nothing skipped applies
            lowered = snap._set_floor(0)
            assert lowered
            t.start()
        else:
            t.start()
            time.sleep(float(rng.uniform(0, 0.008)))  # land anywhere in the write
            lowered = snap._set_floor(0)
        t.join()
        outcomes.add(lowered)
        keep = np.arange(n) if lowered else above
        data_, got_versions = snap.read_pages(keep)
        got = np.frombuffer(data_, dtype=np.uint8).reshape(len(keep), PS)
        bad = np.flatnonzero((got != expected[keep]).any(axis=1))
        assert not len(bad), (trial, lowered, keep[bad][:5])
        assert (got_versions == versions[keep]).all()
        snap.release()
        store.close()
    assert False in outcomes  # the lowering also landed after skips


# ---- model-based: floors among ordinary snapshots -------------------------------------------
MPAGE = 512
MN = 16


class FloorMachine(RuleBasedStateMachine):
    """Writes, ordinary and floored snapshots, raised and lowered floors and releases, on a
    Store and the pure-Python model: every snapshot reads as the model for each page its
    floor covers (all pages at floor 0), with its versions, and its changed pages since
    any epoch at or above its floor match."""

    def __init__(self) -> None:
        super().__init__()
        self.store = sc.Store(size=MPAGE * MN, page_size=MPAGE)
        self.model = StoreModel(MPAGE * MN, MPAGE)
        self.snaps: dict = {}
        self.floors: dict = {}

    def teardown(self) -> None:
        self.store.close()

    @rule(ids=st.lists(st.integers(0, MN - 1), max_size=6), seed=st.integers(0, 255))
    def write_pages(self, ids, seed):
        data = (np.arange(len(ids) * MPAGE, dtype=np.int64) * 31 + seed).astype(np.uint8)
        self.store.write_pages(ids, data)
        self.model.write_pages(ids, data)

    @rule(offset=st.integers(0, MPAGE * MN - 1), payload=st.binary(min_size=1, max_size=700))
    def write(self, offset, payload):
        payload = payload[:MPAGE * MN - offset]
        self.store.write(offset, payload)
        self.model.write(offset, payload)

    @precondition(lambda self: len(self.snaps) < 4)
    @rule(floor_back=st.none() | st.integers(0, 6))
    def snapshot(self, floor_back):
        snap = self.store.snapshot()
        epoch = self.model.snapshot()
        self.snaps[epoch], self.floors[epoch] = snap, 0
        if floor_back is not None:  # raised at once, as a primary does
            floor = max(0, epoch - floor_back)
            assert snap._set_floor(floor)
            self.floors[epoch] = floor

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def change_floor(self, data):
        e = data.draw(st.sampled_from(sorted(self.snaps)))
        floor = data.draw(st.integers(0, e))
        if floor >= self.floors[e]:
            # Raising needs no reader to depend on the pages it gives up: the checks
            # below only read what the floor in force covers.
            assert self.snaps[e]._set_floor(floor)
            self.floors[e] = floor
        elif self.snaps[e]._set_floor(floor):
            self.floors[e] = floor

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def release(self, data):
        e = data.draw(st.sampled_from(sorted(self.snaps)))
        self.snaps.pop(e).release()
        self.floors.pop(e)
        self.model.release(e)

    @invariant()
    def snapshots_read_what_their_floor_covers(self):
        assert self.store.read(0, MPAGE * MN) == bytes(self.model.data)
        for e, snap in self.snaps.items():
            floor = self.floors[e]
            want = self.model.snapshots[e]
            versions = np.array(want.versions, dtype=np.uint64)
            covered = np.arange(MN) if floor == 0 else np.flatnonzero(versions > floor)
            data, got_versions = snap.read_pages(covered)
            for k, p in enumerate(covered):
                assert data[k * MPAGE:(k + 1) * MPAGE] == want.data[p * MPAGE:(p + 1) * MPAGE]
            assert got_versions.tolist() == versions[covered].tolist()
            for since in {floor, e - 1, e}:
                if floor <= since <= e:
                    got = self.store.changed_pages(since, snap)
                    assert got.tolist() == self.model.changed_pages(since, e).tolist()


TestFloorMachine = FloorMachine.TestCase
# Cheap steps: more examples than the profile's default, which missed a lost skip count.
TestFloorMachine.settings = settings(settings.default,
                                     max_examples=max(400, settings.default.max_examples))
