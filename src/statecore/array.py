"""StateArray: a typed numpy view over a store whose writes go through the tracked path.

A write first computes, vectorized, the pages the index touches; the core preserves them
for live snapshots and records their versions; only then are the bytes modified (by numpy,
or by the core itself for whole rows chosen by an integer index)."""
from __future__ import annotations

import math
import traceback
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from ._args import as_int

if TYPE_CHECKING:
    from .store import Store

_MAX_BYTES = np.iinfo(np.intp).max  # numpy's own limit on an array's bytes, zero dims aside
_UNSUPPORTED = ("StateArray indexes with ints, slices, Ellipsis, None, or one integer or "
                "boolean array on the first axis (or integer arrays on the leading axes, or "
                "a boolean mask over them)")


def _unpin_export(exc: BaseException) -> None:
    """A failed access's traceback keeps the frames that hold a view of the store; while
    anyone keeps the exception, that export would make store.close() raise BufferError.
    Clear those frames' locals (the raising frame drops its own)."""
    traceback.clear_frames(exc.__traceback__)


def _index_array(key: Any) -> np.ndarray:
    """Like numpy, an empty list selects nothing (np.asarray([]) alone would be float)."""
    idx = np.asarray(key)
    if idx.size == 0 and not isinstance(key, np.ndarray):
        idx = idx.astype(np.intp)
    return idx


def _drop_leading_ones(values: np.ndarray, ndim: int) -> np.ndarray:
    """numpy's assignment drops leading size-1 dimensions beyond the selection's own
    (`a[0:3] = np.ones((1, 3))`); plain broadcasting would refuse them."""
    while values.ndim > ndim and values.shape[0] == 1:
        values = values[0]
    return values


def _expand_mask(parts: tuple, shape: tuple) -> tuple:
    """A leading boolean mask over several axes becomes the integer arrays of its True
    positions, as numpy reads it (`a[mask2d]` is `a[mask2d.nonzero()]`)."""
    if not parts or not isinstance(parts[0], (list, np.ndarray)):
        return parts
    mask = np.asarray(parts[0])
    if mask.dtype != bool or mask.ndim < 2:
        return parts
    if mask.ndim > len(shape) or mask.shape != shape[:mask.ndim]:
        raise IndexError(f"boolean index of shape {mask.shape} does not match the array's "
                         f"leading dimensions {shape[:mask.ndim]}")
    return tuple(np.nonzero(mask)) + parts[1:]


def _broadcasts(shape: tuple, target: tuple) -> bool:
    try:
        return np.broadcast_shapes(shape, target) == target
    except ValueError:
        return False


def _assignable(key: Any, values: np.ndarray, target: tuple, ndim: int) -> np.ndarray:
    """`values` shaped for `view[key] = values` as numpy would take them, or the error
    numpy gives (raised before anything is touched)."""
    parts = key if isinstance(key, tuple) else (key,)
    if values.ndim > len(target):
        if len(parts) == 1 and isinstance(parts[0], (list, np.ndarray)):
            mask = np.asarray(parts[0])
            if mask.dtype == bool and mask.ndim == ndim:
                # numpy's own path for a full-shape mask takes flat values only.
                raise TypeError("boolean array indexing assignment requires a 0 or "
                                f"1-dimensional input, input has {values.ndim} dimensions")
        element = len(parts) == ndim and all(
            isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in parts)
        if not element:  # one element takes a scalar only, as in numpy
            values = _drop_leading_ones(values, len(target))
    if not _broadcasts(values.shape, target):
        raise ValueError(f"cannot assign values of shape {values.shape} to a selection of "
                         f"shape {target}")
    return values


def _addends(values: Any, dtype: np.dtype) -> np.ndarray:
    """The values as np.add.at takes them (numpy picks the loop and casts the sums back,
    so -1 wraps in an unsigned array), checked before anything is touched."""
    vals = np.asarray(values)
    if vals.dtype.hasobject:
        # Python objects (an int beyond 64 bits, say) would fail halfway through the sums.
        raise TypeError(f"values must be numbers numpy can hold in a fixed-size dtype, "
                        f"got Python objects (for example {vals.flat[0]!r})"
                        if vals.size else "values must be numbers, got an object array")
    np.add.resolve_dtypes((dtype, vals.dtype, None))  # numpy's error when there is no loop
    return vals


def _is_basic(part: Any) -> bool:
    return part is None or part is Ellipsis or isinstance(part, (int, np.integer, slice)) \
        and not isinstance(part, bool)


def _int_rows(key: Any) -> Optional[np.ndarray]:
    """An integer index array as contiguous int64 (negative values kept), or None when the
    key needs the general path (bools, other types, uint64 beyond int64)."""
    if isinstance(key, list):
        key = np.asarray(key)
    if not isinstance(key, np.ndarray) or key.dtype.kind not in "iu" or key.ndim == 0:
        return None
    if key.dtype == np.uint64 and key.size and int(key.max()) > np.iinfo(np.int64).max:
        return None
    return np.ascontiguousarray(key, dtype=np.int64)


class StateArray:
    """`arr[idx] = values`, `arr.add_at(idx, values)`, `arr[i:j] -> ndarray` (a copy)."""

    def __init__(self, store: "Store", dtype: Any, *, offset: int = 0,
                 shape: Optional[Any] = None) -> None:
        try:
            dt = np.dtype(dtype)
        except TypeError as e:
            raise TypeError(f"dtype {dtype!r} is not a numpy dtype: {e}") from None
        if dt.hasobject or dt.itemsize == 0:
            raise TypeError(f"dtype must be a fixed-size type without Python objects, got {dt}")
        size = store.size
        off = as_int("offset", offset)
        if off < 0 or off > size:
            raise IndexError(f"offset must be in [0, {size}], got {off}")
        if shape is None:
            shape = ((size - off) // dt.itemsize,)
        elif not isinstance(shape, tuple):
            shape = (shape,)
        shp = tuple(as_int("shape", d) for d in shape)
        if any(d < 0 for d in shp):
            raise ValueError(f"shape must have non-negative dimensions, got {shp}")
        # Python ints: np.prod wraps silently (2**32 * 2**32 would be 0 elements).
        count = math.prod(shp)
        if math.prod(d for d in shp if d) * dt.itemsize > _MAX_BYTES:
            raise ValueError(f"shape {shp} is too large for numpy: its non-zero dimensions "
                             f"need more than {_MAX_BYTES} bytes of {dt}")
        room = (size - off) // dt.itemsize
        if count > room:
            raise IndexError(
                f"shape {shp} needs {count} elements of {dt}: at most {room} elements "
                f"({room * dt.itemsize} bytes) fit at offset {off} of the {size}-byte store")
        self._store = store
        self.dtype = dt
        self.offset = off
        self.shape = shp
        self.size = count
        self.nbytes = count * dt.itemsize
        self._page_shift = store.page_size.bit_length() - 1
        # Elements never straddle pages when aligned to their (power-of-two) size.
        isz = dt.itemsize
        self._straddles = not (isz & (isz - 1) == 0 and off % isz == 0 and isz <= store.page_size)

    def __repr__(self) -> str:
        return f"<StateArray dtype={self.dtype} shape={self.shape} offset={self.offset}>"

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def _live(self, region: Any) -> np.ndarray:
        # A fresh view per call: no long-lived export, so store.close() stays possible.
        return np.frombuffer(region, dtype=self.dtype, count=self.size,
                             offset=self.offset).reshape(self.shape)

    # ---- reads ----------------------------------------------------------------------
    def __getitem__(self, key: Any) -> Any:
        view = self._live(self._store)
        try:
            out = view[key]
        except BaseException as e:
            del view
            _unpin_export(e)
            raise
        # A structured element comes back as an np.void that is a view of the store;
        # other numpy scalars are copies already.
        return out.copy() if isinstance(out, (np.ndarray, np.void)) else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.array(self._live(self._store))
        return out.astype(dtype) if dtype is not None else out

    def to_numpy(self) -> np.ndarray:
        return np.array(self._live(self._store))

    # ---- writes ---------------------------------------------------------------------
    def __setitem__(self, key: Any, value: Any) -> None:
        store = self._store
        region = store._writable_region()
        view = self._live(region)
        try:
            values = np.asarray(value, dtype=self.dtype)
            target, pages, span = self._plan(view, key)
            values = _assignable(key, values, target, view.ndim)
            whole_rows = isinstance(pages, tuple) and not isinstance(key, tuple)
            store._begin_write()
            try:
                if whole_rows:
                    self._write_rows(pages[1], values, target, view)
                else:
                    self._touch(pages, span)
                    view[key] = values
            finally:
                store._write_lock.release()
        except BaseException as e:
            del view, region
            _unpin_export(e)
            raise

    def add_at(self, idx: Any, values: Any) -> None:
        """Unbuffered `arr[idx] += values` (repeated indices accumulate), like np.add.at:
        the same indices as `arr[idx] = ...`, and numpy's casting of the values."""
        store = self._store
        region = store._writable_region()
        view = self._live(region)
        try:
            target, pages, span = self._plan(view, idx)
            vals = _addends(values, self.dtype)
            if not _broadcasts(vals.shape, target):
                raise ValueError(f"values of shape {vals.shape} do not match index of shape "
                                 f"{target}")
            store._begin_write()
            try:
                self._touch(pages, span)
                np.add.at(view, idx, vals)
            finally:
                store._write_lock.release()
        except BaseException as e:
            del view, region
            _unpin_export(e)
            raise

    def _write_rows(self, rows: np.ndarray, values: np.ndarray, target: tuple,
                    view: np.ndarray) -> None:
        """arr[rows] = values for whole rows, done by the core: with no live snapshot it
        prepares each row's pages and writes the row in one pass (numpy's scatter after a
        separate pass would walk the scattered pages twice)."""
        if not self.size:  # rows of no bytes (or no rows): only the indices to check
            self._normalize(rows, self.shape[0], 0)
            return
        if not rows.size:
            return
        row_bytes = self.nbytes // self.shape[0]
        full = np.broadcast_to(values, target)
        lead = len(target) - (len(self.shape) - 1)  # the index's own dimensions
        if lead and not any(full.strides[:lead]):
            # One row for every index (a scalar, or a single row): not materialized n times.
            # The Ellipsis keeps a 0-d array: a numpy scalar would be native byte order
            # and drop the trailing NULs of S/U values.
            src, stride = np.ascontiguousarray(full[(0,) * lead + (Ellipsis,)]), 0
        else:
            src, stride = np.ascontiguousarray(full), row_bytes
        if np.may_share_memory(src, view):
            src = src.copy()  # values read from the store itself: as numpy, copy them first
        self._store._write_rows(rows, self.shape[0], self.offset, row_bytes,
                                src.reshape(-1).view(np.uint8), stride)

    def _touch(self, pages: Any, span: Optional[tuple[int, int]]) -> None:
        if span is not None:
            self._store._touch_range(*span)
        if isinstance(pages, tuple) and not self.size:
            self._normalize(pages[1], self.shape[0], 0)  # rows of no bytes: only the check
        elif isinstance(pages, tuple):
            row_bytes = self.nbytes // self.shape[0]
            self._store._touch_rows(pages[1], self.shape[0], self.offset, row_bytes)
        elif pages is not None and len(pages):
            self._store._touch_pages(pages)

    # ---- which pages a key touches ----------------------------------------------------
    def _plan(self, view: np.ndarray, key: Any):
        """(selection shape, page ids or None, (offset, length) or None), raising on a bad
        key before anything is touched."""
        parts = key if isinstance(key, tuple) else (key,)
        if all(_is_basic(p) for p in parts):
            sub = view[key]
            if not isinstance(sub, np.ndarray):
                # One element comes back as a numpy scalar, which has no address; with a
                # trailing Ellipsis numpy returns it as a 0-d view instead (a key that
                # already holds an Ellipsis never yields a scalar).
                sub = view[parts + (Ellipsis,)]
            return sub.shape, *self._basic_pages(view, sub)
        parts = _expand_mask(parts, view.shape)
        first, rest = parts[0], parts[1:]
        if all(_is_basic(p) for p in rest):
            # What the basic rest leaves of one row, taken from an empty slice so that an
            # array with no rows needs none.
            inner = view[(slice(0, 0),) + rest].shape[1:] if view.ndim else ()
            fast = _int_rows(first)
            if fast is not None and view.ndim:
                # The core checks bounds and finds the pages in one pass.
                return fast.shape + inner, ("rows", fast.ravel()), None
            rows = self._rows(view, first)
            return rows.shape + inner, self._row_pages(view, rows), None
        k = len(parts)
        if view.ndim > 1 and k <= view.ndim and all(
                isinstance(p, (list, np.ndarray)) for p in parts):
            idx = [self._normalize(_index_array(p), d, i).astype(np.intp) for i, (p, d) in
                   enumerate(zip(parts, view.shape))]
            flat = np.ravel_multi_index(idx, view.shape[:k])
            block = math.prod(view.shape[k:]) * self.dtype.itemsize
            pages = self._block_pages(flat.ravel().astype(np.int64) * block, block)
            return flat.shape + view.shape[k:], pages, None
        raise TypeError(_UNSUPPORTED)

    def _basic_pages(self, view: np.ndarray, sub: np.ndarray):
        if sub.size == 0:
            return None, None
        base = view.ctypes.data
        start = sub.ctypes.data - base
        strides = [s for s, n in zip(sub.strides, sub.shape) if n > 1]
        lo = start + sum(s * (n - 1) for s, n in zip(sub.strides, sub.shape) if s < 0)
        hi = start + sum(s * (n - 1) for s, n in zip(sub.strides, sub.shape) if s > 0)
        length = hi - lo + self.dtype.itemsize
        dense = sub.flags.c_contiguous or sub.flags.f_contiguous or (
            len(strides) == 1 and abs(strides[0]) <= self._store.page_size)
        if dense:
            # Every page in the span holds a written byte: the range is exact.
            return None, (self.offset + lo, length)
        offs = np.zeros((), dtype=np.int64) + start
        for s, n in zip(sub.strides, sub.shape):
            offs = offs[..., None] + np.arange(n, dtype=np.int64) * s
        return self._element_pages(offs.ravel()), None

    def _normalize(self, idx: np.ndarray, n: int, axis: int) -> np.ndarray:
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise IndexError(f"boolean index on axis {axis} must have shape ({n},), "
                                 f"got {idx.shape}")
            return np.flatnonzero(idx)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"{_UNSUPPORTED}; got an array of dtype {idx.dtype}")
        if idx.size:
            lo, hi = int(idx.min()), int(idx.max())
            if lo < -n or hi >= n:
                bad = lo if lo < -n else hi
                raise IndexError(f"index {bad} is out of bounds for axis {axis} with size {n}: "
                                 f"indices must be in [{-n}, {n - 1}]")
            if lo < 0:
                idx = np.where(idx < 0, idx + n, idx)
        return idx

    def _rows(self, view: np.ndarray, key: Any) -> np.ndarray:
        if not view.ndim:
            raise IndexError("a 0-d StateArray has no rows to index")
        idx = _index_array(key)
        if idx.dtype == object:
            raise TypeError(_UNSUPPORTED)
        return self._normalize(idx, view.shape[0], 0)

    def _row_pages(self, view: np.ndarray, rows: np.ndarray) -> np.ndarray:
        row_bytes = view.strides[0] if view.ndim else self.dtype.itemsize
        return self._block_pages(rows.ravel().astype(np.int64) * row_bytes, row_bytes)

    def _block_pages(self, starts: np.ndarray, nbytes: int) -> np.ndarray:
        """Pages under blocks of `nbytes` bytes at byte offsets `starts` (relative to this
        array)."""
        if not nbytes or not starts.size:
            return np.empty(0, dtype=np.uint64)
        if nbytes <= self._store.page_size:
            return self._element_pages(starts, nbytes)
        # Blocks longer than a page: every page of each block.
        shift = self._page_shift
        first = (self.offset + starts) >> shift
        last = (self.offset + starts + nbytes - 1) >> shift
        counts = last - first + 1
        return (np.repeat(first - np.cumsum(counts) + counts, counts)
                + np.arange(int(counts.sum()))).astype(np.uint64)

    def _element_pages(self, offs: np.ndarray, nbytes: Optional[int] = None) -> np.ndarray:
        """Pages under elements at byte offsets `offs` (relative to this array). Duplicates
        are fine: the core skips a page already written in this epoch cheaply, which is
        faster than sorting them away."""
        shift = self._page_shift
        first = (offs + self.offset) >> shift
        width = nbytes if nbytes is not None else self.dtype.itemsize
        if not self._straddles and width == self.dtype.itemsize:
            return first.astype(np.uint64)
        last = (offs + self.offset + width - 1) >> shift
        return np.concatenate([first, last[last != first]]).astype(np.uint64)
