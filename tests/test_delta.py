"""Deltas: what store.delta() carries, the encoded format, transport, and store.apply().

Epoch arithmetic (DESIGN.md): a new store is at epoch 1; snapshot() closes the open epoch
E (snap.epoch == E) and later writes belong to E + 1; delta(a, b) carries the pages whose
version v satisfies a < v <= b, with their content as of b; a store at epoch E applies it
when a < E, and is at epoch >= b + 1 afterwards.
"""
from __future__ import annotations

import os
import socket
import struct
import threading

import mmh3
import numpy as np
import pytest

import statecore as sc

PS = 4096
N_PAGES = 32
SIZE = PS * N_PAGES
HEADER = 128

# Header offsets (csrc/statecore.h, sc_header).
OFF_MAGIC, OFF_VERSION, OFF_KIND, OFF_COMPRESSION = 0, 8, 10, 12
OFF_PAGE_SIZE, OFF_STORE_PAGES, OFF_BASE, OFF_TARGET = 16, 24, 32, 40
OFF_N_PAGES, OFF_SCHEMA, OFF_PAYLOAD_BYTES, OFF_UUID = 48, 56, 64, 72
OFF_INDEX_SUM, OFF_HEADER_SUM = 88, 120


def murmur(data) -> int:
    return mmh3.hash64(bytes(data), signed=False)[0]


def u64(buf, off: int) -> int:
    return struct.unpack_from("<Q", buf, off)[0]


def page_fill(page: int, tag: int, ps: int = PS) -> bytes:
    """Distinct, deterministic content for (page, tag)."""
    rng = np.random.default_rng(page * 1000 + tag)
    return rng.integers(0, 256, ps, dtype=np.uint8).tobytes()


def state(obj, size: int = SIZE) -> bytes:
    """Whole content of a store, or of a snapshot of a store of `size` bytes."""
    return obj.read(0, obj.size if isinstance(obj, sc.Store) else size)


def new_store(size: int = SIZE, page_size: int = PS) -> sc.Store:
    return sc.Store(size=size, page_size=page_size)


def address(buf) -> int:
    return np.frombuffer(buf, dtype=np.uint8).__array_interface__["data"][0]


def same_delta(x: sc.Delta, y: sc.Delta) -> None:
    assert (x.base_epoch, x.target_epoch, x.page_size, x.store_pages, x.schema_version,
            x.store_uuid, x.n_pages) == (y.base_epoch, y.target_epoch, y.page_size,
                                         y.store_pages, y.schema_version, y.store_uuid,
                                         y.n_pages)
    np.testing.assert_array_equal(x.page_ids, y.page_ids)
    np.testing.assert_array_equal(x.versions, y.versions)
    np.testing.assert_array_equal(x.checksums, y.checksums)
    assert bytes(x.payload) == bytes(y.payload)
    assert bytes(x.encode()) == bytes(y.encode())


@pytest.fixture
def primary():
    s = new_store()
    yield s
    s.close()


@pytest.fixture
def history(primary):
    """Three snapshots over a known write history:
    epoch 1: pages 0, 1, 2      -> s1
    epoch 2: pages 2, 5         -> s2
    epoch 3: pages 5, 7, 31     -> s3
    epoch 4 (open): page 1, 9   (not in any snapshot)
    """
    s = primary
    s.write_pages([0, 1, 2], page_fill(0, 1) + page_fill(1, 1) + page_fill(2, 1))
    s1 = s.snapshot()
    s.write(2 * PS + 100, b"epoch two")            # part of page 2
    s.write_pages([5], page_fill(5, 2))
    s2 = s.snapshot()
    s.write(5 * PS, page_fill(5, 3))
    s.write(7 * PS + PS - 3, b"abcdef")            # spans pages 7 and 8
    s.write(31 * PS, b"last")
    s3 = s.snapshot()
    s.write(1 * PS, page_fill(1, 4))
    s.write(9 * PS, b"after s3")
    return s, s1, s2, s3


# ---- what a delta carries ---------------------------------------------------------------------

def test_new_store_epoch_arithmetic(primary):
    assert primary.epoch == 1
    snap = primary.snapshot()
    assert snap.epoch == 1 and primary.epoch == 2
    d = primary.delta(0, snap)
    assert (d.base_epoch, d.target_epoch, d.n_pages) == (0, 1, 0)


def test_delta_carries_exactly_the_pages_changed_in_the_interval(history):
    s, s1, s2, s3 = history
    assert (s1.epoch, s2.epoch, s3.epoch, s.epoch) == (1, 2, 3, 4)
    expected = {
        (0, s1): ([0, 1, 2], [1, 1, 1]),
        (0, s2): ([0, 1, 2, 5], [1, 1, 2, 2]),
        (0, s3): ([0, 1, 2, 5, 7, 8, 31], [1, 1, 2, 3, 3, 3, 3]),
        (s1, s2): ([2, 5], [2, 2]),
        (s1, s3): ([2, 5, 7, 8, 31], [2, 3, 3, 3, 3]),
        (s2, s3): ([5, 7, 8, 31], [3, 3, 3, 3]),
        (s3, s3): ([], []),
        (s1, s1): ([], []),
    }
    for (a, b), (ids, versions) in expected.items():
        d = s.delta(a, b)
        assert d.page_ids.tolist() == ids, (a, b)
        assert d.versions.tolist() == versions, (a, b)
        assert len(d) == d.n_pages == len(ids)
        assert d.base_epoch == (a if isinstance(a, int) else a.epoch)
        assert d.target_epoch == b.epoch
        np.testing.assert_array_equal(s.changed_pages(a, b), d.page_ids)


def test_delta_content_is_as_of_until_not_live(history):
    s, s1, s2, s3 = history
    d = s.delta(0, s3)
    for i, page in enumerate(d.page_ids.tolist()):
        assert bytes(d.page(i)) == s3.read(page * PS, PS)
    # Page 1 was rewritten after s3: the delta must carry the preserved content.
    i = d.page_ids.tolist().index(1)
    assert bytes(d.page(i)) == page_fill(1, 1)
    assert bytes(d.page(i)) != s.read(PS, PS)
    # Page 2 of s1 predates its partial rewrite in epoch 2.
    d1 = s.delta(0, s1)
    assert bytes(d1.page(2)) == page_fill(2, 1)
    assert bytes(d1.payload) == b"".join(s1.read(p * PS, PS) for p in (0, 1, 2))


@pytest.mark.parametrize("since_kind", ["snapshot", "int"])
@pytest.mark.parametrize("until_kind", ["snapshot", "int"])
def test_since_and_until_forms_agree(history, since_kind, until_kind):
    s, s1, s2, s3 = history
    since = s1 if since_kind == "snapshot" else s1.epoch
    until = s3 if until_kind == "snapshot" else s3.epoch
    same_delta(s.delta(since, until), s.delta(s1, s3))


def test_until_none_means_now(history):
    s, s1, s2, s3 = history
    epoch = s.epoch
    d = s.delta(s3)
    assert d.target_epoch == epoch
    assert d.page_ids.tolist() == [1, 9]
    assert d.versions.tolist() == [epoch, epoch]
    assert bytes(d.page(0)) == page_fill(1, 4)
    assert s.epoch == epoch + 1  # "now" closed the open epoch
    assert s.stats()["live_snapshots"] == 3  # ... with a snapshot released after use
    # Writes after the delta belong to the next epoch and are not in it.
    s.write(3 * PS, b"later")
    assert s.delta(epoch).page_ids.tolist() == [3]


def test_since_equal_to_the_open_epoch_gives_an_empty_delta(history):
    s, s1, s2, s3 = history
    epoch = s.epoch
    d = s.delta(epoch)
    assert (d.base_epoch, d.target_epoch, d.n_pages) == (epoch, epoch, 0)
    assert s.epoch == epoch + 1


def test_delta_zero_brings_a_fresh_replica_to_the_snapshot(history):
    s, s1, s2, s3 = history
    for snap in (s1, s2, s3):
        with new_store() as replica:
            assert replica.epoch == 1
            written = replica.apply(s.delta(0, snap))
            assert written == len(s.delta(0, snap))
            assert state(replica) == state(snap)
            assert replica.epoch == snap.epoch + 1


def test_delta_zero_carries_pages_written_back_to_zero(primary):
    primary.write(3 * PS, b"x")
    primary.write(3 * PS, b"\0")
    snap = primary.snapshot()
    d = primary.delta(0, snap)
    assert d.page_ids.tolist() == [3]
    assert bytes(d.page(0)) == bytes(PS)


def test_empty_delta_round_trips_and_applies(history):
    s, s1, s2, s3 = history
    d = s.delta(s3, s3)
    assert d.n_pages == 0 and d.page_ids.size == 0 and bytes(d.payload) == b""
    assert len(d.encode()) == d.nbytes == HEADER
    for comp in ("none", "lz4"):
        same_delta(sc.Delta.decode(d.encode(comp)), d)
    with new_store() as replica:
        replica.apply(s.delta(0, s3))
        before = state(replica)
        assert replica.apply(d) == 0
        assert state(replica) == before and replica.epoch == s3.epoch + 1


# ---- header ---------------------------------------------------------------------------------

def test_header_fields(history):
    s, s1, s2, s3 = history
    s.schema_version = 7
    d = s.delta(s1, s3)
    assert d.base_epoch == s1.epoch and d.target_epoch == s3.epoch
    assert d.page_size == PS and d.store_pages == N_PAGES
    assert d.schema_version == 7
    assert d.store_uuid == s.uuid and len(d.store_uuid) == 16
    assert d.format_version == 1
    assert d.nbytes == HEADER + d.n_pages * (24 + PS)
    assert d.page_bytes == d.n_pages * PS

    buf = d.encode()
    assert len(buf) == d.nbytes
    assert bytes(buf[OFF_MAGIC:OFF_MAGIC + 8]) == b"SCDELTA1"
    assert struct.unpack_from("<HHH", buf, OFF_VERSION) == (1, 1, 0)
    assert struct.unpack_from("<I", buf, OFF_PAGE_SIZE)[0] == PS
    assert [u64(buf, off) for off in (OFF_STORE_PAGES, OFF_BASE, OFF_TARGET, OFF_N_PAGES,
                                      OFF_SCHEMA, OFF_PAYLOAD_BYTES)] == \
        [N_PAGES, s1.epoch, s3.epoch, d.n_pages, 7, d.n_pages * PS]
    assert bytes(buf[OFF_UUID:OFF_UUID + 16]) == s.uuid
    index_end = HEADER + 24 * d.n_pages
    assert u64(buf, OFF_INDEX_SUM) == murmur(buf[HEADER:index_end])
    assert u64(buf, OFF_HEADER_SUM) == murmur(buf[:OFF_HEADER_SUM])

    s.schema_version = 8
    assert s.delta(s1, s3).schema_version == 8
    assert d.schema_version == 7  # a built delta is immutable


def test_schema_version_rejects_bad_values(primary):
    with pytest.raises(ValueError, match="schema_version"):
        primary.schema_version = -1
    with pytest.raises(TypeError, match="schema_version"):
        primary.schema_version = "3"
    assert primary.schema_version == 0


def test_store_uuids_differ_between_stores():
    with new_store() as x, new_store() as y:
        assert x.uuid != y.uuid


def test_per_page_checksums_are_murmur3_low_half(history):
    s, s1, s2, s3 = history
    d = s.delta(0, s3)
    assert d.n_pages == 7
    for i in range(d.n_pages):
        page = bytes(d.page(i))
        assert int(d.checksums[i]) == murmur(page) == sc.page_checksum(page)
    # The library's checksum is the same function on any length.
    for data in (b"", b"a", b"statecore" * 1000):
        assert sc.page_checksum(data) == murmur(data)


@pytest.mark.parametrize("page_size", [512, 1024, 4096, 65536])
def test_batch_page_checksums_are_the_same_function(page_size):
    # Replication and Delta.decode hash several pages side by side: same values.
    from statecore import _core
    rng = np.random.default_rng(page_size)
    for n in (0, 1, 3, 4, 7, 8, 9, 17):
        data = rng.integers(0, 256, n * page_size, dtype=np.uint8).tobytes()
        got = np.frombuffer(_core.page_checksums(data, page_size), dtype="<u8")
        want = [murmur(data[i * page_size:(i + 1) * page_size]) for i in range(n)]
        assert got.tolist() == want
    with pytest.raises(ValueError, match="whole pages"):
        _core.page_checksums(b"x" * 100, 64)
    with pytest.raises(ValueError, match="whole pages"):
        _core.page_checksums(b"x" * 100, 0)


def test_decode_names_the_first_page_that_fails_its_checksum():
    s = new_store(size=64 * PS)
    try:
        s.write(0, np.random.default_rng(3).integers(0, 256, s.size, dtype=np.uint8).tobytes())
        buf = bytearray(s.delta(0).encode())
    finally:
        s.close()
    for entry in (63, 40, 9):  # each flip is the lowest bad page when it is made
        buf[HEADER + 64 * 24 + entry * PS + 5] ^= 1
        with pytest.raises(sc.CorruptDelta, match=rf"checksum mismatch in page {entry} "
                                                  rf"\(entry {entry}\)"):
            sc.Delta.decode(buf)


# ---- zero-copy buffers ------------------------------------------------------------------------

def test_page_ids_is_a_read_only_view_of_the_buffer(history):
    s, s1, s2, s3 = history
    d = s.delta(0, s3)
    ids = d.page_ids
    assert isinstance(ids, np.ndarray) and ids.dtype == np.dtype("<u8")
    assert not ids.flags.writeable
    with pytest.raises(ValueError):
        ids[0] = 5
    with pytest.raises(ValueError):
        ids.flags.writeable = True
    raw = np.frombuffer(d.encode(), dtype=np.uint8)
    assert np.shares_memory(ids, raw)
    assert ids.__array_interface__["data"][0] == address(raw) + HEADER
    for arr in (d.versions, d.checksums):
        assert not arr.flags.writeable and np.shares_memory(arr, raw)
    assert d.page_ids.tolist() == [0, 1, 2, 5, 7, 8, 31]


def test_encode_none_is_the_native_buffer_without_a_copy(history):
    s, s1, s2, s3 = history
    d = s.delta(0, s3)
    a, b = d.encode(), d.encode("none")
    assert memoryview(a).readonly and memoryview(b).readonly
    assert address(a) == address(b)  # the same memory both times: no copy
    assert np.shares_memory(np.frombuffer(a, np.uint8), d.page_ids)
    assert np.shares_memory(np.frombuffer(a, np.uint8), np.frombuffer(d.payload, np.uint8))
    with pytest.raises(TypeError):
        memoryview(a)[0] = 0
    assert not np.frombuffer(a, np.uint8).flags.writeable
    assert bytes(a[:8]) == b"SCDELTA1"


def test_decode_of_a_read_only_buffer_does_not_copy(history):
    s, s1, s2, s3 = history
    blob = bytes(s.delta(0, s3).encode())
    d = sc.Delta.decode(blob)
    assert np.shares_memory(np.frombuffer(blob, np.uint8), d.page_ids)
    assert address(d.encode()) == address(blob)


def test_decode_copies_a_writable_buffer_so_later_changes_cannot_slip_in(history):
    s, s1, s2, s3 = history
    original = s.delta(0, s3)
    blob = bytearray(original.encode())
    d = sc.Delta.decode(blob)
    blob[HEADER] ^= 0xFF          # first page id
    blob[-1] ^= 0xFF              # last payload byte
    same_delta(d, original)
    assert not np.shares_memory(np.frombuffer(blob, np.uint8), d.page_ids)


def test_decode_of_a_misaligned_view(history):
    s, s1, s2, s3 = history
    original = s.delta(s1, s3)
    padded = b"x" + bytes(original.encode())
    view = memoryview(padded)[1:]
    assert address(view) % 8 != 0
    same_delta(sc.Delta.decode(view), original)
    with new_store() as replica:
        replica.apply(s.delta(0, s1))
        replica.apply(view)
        assert state(replica) == state(s3)


# ---- lz4 ---------------------------------------------------------------------------------------

def test_lz4_round_trips_and_is_smaller_for_compressible_data(primary):
    pages = np.arange(20, dtype=np.uint64)
    primary.write_pages(pages, b"".join(bytes([p]) * 100 + bytes(PS - 100) for p in range(20)))
    snap = primary.snapshot()
    d = primary.delta(0, snap)
    plain, packed = d.encode("none"), d.encode("lz4")
    assert len(packed) < len(plain) // 10
    assert struct.unpack_from("<H", packed, OFF_COMPRESSION)[0] == 1
    assert u64(packed, OFF_HEADER_SUM) == murmur(packed[:OFF_HEADER_SUM])
    assert u64(packed, OFF_PAYLOAD_BYTES) == len(packed) - HEADER - 24 * d.n_pages
    back = sc.Delta.decode(packed)
    same_delta(back, d)
    # Re-encoding the decoded delta gives back the original bytes, both ways.
    assert bytes(back.encode("none")) == bytes(plain)
    assert bytes(back.encode("lz4")) == bytes(packed)
    with new_store() as replica:
        assert replica.apply(packed) == 20
        assert state(replica) == state(snap)


def test_lz4_round_trips_incompressible_data_over_several_chunks():
    with new_store(size=640 * PS) as s:
        ids = np.arange(0, 640, 1, dtype=np.uint64)
        s.write_pages(ids, np.random.default_rng(1).integers(0, 256, 640 * PS, dtype=np.uint8))
        snap = s.snapshot()
        d = s.delta(0, snap)
        packed = d.encode("lz4")
        chunk, count = struct.unpack_from("<QQ", packed, HEADER + 24 * 640)
        assert (chunk, count) == (1 << 20, 3)  # 640 pages of 4 KiB in 1 MiB chunks
        back = sc.Delta.decode(packed)
        same_delta(back, d)
        with new_store(size=640 * PS) as replica:
            replica.apply(back)
            assert state(replica) == state(snap, 640 * PS)


# ---- apply --------------------------------------------------------------------------------------

def test_apply_is_idempotent(history):
    s, s1, s2, s3 = history
    with new_store() as replica:
        assert replica.apply(s.delta(0, s1)) == 3
        assert state(replica) == state(s1) and replica.epoch == s1.epoch + 1
        d = s.delta(s1, s3)
        assert replica.apply(d) == d.n_pages
        after, epoch = state(replica), replica.epoch
        assert after == state(s3) and epoch == s3.epoch + 1
        # Twice, as a Delta and as bytes of both encodings: nothing changes.
        for again in (d, d.encode(), d.encode("lz4")):
            assert replica.apply(again) == 0
            assert state(replica) == after and replica.epoch == epoch
        # Older deltas change nothing either.
        for old in (s.delta(0, s1), s.delta(0, s2), s.delta(s1, s2), s.delta(0, s3)):
            assert replica.apply(old) == 0
            assert state(replica) == after and replica.epoch == epoch


def test_apply_in_steps_equals_apply_at_once(history):
    s, s1, s2, s3 = history
    with new_store() as stepwise, new_store() as at_once:
        for a, b in ((0, s1), (s1, s2), (s2, s3)):
            stepwise.apply(s.delta(a, b))
        at_once.apply(s.delta(0, s3))
        assert state(stepwise) == state(at_once) == state(s3)
        assert stepwise.epoch == at_once.epoch == s3.epoch + 1
        # Both replicas now ship the same delta as the primary does.
        same_pages = [r.delta(0) for r in (stepwise, at_once)]
        for rd in same_pages:
            ref = s.delta(0, s3)
            np.testing.assert_array_equal(rd.page_ids, ref.page_ids)
            np.testing.assert_array_equal(rd.versions, ref.versions)
            assert bytes(rd.payload) == bytes(ref.payload)


def test_apply_epoch_gap(history):
    s, s1, s2, s3 = history
    with new_store() as replica:
        assert replica.epoch == 1
        gap = s.delta(s1, s3)              # base 1 >= epoch 1: epoch 1's pages are missing
        with pytest.raises(sc.EpochGap) as info:
            replica.apply(gap)
        assert isinstance(info.value, sc.StateError)
        assert str(info.value)
        with pytest.raises(sc.EpochGap):
            replica.apply(gap.encode("lz4"))
        assert state(replica) == bytes(SIZE) and replica.epoch == 1
        assert replica.stats()["deltas_applied"] == 0

        # The boundary: base == epoch - 1 applies, base == epoch does not.
        replica.apply(s.delta(0, s1))
        assert replica.epoch == 2
        with pytest.raises(sc.EpochGap):
            replica.apply(s.delta(s2, s3))   # base 2 == epoch 2
        assert state(replica) == state(s1) and replica.epoch == 2
        replica.apply(s.delta(s1, s2))       # base 1 == epoch - 1
        assert state(replica) == state(s2) and replica.epoch == 3


def test_apply_allow_gap(history):
    s, s1, s2, s3 = history
    with new_store() as replica:
        d = s.delta(s2, s3)
        assert replica.apply(d, allow_gap=True) == d.n_pages
        assert replica.epoch == s3.epoch + 1
        expected = bytearray(SIZE)
        for i, page in enumerate(d.page_ids.tolist()):
            expected[page * PS:(page + 1) * PS] = d.page(i)
        assert state(replica) == bytes(expected)


@pytest.mark.parametrize("size, page_size", [(SIZE, 2 * PS), (SIZE + PS, PS), (SIZE - PS, PS),
                                             (SIZE, PS // 2)])
def test_apply_to_an_incompatible_store(history, size, page_size):
    s, s1, s2, s3 = history
    d = s.delta(0, s3)
    with new_store(size, page_size) as other:
        other.write(0, b"keep")
        before, epoch = state(other), other.epoch
        for what in (d, d.encode(), d.encode("lz4")):
            with pytest.raises(sc.IncompatibleDelta) as info:
                other.apply(what)
            assert isinstance(info.value, sc.StateError)
        with pytest.raises(sc.IncompatibleDelta):
            sc.replay(other, [d])
        assert state(other) == before and other.epoch == epoch


def test_apply_checks_compatibility_before_the_epoch(history):
    s, s1, s2, s3 = history
    with new_store(SIZE, 2 * PS) as other:
        with pytest.raises(sc.IncompatibleDelta):
            other.apply(s.delta(s2, s3))


def test_apply_raises_the_epoch_to_at_least_target_plus_one(history):
    s, s1, s2, s3 = history
    with new_store() as replica:
        for _ in range(10):
            replica.snapshot().release()
        assert replica.epoch == 11
        replica.apply(s.delta(0, s1))
        assert replica.epoch == 11          # already past target + 1: unchanged
        assert state(replica) == state(s1)


def test_apply_to_a_closed_store_raises(history):
    s, s1, s2, s3 = history
    replica = new_store()
    replica.close()
    with pytest.raises(sc.StoreClosed):
        replica.apply(s.delta(0, s1))


def test_replica_snapshot_reads_survive_apply(history):
    s, s1, s2, s3 = history
    with new_store() as replica:
        replica.apply(s.delta(0, s1))
        held = replica.snapshot()
        replica.apply(s.delta(s1, s3))
        assert state(replica) == state(s3)
        assert state(held) == state(s1)


def test_replica_with_a_live_snapshot_applies_later_deltas(primary):
    """Minimal case: a page written in two consecutive epochs, shipped one delta at a
    time to a replica holding a snapshot of itself (e.g. to checkpoint it)."""
    s = primary
    s.write(0, b"A")
    s1 = s.snapshot()
    s.write(0, b"X")
    s2 = s.snapshot()
    with new_store() as replica:
        held = replica.snapshot()
        replica.apply(s.delta(0, s1))
        assert replica.read(0, 1) == b"A"
        replica.apply(s.delta(s1, s2))
        assert replica.read(0, 1) == b"X"   # was skipped as "not newer": the replica stays at A
        assert state(replica) == state(s2) and replica.epoch == s2.epoch + 1
        assert held.read(0, PS) == bytes(PS)


def test_replica_with_a_live_snapshot_replays_later_deltas(primary):
    s = primary
    s.write(0, b"A")
    s1 = s.snapshot()
    s.write(0, b"X")
    s2 = s.snapshot()
    with new_store() as replica:
        held = replica.snapshot()
        sc.replay(replica, [s.delta(0, s1)])
        stats = sc.replay(replica, [s.delta(s1, s2)])
        assert (stats.pages, stats.pages_skipped) == (1, 0)
        assert state(replica) == state(s2)
        assert held.read(0, PS) == bytes(PS)


def test_replay_of_a_covering_delta_and_a_nested_one(history):
    """[delta(0, s3), delta(s1, s2)]: applying them in this order works, so replay must
    too; ordering by target epoch alone puts (1, 2] first and calls it a gap."""
    s, s1, s2, s3 = history
    deltas = [s.delta(0, s3), s.delta(s1, s2)]
    with new_store() as stepwise:
        for d in deltas:
            stepwise.apply(d)
        assert state(stepwise) == state(s3)
    for order in (deltas, deltas[::-1]):
        with new_store() as replica:
            stats = sc.replay(replica, order)
            assert state(replica) == state(s3) and replica.epoch == s3.epoch + 1
            assert (stats.deltas, stats.pages, stats.pages_in, stats.pages_superseded) == \
                (2, 7, 9, 2)


def test_replay_gap_writes_nothing(history):
    s, s1, s2, s3 = history
    with new_store() as replica:
        with pytest.raises(sc.EpochGap):
            sc.replay(replica, [s.delta(0, s1), s.delta(s2, s3)])
        assert state(replica) == bytes(SIZE) and replica.epoch == 1
        with pytest.raises(sc.EpochGap):
            sc.replay(replica, [s.delta(s1, s3)])
        assert state(replica) == bytes(SIZE) and replica.epoch == 1
        stats = sc.replay(replica, [s.delta(s1, s3)], allow_gap=True)
        assert stats.pages == len(s.delta(s1, s3)) and replica.epoch == s3.epoch + 1


def test_replay_of_nothing(history):
    s, s1, s2, s3 = history
    with new_store() as replica:
        stats = sc.replay(replica, [])
        assert (stats.deltas, stats.pages, stats.bytes, stats.pages_in) == (0, 0, 0, 0)
        assert replica.epoch == 1 and state(replica) == bytes(SIZE)
        stats = sc.replay(replica, iter([s.delta(0, s1)]))  # any iterable
        assert stats.deltas == 1 and state(replica) == state(s1)


def test_large_delta_through_the_parallel_paths():
    """12 MiB: big enough for the core's threaded gather, verify and scatter."""
    n = 3072
    with new_store(size=n * PS) as s, new_store(size=n * PS) as via_apply:
        rng = np.random.default_rng(9)
        s.write_pages(np.arange(n), rng.integers(0, 256, n * PS, dtype=np.uint8))
        first = s.snapshot()
        touched = np.sort(rng.choice(n, n // 2, replace=False))
        s.write_pages(touched, rng.integers(0, 256, len(touched) * PS, dtype=np.uint8))
        second = s.snapshot()
        full, part = s.delta(0, first), s.delta(first, second)
        assert bytes(full.payload) == state(first, n * PS)
        np.testing.assert_array_equal(part.page_ids, touched)
        decoded = sc.Delta.decode(bytes(full.encode()))
        assert int(decoded.checksums[-1]) == murmur(state(first, n * PS)[-PS:])
        via_apply.apply(decoded)
        via_apply.apply(part.encode("lz4"))
        expected = state(second, n * PS)
        assert state(via_apply) == expected
        for threads in (0, 1, 2, 4):
            with new_store(size=n * PS) as replica:
                stats = sc.replay(replica, [part, full], threads=threads)
                assert state(replica) == expected, threads
                assert (stats.pages, stats.pages_superseded) == (n, len(touched))


# ---- transport -------------------------------------------------------------------------------

def _recv_exactly(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        assert k > 0, "peer closed early"
        got += k
    return buf


def _send_with_sendmsg(sock: socket.socket, data) -> None:
    view = memoryview(data)
    while view.nbytes:
        sent = sock.sendmsg([view])
        view = view[sent:]


@pytest.fixture
def big_delta():
    """A delta larger than a socket buffer, with compressible and random pages."""
    n = 200
    with new_store(size=n * PS) as s:
        rng = np.random.default_rng(5)
        data = rng.integers(0, 256, n * PS, dtype=np.uint8)
        data[: n * PS // 2] = 7
        s.write_pages(np.arange(n), data)
        snap = s.snapshot()
        d = s.delta(0, snap)
        yield d, state(snap, n * PS), n * PS


@pytest.mark.parametrize("compression", ["none", "lz4"])
@pytest.mark.parametrize("how", ["sendall", "sendmsg"])
def test_delta_crosses_a_socket(big_delta, compression, how):
    d, expected_state, size = big_delta
    payload = d.encode(compression)
    left, right = socket.socketpair()
    errors: list = []

    def send() -> None:
        try:
            left.sendall(struct.pack("<Q", len(payload)))
            if how == "sendall":
                left.sendall(payload)
            else:
                _send_with_sendmsg(left, payload)
        except BaseException as e:  # surfaced below
            errors.append(e)

    with left, right:
        sender = threading.Thread(target=send)
        sender.start()
        n = struct.unpack("<Q", _recv_exactly(right, 8))[0]
        received = _recv_exactly(right, n)
        sender.join(timeout=30)
    assert not errors and not sender.is_alive()
    assert len(received) == len(payload)
    back = sc.Delta.decode(received)
    same_delta(back, d)
    with new_store(size=size) as replica:
        replica.apply(received)
        assert state(replica) == expected_state


@pytest.mark.parametrize("compression", ["none", "lz4"])
def test_delta_crosses_a_file(big_delta, tmp_path, compression):
    d, expected_state, size = big_delta
    path = tmp_path / f"delta.{compression}"
    with open(path, "wb") as f:
        assert f.write(d.encode(compression)) == len(d.encode(compression))
    blob = path.read_bytes()
    same_delta(sc.Delta.decode(blob), d)
    with open(path, "rb") as f:  # readinto a preallocated buffer, as a reader would
        buf = bytearray(os.path.getsize(path))
        assert f.readinto(buf) == len(buf)
    same_delta(sc.Delta.decode(buf), d)
    with new_store(size=size) as replica:
        replica.apply(blob)
        assert state(replica) == expected_state


def test_encoded_overhead_at_4k_pages_is_below_one_percent():
    n = 256
    with new_store(size=n * PS) as s:
        s.write_pages(np.arange(n), np.random.default_rng(2).integers(0, 256, n * PS,
                                                                      dtype=np.uint8))
        snap = s.snapshot()
        d = s.delta(0, snap)
        size = len(d.encode())
        assert size == HEADER + n * (24 + PS)
        assert (size - n * PS) / (n * PS) < 0.01


# ---- bad arguments ---------------------------------------------------------------------------

def _unchanged(store, before):
    assert (state(store), store.epoch, store.stats()["live_snapshots"]) == before


def _fingerprint(store):
    return state(store), store.epoch, store.stats()["live_snapshots"]


def test_since_after_until_raises(history):
    s, s1, s2, s3 = history
    before = _fingerprint(s)
    with pytest.raises(ValueError, match=r"since.*until"):
        s.delta(s3, s1)
    with pytest.raises(ValueError, match="since"):
        s.delta(s2.epoch + 1, s2)
    _unchanged(s, before)


def test_since_after_now_raises_and_changes_nothing(history):
    s, s1, s2, s3 = history
    before = _fingerprint(s)
    with pytest.raises(ValueError, match="since"):
        s.delta(s.epoch + 5)
    _unchanged(s, before)


def test_until_must_be_a_live_snapshot(history):
    s, s1, s2, s3 = history
    with pytest.raises(ValueError, match="until.*live snapshot"):
        s.delta(0, s.epoch)               # the open epoch: no snapshot
    with pytest.raises(ValueError, match="until"):
        s.delta(0, 99)
    epoch = s2.epoch
    s2.release()
    with pytest.raises(ValueError, match="until"):
        s.delta(0, epoch)
    with pytest.raises(sc.SnapshotReleased, match="until"):
        s.delta(0, s2)                    # a released Snapshot object


def test_snapshot_of_another_store_raises(history):
    s, s1, s2, s3 = history
    with new_store() as other:
        foreign = other.snapshot()
        before = _fingerprint(s)
        with pytest.raises(ValueError, match="until.*another store"):
            s.delta(0, foreign)
        with pytest.raises(ValueError, match="since.*another store"):
            s.delta(foreign, s3)
        _unchanged(s, before)


@pytest.mark.parametrize("since, until, exc, name", [
    (-1, None, ValueError, "since"),
    (-(1 << 70), None, ValueError, "since"),
    (0, -1, ValueError, "until"),
    (1.0, None, TypeError, "since"),
    ("0", None, TypeError, "since"),
    (None, None, TypeError, "since"),
    (True, None, TypeError, "since"),
    (0, 2.0, TypeError, "until"),
    (0, "3", TypeError, "until"),
    (0, b"3", TypeError, "until"),
])
def test_bad_epoch_arguments(history, since, until, exc, name):
    s, s1, s2, s3 = history
    before = _fingerprint(s)
    with pytest.raises(exc, match=name):
        s.delta(since, until)
    _unchanged(s, before)


@pytest.mark.parametrize("compression", ["zstd", "LZ4", "", None, 1])
def test_bad_compression_name(history, compression):
    s, s1, s2, s3 = history
    d = s.delta(0, s3)
    with pytest.raises(ValueError, match=r"compression.*'lz4'.*'none'"):
        d.encode(compression)


def test_decode_and_apply_reject_non_buffers(history):
    s, s1, s2, s3 = history
    for bad in (None, 12, "SCDELTA1", [1, 2, 3]):
        with pytest.raises(TypeError, match="bytes-like"):
            sc.Delta.decode(bad)
        with pytest.raises(TypeError, match="bytes-like"):
            s.apply(bad)


def test_decode_copies_a_read_only_view_of_bytes_someone_can_still_change():
    """A read-only view of a bytearray is still changed through the bytearray: decode
    copies it (only bytes and the core's own buffers are immutable), so the page bytes
    applied are the ones validated."""
    src = sc.Store(size=4 * PS)
    dst = sc.Store(size=4 * PS)
    try:
        src.write(0, b"A" * PS)
        wire = bytearray(src.delta(0).encode())
        d = sc.Delta.decode(memoryview(wire).toreadonly())
        wire[-PS:] = b"Z" * PS
        dst.apply(d)
        assert dst.read(0, PS) == b"A" * PS
    finally:
        src.close()
        dst.close()


@pytest.mark.parametrize("threads,exc", [(-1, ValueError), (9, ValueError),
                                         (2**40, ValueError), (1.5, TypeError),
                                         ("2", TypeError)])
def test_replay_threads_must_be_a_count_in_range(threads, exc):
    src = sc.Store(size=4 * PS)
    dst = sc.Store(size=4 * PS)
    try:
        src.write(0, b"x")
        with pytest.raises(exc, match="threads"):
            sc.replay(dst, [src.delta(0)], threads=threads)
        assert dst.epoch == 1 and dst.read(0, 1) == b"\0"
    finally:
        src.close()
        dst.close()


def test_a_released_snapshot_as_delta_bound_is_snapshot_released():
    store = sc.Store(size=4 * PS)
    try:
        snap = store.snapshot()
        snap.release()
        for call in (lambda: store.delta(0, snap), lambda: store.delta(snap),
                     lambda: store.changed_pages(snap)):
            with pytest.raises(sc.SnapshotReleased):
                call()
    finally:
        store.close()
