"""StateArray against numpy: every index and value that numpy takes for `a[key] = v`,
`np.add.at(a, key, v)` and `a[key]` on a plain ndarray gives the same result here, and
every write is tracked (a snapshot taken before keeps the old bytes)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import statecore as sc

PAGE = 512
N_PAGES = 16
SIZE = PAGE * N_PAGES


@pytest.fixture
def store():
    s = sc.Store(size=SIZE, page_size=PAGE)
    yield s
    s.close()


def _setup(store, dtype, shape, offset=0):
    """A StateArray filled with a pattern, the same values as an ndarray, and a snapshot
    of the state before the operation under test."""
    arr = store.array(dtype, offset=offset, shape=shape)
    ref = (np.arange(int(np.prod(shape))) % 97).astype(dtype).reshape(shape)
    arr[...] = ref
    return arr, ref, store.snapshot()


def _assert_tracked(store, snap, before: bytes) -> None:
    """Every page whose bytes changed is recorded as changed, and the snapshot still
    reads the bytes it was taken with."""
    after = np.frombuffer(store.read(0, SIZE), np.uint8).reshape(N_PAGES, PAGE)
    old = np.frombuffer(before, np.uint8).reshape(N_PAGES, PAGE)
    changed = set(np.flatnonzero((after != old).any(axis=1)).tolist())
    assert changed <= set(store.changed_pages(snap).tolist())
    assert snap.read(0, SIZE) == before


def _same_outcome(ref_call, sc_call):
    """Both succeed, or both raise (numpy's and our exception types may differ)."""
    try:
        ref_call()
        expected = None
    except Exception as e:
        expected = e
    if expected is None:
        sc_call()
    else:
        with pytest.raises((ValueError, IndexError, TypeError)):  # README: Bad input
            sc_call()
    return expected


# ---- add_at takes the indices numpy takes -----------------------------------------------
ROWS, COLS = np.array([0, 1, 1, 5]), np.array([2, 3, 3, 0])
ADD_AT_KEYS = {
    "rows and cols": (ROWS, COLS),
    "rows and cols as lists": ([0, 1, 1], [2, 3, 3]),
    "negative rows and cols": (np.array([-1, -1, 0]), np.array([-4, 0, -1])),
    "row array in a tuple": (np.array([1, 1, 3]),),
    "2-d rows and cols": (np.array([[0, 1], [1, 0]]), np.array([[3, 3], [0, 0]])),
    "full-shape mask": "mask",
    "list of lists (rows)": [[0, 1], [2, 3]],
    "rows": np.array([2, 2, 7]),
    "row mask": np.array([True, False] * 4),
    "ellipsis": Ellipsis,
    "slice": slice(1, 6, 2),
    "int": 3,
    "int pair": (3, 2),
    "rows then slice": (np.array([0, 0, 6]), slice(1, 3)),
    "empty": (np.array([], dtype=np.intp), np.array([], dtype=np.intp)),
}


@pytest.mark.parametrize("key", ADD_AT_KEYS.values(), ids=ADD_AT_KEYS.keys())
def test_add_at_on_a_2d_array_matches_numpy(store, key):
    # Rows of 200 bytes: rows straddle the 512-byte pages.
    arr, ref, snap = _setup(store, "int64", (8, 25), offset=40)
    if isinstance(key, str):
        key = ref % 3 == 0
    before = snap.read(0, SIZE)
    np.add.at(ref, key, 10)
    arr.add_at(key, 10)
    assert np.array_equal(arr[...], ref)
    _assert_tracked(store, snap, before)


def test_add_at_with_values_per_index_pair(store):
    arr, ref, snap = _setup(store, "float64", (4, 4))
    vals = np.array([1.5, 2.0, 4.0, 8.0])
    np.add.at(ref, (ROWS % 4, COLS), vals)
    arr.add_at((ROWS % 4, COLS), vals)
    assert np.array_equal(arr[...], ref)
    assert arr[1, 3] == 7 + 2.0 + 4.0  # the repeated pair accumulated


def test_add_at_with_a_partial_index_tuple_on_3d_adds_whole_blocks(store):
    arr, ref, snap = _setup(store, "int32", (4, 5, 6))
    before = snap.read(0, SIZE)
    key = (np.array([0, 3, 3]), np.array([4, 1, 1]))
    np.add.at(ref, key, np.arange(6))
    arr.add_at(key, np.arange(6))
    assert np.array_equal(arr[...], ref)
    _assert_tracked(store, snap, before)


@pytest.mark.parametrize("key,values", [
    ((ROWS, COLS), [1, 2, 3]),                 # 4 pairs, 3 values
    ((ROWS, COLS, np.array([0])), 1),          # more index arrays than dimensions
    ((np.array([8]), np.array([0])), 1),       # row out of range
    ((np.array([0]), np.array([-26])), 1),     # column out of range
    (np.ones((3, 4), bool), 1),                # mask of the wrong shape
])
def test_add_at_refuses_what_numpy_refuses_and_changes_nothing(store, key, values):
    arr, ref, snap = _setup(store, "int64", (8, 25))
    before = store.read(0, SIZE)
    stats = store.stats()
    with pytest.raises((IndexError, ValueError, TypeError)):
        np.add.at(ref.copy(), key, values)
    with pytest.raises((IndexError, ValueError, TypeError)):
        arr.add_at(key, values)
    assert store.read(0, SIZE) == before
    assert store.stats()["pages_written"] == stats["pages_written"]


# ---- add_at casts values as numpy does ---------------------------------------------------
CASTS = [
    ("uint32", 5, -1),
    ("uint8", 5, -1),
    ("uint8", 0, 300),
    ("uint8", 250, np.array([10, 20], np.int16)),
    ("uint64", 1, -2),
    ("int32", 0, 2**40),
    ("int64", -1, 0.5),
    ("int64", 0, [0.9, 0.9]),
    ("int16", 0, np.array([70000], np.uint64)),
    ("float32", 0, 1 + 2j),
    ("bool", False, True),
]


@pytest.mark.parametrize("dtype,init,values", CASTS, ids=[f"{d} += {v!r}" for d, _, v in CASTS])
def test_add_at_casts_values_like_numpy(store, dtype, init, values):
    arr = store.array(dtype, shape=(6,))
    arr[...] = init
    ref = np.full(6, init, dtype=dtype)
    idx = [0, 0] if np.ndim(values) == 0 else list(range(np.size(values)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ComplexWarning: numpy warns as well
        np.add.at(ref, idx, values)
        arr.add_at(idx, values)
    assert arr[...].tolist() == ref.tolist()


@pytest.mark.parametrize("values", ["abc", "5", 2**70, [1, 2**70]], ids=repr)
def test_add_at_values_numpy_cannot_add_raise_before_anything_is_touched(store, values):
    arr = store.array("int64", shape=(6,))
    ref = np.zeros(6, "int64")
    idx = [0] if np.ndim(values) == 0 else [0, 1]
    with pytest.raises((TypeError, OverflowError)):
        np.add.at(ref, idx, values)
    snap = store.snapshot()
    written = store.stats()["pages_written"]
    with pytest.raises(TypeError, match="values|loop"):
        arr.add_at(idx, values)
    assert store.stats()["pages_written"] == written
    assert store.changed_pages(snap).size == 0
    assert arr[...].tolist() == [0] * 6


# ---- reads are copies --------------------------------------------------------------------
def test_reading_one_structured_element_returns_a_copy(store):
    dt = np.dtype([("a", "<i4"), ("b", "u1")])
    arr = store.array(dt, shape=(10,))
    arr[3] = (7, 1)
    v = arr[3]
    assert isinstance(v, np.void)
    arr[3] = (99, 2)
    assert v.tolist() == (7, 1)            # not a view of the live bytes
    v["a"] = 5                             # writable, and changes only the copy
    assert arr[3].tolist() == (99, 2)
    assert store.stats()["exported_buffers"] == 0
    store.close()                          # nothing keeps the mapping exported


@pytest.mark.parametrize("dtype", ["V8", "S3", "U2", "int64", "complex64",
                                   np.dtype([("a", "<i4", (2,))])], ids=str)
def test_an_element_read_keeps_its_value_after_the_store_changes(store, dtype):
    arr = store.array(dtype, shape=(4,))
    arr[1] = np.frombuffer(bytes(range(1, 1 + arr.dtype.itemsize)), arr.dtype)[0]
    out = arr[1]
    kept = out.tobytes()
    arr[1] = np.zeros((), arr.dtype)
    assert out.tobytes() == kept
    del out
    store.close()  # no read result keeps the mapping exported


# ---- assignments numpy accepts -------------------------------------------------------------
MASK8 = np.array([True, True, True, False, False, False, False, False])
SETITEM_1D = [
    (slice(0, 3), np.ones((1, 3))),
    (slice(0, 3), np.ones((1, 1, 3))),
    ([0, 1, 2], np.ones((1, 3))),
    ([0, 1, 2], [[7, 8, 9]]),
    (np.array([0, 1, 2]), np.ones((1, 1, 3))),
    (Ellipsis, np.ones((1, 8))),
    (slice(0, 3), np.ones((1,))),
    (slice(0, 3), np.ones((2, 3))),            # refused by both
    (MASK8, np.ones((3,))),
    (MASK8, np.ones((1,))),
    (MASK8, np.ones((1, 3))),                  # refused by both: a mask takes flat values
    (MASK8, np.ones((3, 1))),
    (2, np.ones((1,))),                        # refused by both: one element takes a scalar
    (2, np.ones((1, 1))),
    (2, 5),
]


@pytest.mark.parametrize("key,value", SETITEM_1D,
                         ids=[f"{k!r}={np.shape(v)}" for k, v in SETITEM_1D])
def test_setitem_accepts_the_value_shapes_numpy_accepts(store, key, value):
    arr, ref, snap = _setup(store, "int64", (8,), offset=PAGE - 16)
    before = snap.read(0, SIZE)
    if _same_outcome(lambda: ref.__setitem__(key, value),
                     lambda: arr.__setitem__(key, value)) is not None:
        assert store.changed_pages(snap).size == 0
    assert np.array_equal(arr[...], ref)
    _assert_tracked(store, snap, before)


SETITEM_2D = [
    ([0, 2], np.ones((1, 2, 4))),
    (np.array([True, False, True]), np.ones((1, 1, 4))),
    (slice(None), np.ones((1, 3, 4))),
    (1, np.ones((1, 4))),
    ((1, slice(None)), np.ones((1, 1, 4))),
    ((np.array([0, 2]), np.array([1, 3])), np.ones((1, 2))),
]


@pytest.mark.parametrize("key,value", SETITEM_2D,
                         ids=[f"{k!r}={np.shape(v)}" for k, v in SETITEM_2D])
def test_setitem_on_2d_drops_leading_ones_like_numpy(store, key, value):
    arr, ref, snap = _setup(store, "int64", (3, 4))
    ref[key] = value * 5
    arr[key] = value * 5
    assert np.array_equal(arr[...], ref)


@pytest.mark.parametrize("shape,mask_shape", [((3, 4), (3, 4)), ((8, 25), (8, 25)),
                                              ((2, 3, 40), (2, 3)), ((4, 5, 6), (4, 5, 6))])
def test_setitem_with_a_mask_over_several_axes_matches_numpy(store, shape, mask_shape):
    arr, ref, snap = _setup(store, "int32", shape)
    before = snap.read(0, SIZE)
    mask = (np.arange(int(np.prod(mask_shape))).reshape(mask_shape) % 5) == 1
    ref[mask] = 0
    arr[mask] = 0
    assert np.array_equal(arr[...], ref)
    assert np.array_equal(arr[mask], ref[mask])
    _assert_tracked(store, snap, before)
    n = int(mask.sum())
    values = np.arange(n * int(np.prod(shape[mask.ndim:]))).reshape((n,) + shape[mask.ndim:])
    ref[mask] = values
    arr[mask] = values
    assert np.array_equal(arr[...], ref)


def test_setitem_with_a_mask_of_the_wrong_shape_raises_index_error(store):
    arr, ref, snap = _setup(store, "int32", (3, 4))
    for mask in (np.ones((4, 3), bool), np.ones((3, 5), bool), np.ones((3, 4, 1), bool)):
        with pytest.raises(IndexError):
            ref[mask] = 0
        with pytest.raises(IndexError):
            arr[mask] = 0
    assert store.changed_pages(snap).size == 0


@pytest.mark.parametrize("key", [[], np.array([], np.int64), np.array([], np.uint32),
                                 np.zeros(0, bool)], ids=repr)
def test_empty_index_on_an_array_without_rows(store, key):
    ref = np.zeros((0, 7), "int32")
    arr = store.array("int32", shape=(0, 7))
    for value in (np.arange(7), 5, np.ones((1, 7))):
        ref[key] = value
        arr[key] = value
        arr.add_at(key, value)
    assert arr[key].shape == ref[key].shape == (0, 7)
    with pytest.raises(ValueError):
        arr[key] = np.ones((2, 7))
    # Rows of no bytes: an empty selection of a (5, 0) array, and of a 0-d-row (0,) array.
    flat = store.array("int32", shape=(0,))
    flat[key] = 5
    assert flat[...].shape == (0,)


def test_empty_index_with_trailing_basic_parts_on_an_array_without_rows(store):
    arr = store.array("int32", shape=(0, 7))
    ref = np.zeros((0, 7), "int32")
    ref[[], 1:3] = [1, 2]
    arr[[], 1:3] = [1, 2]
    assert arr[[], 1:3].shape == ref[[], 1:3].shape == (0, 2)


@pytest.mark.parametrize("shape", [(6, 0), (3, 7, 0), (2, 0, 4)])
def test_rows_of_no_bytes_take_the_indices_numpy_takes(store, shape):
    arr = store.array("int16", shape=shape)
    ref = np.zeros(shape, "int16")
    mask = np.arange(shape[0]) == 0
    for key in ([shape[0] - 1, 0, 0], (np.array([-1, 0]),), mask):
        ref[key] = 1
        arr[key] = 1
        np.add.at(ref, key, 1)
        arr.add_at(key, 1)
    for key in ([shape[0]], (np.array([-shape[0] - 1]),)):
        with pytest.raises(IndexError):
            arr[key] = 1
        with pytest.raises(IndexError):
            arr.add_at(key, 1)


def test_random_keys_and_values_match_numpy_and_are_tracked(store):
    """Seeded: integer arrays on leading axes, masks over leading axes, row lists, rows
    then slices; setitem and add_at; every result, refusal and page tracked as numpy and
    the snapshot contract say."""
    rng = np.random.default_rng(7)
    value_shapes = [(), (1,), (3,), (1, 3), (2, 1), (1, 1, 3)]
    for _ in range(300):
        nd = int(rng.integers(1, 4))
        shape = tuple(int(x) for x in rng.integers(0, 9, nd))
        dtype = str(rng.choice(["int64", "int8", "float32", "int16"]))
        arr = store.array(dtype, offset=int(rng.integers(0, 200)), shape=shape)
        ref = rng.integers(0, 100, size=shape).astype(dtype)
        arr[...] = ref
        lead = int(rng.integers(1, nd + 1))
        kind = int(rng.integers(0, 4))
        if kind == 0:
            key: object = tuple(rng.integers(-d, d + 1, size=3) for d in shape[:lead])
        elif kind == 1:
            key = rng.random(shape[:lead]) < 0.4
        elif kind == 2:
            key = [int(x) for x in rng.integers(-shape[0], shape[0] + 1, size=rng.integers(0, 4))]
        else:
            key = (rng.integers(0, max(shape[0], 1), 2),) + (slice(None, None, 2),) * (nd - 1)
        values = rng.integers(-5, 5, size=value_shapes[rng.integers(0, len(value_shapes))])
        add = bool(rng.integers(0, 2))
        snap = store.snapshot()
        before = snap.read(0, SIZE)
        written = store.stats()["pages_written"]
        expected = _same_outcome(
            lambda: np.add.at(ref, key, values) if add else ref.__setitem__(key, values),
            lambda: arr.add_at(key, values) if add else arr.__setitem__(key, values))
        if expected is None:
            assert np.array_equal(arr[...], ref), (shape, key, add)
        else:
            assert store.read(0, SIZE) == before and store.stats()["pages_written"] == written
        _assert_tracked(store, snap, before)
        snap.release()


@pytest.mark.parametrize("dtype,shape,offset", [
    ("int64", (5_000_000,), 0),                     # one int64 per row
    ("float32", (1_000_000, 9), 4000),               # 36-byte rows straddle pages
    (np.dtype([("a", "<i8"), ("b", "<f4")]), (2_500_000,), 12),  # packed 12-byte records
])
def test_many_rows_under_a_live_snapshot_match_numpy(dtype, shape, offset):
    """Large fancy assignments under a live snapshot take the core's sorted path (pages
    copied in address order, rows written window by window behind the copies): repeats
    end with their last value and negative indices count from the end, as in numpy, and
    the snapshot keeps the old bytes."""
    rng = np.random.default_rng(5)
    dtype = np.dtype(dtype)
    size = offset + int(np.prod(shape)) * dtype.itemsize
    with sc.Store(size=size + (-size % 4096)) as big:
        arr = big.array(dtype, offset=offset, shape=shape)
        ref = np.frombuffer(rng.bytes(size - offset), dtype=dtype).reshape(shape).copy()
        arr[...] = ref
        snap = big.snapshot()
        before = np.asarray(big).copy()
        n_rows = shape[0]
        idx = rng.integers(-n_rows, n_rows, 60_000)
        idx[-500:] = idx[:500]  # repeats far apart: the later value must win
        values = np.frombuffer(rng.bytes(len(idx) * dtype.itemsize * int(np.prod(shape[1:]))),
                               dtype=dtype).reshape((len(idx),) + shape[1:])
        arr[idx] = values
        ref[idx] = values
        assert np.array_equal(arr[...].view(np.uint8), ref.view(np.uint8))
        assert np.array_equal(np.frombuffer(snap.read(0, big.size), np.uint8), before)
        snap.release()
