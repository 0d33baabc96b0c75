"""Argument checking shared by the Python API, the manifest's field checks and the CLI:
every message names the argument and the allowed range, and nothing is touched before the
checks pass."""
from __future__ import annotations

import operator
from typing import Any

import numpy as np

from .progress import human_bytes

MIN_PAGE_SIZE = 512
MAX_PAGE_SIZE = 1 << 20
DEFAULT_PAGE_SIZE = 4096
# The core numbers pages with 32 bits (sc_store_open refuses more pages: replay packs page
# rows into 32 bits), so a store holds at most this many pages of its page size.
MAX_PAGES = (1 << 32) - 1
MAX_SIZE = MAX_PAGES * MAX_PAGE_SIZE


def as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None


def check_page_size(page_size: Any, name: str = "page_size") -> int:
    """The one check of a page size (the Python API, the manifest and the CLI use it);
    `name` is what the caller calls it (the CLI: "--page-size")."""
    ps = as_int(name, page_size)
    if ps < MIN_PAGE_SIZE or ps > MAX_PAGE_SIZE or ps & (ps - 1):
        raise ValueError(
            f"{name} must be a power of two from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE}, got {ps}")
    return ps


def check_size(size: Any, page_size: int, name: str = "size",
               page_size_name: str = "page_size") -> int:
    """The one check of a store's size for a page size that passed check_page_size."""
    n = as_int(name, size)
    top = MAX_PAGES * page_size
    if n <= 0 or n % page_size or n > top:
        raise ValueError(f"{name} must be a positive multiple of {page_size_name} ({page_size}) "
                         f"in [{page_size}, {top}] ({MAX_PAGES} pages, {human_bytes(top)}), "
                         f"got {n}")
    return n


def check_range(offset: Any, length: int, size: int, what: str = "offset",
                length_name: str = "length") -> int:
    """The offset of `length` bytes inside a store of `size` bytes. The message blames
    the length when no offset could hold it, the offset otherwise."""
    off = as_int(what, offset)
    if length > size:
        room = size - off if 0 <= off <= size else size
        raise IndexError(
            f"{length_name} {length} at {what} {off} runs past the end of the {size}-byte "
            f"store: {length_name} must be in [0, {room}]")
    if off < 0 or length < 0 or off > size - length:
        raise IndexError(
            f"{what} {off} with {length_name} {length} is outside the store: {what} must "
            f"be in [0, {size - length}] for {length} bytes of a {size}-byte store")
    return off


def byte_view(data: Any, name: str = "data") -> memoryview:
    """A flat, C-contiguous byte view of any bytes-like object, without a copy if possible."""
    try:
        mv = memoryview(data)
    except TypeError:
        raise TypeError(f"{name} must be a bytes-like object (bytes, bytearray, memoryview, "
                        f"numpy array), got {type(data).__name__}") from None
    # Object arrays export their PyObject pointers: storing those bytes is never meant.
    if "O" in mv.format and np.asarray(data).dtype.hasobject:
        raise TypeError(f"{name} must hold plain bytes or numbers, got an array of Python "
                        f"objects (format {mv.format!r})")
    if not mv.c_contiguous:
        mv = np.ascontiguousarray(np.asarray(data)).data
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    return mv


def page_id_array(page_ids: Any, n_pages: int, name: str = "page_ids") -> np.ndarray:
    ids = np.asarray(page_ids)
    if ids.ndim == 0:
        ids = ids.reshape(1)
    if ids.size == 0:
        return np.empty(0, dtype=np.uint64)
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise TypeError(f"{name} must be a 1-D sequence of integers, got dtype {ids.dtype} "
                        f"with shape {ids.shape}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= n_pages:
        bad = lo if lo < 0 else hi
        raise IndexError(f"{name} contains {bad}: page ids must be in [0, {n_pages - 1}]")
    return np.ascontiguousarray(ids, dtype=np.uint64)
