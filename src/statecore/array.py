"""StateArray: a typed numpy view over a store whose writes go through the tracked path.

A write first computes, vectorized, the pages the index touches; the core preserves them
for live snapshots and records their versions; only then are the bytes modified (by numpy,
or by the core itself for whole rows chosen by an integer index)."""
from __future__ import annotations

import traceback
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from ._args import as_int, check_range

if TYPE_CHECKING:
    from .store import Store

_UNSUPPORTED = ("StateArray indexes with ints, slices, Ellipsis, None, or one integer or "
                "boolean array on the first axis (or integer arrays on every axis)")


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
        count = int(np.prod(shp, dtype=np.int64))
        check_range(off, count * dt.itemsize, size)
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
        return out.copy() if isinstance(out, np.ndarray) else out

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
            if np.broadcast_shapes(values.shape, target) != target:
                raise ValueError(f"cannot assign values of shape {values.shape} to a "
                                 f"selection of shape {target}")
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
        """Unbuffered `arr[idx] += values` (repeated indices accumulate), like np.add.at."""
        store = self._store
        region = store._writable_region()
        view = self._live(region)
        try:
            fast = _int_rows(idx) if view.ndim else None
            rows = fast if fast is not None else self._rows(view, idx)
            vals = np.asarray(values, dtype=self.dtype)
            target = rows.shape + view.shape[1:]
            if np.broadcast_shapes(vals.shape, target) != target:
                raise ValueError(f"values of shape {vals.shape} do not match index of shape "
                                 f"{rows.shape}")
            pages = ("rows", fast.ravel()) if fast is not None else self._row_pages(view, rows)
            store._begin_write()
            try:
                self._touch(pages, None)
                np.add.at(view, rows, vals)
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
        if isinstance(pages, tuple):
            row_bytes = self.nbytes // self.shape[0] if self.shape[0] else self.dtype.itemsize
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
        first, rest = parts[0], parts[1:]
        if all(_is_basic(p) for p in rest):
            inner = view[(0,) + rest].shape if view.ndim > 1 else ()
            fast = _int_rows(first)
            if fast is not None and view.ndim:
                # The core checks bounds and finds the pages in one pass.
                return fast.shape + inner, ("rows", fast.ravel()), None
            rows = self._rows(view, first)
            inner = view[(0,) + rest].shape if view.ndim > 1 else ()
            return rows.shape + inner, self._row_pages(view, rows), None
        if view.ndim > 1 and len(parts) == view.ndim and all(
                isinstance(p, (list, np.ndarray)) for p in parts):
            idx = [self._normalize(_index_array(p), d, i) for i, (p, d) in
                   enumerate(zip(parts, view.shape))]
            flat = np.ravel_multi_index(idx, view.shape)
            return flat.shape, self._element_pages(flat.ravel() * self.dtype.itemsize), None
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
        if _is_basic(key) and not isinstance(key, slice) and key is not None and key is not Ellipsis:
            key = [key]
        elif isinstance(key, slice):
            return np.arange(*key.indices(view.shape[0]))
        idx = _index_array(key)
        if idx.dtype == object:
            raise TypeError(_UNSUPPORTED)
        return self._normalize(idx, view.shape[0], 0)

    def _row_pages(self, view: np.ndarray, rows: np.ndarray) -> np.ndarray:
        row_bytes = view.strides[0] if view.ndim else self.dtype.itemsize
        starts = rows.ravel().astype(np.int64) * row_bytes
        if row_bytes <= self._store.page_size:
            return self._element_pages(starts, row_bytes)
        # Rows longer than a page: every page of each row.
        shift = self._page_shift
        first = (self.offset + starts) >> shift
        last = (self.offset + starts + row_bytes - 1) >> shift
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
