"""The page store: construction, write and read paths, typed arrays, buffer exports,
tracking counters, lifecycle and argument checking."""
from __future__ import annotations

import array
import ctypes
import os
import stat

import numpy as np
import pytest

import statecore as sc

from model import StoreModel, assert_same_state, filled, pattern

PAGE = 4096
N_PAGES = 16
SIZE = PAGE * N_PAGES



# ---- construction ------------------------------------------------------------------------
def test_new_anonymous_store():
    with sc.Store(size=SIZE) as s:
        assert (s.size, s.page_size, s.n_pages) == (SIZE, PAGE, N_PAGES)
        assert s.epoch == 1
        assert not s.closed
        assert s.path is None
        assert s.read(0, SIZE) == bytes(SIZE)
        st = s.stats()
        assert st["live_snapshots"] == 0 and st["oldest_snapshot"] is None
        assert st["dirty_pages"] == 0 and st["preserved_pages"] == 0
        assert st["exported_buffers"] == 0


def test_size_is_required_for_a_new_store(store_path):
    with pytest.raises(TypeError, match="size"):
        sc.Store()
    with pytest.raises(TypeError, match="size"):
        sc.Store(store_path)
    assert not store_path.exists()


def test_path_store_is_created_with_mode_0600(store_path):
    old = os.umask(0)  # the store, not the umask, must restrict the mode
    try:
        s = sc.Store(store_path, size=SIZE)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(store_path).st_mode) == 0o600
        assert s.path == os.fspath(store_path)
        assert s.epoch == 1 and s.read(0, SIZE) == bytes(SIZE)
    finally:
        s.close()


@pytest.mark.parametrize("reopen_kwargs", [{"size": SIZE}, {"size": SIZE, "page_size": PAGE}, {}],
                         ids=["size", "size+page_size", "from-file"])
def test_reopen_keeps_contents_epoch_and_versions(store_path, reopen_kwargs):
    with sc.Store(store_path, size=SIZE) as s:
        s.write(100, b"first")                  # epoch 1
        s.snapshot().release()                  # closes epoch 1
        s.write_pages([3], bytes([7]) * PAGE)   # epoch 2
        s.snapshot().release()
        s.write(5 * PAGE + 1, b"third")         # epoch 3
        content = s.read(0, SIZE)
        epoch = s.epoch
        dirty = s.stats()["dirty_pages"]
    assert epoch == 3 and dirty == 3
    with sc.Store(store_path, **reopen_kwargs) as s:
        assert (s.size, s.page_size) == (SIZE, PAGE)
        assert s.read(0, SIZE) == content
        assert s.epoch == epoch
        assert s.stats()["dirty_pages"] == dirty
        with s.snapshot() as snap:
            _, versions = snap.read_pages([0, 3, 5, 6])
        assert versions.tolist() == [1, 2, 3, 0]


def test_reopen_with_size_only_uses_the_files_page_size(store_path):
    # A store of 512-byte pages whose size is no multiple of the default 4096.
    with sc.Store(store_path, size=3 * 512, page_size=512) as s:
        s.write(1000, b"small pages")
    with sc.Store(store_path, size=3 * 512) as s:
        assert (s.size, s.page_size, s.n_pages) == (1536, 512, 3)
        assert s.read(1000, 11) == b"small pages"


@pytest.mark.parametrize("kwargs", [{"size": 2 * SIZE}, {"size": SIZE // 2},
                                    {"size": SIZE, "page_size": 8192},
                                    {"size": SIZE, "page_size": 512}])
def test_reopen_with_other_geometry_raises_store_mismatch(store_path, kwargs, in_child):
    with sc.Store(store_path, size=SIZE) as s:
        s.write(0, b"keep me")
    assert in_child(lambda: sc.Store(store_path, **kwargs)) == "StoreMismatch"
    assert issubclass(sc.StoreMismatch, ValueError)
    with sc.Store(store_path, size=SIZE) as s:  # the file is untouched and still usable
        assert s.read(0, 7) == b"keep me"
        assert s.size == SIZE


def test_opening_a_store_that_is_open_raises_store_locked(store_path, in_child):
    with sc.Store(store_path, size=SIZE) as s:
        s.write(0, b"mine")
        assert in_child(lambda: sc.Store(store_path, size=SIZE)) == "StoreLocked"
        assert in_child(lambda: sc.Store(store_path)) == "StoreLocked"
        assert s.read(0, 4) == b"mine"
        s.write(4, b"!")
    with sc.Store(store_path) as s:
        assert s.read(0, 5) == b"mine!"


@pytest.mark.parametrize("content", [b"\0" * 8192, b"not a statecore store" * 400, b"x"],
                         ids=["zeros", "text", "one byte"])
def test_opening_a_file_that_is_not_a_store_raises(store_path, content, in_child):
    store_path.write_bytes(content)
    # README: a failed magic check is CorruptStore (UnsupportedFormat: a newer version).
    assert in_child(lambda: sc.Store(store_path, size=SIZE)) == "CorruptStore"
    assert store_path.read_bytes() == content   # nothing was written to it


@pytest.mark.parametrize("page_size", [1 << k for k in range(9, 21)])
def test_every_power_of_two_page_size_is_accepted(page_size):
    with sc.Store(size=2 * page_size, page_size=page_size) as s:
        assert (s.page_size, s.n_pages) == (page_size, 2)
        s.write(2 * page_size - 3, b"end")
        s.write_pages([0], bytes([1]) * page_size)
        assert s.read(2 * page_size - 3, 3) == b"end"
        assert s.read(0, page_size) == bytes([1]) * page_size
        assert s.stats()["dirty_pages"] == 2


@pytest.mark.parametrize("page_size", [0, 1, 256, 511, 513, 1000, 4095, 4097, 3 * 4096,
                                       1 << 21, -4096])
def test_other_page_sizes_raise_value_error(page_size):
    with pytest.raises(ValueError, match=r"page_size.*512.*1048576") as e:
        sc.Store(size=1 << 22, page_size=page_size)
    assert str(page_size) in str(e.value)


@pytest.mark.parametrize("page_size", ["4096", 4096.0, True])
def test_non_integer_page_size_raises_type_error(page_size):
    with pytest.raises(TypeError, match="page_size"):
        sc.Store(size=1 << 22, page_size=page_size)


@pytest.mark.parametrize("size", [0, -4096, 100, 4097, 3 * 4096 + 1])
def test_size_not_a_positive_multiple_of_page_size_raises(size, store_path):
    with pytest.raises(ValueError, match=r"size.*multiple of page_size \(4096\)"):
        sc.Store(size=size)
    with pytest.raises(ValueError, match=r"size.*multiple of page_size \(4096\)"):
        sc.Store(store_path, size=size)
    assert not store_path.exists()
    with pytest.raises(ValueError, match=r"size.*multiple of page_size \(8192\)"):
        sc.Store(size=4096 * 3, page_size=8192)


# ---- write and read ---------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    bytes, bytearray, memoryview,
    lambda b: np.frombuffer(b, dtype=np.uint8),
    lambda b: np.frombuffer(b, dtype=np.int32),          # raw bytes of any dtype
    lambda b: array.array("B", b),
    lambda b: memoryview(b).cast("H"),
], ids=["bytes", "bytearray", "memoryview", "uint8", "int32", "array", "memoryview-H"])
def test_write_accepts_any_bytes_like(store, make):
    data = pattern(3 * PAGE + 12, 2)
    store.write(PAGE - 4, make(data))
    assert store.read(PAGE - 4, len(data)) == data
    assert store.read(0, PAGE - 4) == bytes(PAGE - 4)
    assert store.read(PAGE - 4 + len(data), 16) == bytes(16)


def test_write_of_non_contiguous_numpy_writes_its_elements(store):
    a = np.arange(64, dtype=np.int32)[::2]
    store.write(8, a)
    assert store.read(8, a.nbytes) == a.tobytes()


def test_empty_write_and_read(store):
    store.write(SIZE, b"")
    store.write(0, b"")
    assert store.read(SIZE, 0) == b""
    assert store.stats()["dirty_pages"] == 0


def test_write_pages(store):
    model = StoreModel(SIZE, PAGE)
    data = np.arange(3 * PAGE, dtype=np.uint32).astype(np.uint8).reshape(3, PAGE)
    for ids in ([2, 9, 15], np.array([0, 4, 1], dtype=np.int16), np.array([7, 7, 3], np.uint64)):
        store.write_pages(ids, data)
        model.write_pages(ids, data)
        data = data[::-1].copy()
    store.write_pages(5, pattern(PAGE, 3))     # a single id
    model.write_pages([5], pattern(PAGE, 3))
    store.write_pages([], b"")
    assert_same_state(store, model)
    # a repeated id keeps the content of its last occurrence
    assert store.read(7 * PAGE, PAGE) == bytes(data[::-1][1])


def test_write_pages_from_2d_numpy_and_list_ids(store):
    rows = np.random.default_rng(4).integers(0, 256, (4, PAGE), dtype=np.uint8)
    store.write_pages([12, 1, 3, 8], rows)
    for i, p in enumerate([12, 1, 3, 8]):
        assert store.read(p * PAGE, PAGE) == rows[i].tobytes()


# ---- StateArray ------------------------------------------------------------------------
N64 = SIZE // 8


def _mask(n, seed=5):
    return np.random.default_rng(seed).random(n) < 0.2


ARRAY_1D_WRITES = [
    ("int", 5, 11),
    ("negative int", -1, 12),
    ("numpy int", np.int32(700), 13),
    ("slice", slice(100, 2000), 14),
    ("slice step", slice(3, N64, 7), 15),
    ("slice big step", slice(1, N64, 1500), 16),          # elements 12 KB apart
    ("slice negative step", slice(None, None, -3), np.arange(N64)[::-3]),
    ("slice negative big step", slice(N64 - 1, 0, -2000), 18),
    ("empty slice", slice(10, 10), 19),
    ("int array", np.array([0, 600, 4000, 8191]), np.array([1, 2, 3, 4])),
    ("int array with negatives", np.array([-1, -8192, -513, 20]), 21),
    ("int list", [3, 1, 4, 1, 5], 22),
    ("int array with repeats: the last wins", np.array([7, 9, 7, 7]), np.array([1, 2, 3, 4])),
    ("2-d int array", np.array([[1, 2], [8000, -5]]), np.array([[5, 6], [7, 8]])),
    ("uint64 array", np.array([2, 4096], dtype=np.uint64), np.array([9, 10])),
    ("boolean mask", _mask(N64), 23),
    ("ellipsis", Ellipsis, 24),
    ("empty int array", np.array([], dtype=np.int64), 25),
]


def _setitem_both_ways(store, model, arr, ref, key, value, live_snapshot):
    """arr[key] = value under a live snapshot (pages prepared, then written) or with none
    (integer rows are prepared and written in one pass): the same bytes and versions as
    the model either way, and the snapshot keeps what it saw."""
    if not live_snapshot:
        before = store.epoch - 1
        arr[key] = value
        ref[key] = value
        assert np.array_equal(np.asarray(arr), ref.to_numpy())
        assert_same_state(store, model, {})
        # exactly the pages written get the open epoch's version
        assert store.changed_pages(before).tolist() == model.changed_pages(before).tolist()
        return
    with store.snapshot() as snap:
        model_snap = model.snapshot()
        arr[key] = value
        ref[key] = value
        assert np.array_equal(np.asarray(arr), ref.to_numpy())
        assert_same_state(store, model, {model_snap: snap})


@pytest.mark.parametrize("live_snapshot", [True, False], ids=["snapshot", "no-snapshot"])
@pytest.mark.parametrize("key,value", [c[1:] for c in ARRAY_1D_WRITES],
                         ids=[c[0] for c in ARRAY_1D_WRITES])
def test_state_array_1d_setitem(store, key, value, live_snapshot):
    model = filled(store)
    arr, ref = store.array("int64"), model.array("int64")
    assert arr.shape == ref.shape == (N64,)
    _setitem_both_ways(store, model, arr, ref, key, value, live_snapshot)


ARRAY_2D_WRITES = [
    ("row int", 3, 7),
    ("row negative", -2, np.arange(512)),
    ("element", (4, 100), 9),
    ("column", (slice(None), 6), 10),
    ("block", (slice(2, 5), slice(10, 20)), 11),
    ("strided block", (slice(None, None, 3), slice(None, None, -50)), 12),
    ("rows int array", np.array([1, -1, 8]), 13),
    ("rows list broadcast row", [0, 2], np.arange(512)),
    ("rows broadcast column", np.array([4, 5]), np.array([[1], [2]])),
    ("rows 2-d index", np.array([[0, 15], [7, 0]]), np.arange(512)),
    ("rows boolean mask", np.arange(16) % 3 == 0, 14),
    ("fancy every axis", (np.array([0, 3, 15, -1]), np.array([0, 511, 7, -3])), 15),
    ("fancy every axis broadcast", (np.array([[1], [9]]), np.array([2, 300, 4])), 16),
    ("fancy every axis lists", ([5, 5, 6], [1, 2, 3]), np.array([1, 2, 3])),
]


@pytest.mark.parametrize("live_snapshot", [True, False], ids=["snapshot", "no-snapshot"])
@pytest.mark.parametrize("key,value", [c[1:] for c in ARRAY_2D_WRITES],
                         ids=[c[0] for c in ARRAY_2D_WRITES])
def test_state_array_2d_setitem(store, key, value, live_snapshot):
    model = filled(store)
    arr, ref = store.array("int64", shape=(16, 512)), model.array("int64", shape=(16, 512))
    _setitem_both_ways(store, model, arr, ref, key, value, live_snapshot)


def test_state_array_rows_with_column_slice_writes_and_tracks_the_rows(store):
    # Pages of whole rows may be marked (a superset); the bytes must be exact.
    model = filled(store)
    arr = store.array("int32", shape=(32, 512))   # two rows per page
    ref = model.array("int32", shape=(32, 512))
    with store.snapshot() as snap:
        arr[[1, 30], 5:9] = -1
        ref.view()[[1, 30], 5:9] = -1
        assert store.read(0, SIZE) == bytes(model.data)
        changed = store.changed_pages(snap)
    assert {0, 15} <= set(changed.tolist())


@pytest.mark.parametrize("dtype,offset,shape", [("uint8", 3, (SIZE - 3,)), ("float64", 8, (100,)),
                                                ("int16", 4094, (3, 5)), ("<u4", PAGE, None),
                                                (np.dtype([("a", "<i4"), ("b", "<f8")]), 0, (10,))])
def test_state_array_dtypes_offsets_and_shapes(store, dtype, offset, shape):
    model = filled(store)
    arr = store.array(dtype, offset=offset, shape=shape)
    ref = model.array(dtype, offset=offset, shape=shape)
    assert arr.shape == ref.shape and arr.dtype == np.dtype(dtype) and arr.offset == offset
    assert np.array_equal(arr[...], ref[...])
    value = np.zeros((), dtype=dtype)
    with store.snapshot() as snap:
        s = model.snapshot()
        arr[1] = value
        ref[1] = value
        assert_same_state(store, model, {s: snap})


ROW_WRITE_CASES = [
    # dtype, offset, shape, index, value: integer-row writes the core does itself
    (">i8", 0, (1000,), [1, 2, 999], 5),                       # non-native byte order
    ("S4", 8, (1000,), [3, 3, 7], b"ab"),                      # trailing NULs kept
    ("U3", 0, (100,), np.array([0, -1]), "xy"),
    (np.dtype([("a", "<i4"), ("b", "<f8")]), 0, (50,), [4, 9], (7, 2.5)),
    ("complex128", 16, (300,), [2, 299], 1 + 2j),
    ("<u2", PAGE - 3, (40, 3), [0, 1, 39, 0], np.array([1, 2, 3])),  # rows straddle pages
    ("float32", 5, (20, 7), np.array([[1, 2], [19, 1]]), np.arange(7)),
]


@pytest.mark.parametrize("live_snapshot", [True, False], ids=["snapshot", "no-snapshot"])
@pytest.mark.parametrize("dtype,offset,shape,key,value", ROW_WRITE_CASES,
                         ids=[str(c[0]) + "@" + str(c[1]) for c in ROW_WRITE_CASES])
def test_state_array_integer_rows_match_numpy(store, dtype, offset, shape, key, value,
                                              live_snapshot):
    model = filled(store)
    arr = store.array(dtype, offset=offset, shape=shape)
    ref = model.array(dtype, offset=offset, shape=shape)
    _setitem_both_ways(store, model, arr, ref, key, value, live_snapshot)


def test_state_array_rows_from_the_store_itself(store):
    # Values read straight from the store (a zero-copy view) are copied first, as numpy
    # does: rows written early must not feed the rows written later.
    model = filled(store)
    arr, ref = store.array("int64", shape=(N64,)), model.array("int64")
    src = np.asarray(store).view(np.int64)[10:14]
    want = ref.to_numpy()[10:14].copy()
    arr[[11, 12, 13, 14]] = src
    del src  # the export, before the fixture closes the store
    ref[[11, 12, 13, 14]] = want
    assert_same_state(store, model, {})


def test_state_array_rows_of_no_bytes(store):
    arr = store.array("int64", shape=(5, 0))
    before = store.stats()["pages_written"]
    arr[[0, 4]] = 1
    assert store.stats()["pages_written"] == before
    with pytest.raises(IndexError, match="out of bounds"):
        arr[[5]] = 1


def test_state_array_element_straddling_pages(store):
    model = filled(store)
    arr = store.array("int64", offset=PAGE - 4, shape=(4,))  # element 0 spans pages 0 and 1
    ref = model.array("int64", offset=PAGE - 4, shape=(4,))
    with store.snapshot() as snap:
        s = model.snapshot()
        arr[0] = 42
        ref[0] = 42
        arr.add_at([0, 0], 1)
        ref.add_at([0, 0], 1)
        assert arr[0] == 44
        assert_same_state(store, model, {s: snap})


@pytest.mark.parametrize("idx,values", [
    (np.array([1, 1, 1, 900, 1]), 5),
    (np.array([-1, -1, 4000]), np.array([1, 2, 3])),
    ([7, 7], np.array([10, -10])),
    (3, 9),
    (slice(0, 8192, 1000), 2),
    (_mask(N64, 9), 1),
], ids=["repeated", "negative repeated", "list", "int", "slice", "mask"])
def test_state_array_add_at_accumulates_repeated_indices(store, idx, values):
    model = filled(store)
    arr, ref = store.array("int64"), model.array("int64")
    with store.snapshot() as snap:
        s = model.snapshot()
        arr.add_at(idx, values)
        ref.add_at(idx, values)
        assert_same_state(store, model, {s: snap})


def test_state_array_add_at_on_2d_rows(store):
    model = filled(store)
    arr = store.array("int32", shape=(32, 512))
    ref = model.array("int32", shape=(32, 512))
    arr.add_at([4, 4, 31], np.arange(512))
    ref.add_at([4, 4, 31], np.arange(512))
    assert_same_state(store, model)


def test_state_array_reads_are_copies(store):
    arr = store.array("int64")
    arr[0:4] = [1, 2, 3, 4]
    out = arr[0:4]
    assert isinstance(out, np.ndarray) and out.tolist() == [1, 2, 3, 4]
    out[:] = 0                       # a copy: the store is unaffected
    assert arr[0:4].tolist() == [1, 2, 3, 4]
    assert arr[2] == 3 and arr[-1] == 0
    full = np.asarray(arr)
    full[:] = 9
    assert arr[0] == 1
    assert arr.to_numpy()[:4].tolist() == [1, 2, 3, 4]
    assert store.stats()["exported_buffers"] == 0


# ---- buffer exports -----------------------------------------------------------------------
def test_numpy_and_memoryview_are_read_only_zero_copy_views(store):
    mv = memoryview(store)
    view = np.asarray(store)
    assert mv.readonly and mv.nbytes == SIZE and mv.format == "B"
    assert view.dtype == np.uint8 and view.shape == (SIZE,) and not view.flags.writeable
    assert store.stats()["exported_buffers"] >= 2
    store.write(10, b"later")   # both views see later writes: no copy was made
    assert mv[10:15].tobytes() == b"later"
    assert view[10:15].tobytes() == b"later"
    store.array("uint8")[SIZE - 1] = 200
    assert mv[SIZE - 1] == 200 and view[-1] == 200
    with pytest.raises(TypeError):
        mv[0] = 1
    with pytest.raises(ValueError):
        view[0] = 1
    with pytest.raises(ValueError):
        view.flags.writeable = True
    assert store.read(0, 1) == b"\x00"
    del mv, view
    assert store.stats()["exported_buffers"] == 0


def test_writable_buffer_request_is_refused(store):
    with pytest.raises((BufferError, TypeError)):
        (ctypes.c_char * SIZE).from_buffer(store)
    assert store.stats()["exported_buffers"] == 0


def test_close_with_exported_buffer_raises_and_store_stays_usable(store):
    mv = memoryview(store)
    arr_view = np.asarray(store)
    with pytest.raises(BufferError, match="exported"):
        store.close()
    assert not store.closed
    store.write(0, b"still works")
    assert store.read(0, 11) == b"still works" == mv[:11].tobytes()
    with store.snapshot() as snap:
        assert snap.read(0, 5) == b"still"
    del arr_view
    with pytest.raises(BufferError):
        store.close()
    mv.release()
    store.close()
    assert store.closed


# ---- tracking counters ------------------------------------------------------------------------
def test_page_versions_and_dirty_pages(store):
    store.write(PAGE - 1, b"ab")                     # pages 0 and 1, epoch 1
    store.write_pages([5], bytes(PAGE))              # page 5 (zeros still count as a write)
    st = store.stats()
    assert st["dirty_pages"] == 3 and st["epoch"] == 1
    assert st["pages_written"] >= 3
    s1 = store.snapshot()
    store.array("int64")[PAGE // 8 * 5] = 1          # page 5 again, epoch 2
    store.array("int64")[[PAGE // 8 * 9]] = 1        # page 9, epoch 2
    s2 = store.snapshot()
    assert store.stats()["dirty_pages"] == 4
    _, v1 = s1.read_pages(range(N_PAGES))
    _, v2 = s2.read_pages(range(N_PAGES))
    expected1 = [0] * N_PAGES
    expected1[0] = expected1[1] = expected1[5] = 1
    expected2 = list(expected1)
    expected2[5] = expected2[9] = 2
    assert v1.tolist() == expected1 and v2.tolist() == expected2
    assert store.changed_pages(0, s1).tolist() == [0, 1, 5]
    assert store.changed_pages(s1, s2).tolist() == [5, 9]
    assert store.changed_pages(s2, s2).tolist() == []
    s1.release()
    s2.release()


def test_stats_reports_geometry(store):
    st = store.stats()
    assert (st["size"], st["page_size"], st["n_pages"]) == (SIZE, PAGE, N_PAGES)
    assert st["epoch"] == store.epoch


# ---- lifecycle ------------------------------------------------------------------------------
def test_context_manager_closes_even_on_error():
    with pytest.raises(RuntimeError):
        with sc.Store(size=SIZE) as s:
            s.write(0, b"x")
            raise RuntimeError("boom")
    assert s.closed
    with sc.Store(size=SIZE) as s2:
        assert not s2.closed
    assert s2.closed


def test_close_is_idempotent_and_releases_snapshots(store):
    snap = store.snapshot()
    store.close()
    store.close()
    assert store.closed
    assert snap.released
    with pytest.raises(sc.SnapshotReleased):
        snap.read(0, 1)
    snap.release()   # harmless


def test_repr(store_path):
    with sc.Store(store_path, size=SIZE) as s:
        assert os.fspath(store_path) in repr(s) and "epoch=1" in repr(s)
    assert "closed" in repr(s)


CLOSED_CALLS = {
    "write": lambda s, a: s.write(0, b"x"),
    "write bad offset": lambda s, a: s.write(-1, b"x"),
    "read": lambda s, a: s.read(0, 1),
    "write_pages": lambda s, a: s.write_pages([0], bytes(PAGE)),
    "array": lambda s, a: s.array("int64"),
    "snapshot": lambda s, a: s.snapshot(),
    "stats": lambda s, a: s.stats(),
    "sync": lambda s, a: s.sync(),
    "epoch": lambda s, a: s.epoch,
    "size": lambda s, a: s.size,
    "page_size": lambda s, a: s.page_size,
    "n_pages": lambda s, a: s.n_pages,
    "uuid": lambda s, a: s.uuid,
    "memoryview": lambda s, a: memoryview(s),
    "np.asarray": lambda s, a: np.asarray(s),
    "enter": lambda s, a: s.__enter__(),
    "delta": lambda s, a: s.delta(0),
    "changed_pages": lambda s, a: s.changed_pages(0),
    "array getitem": lambda s, a: a[0],
    "array slice": lambda s, a: a[0:4],
    "array setitem": lambda s, a: a.__setitem__(0, 1),
    "array fancy setitem": lambda s, a: a.__setitem__([0, 1], 1),
    "array add_at": lambda s, a: a.add_at([0], 1),
    "array to_numpy": lambda s, a: a.to_numpy(),
}


@pytest.mark.parametrize("call", CLOSED_CALLS.values(), ids=CLOSED_CALLS.keys())
def test_every_method_after_close_raises_store_closed(call):
    s = sc.Store(size=SIZE)
    arr = s.array("int64")
    s.close()
    with pytest.raises(sc.StoreClosed):
        call(s, arr)


# ---- argument checking ------------------------------------------------------------------
OBJ = np.array([1, 2, 3], dtype=object)
BAD_INPUT = [
    # (id, call, exception, message pattern)
    ("write negative offset", lambda s: s.write(-1, b"x"), IndexError, rf"offset -1 .*\[0, {SIZE - 1}\]"),
    ("write past end", lambda s: s.write(SIZE - 1, b"xy"), IndexError, rf"offset {SIZE - 1} .*\[0, {SIZE - 2}\]"),
    ("write offset beyond", lambda s: s.write(SIZE + 1, b""), IndexError, rf"offset .*\[0, {SIZE}\]"),
    ("write huge offset", lambda s: s.write(1 << 64, b"x"), IndexError, "offset"),
    ("write bool offset", lambda s: s.write(True, b"x"), TypeError, "offset must be an integer, got bool"),
    ("write float offset", lambda s: s.write(1.0, b"x"), TypeError, "offset must be an integer"),
    ("write str offset", lambda s: s.write("0", b"x"), TypeError, "offset must be an integer"),
    ("write str data", lambda s: s.write(0, "text"), TypeError, "data must be a bytes-like"),
    ("write int data", lambda s: s.write(0, 7), TypeError, "data must be a bytes-like"),
    ("write list data", lambda s: s.write(0, [1, 2]), TypeError, "data must be a bytes-like"),
    ("write None data", lambda s: s.write(0, None), TypeError, "data must be a bytes-like"),
    ("write object array", lambda s: s.write(0, OBJ), TypeError, "data"),
    ("read negative length", lambda s: s.read(0, -1), ValueError, "length must be >= 0"),
    ("read past end", lambda s: s.read(SIZE - 4, 5), IndexError, rf"offset .*\[0, {SIZE - 5}\]"),
    ("read too long", lambda s: s.read(0, SIZE + 1), IndexError, rf"length {SIZE + 1} .*\[0, {SIZE}\]"),
    ("read too long at offset", lambda s: s.read(8, SIZE + 1), IndexError, rf"length .*\[0, {SIZE - 8}\]"),
    ("write too long", lambda s: s.write(0, bytes(SIZE + 1)), IndexError, rf"len\(data\) .*\[0, {SIZE}\]"),
    ("read negative offset", lambda s: s.read(-5, 1), IndexError, rf"offset -5 .*\[0, {SIZE - 1}\]"),
    ("read bool offset", lambda s: s.read(False, 1), TypeError, "offset must be an integer, got bool"),
    ("read bool length", lambda s: s.read(0, True), TypeError, "length must be an integer, got bool"),
    ("read float length", lambda s: s.read(0, 2.0), TypeError, "length must be an integer"),
    ("write_pages id too big", lambda s: s.write_pages([0, N_PAGES], bytes(2 * PAGE)), IndexError,
     rf"page_ids contains {N_PAGES}.*\[0, {N_PAGES - 1}\]"),
    ("write_pages negative id", lambda s: s.write_pages([-1], bytes(PAGE)), IndexError,
     rf"page_ids contains -1.*\[0, {N_PAGES - 1}\]"),
    ("write_pages float ids", lambda s: s.write_pages([0.0], bytes(PAGE)), TypeError, "page_ids"),
    ("write_pages bool ids", lambda s: s.write_pages([True], bytes(PAGE)), TypeError, "page_ids"),
    ("write_pages str ids", lambda s: s.write_pages(["1"], bytes(PAGE)), TypeError, "page_ids"),
    ("write_pages 2-d ids", lambda s: s.write_pages([[0], [1]], bytes(2 * PAGE)), TypeError, "page_ids"),
    ("write_pages None ids", lambda s: s.write_pages(None, bytes(PAGE)), TypeError, "page_ids"),
    ("write_pages short data", lambda s: s.write_pages([0], bytes(PAGE - 1)), ValueError,
     rf"data must hold .* {PAGE} bytes, got {PAGE - 1}"),
    ("write_pages long data", lambda s: s.write_pages([0, 1], bytes(3 * PAGE)), ValueError,
     rf"{2 * PAGE} bytes, got {3 * PAGE}"),
    ("write_pages str data", lambda s: s.write_pages([0], "x" * PAGE), TypeError, "data must be a bytes-like"),
    ("write_pages object data", lambda s: s.write_pages([0], np.array([b"x" * PAGE], dtype=object)),
     TypeError, "data"),
    ("array object dtype", lambda s: s.array(object), TypeError, "dtype"),
    ("array bad dtype", lambda s: s.array("no such dtype"), TypeError, "dtype"),
    ("array negative offset", lambda s: s.array("int64", offset=-8), IndexError, rf"offset .*\[0, {SIZE}\]"),
    ("array offset past end", lambda s: s.array("int64", offset=SIZE + 8), IndexError, rf"offset .*\[0, {SIZE}\]"),
    ("array bool offset", lambda s: s.array("int64", offset=True), TypeError, "offset"),
    ("array too big", lambda s: s.array("int64", shape=(N64 + 1,)), IndexError,
     rf"shape \({N64 + 1},\) .*at most {N64} elements"),
    ("array too big at offset", lambda s: s.array("int64", offset=64, shape=(2, N64)), IndexError,
     rf"shape .*at most {N64 - 8} elements"),
    ("array shape overflows int64", lambda s: s.array("int64", shape=(2**32, 2**32)), ValueError,
     "shape .*too large"),
    ("array shape too large with a zero dim", lambda s: s.array("int64", shape=(2**62, 0)),
     ValueError, "shape .*too large"),
    ("array negative shape", lambda s: s.array("int64", shape=(-1,)), ValueError, "shape"),
    ("getitem index out of range", lambda s: s.array("int64")[N64], IndexError, rf"{N64}.*size {N64}"),
    ("getitem str key", lambda s: s.array("int64")["x"], IndexError, "only integers"),
    ("setitem index out of range", lambda s: s.array("int64").__setitem__(N64, 1), IndexError,
     rf"{N64}.*size {N64}"),
    ("setitem int array out of range", lambda s: s.array("int64").__setitem__(np.array([0, -N64 - 1]), 1),
     IndexError, rf"-{N64 + 1}.*\[-{N64}, {N64 - 1}\]"),
    ("setitem mask wrong length", lambda s: s.array("int64").__setitem__(np.ones(5, bool), 1),
     IndexError, rf"boolean index.*\({N64},\)"),
    ("setitem float key", lambda s: s.array("int64").__setitem__(np.array([1.0]), 1), TypeError, "StateArray indexes"),
    ("setitem values wrong shape", lambda s: s.array("int64").__setitem__(slice(0, 4), np.arange(3)),
     ValueError, "shape"),
    ("setitem values not numbers", lambda s: s.array("int64").__setitem__(slice(0, 4), "abc"), ValueError, "abc"),
    ("setitem 2-d row out of range", lambda s: s.array("int64", shape=(16, 512)).__setitem__([16], 1),
     IndexError, r"\[-16, 15\]"),
    ("setitem 2-d fancy out of range",
     lambda s: s.array("int64", shape=(16, 512)).__setitem__(([0], [512]), 1), IndexError, r"\[-512, 511\]"),
    ("add_at out of range", lambda s: s.array("int64").add_at([1, N64], 1), IndexError, rf"\[-{N64}, {N64 - 1}\]"),
    ("add_at values wrong shape", lambda s: s.array("int64").add_at([1, 2], [1, 2, 3]), ValueError, "shape"),
    ("add_at object key", lambda s: s.array("int64").add_at(np.array([1, None], dtype=object), 1),
     TypeError, "StateArray indexes"),
    ("changed_pages bad since", lambda s: s.changed_pages(True), TypeError, "since"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input_raises_clearly_and_changes_nothing(store, call, exc, match):
    model = filled(store)
    snap = store.snapshot()
    s = model.snapshot()
    store.write(0, b"after")          # one preserved page, so preservation counters are live
    model.write(0, b"after")
    before = store.stats()
    with pytest.raises(exc, match=match) as excinfo:
        call(store)
    assert_same_state(store, model, {s: snap})
    after = store.stats()
    for key in ("pages_written", "pages_preserved_total", "dirty_pages", "preserved_pages"):
        assert after[key] == before[key], key
    # Even while the exception (and its traceback) is kept, nothing stays exported:
    # the store can still be closed.
    assert after["exported_buffers"] == 0, excinfo.value
    snap.release()
    store.close()
    assert store.closed
