"""Store arguments and messages: sizes beyond what the core can map, reopening with
another geometry, files that are not stores, and write_pages from the store's own bytes."""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest

import statecore as sc

PAGE = 512
N_PAGES = 8
SIZE = PAGE * N_PAGES
MAX_PAGES = 2**32 - 1   # the core numbers pages with 32 bits


@pytest.fixture
def paged():
    """A store whose page p is filled with byte p."""
    s = sc.Store(size=SIZE, page_size=PAGE)
    s.write(0, bytes(np.repeat(np.arange(N_PAGES, dtype=np.uint8), PAGE)))
    yield s
    s.close()


def _pages(store) -> list:
    return list(store.read(0, store.size)[::PAGE])


# ---- write_pages from the store itself -----------------------------------------------------
@pytest.mark.parametrize("ids,src", [
    ([1, 2, 3], (0, 3)),      # copy pages 0..2 onto 1..3: each source is overwritten first
    ([0, 1, 2], (1, 4)),      # copy pages 1..3 onto 0..2
    ([3, 1, 2], (1, 4)),      # a permutation of the source pages themselves
    ([5, 5], (4, 6)),         # one target twice: the last page wins
    ([2, 3], (2, 4)),         # onto themselves
], ids=["forward", "backward", "permuted", "repeated", "same"])
@pytest.mark.parametrize("with_snapshot", [False, True], ids=["", "under-snapshot"])
def test_write_pages_from_a_view_of_the_store_matches_a_copy(paged, ids, src, with_snapshot):
    model = bytearray(paged.read(0, SIZE))
    data = bytes(model[src[0] * PAGE:src[1] * PAGE])
    for i, p in enumerate(ids):
        model[p * PAGE:(p + 1) * PAGE] = data[i * PAGE:(i + 1) * PAGE]
    snap = paged.snapshot() if with_snapshot else None
    before = paged.read(0, SIZE)
    view = np.asarray(paged)[src[0] * PAGE:src[1] * PAGE]
    paged.write_pages(ids, view)
    del view
    assert paged.read(0, SIZE) == bytes(model)
    if snap is not None:
        assert snap.read(0, SIZE) == before
        assert set(paged.changed_pages(snap).tolist()) == set(ids)
        snap.release()


def test_write_pages_from_a_memoryview_of_the_store(paged):
    with memoryview(paged) as mv:
        paged.write_pages([4, 5], mv[3 * PAGE:5 * PAGE])
    assert _pages(paged) == [0, 1, 2, 3, 3, 4, 6, 7]


def test_write_pages_from_a_state_array_read_is_already_a_copy(paged):
    arr = paged.array("uint8")
    paged.write_pages([1, 2], arr[0:2 * PAGE])
    assert _pages(paged) == [0, 0, 1, 3, 4, 5, 6, 7]


# ---- sizes the core cannot hold ---------------------------------------------------------------
@pytest.mark.parametrize("page_size", [512, 4096])
@pytest.mark.parametrize("size", [2**80, 2**64, 2**62, "one page too many"])
def test_size_beyond_the_largest_store_raises_value_error_naming_the_range(
        size, page_size, tmp_path):
    if size == "one page too many":
        size = (MAX_PAGES + 1) * page_size
    top = MAX_PAGES * page_size
    pattern = rf"size must be .*\[{page_size}, {top}\].*got {size}"
    with pytest.raises(ValueError, match=pattern):
        sc.Store(size=size, page_size=page_size)
    path = tmp_path / "new.store"
    with pytest.raises(ValueError, match=pattern):
        sc.Store(path, size=size, page_size=page_size)
    assert not path.exists()


def test_size_beyond_any_store_on_reopen_raises_value_error(tmp_path):
    path = tmp_path / "s.store"
    sc.Store(path, size=SIZE, page_size=PAGE).close()
    for size in (2**80, 2**64, -PAGE, 0):
        with pytest.raises(ValueError, match=rf"size must be in \[1, \d+\].*got {size}"):
            sc.Store(path, size=size)


# ---- reopening ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,asked", [
    ({"size": 2 * SIZE}, f"size={2 * SIZE}"),
    ({"page_size": 1024}, "page_size=1024"),
    ({"size": SIZE, "page_size": 1024}, f"size={SIZE}, page_size=1024"),
])
def test_store_mismatch_states_the_existing_and_the_requested_geometry(tmp_path, kwargs, asked):
    path = tmp_path / "s.store"
    sc.Store(path, size=SIZE, page_size=PAGE).close()
    with pytest.raises(sc.StoreMismatch) as info:
        sc.Store(path, **kwargs)
    msg = str(info.value)
    assert f"size={SIZE}, page_size={PAGE}" in msg
    assert f"asked for {asked}" in msg
    with sc.Store(path) as s:     # untouched
        assert (s.size, s.page_size) == (SIZE, PAGE)


# ---- files that are not (this version's) stores --------------------------------------------------
def _store_file(tmp_path) -> bytes:
    path = tmp_path / "s.store"
    with sc.Store(path, size=SIZE, page_size=PAGE) as s:
        s.write(0, b"payload")
    return path.read_bytes()


def test_a_file_with_another_magic_raises_corrupt_store(tmp_path):
    # README: CorruptStore for bytes that fail a magic check; UnsupportedFormat only for
    # a newer format version.
    blob = bytearray(_store_file(tmp_path))
    blob[:8] = b"NOTASTOR"
    path = tmp_path / "other.store"
    path.write_bytes(bytes(blob))
    with pytest.raises(sc.CorruptStore, match="magic"):
        sc.Store(path, size=SIZE, page_size=PAGE)
    with pytest.raises(sc.CorruptStore, match="magic"):
        sc.Store(path)
    assert path.read_bytes() == bytes(blob)


@pytest.mark.parametrize("delta,exc", [(1, sc.UnsupportedFormat), (100, sc.UnsupportedFormat),
                                       (-1, sc.CorruptStore)], ids=["next", "far", "zero"])
def test_store_format_version_newer_is_unsupported_older_is_corrupt(tmp_path, delta, exc):
    blob = bytearray(_store_file(tmp_path))
    (version,) = struct.unpack_from("<I", blob, 8)
    struct.pack_into("<I", blob, 8, version + delta)
    path = tmp_path / "v.store"
    path.write_bytes(bytes(blob))
    with pytest.raises(exc, match="version"):
        sc.Store(path)
    assert path.read_bytes() == bytes(blob)
    assert not issubclass(sc.UnsupportedFormat, sc.CorruptStore)


def test_reading_past_the_end_names_the_length(paged):
    with pytest.raises(IndexError, match=rf"length {SIZE + 1} .*length must be in \[0, {SIZE}\]"):
        paged.read(0, SIZE + 1)
    with pytest.raises(IndexError, match=rf"length must be in \[0, {SIZE - 100}\]"):
        paged.read(100, SIZE + 1)
    # A length the store can hold, but not from this offset: the offset is at fault.
    with pytest.raises(IndexError, match=rf"offset 100 .*offset must be in \[0, 96\]"):
        paged.read(100, SIZE - 96)
    with pytest.raises(IndexError, match="length"):
        with paged.snapshot() as snap:
            snap.read(0, SIZE + 1)


@pytest.mark.parametrize("src,dst", [(0, 100), (100, 0), (0, 1), (1, 0), (3 * PAGE, 3 * PAGE)])
def test_write_from_an_overlapping_view_of_the_store_matches_a_copy(src, dst):
    """The core copies with memcpy, undefined for overlapping ranges (glibc's happens to
    behave like memmove, so the bytes alone would not show a missing copy): a view of the
    store itself is copied first, as numpy does for a[1:] = a[:-1]."""
    n = 2 * PAGE + 17
    with sc.Store(size=SIZE, page_size=PAGE) as store:
        store.write(0, np.random.default_rng(src + dst).bytes(SIZE))
        model = bytearray(store.read(0, SIZE))
        model[dst:dst + n] = bytes(model[src:src + n])
        with memoryview(store) as mv:
            assert isinstance(store._unaliased(mv[src:src + n]).obj, bytes)  # copied
            store.write(dst, mv[src:src + n])
        assert store.read(0, SIZE) == bytes(model)
        other = memoryview(bytearray(n))
        assert store._unaliased(other) is other  # not a view of the store: no copy


def test_overlap_check_makes_no_export_of_the_store():
    """A write checks whether its data is a view of the store without exporting the
    store: a close() racing a write must not be refused for the write's own check."""
    with sc.Store(size=SIZE, page_size=PAGE) as store:
        with memoryview(store) as mv:
            inside, edge = mv[10:20], mv[SIZE - 4:]
            assert store._overlaps(inside) and store._overlaps(edge)
            exports = store._exports_count
            assert not store._overlaps(bytearray(10)) and not store._overlaps(b"")
            assert store._exports_count == exports
            del inside, edge
