"""KVStore: keyed state (a MutableMapping[bytes, bytes]) kept in a page store's bytes.

The whole map (header, hash table, records, allocator state) lives in a region of the
store, so snapshots, deltas, checkpoints, recovery and replication carry it unchanged:
`KVStore(replica)` on a store that received the primary's deltas reads the same map, and
`KVStore(store.snapshot())` reads the map as of the snapshot.

    kv = sc.KVStore(store)                 # attaches to a map in the store, or creates one on first write
    kv[b"user:1"] = b"..."; kv[b"user:1"]; del kv[b"user:1"]
    kv.put_many(keys, values); kv.get_many(keys); kv.delete_many(keys)
    with kv.snapshot() as view: dict(view.items())

Design (csrc/kv_internal.h): linear hashing over 128-byte buckets of 7 (hash, record)
slots with overflow chains; each insert that lifts the load past 1/2 splits exactly one
bucket, so the table grows without a rehash pause. Keys hash with murmur3 x64-128
(seed 0: `KVStore.key_hash(k) == mmh3.hash64(k, signed=False)[0]`). Keys and values live
in records allocated by a boundary-tag allocator with segregated free lists that reuses
and coalesces freed space.
"""
from __future__ import annotations

from collections.abc import ItemsView, Iterator, MutableMapping, ValuesView
from typing import Any, List, Optional, Union

from . import _kv, errors
from ._args import as_int
from .snapshot import Snapshot
from .store import PathLike, Store

class KVFull(errors.StateError):
    """The map's region has no free block large enough; nothing was written."""


class CorruptKV(errors.CorruptData):
    """The map's structure in the store is damaged (KVStore.verify() says where)."""


class _Items(ItemsView):
    _mapping: "KVStore"

    def __iter__(self) -> Iterator[tuple]:
        return self._mapping._iter(2)


class _Values(ValuesView):
    _mapping: "KVStore"

    def __iter__(self) -> Iterator[bytes]:
        return self._mapping._iter(1)


class KVStore(_kv.KVCore, MutableMapping):
    """A hash table of bytes keys and values inside a Store (or a read-only view of one
    inside a Snapshot).

    source: a Store or DurableStore (live, read-write), or a Snapshot (read-only view).
    capacity: keys to size the table for when the map is created (it grows past that
        anyway, a bucket at a time); ignored when the region already holds a map.
    offset, size: the region of the store the map owns (page multiples; default: all of
        it). Nothing else may write there. A map made with another size raises
        sc.StoreMismatch naming the size it was made with.
    readonly: refuse writes (use it on a replica: a follower's store only changes by the
        primary's deltas).

    Opening never writes: on a zeroed region the first write creates the map; a region
    holding other data and no map is refused (ValueError).
    """

    MAX_KEY_SIZE: int = _kv.MAX_KEY_SIZE
    MAX_VALUE_SIZE: int = _kv.MAX_VALUE_SIZE

    def __init__(self, source: Union[Store, Snapshot], *, capacity: Optional[int] = None,
                 offset: int = 0, size: Optional[int] = None, readonly: bool = False) -> None:
        if isinstance(source, Snapshot):
            snap: Optional[Snapshot] = source
            store = source._acquire()
            source._done()
        elif isinstance(source, Store):
            snap, store = None, source
        else:
            raise TypeError(f"source must be a statecore Store, DurableStore or Snapshot, got "
                            f"{type(source).__name__}")
        store._check()
        off, sz = _region(store, offset, size)
        cap = 0 if capacity is None else as_int("capacity", capacity)
        if cap < 0:
            raise ValueError(f"capacity must be >= 0, got {cap}")
        self._owned_store: Optional[Store] = None
        self._owned_snap: Optional[Snapshot] = None
        self.store = store
        self.source = source
        self._attach(store, snap, off, sz, cap, bool(readonly))

    # ---- opening and closing ------------------------------------------------------------
    @classmethod
    def open(cls, path: PathLike, *, size: Optional[int] = None,
             page_size: Optional[int] = None, capacity: Optional[int] = None,
             durable: bool = False, **store_args: Any) -> "KVStore":
        """A map in a store file (`durable=False`: an mmap'd sc.Store at `path`) or a durable
        directory (`durable=True`: an sc.DurableStore, which recovers on open; call
        `commit()` to make writes durable). size is needed to create either; the KVStore
        owns the store and closes it with close()."""
        if durable:
            from .durable import DurableStore
            store: Store = DurableStore(path, size=size, page_size=page_size, **store_args)
        else:
            if store_args:
                raise TypeError(f"unexpected arguments for a plain store: {sorted(store_args)}")
            store = Store(path, size=size, page_size=page_size)
        try:
            kv = cls(store, capacity=capacity)
        except BaseException:
            store.close()
            raise
        kv._owned_store = store
        return kv

    def close(self) -> None:
        """Detach; also close the store if open() made it, or release the snapshot if
        snapshot() took it. Idempotent. Raises sc.StateError (and changes nothing) while
        a call on this KVStore is still running in another thread."""
        if self.closed:
            return
        self._detach()
        snap, self._owned_snap = self._owned_snap, None
        store, self._owned_store = self._owned_store, None
        if snap is not None:
            snap.release()
        if store is not None:
            store.close()

    def _check_open(self) -> None:
        if self.closed:
            raise errors.StoreClosed("KVStore is closed")

    def __enter__(self) -> "KVStore":
        self._check_open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return "<KVStore closed>"
        kind = f"view at epoch {self.source.epoch}" if self.is_view else (
            "read-only" if self.readonly else "live")
        try:
            n = f"{len(self)} keys"
        except errors.StateError as e:
            n = f"unreadable: {e}"
        return (f"<KVStore {kind}, {n}, region [{self.offset}, "
                f"{self.offset + self.region_size}) of {self.store!r}>")

    # ---- snapshots and durability ---------------------------------------------------------
    def snapshot(self) -> "KVStore":
        """Snapshot the store (O(1)) and return a read-only view of the map as of now; the
        view owns the snapshot and releases it on close() (or `with`)."""
        self._check_open()
        if self.is_view:
            raise TypeError("snapshot() of a view: take views of the live KVStore")
        snap = self.store.snapshot()
        try:
            view = self.snapshot_view(snap)
        except BaseException:
            snap.release()
            raise
        view._owned_snap = snap
        return view

    def snapshot_view(self, snap: Snapshot) -> "KVStore":
        """A read-only view of this map (same region) inside `snap`, a snapshot of its store."""
        self._check_open()
        if not isinstance(snap, Snapshot):
            raise TypeError(f"snap must be a Snapshot, got {type(snap).__name__}")
        if snap._store is not None and snap._store is not self.store:
            raise ValueError("snap is a snapshot of another store")
        return type(self)(snap, offset=self.offset, size=self.region_size)

    def commit(self) -> int:
        """DurableStore.commit() of the underlying store: the map as of now is durable."""
        self._check_open()
        commit = getattr(self.store, "commit", None)
        if commit is None:
            raise TypeError("commit() needs a DurableStore (KVStore.open(..., durable=True))")
        return commit()

    # ---- mapping extras ----------------------------------------------------------------------
    def items(self) -> ItemsView:
        return _Items(self)

    def values(self) -> ValuesView:
        return _Values(self)

    def update(self, other: Any = (), /, **kwds: Any) -> None:
        """Like dict.update, in one put_many (so all or nothing)."""
        self._check_open()
        if kwds:
            raise TypeError("KVStore keys are bytes: keyword arguments cannot be keys")
        keys: List[Any]
        values: List[Any]
        if type(other) is dict:
            # Only an exact dict is known to list values() in the order of its keys: a
            # subclass may iterate in another order (dict.update asks it for keys() too).
            keys, values = list(other), list(other.values())
        elif hasattr(other, "keys"):
            keys = list(other.keys())
            values = [other[k] for k in keys]
        else:
            keys, values = [], []
            for pair in other:
                k, v = pair
                keys.append(k)
                values.append(v)
        if keys:
            self.put_many(keys, values)

    # ---- inspection -------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Table and heap figures: count, buckets, level/split (linear hashing), splits,
        overflow buckets, load factor, used/free/wilderness bytes of the region."""
        s: dict[str, Any] = dict(self._stats())
        slots = s["buckets"] * s["slots_per_bucket"]
        s["load_factor"] = s["count"] / slots if slots else 0.0
        return s

    def verify(self) -> None:
        """Check every structure of the map (one pass over its region); raises CorruptKV
        naming the first problem."""
        self._verify()

    @property
    def present(self) -> bool:
        """True once the region holds a map header (the first write creates it)."""
        return self._present()


def _region(store: Store, offset: Any, size: Any) -> tuple:
    ps, total = store.page_size, store.size
    off = as_int("offset", offset)
    if off < 0 or off % ps or off >= total:
        raise ValueError(f"offset must be a multiple of page_size ({ps}) in [0, {total}), "
                         f"got {off}")
    sz = total - off if size is None else as_int("size", size)
    if sz <= 0 or sz % ps or sz > total - off:
        raise ValueError(f"size must be a positive multiple of page_size ({ps}) of at most "
                         f"{total - off} bytes (the store after offset), got {sz}")
    if sz < _kv.MIN_REGION:
        raise ValueError(f"a key-value region needs at least {_kv.MIN_REGION} bytes, got {sz}")
    return off, sz
