"""Property tests of deltas and replay against a pure-Python model of the write history.

For random write histories with snapshots (some released) at random points:
- delta(a, b) carries exactly the pages the model last wrote in (a, b], as of b;
- applied to a replica holding the state at a (built by applying delta(0, a) to a fresh
  store) it gives exactly the state at b, and applying it again, or older deltas
  afterwards, changes nothing;
- sc.replay of a shuffled list of consecutive deltas gives the same state and epoch as
  applying them one by one, and its ReplayStats add up.

Example counts come from the hypothesis profile that tests/conftest.py loads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import numpy as np
from hypothesis import example, given
from hypothesis import strategies as st

import statecore as sc

PS = 512
N_PAGES = 130  # three 64-page summary groups, the last one partial
SIZE = PS * N_PAGES

SEED = st.integers(0, 2**32 - 1)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, SIZE - 1), st.integers(0, 3 * PS), SEED),
        st.tuples(st.just("write_pages"),
                  st.lists(st.integers(0, N_PAGES - 1), min_size=1, max_size=8, unique=True),
                  SEED),
        st.tuples(st.just("snapshot")),
        st.tuples(st.just("snapshot")),
        st.tuples(st.just("release"), st.integers(0, 1000)),
    ),
    max_size=30,
)


def noise(seed: int, n: int) -> bytes:
    rng = np.random.default_rng(seed)
    # Half the writes are low-entropy, so lz4 encodings take both of its paths.
    if seed % 2:
        return rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    return bytes([seed % 251]) * n


def first_difference(actual: bytes, expected: bytes) -> str:
    """'' when equal, else which page differs first (bytes reprs would fill the screen)."""
    if actual == expected:
        return ""
    if len(actual) != len(expected):
        return f"length {len(actual)} != {len(expected)}"
    a = np.frombuffer(actual, np.uint8)
    e = np.frombuffer(expected, np.uint8)
    pages = sorted({int(i) // PS for i in np.flatnonzero(a != e)})
    return f"pages {pages} differ"


def assert_state(store, epoch_state: bytes, what: str = "") -> None:
    diff = first_difference(store.read(0, SIZE), epoch_state)
    assert not diff, f"{what}: {diff}" if what else diff


@dataclass
class History:
    """A primary store driven through `ops`, with the model's state at every snapshot."""
    store: sc.Store
    live: Dict[int, sc.Snapshot] = field(default_factory=dict)
    # epoch -> (bytes, per-page versions) as of that snapshot; epoch 0 is the empty state.
    states: Dict[int, Tuple[bytes, Tuple[int, ...]]] = field(default_factory=dict)

    @classmethod
    def run(cls, ops) -> "History":
        h = cls(sc.Store(size=SIZE, page_size=PS))
        model = bytearray(SIZE)
        versions = [0] * N_PAGES
        epoch = 1
        h.states[0] = (bytes(SIZE), tuple(versions))
        for op in ops + [("snapshot",)]:  # always end on a snapshot
            if op[0] == "write":
                _, offset, length, seed = op
                data = noise(seed, min(length, SIZE - offset))
                h.store.write(offset, data)
                model[offset:offset + len(data)] = data
                if data:
                    for p in range(offset // PS, (offset + len(data) - 1) // PS + 1):
                        versions[p] = epoch
            elif op[0] == "write_pages":
                _, ids, seed = op
                data = noise(seed, len(ids) * PS)
                h.store.write_pages(ids, data)
                for i, p in enumerate(ids):
                    model[p * PS:(p + 1) * PS] = data[i * PS:(i + 1) * PS]
                    versions[p] = epoch
            elif op[0] == "snapshot":
                snap = h.store.snapshot()
                assert snap.epoch == epoch and h.store.epoch == epoch + 1
                h.live[epoch] = snap
                h.states[epoch] = (bytes(model), tuple(versions))
                epoch += 1
            elif op[0] == "release" and len(h.live) > 1:
                victim = sorted(h.live)[op[1] % (len(h.live) - 1)]  # keep the newest
                h.live.pop(victim).release()
            assert h.store.epoch == epoch
        return h

    def close(self) -> None:
        for snap in self.live.values():
            snap.release()
        self.store.close()

    def replica_at(self, a: int) -> sc.Store:
        """A fresh store brought to the state at snapshot `a` (or left empty for 0)."""
        r = sc.Store(size=SIZE, page_size=PS)
        if a:
            r.apply(self.store.delta(0, self.live[a]))
        assert_state(r, self.states[a][0])
        assert r.epoch == a + 1
        return r


def expected_pages(h: History, a: int, b: int) -> List[int]:
    vb = h.states[b][1]
    return [p for p in range(N_PAGES) if a < vb[p] <= b]


def check_delta_against_model(h: History, d: sc.Delta, a: int, b: int) -> None:
    state_b, versions_b = h.states[b]
    ids = expected_pages(h, a, b)
    assert (d.base_epoch, d.target_epoch, d.page_size, d.store_pages) == (a, b, PS, N_PAGES)
    assert d.page_ids.tolist() == ids
    assert d.versions.tolist() == [versions_b[p] for p in ids]
    assert bytes(d.payload) == b"".join(state_b[p * PS:(p + 1) * PS] for p in ids)
    assert d.checksums.tolist() == [sc.page_checksum(d.page(i)) for i in range(len(ids))]


@given(OPS, st.data())
def test_delta_between_any_two_epochs_matches_the_model(ops, data):
    h = History.run(ops)
    try:
        for b in sorted(h.live):
            for a in sorted(e for e in h.states if e <= b):
                # since as an int (live or released epoch) or as a live Snapshot.
                since = h.live[a] if a in h.live and data.draw(st.booleans()) else a
                until = h.live[b] if data.draw(st.booleans()) else b
                d = h.store.delta(since, until)
                check_delta_against_model(h, d, a, b)
                np.testing.assert_array_equal(h.store.changed_pages(a, h.live[b]), d.page_ids)
    finally:
        h.close()


@given(OPS)
def test_apply_brings_a_replica_from_a_to_b_and_is_idempotent(ops):
    h = History.run(ops)
    try:
        for b in sorted(h.live):
            for a in [0] + sorted(e for e in h.live if e <= b):
                with h.replica_at(a) as replica:
                    d = h.store.delta(a, h.live[b])
                    assert replica.apply(d) == len(d)
                    assert_state(replica, h.states[b][0])
                    assert replica.epoch == b + 1
                    # Again (both encodings), then every older delta: nothing changes.
                    older = [h.store.delta(x, h.live[y]) for y in h.live if y <= b
                             for x in (0, a) if x <= y]
                    for again in [d.encode(), d.encode("lz4")] + older:
                        assert replica.apply(again) == 0
                        assert_state(replica, h.states[b][0])
                        assert replica.epoch == b + 1
    finally:
        h.close()


@given(OPS)
def test_replica_ships_the_deltas_the_primary_ships(ops):
    """Applied deltas keep page versions, so a replica can feed a replica of its own."""
    h = History.run(ops)
    try:
        b = max(h.live)
        with h.replica_at(0) as replica:
            replica.apply(h.store.delta(0, h.live[b]))
            with replica.snapshot() as rs:
                assert rs.epoch == b + 1
                for a in [0] + sorted(h.live):
                    mine, theirs = replica.delta(a, rs), h.store.delta(a, h.live[b])
                    np.testing.assert_array_equal(mine.page_ids, theirs.page_ids)
                    np.testing.assert_array_equal(mine.versions, theirs.versions)
                    assert bytes(mine.payload) == bytes(theirs.payload)
    finally:
        h.close()


@example(ops=[("write", 0, 1, 0), ("snapshot",), ("write", 0, 1, 1)], snapshot_before=[])
@given(OPS, st.lists(st.booleans(), max_size=12))
def test_replica_with_live_snapshots_follows_consecutive_deltas(ops, snapshot_before):
    """A replica's own snapshots (to read or checkpoint it) must not change what later
    deltas do to it, and must keep reading the state they were taken at.
    snapshot_before[i] (True past its end): snapshot the replica before the i-th delta."""
    h = History.run(ops)
    try:
        chain = sorted(h.live)
        with h.replica_at(0) as replica:
            held = []
            reached = 0
            for i, y in enumerate(chain):
                if i >= len(snapshot_before) or snapshot_before[i]:
                    held.append((replica.snapshot(), reached))
                replica.apply(h.store.delta(reached, h.live[y]))
                assert_state(replica, h.states[y][0],
                             f"replica wrong after delta({reached}, {y}) with replica snapshots "
                             f"(epoch, state) {[(s.epoch, at) for s, at in held]}")
                reached = y
            for snap, at in held:
                assert_state(snap, h.states[at][0])
                snap.release()
    finally:
        h.close()


def encoded_as(d: sc.Delta, how: str):
    return d if how == "delta" else d.encode(how)


@given(OPS, st.data())
def test_replay_of_shuffled_consecutive_deltas_equals_applying_one_by_one(ops, data):
    h = History.run(ops)
    try:
        starts = [0] + sorted(h.live)
        a = data.draw(st.sampled_from(starts), label="a")
        later = [e for e in sorted(h.live) if e > a]
        if later:
            chain_ends = data.draw(st.lists(st.sampled_from(later), min_size=1, unique=True)
                                   .map(sorted), label="chain")
        else:
            chain_ends = [a] if a else []  # an empty delta (a, a], or no deltas at all
        bounds = [a] + chain_ends
        deltas = [h.store.delta(x, h.live[y]) for x, y in zip(bounds, bounds[1:])]
        b = bounds[-1]
        order = data.draw(st.permutations(range(len(deltas))), label="order")
        forms = data.draw(st.lists(st.sampled_from(["delta", "none", "lz4"]),
                                   min_size=len(deltas), max_size=len(deltas)), label="forms")
        shuffled = [encoded_as(deltas[i], forms[i]) for i in order]

        distinct = set().union(*(d.page_ids.tolist() for d in deltas))
        assert sorted(distinct) == expected_pages(h, a, b)
        pages_in = sum(len(d) for d in deltas)

        with h.replica_at(a) as replayed, h.replica_at(a) as stepwise:
            stats = sc.replay(replayed, shuffled)
            assert_state(replayed, h.states[b][0])
            assert replayed.epoch == b + 1

            for d in deltas:
                stepwise.apply(d)
            assert_state(stepwise, replayed.read(0, SIZE))
            assert stepwise.epoch == replayed.epoch

            assert isinstance(stats, sc.ReplayStats)
            assert stats.deltas == len(deltas)
            assert stats.pages_in == pages_in
            # The replica held exactly the state at a: every carried page is newer.
            assert stats.pages == len(distinct)
            assert stats.pages_skipped == 0
            assert stats.pages_superseded == pages_in - len(distinct)
            assert stats.pages_in == stats.pages + stats.pages_superseded + stats.pages_skipped
            assert stats.bytes == stats.pages * PS
            assert stats.seconds >= 0

            # Replaying again is a no-op that skips every distinct page.
            again = sc.replay(replayed, list(reversed(shuffled)))
            assert (again.deltas, again.pages, again.pages_in, again.pages_superseded,
                    again.pages_skipped) == (len(deltas), 0, pages_in,
                                             pages_in - len(distinct), len(distinct))
            assert_state(replayed, h.states[b][0])
            assert replayed.epoch == b + 1

            # Older deltas afterwards change nothing either.
            for y in [e for e in h.live if e <= b]:
                assert replayed.apply(h.store.delta(0, h.live[y])) == 0
            assert_state(replayed, h.states[b][0])
            assert replayed.epoch == b + 1
    finally:
        h.close()


@given(OPS, st.data())
def test_replay_from_empty_of_a_shuffled_chain(ops, data):
    h = History.run(ops)
    try:
        ends = sorted(h.live)
        bounds = [0] + ends
        deltas = [h.store.delta(x, h.live[y]) for x, y in zip(bounds, bounds[1:])]
        shuffled = data.draw(st.permutations(deltas), label="order")
        seen: List[int] = []
        with sc.Store(size=SIZE, page_size=PS) as replica:
            stats = sc.replay(replica, shuffled,
                              progress=lambda done, total: seen.append((done, total)))
            b = ends[-1]
            assert_state(replica, h.states[b][0])
            assert replica.epoch == b + 1
            assert stats.pages == len(expected_pages(h, 0, b))
            assert stats.pages_in == sum(len(d) for d in deltas)
            assert stats.pages_in == stats.pages + stats.pages_superseded + stats.pages_skipped
            assert seen and seen[-1] == (stats.bytes, stats.bytes)
    finally:
        h.close()


@given(OPS, st.data())
def test_replay_with_a_missing_delta_is_a_gap_and_writes_nothing(ops, data):
    h = History.run(ops)
    try:
        ends = sorted(h.live)
        bounds = [0] + ends
        deltas = [h.store.delta(x, h.live[y]) for x, y in zip(bounds, bounds[1:])]
        missing = data.draw(st.integers(0, len(deltas) - 1), label="missing")
        rest = deltas[:missing] + deltas[missing + 1:]
        with sc.Store(size=SIZE, page_size=PS) as replica:
            if missing == len(deltas) - 1:
                # Dropping the newest leaves a complete chain to the epoch before it.
                sc.replay(replica, rest)
                b = bounds[missing]
                assert_state(replica, h.states[b][0])
                assert replica.epoch == b + 1
                return
            try:
                sc.replay(replica, data.draw(st.permutations(rest), label="order"))
            except sc.EpochGap:
                pass
            else:
                raise AssertionError(f"replay without delta #{missing} of {len(deltas)} "
                                     "did not raise EpochGap")
            assert_state(replica, bytes(SIZE))
            assert replica.epoch == 1
            assert replica.stats()["pages_applied"] == 0
    finally:
        h.close()


@given(OPS, st.data())
def test_replay_of_overlapping_deltas_keeps_the_newest_page(ops, data):
    """Deltas that overlap (not a chain: any intervals, as long as together they leave no
    gap) coalesce to the newest copy of each page, in whatever order they come."""
    h = History.run(ops)
    try:
        ends = sorted(h.live)
        b = ends[-1]
        chain = data.draw(st.lists(st.sampled_from(ends), unique=True).map(sorted),
                          label="chain") + [b]
        bounds = [0] + sorted(set(chain))
        intervals = list(zip(bounds, bounds[1:]))
        extra = data.draw(st.lists(st.tuples(st.sampled_from([0] + ends), st.sampled_from(ends))
                                   .map(sorted), max_size=4), label="extra")
        intervals += [tuple(x) for x in extra]
        deltas = [h.store.delta(x, h.live[y]) for x, y in intervals]
        shuffled = data.draw(st.permutations(deltas), label="order")
        with sc.Store(size=SIZE, page_size=PS) as replica, \
                sc.Store(size=SIZE, page_size=PS) as stepwise:
            stats = sc.replay(replica, shuffled)
            assert_state(replica, h.states[b][0])
            assert replica.epoch == b + 1
            distinct = set().union(*(d.page_ids.tolist() for d in deltas))
            assert stats.pages == len(distinct) == len(expected_pages(h, 0, b))
            assert stats.pages_skipped == 0
            assert stats.pages_superseded == stats.pages_in - len(distinct)
            assert stats.pages_in == sum(len(d) for d in deltas)
            # One by one, in an order without gaps, gives the same.
            for d in sorted(deltas, key=lambda d: (d.base_epoch, d.target_epoch)):
                stepwise.apply(d)
            assert_state(stepwise, replica.read(0, SIZE))
            assert stepwise.epoch == replica.epoch
    finally:
        h.close()


@given(OPS)
def test_replay_accepts_a_covering_delta_with_a_nested_one(ops):
    """delta(0, b) covers everything; a delta nested inside it (a, c] with a > 0 must not
    be taken for a gap just because it ends earlier."""
    h = History.run(ops)
    try:
        ends = sorted(h.live)
        b = ends[-1]
        for a in ends:
            for c in (e for e in ends if e >= a):
                with sc.Store(size=SIZE, page_size=PS) as replica:
                    stats = sc.replay(replica, [h.store.delta(0, h.live[b]),
                                                h.store.delta(a, h.live[c])])
                    assert_state(replica, h.states[b][0])
                    assert replica.epoch == b + 1
                    assert stats.pages == len(expected_pages(h, 0, b))
    finally:
        h.close()


def test_history_model_is_exercised():
    """The model itself: a fixed history whose expected deltas are known by hand."""
    ops = [("write", 0, PS + 1, 1), ("snapshot",), ("write_pages", [64, 129], 2),
           ("snapshot",), ("write", 129 * PS, 1, 3), ("release", 0)]
    h = History.run(ops)
    try:
        assert sorted(h.live) == [2, 3] and sorted(h.states) == [0, 1, 2, 3]
        assert expected_pages(h, 0, 3) == [0, 1, 64, 129]
        assert expected_pages(h, 1, 2) == [64, 129]
        assert expected_pages(h, 2, 3) == [129]
        assert sum(h.states[3][1]) == 1 + 1 + 2 + 3
        d = h.store.delta(1, 3)
        assert d.page_ids.tolist() == [64, 129] and d.versions.tolist() == [2, 3]
    finally:
        h.close()
