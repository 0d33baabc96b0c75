"""KVStore: the keyed-state map inside a page store.

Unit tests of the mapping API and its argument checks, the on-store layout against mmh3
(the reference hash), growth, the allocator's reuse of freed space, snapshots, deltas and
replication round trips, crash recovery of a durable map, a full region, damaged bytes,
threads and fork. The model-based test against dict is tests/test_kv_model.py.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import select
import signal
import struct
import threading
import time
import traceback

import mmh3
import numpy as np
import pytest

import statecore as sc
from statecore.kv import CorruptKV, KVFull, KVStore

MiB = 1 << 20
HEADER = 2560          # KV_HEADER_BYTES: the heap (and segment 0's block) starts here
SEG0 = 2688            # segment 0's first bucket: round_up(HEADER + 16, 128)
BUCKET = 128


def digest(kv) -> str:
    h = hashlib.blake2b(digest_size=16)
    for k, v in sorted(kv.items()):
        h.update(struct.pack("<II", len(k), len(v)) + k + v)
    return h.hexdigest()


def dict_digest(d: dict) -> str:
    h = hashlib.blake2b(digest_size=16)
    for k, v in sorted(d.items()):
        h.update(struct.pack("<II", len(k), len(v)) + k + v)
    return h.hexdigest()


@pytest.fixture
def kv():
    store = sc.Store(size=4 * MiB)
    m = KVStore(store)
    yield m
    m.close()
    store.close()


def rand_items(rng: random.Random, n: int, vmax: int = 100, prefix: bytes = b""):
    return {prefix + rng.randbytes(rng.randint(1, 24)): rng.randbytes(rng.randint(0, vmax))
            for _ in range(n)}


# ---- the mapping API ------------------------------------------------------------------------
def test_basic_mapping(kv):
    assert len(kv) == 0 and not kv.present and list(kv) == []
    kv[b"a"] = b"1"
    kv[b""] = b""              # the empty key and the empty value are fine
    kv[b"b"] = b"x" * 5000
    assert kv.present
    assert kv[b"a"] == b"1" and kv[b""] == b"" and kv[b"b"] == b"x" * 5000
    assert len(kv) == 3 and b"a" in kv and b"zz" not in kv
    assert kv.get(b"zz") is None and kv.get(b"zz", 7) == 7 and kv.get(b"a") == b"1"
    kv[b"a"] = b"22"           # overwrite
    assert kv[b"a"] == b"22" and len(kv) == 3
    del kv[b"a"]
    assert b"a" not in kv and len(kv) == 2
    with pytest.raises(KeyError):
        kv[b"a"]
    with pytest.raises(KeyError):
        del kv[b"a"]
    assert sorted(kv) == [b"", b"b"]
    assert sorted(kv.keys()) == [b"", b"b"]
    assert sorted(kv.values()) == [b"", b"x" * 5000]
    assert sorted(kv.items()) == [(b"", b""), (b"b", b"x" * 5000)]
    assert (b"b", b"x" * 5000) in kv.items() and (b"b", b"y") not in kv.items()
    assert kv == {b"": b"", b"b": b"x" * 5000}
    assert kv.pop(b"b") == b"x" * 5000 and kv.pop(b"b", None) is None
    assert kv.setdefault(b"s", b"d") == b"d" and kv.setdefault(b"s", b"e") == b"d"
    kv.update({b"u1": b"1", b"u2": b"2"})
    kv.update([(b"u3", b"3")])
    assert kv[b"u1"] == b"1" and kv[b"u3"] == b"3"
    k, v = kv.popitem()
    assert k not in kv
    kv.clear()
    assert len(kv) == 0 and list(kv.items()) == []
    kv.verify()
    assert "KVStore live" in repr(kv)


def test_bytes_like_in_bytes_out(kv):
    kv[bytearray(b"ba")] = bytearray(b"v1")
    kv[memoryview(b"mv")] = memoryview(b"v2")
    kv[np.frombuffer(b"np", dtype=np.uint8)] = np.arange(3, dtype=np.int64)
    kv[memoryview(b"abcdef")[::2]] = b"strided"       # non-contiguous: its elements, in order
    assert kv[b"ba"] == b"v1" and type(kv[b"ba"]) is bytes
    assert kv[bytearray(b"mv")] == b"v2"
    assert kv[b"np"] == np.arange(3, dtype=np.int64).tobytes()
    assert kv[b"ace"] == b"strided"
    assert all(type(k) is bytes for k in kv) and all(type(v) is bytes for v in kv.values())
    kv.put_many([bytearray(b"p1"), memoryview(b"p2")], [b"1", np.uint8([2])])
    assert kv.get_many([b"p1", memoryview(b"p2"), b"nope"], default=b"-") == [b"1", b"\x02", b"-"]


@pytest.mark.parametrize("bad", ["str", 5, None, 1.5, [b"a"], np.array([b"a"], dtype=object)])
def test_non_bytes_keys_and_values_are_type_errors(kv, bad):
    with pytest.raises(TypeError, match="bytes"):
        kv[bad] = b"v"
    with pytest.raises(TypeError, match="bytes"):
        kv[b"k"] = bad
    with pytest.raises(TypeError):
        kv[bad]
    with pytest.raises(TypeError):
        bad in kv
    with pytest.raises(TypeError, match=r"keys\[1\]"):
        kv.put_many([b"a", bad], [b"1", b"2"])
    with pytest.raises(TypeError, match=r"values\[0\]"):
        kv.put_many([b"a"], [bad])
    assert len(kv) == 0 and not kv.present   # nothing was written


def test_limits(kv):
    assert KVStore.MAX_KEY_SIZE == 65535 and KVStore.MAX_VALUE_SIZE == 1 << 30
    kv[b"k" * 65535] = b"v"
    assert kv[b"k" * 65535] == b"v"
    with pytest.raises(ValueError, match="at most 65535"):
        kv[b"k" * 65536] = b"v"
    with pytest.raises(ValueError, match="at most 65535"):
        kv[b"k" * 65536]
    huge = np.empty((1 << 30) + 1, dtype=np.uint8)   # never touched: the check comes first
    with pytest.raises(ValueError, match="at most 1073741824"):
        kv[b"big"] = huge
    before = dict(kv.items())
    with pytest.raises(ValueError, match=r"keys\[2\]"):
        kv.put_many([b"x", b"y", b"z" * 70000], [b"1", b"2", b"3"])
    with pytest.raises(ValueError, match="same length"):
        kv.put_many([b"x", b"y"], [b"1"])
    assert dict(kv.items()) == before


def test_large_values_round_trip(kv):
    big = os.urandom(3 * MiB)            # > 1 MiB: copied without the GIL
    kv[b"big"] = big
    assert kv[b"big"] == big
    assert kv.get_many([b"big"]) == [big]
    kv.verify()


def test_batches(kv):
    rng = random.Random(1)
    items = rand_items(rng, 3000)
    keys, values = list(items), list(items.values())
    kv.put_many(keys, values)
    assert len(kv) == len(items)
    assert kv.get_many(keys) == values
    assert kv.get_many(iter(keys[:10])) == values[:10]            # any iterable
    assert kv.get_many([b"missing"] + keys[:1]) == [None, values[0]]
    # repeated keys in one batch: the last value wins, like dict.update
    kv.put_many([b"r", b"r", b"r"], [b"1", b"22", b"333"])
    assert kv[b"r"] == b"333"
    assert kv.delete_many(keys[:1000] + [b"missing", keys[0]]) == 1000
    assert len(kv) == len(items) - 1000 + 1
    assert kv.get_many(keys[:3]) == [None] * 3
    assert kv.put_many([], []) is None and kv.get_many([]) == [] and kv.delete_many([]) == 0
    kv.verify()


def test_get_many_across_lookup_chunks(kv):
    """get_many looks keys up 4096 at a time and then copies the values into the results:
    order, missing keys, the default object itself, empty and 1-byte values, and bytes-like
    keys must come out right across chunk boundaries, for lists, tuples and iterators."""
    rng = random.Random(7)
    n = 10_000
    keys = [b"k%06d" % i for i in range(n)]
    values = [rng.randbytes(rng.choice((0, 1, 7, 100, 1500))) for _ in range(n)]
    kv.put_many(keys[::2], values[::2])               # odd keys are missing
    want = [v if i % 2 == 0 else None for i, v in enumerate(values)]
    assert kv.get_many(keys) == want
    assert kv.get_many(tuple(keys)) == want
    assert kv.get_many(iter(keys)) == want
    sentinel = object()
    got = kv.get_many(keys, default=sentinel)
    assert all((g is sentinel) if i % 2 else (g == values[i]) for i, g in enumerate(got))
    assert all(type(g) is bytes for g in got[::2])
    mixed = [bytearray(k) if i % 3 == 0 else memoryview(k) if i % 3 == 1 else k
             for i, k in enumerate(keys)]
    assert kv.get_many(mixed) == want
    with pytest.raises(TypeError, match=r"keys\[4097\]"):
        kv.get_many(keys[:4097] + ["not bytes"] + keys[4097:])


def test_batches_keep_reference_counts(kv):
    """Batches pin their items while C reads them and release each exactly once, also
    when a batch fails part-way."""
    import sys
    keys = [b"rc-%d" % i for i in range(5000)]
    vals = [b"v-%d" % i for i in range(5000)]
    before = [sys.getrefcount(k) for k in keys[:50]] + [sys.getrefcount(v) for v in vals[:50]]
    kv.put_many(keys, vals)
    kv.get_many(keys)
    kv.get_many(tuple(keys))
    kv.delete_many(keys[:10])
    with pytest.raises(ValueError, match=r"keys\[4999\]"):
        kv.put_many(keys[:4999] + [b"x" * 70000], vals)
    with pytest.raises(TypeError):
        kv.get_many(keys[:4999] + [1.5])
    # the first non-bytes item (a bytearray in the middle) pins the rest before converting
    mixed = keys[:30] + [bytearray(b"rc-30")] + keys[31:]
    assert kv.get_many(mixed)[5:35] == [None] * 5 + vals[10:35]
    del mixed
    with pytest.raises(TypeError, match=r"keys\[40\]"):
        kv.get_many(keys[:30] + [bytearray(b"x")] + keys[31:40] + ["str"] + keys[41:])
    after = [sys.getrefcount(k) for k in keys[:50]] + [sys.getrefcount(v) for v in vals[:50]]
    assert after == before
    default = object()
    got = kv.get_many([b"missing-%d" % i for i in range(5000)], default)
    assert sys.getrefcount(default) == 2 + 5000
    del got
    assert sys.getrefcount(default) == 2


def test_batches_do_not_leak(kv):
    import gc
    import tracemalloc
    keys = [b"leak-%d" % i for i in range(3000)]
    vals = [b"v" * (i % 700) for i in range(3000)]

    def cycle():
        kv.put_many(keys, vals)
        kv.get_many(keys + [b"missing"], default=b"-")
        kv.get_many(tuple(bytearray(k) for k in keys[:500]))
        with pytest.raises(TypeError):
            kv.get_many(keys[:2000] + [None])
        with pytest.raises(ValueError):
            kv.put_many(keys[:10], vals[:9])

    for _ in range(3):
        cycle()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(30):
            cycle()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # One leaked result list or key per cycle would be far more than this.
    assert grown < 32 * 1024, f"Python-level memory grew by {grown} bytes over 30 cycles"


def test_iteration_guards_against_inserts_but_not_overwrites(kv):
    kv.put_many([b"%d" % i for i in range(2000)], [b"v"] * 2000)
    for k in kv:                      # overwriting while iterating is fine (as in dict)
        kv[k] = b"w" + k
    assert all(v == b"w" + k for k, v in kv.items())
    it = iter(kv)
    for _ in range(600):              # past the first refill
        next(it)
    kv[b"new"] = b"x"
    with pytest.raises(RuntimeError, match="changed size"):
        list(it)


@pytest.mark.parametrize("n", [2, 100, 511, 512, 600, 1500])
def test_iteration_guards_small_maps_and_the_last_chunk(kv, n):
    keys = [b"%d" % i for i in range(n)]
    kv.put_many(keys, [b"v"] * n)
    with pytest.raises(RuntimeError, match="changed size"):
        for k in kv:                  # an insert through the same handle: the next item
            kv[k + b"x"] = b"y"
    kv.delete_many([k + b"x" for k in keys])
    with pytest.raises(RuntimeError, match="changed size"):
        for k in kv:                  # deletes too
            del kv[k]
    kv.clear()
    kv.put_many(keys, [b"v"] * n)
    other = KVStore(kv.store)         # another handle (or thread): caught by the end
    it = iter(kv.items())
    got = [next(it) for _ in range(n - 1)]
    other[b"new"] = b"x"
    with pytest.raises(RuntimeError, match="changed size"):
        got += list(it)
    del other[b"new"]
    for k, v in kv.items():           # overwrites are fine, to the last item
        kv[k] = v + b"w"
    assert sorted(kv.values()) == [b"vw"] * n
    it = iter(kv)                     # an exhausted iterator stays exhausted
    assert len(list(it)) == n and list(it) == []


def test_update_pairs_keys_with_their_values():
    class SortedIterDict(dict):
        """A dict iterating its keys sorted; values() keeps insertion order."""
        def __iter__(self):
            return iter(sorted(super().__iter__()))

        def keys(self):
            return sorted(super().keys())

    class Pairs:
        def __init__(self, d):
            self.d = d

        def keys(self):
            return reversed(list(self.d))

        def __getitem__(self, k):
            return self.d[k]

    store = sc.Store(size=MiB)
    kv = KVStore(store)
    src = SortedIterDict({b"b": b"B", b"a": b"A", b"c": b"C"})
    want: dict = {}
    want.update(src)
    kv.update(src)
    assert dict(kv.items()) == want == {b"a": b"A", b"b": b"B", b"c": b"C"}
    kv.update(Pairs({b"x": b"X", b"y": b"Y"}))
    kv.update([(b"p", b"P")])
    kv.update({b"q": b"Q", b"a": b"A2"})
    assert dict(kv.items()) == {b"a": b"A2", b"b": b"B", b"c": b"C", b"x": b"X",
                                b"y": b"Y", b"p": b"P", b"q": b"Q"}
    store.close()


def test_hash_and_placement_match_mmh3(kv):
    rng = random.Random(2)
    for n in list(range(0, 40)) + [100, 1000, 65535]:
        k = rng.randbytes(n)
        assert KVStore.key_hash(k) == mmh3.hash64(k, signed=False)[0]
        assert KVStore.key_hash(bytearray(k)) == mmh3.hash64(k, signed=False)[0]
    # A fresh map has 16 buckets in segment 0: the key's slot holds its mmh3 hash, in the
    # bucket that hash selects.
    key = b"placed by murmur3"
    h = mmh3.hash64(key, signed=False)[0]
    kv[key] = b"v"
    st = kv.stats()
    assert st["initial_buckets"] == 16 and st["buckets"] == 16
    bucket = SEG0 + (h % 16) * BUCKET
    count, = struct.unpack_from("<I", kv.store.read(bucket, 4))
    slot_hash, rec = struct.unpack("<QQ", kv.store.read(bucket + 16, 16))
    assert count == 1 and slot_hash == h
    klen, vlen = struct.unpack("<II", kv.store.read(rec + 8, 8))
    assert (klen, vlen) == (len(key), 1) and kv.store.read(rec + 16, klen + 1) == key + b"v"


def test_growth_is_one_bucket_at_a_time():
    store = sc.Store(size=16 * MiB)
    kv = KVStore(store)
    n, prev = 60000, kv.stats()
    for i in range(n):
        kv[b"key-%d" % i] = b"v"
        if i % 5000 == 4999:
            st = kv.stats()
            # every insert splits at most two buckets, and the load stays at 1/2
            assert st["splits"] - prev["splits"] <= 2 * 5000
            assert st["load_factor"] <= 0.5 + 1e-9
            prev = st
    st = kv.stats()
    assert st["count"] == n and st["level"] >= 8
    assert st["buckets"] == st["initial_buckets"] * 2 ** st["level"] + st["split"]
    assert st["overflow_buckets"] < st["buckets"] / 2
    kv.verify()
    assert all(kv[b"key-%d" % i] == b"v" for i in range(0, n, 97))
    store.close()


def test_capacity_presizes_the_table():
    store = sc.Store(size=16 * MiB)
    kv = KVStore(store, capacity=100_000)
    kv[b"a"] = b"b"
    st = kv.stats()
    assert st["initial_buckets"] >= 100_000 / 7 / 0.5 and st["splits"] == 0
    for i in range(50_000):
        kv[b"%d" % i] = b""
    assert kv.stats()["splits"] == 0
    kv.clear()     # back to the table it was created with
    assert kv.stats()["buckets"] == st["initial_buckets"] and len(kv) == 0
    kv.verify()
    with pytest.raises(KVFull):
        KVStore(sc.Store(size=MiB), capacity=10**8)[b"a"] = b"b"
    store.close()


def test_freed_space_is_reused():
    store = sc.Store(size=8 * MiB)
    kv = KVStore(store)
    rng = random.Random(3)
    keys = [b"k%06d" % i for i in range(20000)]
    kv.put_many(keys, [rng.randbytes(100) for _ in keys])
    before = kv.stats()
    wild = before["wilderness_bytes"]
    # delete everything and insert the same amount again: no new space is taken
    kv.delete_many(keys)
    after = kv.stats()
    # every record (16 + 7 + 100 bytes -> a block of at least 128) and overflow bucket is
    # freed: what stays in use is the table's segments
    assert after["used_bytes"] <= (before["used_bytes"] - 20000 * 128
                                   - before["overflow_buckets"] * 144)
    assert after["overflow_buckets"] == 0
    kv.put_many(keys, [rng.randbytes(100) for _ in keys])
    assert kv.stats()["wilderness_bytes"] >= wild - 64 * 1024
    # churn: many times the region's size in overwrites of changing sizes, deletes and
    # re-inserts, in a region that holds a fixed amount of live data
    for _ in range(40):
        vals = [rng.randbytes(rng.randint(0, 300)) for _ in keys]
        kv.put_many(keys, vals)
        gone = rng.sample(keys, 2000)
        kv.delete_many(gone)
        for k in gone[:1000]:
            kv[k] = rng.randbytes(rng.randint(0, 600))
    kv.verify()
    st = kv.stats()
    assert st["free_bytes"] + st["used_bytes"] + st["wilderness_bytes"] + HEADER == store.size
    store.close()


def test_in_place_overwrite_dirties_only_the_record_page():
    store = sc.Store(size=4 * MiB)
    kv = KVStore(store)
    kv.put_many([b"%05d" % i for i in range(5000)], [b"a" * 64] * 5000)
    with store.snapshot() as s1:
        kv[b"01234"] = b"b" * 64        # same size: rewritten in place
        with store.snapshot() as s2:
            d = store.delta(s1, s2)
    # the record's page (two if it straddles a boundary), not the header's or the table's
    assert 1 <= len(d.page_ids) <= 2 and 0 not in d.page_ids
    assert kv[b"01234"] == b"b" * 64
    store.close()


# ---- regions ---------------------------------------------------------------------------------
def test_region_of_a_store():
    store = sc.Store(size=4 * MiB)
    arr = store.array("int64", shape=(1000,))
    arr[:] = 7
    kv = KVStore(store, offset=MiB, size=2 * MiB)
    kv.put_many([b"%d" % i for i in range(5000)], [b"v" * 50] * 5000)
    assert (arr[:] == 7).all()
    assert store.read(3 * MiB, MiB) == bytes(MiB)   # nothing past the region
    kv2 = KVStore(store, offset=MiB, size=2 * MiB)  # a second handle attaches
    assert len(kv2) == 5000 and kv2[b"42"] == b"v" * 50
    # the region holds non-map data: refused on the first write, not silently overwritten
    with pytest.raises(ValueError, match="holds data but no key-value header"):
        KVStore(store, size=MiB)[b"k"] = b"v"
    # the same map seen with another region size: a mismatch naming the right size
    # (opening a live handle or a view), not damage
    msg = (rf"size={MiB}, but the map at offset={MiB} was made for a region of {2 * MiB} "
           rf"bytes; open it with size={2 * MiB}")
    with pytest.raises(sc.StoreMismatch, match=msg):
        KVStore(store, offset=MiB, size=MiB)
    with store.snapshot() as snap, pytest.raises(sc.StoreMismatch, match=msg):
        KVStore(snap, offset=MiB, size=MiB)
    assert isinstance(sc.StoreMismatch("x"), ValueError)
    # a handle opened before the map existed (a replica, say) learns it at its next call
    other = sc.Store(size=4 * MiB)
    early = KVStore(other, size=MiB)
    KVStore(other, size=2 * MiB)[b"k"] = b"v"
    for call in (lambda: len(early), early.verify, lambda: early.get(b"k"),
                 lambda: early.put_many([b"a"], [b"b"])):
        with pytest.raises(sc.StoreMismatch, match="made for another region size"):
            call()
    other.close()
    for bad in [dict(offset=100), dict(offset=-4096), dict(size=5000), dict(size=4096),
                dict(offset=3 * MiB, size=2 * MiB)]:
        with pytest.raises(ValueError):
            KVStore(store, **bad)
    with pytest.raises(TypeError):
        KVStore(b"not a store")
    store.close()


# ---- snapshots ----------------------------------------------------------------------------------
def test_snapshot_views_read_the_map_as_of_the_snapshot(kv):
    empty = kv.snapshot()               # before the map exists: an empty view
    kv.update({b"a": b"1", b"b": b"2"})
    v1 = kv.snapshot()
    kv[b"a"] = b"changed"
    del kv[b"b"]
    kv.put_many([b"%d" % i for i in range(3000)], [b"x" * 30] * 3000)   # growth after it
    assert dict(v1.items()) == {b"a": b"1", b"b": b"2"}
    assert v1[b"a"] == b"1" and v1.get_many([b"a", b"b", b"0"]) == [b"1", b"2", None]
    assert len(v1) == 2 and b"0" not in v1 and len(empty) == 0 and list(empty) == []
    assert kv[b"a"] == b"changed" and len(kv) == 3001
    v1.verify()
    for write in (lambda: v1.__setitem__(b"a", b"x"), lambda: v1.__delitem__(b"a"),
                  lambda: v1.put_many([b"a"], [b"b"]), lambda: v1.delete_many([b"a"]),
                  v1.clear):
        with pytest.raises(TypeError, match="read-only"):
            write()
    # KVStore(snapshot) works too; the view made by snapshot() owns its snapshot
    snap = kv.store.snapshot()
    v2 = KVStore(snap)
    assert len(v2) == 3001 and v2 == kv
    snap.release()
    with pytest.raises(sc.SnapshotReleased):
        len(v2)
    s = v1.source
    v1.close()
    assert s.released
    with pytest.raises(sc.StoreClosed):
        v1[b"a"]
    empty.close()


def test_views_read_concurrently_with_a_writer():
    store = sc.Store(size=32 * MiB)
    kv = KVStore(store)
    base = {b"%06d" % i: b"v%d" % i for i in range(20000)}
    kv.update(base)
    stop = threading.Event()
    errors = []

    def writer():
        rng = random.Random(4)
        while not stop.is_set():
            kv.put_many([b"%06d" % rng.randrange(40000) for _ in range(500)], [b"new"] * 500)
            kv.delete_many([b"%06d" % rng.randrange(40000) for _ in range(200)])

    def reader(view):
        try:
            for _ in range(5):
                assert dict(view.items()) == base
                assert view.get_many(list(base)) == list(base.values())
        except BaseException as e:
            errors.append(e)

    with kv.snapshot() as view:
        t = threading.Thread(target=writer)
        t.start()
        readers = [threading.Thread(target=reader, args=(view,)) for _ in range(3)]
        for r in readers:
            r.start()
        for r in readers:
            r.join()
        stop.set()
        t.join()
    assert not errors, errors
    kv.verify()
    store.close()


# ---- deltas, replication, recovery -----------------------------------------------------------------
def test_delta_round_trip_replica_equals_primary():
    rng = random.Random(5)
    primary, replica = sc.Store(size=8 * MiB), sc.Store(size=8 * MiB)
    kv = KVStore(primary)
    model = rand_items(rng, 5000)
    kv.update(model)
    s1 = primary.snapshot()
    replica.apply(primary.delta(0, s1).encode())           # full sync through bytes
    rkv = KVStore(replica, readonly=True)
    assert rkv == model and digest(rkv) == dict_digest(model)
    rkv.verify()
    for round_ in range(5):
        for k in rng.sample(list(model), 500):
            del kv[k]
            del model[k]
        more = rand_items(rng, 1000, prefix=b"r%d-" % round_)
        kv.put_many(list(more), list(more.values()))
        model.update(more)
        for k in rng.sample(list(model), 300):
            model[k] = kv[k] = rng.randbytes(rng.randint(0, 200))
        s2 = primary.snapshot()
        replica.apply(sc.Delta.decode(primary.delta(s1, s2).encode("lz4")))
        s1.release()
        s1 = s2
        assert digest(rkv) == dict_digest(model) == digest(kv)
    with pytest.raises(TypeError, match="read-only"):
        rkv[b"x"] = b"y"
    rkv.verify()
    s1.release()
    primary.close()
    replica.close()


def test_replay_of_many_deltas():
    rng = random.Random(6)
    primary, replica = sc.Store(size=4 * MiB), sc.Store(size=4 * MiB)
    kv = KVStore(primary)
    snaps = [primary.snapshot()]
    deltas = [primary.delta(0, snaps[0]).encode()]
    for i in range(8):
        kv.update(rand_items(rng, 300, prefix=b"%d-" % i))
        kv.delete_many(rng.sample(list(kv), 100))
        snaps.append(primary.snapshot())
        deltas.append(primary.delta(snaps[-2], snaps[-1]).encode())
    sc.replay(replica, deltas)
    assert digest(KVStore(replica)) == digest(kv)
    for s in snaps:
        s.release()
    primary.close()
    replica.close()


def test_replication_follower_map_equals_primary():
    rng = random.Random(7)
    primary_store, follower_store = sc.Store(size=4 * MiB), sc.Store(size=4 * MiB)
    kv = KVStore(primary_store)
    kv.update(rand_items(rng, 2000))
    with sc.Primary(primary_store) as primary:
        with sc.Follower(follower_store, primary.address) as follower:
            fkv = KVStore(follower_store, readonly=True)
            follower.wait_for(primary.epoch, timeout=30)
            assert digest(fkv) == digest(kv)
            for i in range(3):
                kv.update(rand_items(rng, 500, prefix=b"%d-" % i))
                kv.delete_many(rng.sample(list(kv), 200))
                want = digest(kv)
                epoch = primary.publish()
                follower.wait_for(epoch, timeout=30)
                assert digest(fkv) == want
            fkv.verify()
    primary_store.close()
    follower_store.close()


def test_durable_map_survives_close_and_reopen(tmp_path):
    d = tmp_path / "kvdir"
    with KVStore.open(d, size=4 * MiB, durable=True) as kv:
        kv.update({b"a": b"1", b"b": b"2"})
        assert kv.commit() >= 1
        kv[b"c"] = b"3"                   # close() commits it
    with KVStore.open(d, durable=True) as kv:
        assert dict(kv.items()) == {b"a": b"1", b"b": b"2", b"c": b"3"}
        kv.store.checkpoint().result()
        del kv[b"a"]
    with KVStore.open(d, durable=True) as kv:
        assert dict(kv.items()) == {b"b": b"2", b"c": b"3"}
        kv.verify()
    # a plain store file
    p = tmp_path / "kv.store"
    with KVStore.open(p, size=MiB) as kv:
        kv[b"x"] = b"y"
    with KVStore.open(p) as kv:
        assert kv[b"x"] == b"y"
    with pytest.raises(TypeError, match="commit"):
        with KVStore.open(p) as kv:
            kv.commit()


def _crash_child(directory, seed, wfd):
    """Random map changes and commits until killed. Lines: 'pre E H' (about to commit
    epoch E whose map digest is H), 'done E' (that commit returned)."""
    try:
        rng = random.Random(seed)
        kv = KVStore.open(directory, size=2 * MiB, durable=True)
        model = dict(kv.items())
        while True:
            for _ in range(rng.randint(1, 40)):
                r = rng.random()
                if r < 0.5 or not model:
                    k, v = b"k%d" % rng.randrange(3000), rng.randbytes(rng.randint(0, 200))
                    kv[k] = v
                    model[k] = v
                elif r < 0.8:
                    k = rng.choice(list(model))
                    del kv[k]
                    del model[k]
                else:
                    ks = [b"k%d" % rng.randrange(3000) for _ in range(20)]
                    vs = [rng.randbytes(8) for _ in ks]
                    kv.put_many(ks, vs)
                    model.update(zip(ks, vs))
            e = kv.store.epoch
            os.write(wfd, f"pre {e} {dict_digest(model)}\n".encode())
            kv.commit()
            os.write(wfd, f"done {e}\n".encode())
    except BaseException:
        os.write(wfd, f"error {traceback.format_exc()[-2000:]}\n".replace("\n", " | ").encode()
                 + b"\n")
        os._exit(2)


def test_crash_recovery_map_equals_last_commit(tmp_path):
    ctx = multiprocessing.get_context("fork")
    directory = str(tmp_path / "d")
    rng = random.Random(8)
    announced = {}
    kills = 12
    for kill in range(kills):
        rfd, wfd = os.pipe()
        p = ctx.Process(target=_crash_child, args=(directory, rng.getrandbits(32), wfd),
                        daemon=True)
        p.start()
        os.close(wfd)
        buf, done = b"", None
        deadline = time.monotonic() + rng.uniform(0.05, 0.4)
        try:
            while time.monotonic() < deadline:
                r, _, _ = select.select([rfd], [], [], max(0.0, deadline - time.monotonic()))
                if r:
                    chunk = os.read(rfd, 65536)
                    if not chunk:
                        break
                    buf += chunk
            os.kill(p.pid, signal.SIGKILL)
            p.join(30)
            while True:
                chunk = os.read(rfd, 65536)
                if not chunk:
                    break
                buf += chunk
        finally:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join(30)
            os.close(rfd)
        for line in buf.decode().splitlines():
            kind, _, rest = line.partition(" ")
            assert kind != "error", rest
            if kind == "pre":
                e, h = rest.split()
                announced[int(e)] = h
            elif kind == "done":
                done = int(rest)
        with KVStore.open(directory, durable=True) as kv:
            got = kv.store.committed_epoch
            if done is not None:
                assert got >= done, f"kill {kill}: commit of {done} returned, recovered {got}"
            want = announced.get(got, dict_digest({}))
            assert digest(kv) == want, f"kill {kill}: map at epoch {got} is not what was committed"
            kv.verify()
        for e in [e for e in announced if e > got]:
            del announced[e]
    assert max(announced, default=0) > kills, "children made too little progress"


# ---- a full region --------------------------------------------------------------------------------
def test_full_region_raises_and_writes_nothing():
    store = sc.Store(size=256 * 1024)
    kv = KVStore(store)
    i = 0
    with pytest.raises(KVFull, match="nothing was written"):
        while True:
            kv[b"key-%06d" % i] = b"v" * 100
            i += 1
    before = dict(kv.items())
    assert len(before) == i and i > 1000
    with pytest.raises(KVFull):
        kv[b"key-000000"] = b"w" * 2000          # an overwrite that cannot fit
    with pytest.raises(KVFull):
        kv[b"another"] = b"v" * 100
    with pytest.raises(KVFull, match=r"put_many \(at item"):
        kv.put_many([b"key-000001", b"new-1", b"key-000002"] + [b"n%d" % j for j in range(500)],
                    [b"x" * 100, b"y", b"z" * 3] + [b"q" * 100] * 500)
    assert dict(kv.items()) == before
    kv.verify()
    # deleting makes room again
    kv.delete_many(list(before)[:200])
    kv[b"another"] = b"v" * 100
    kv.verify()
    store.close()


def test_failed_put_many_leaves_the_allocation_as_it_was():
    # A batch that splits buckets and reserves segments before it runs out of room: after
    # the failure the region is as it was, so what fit before still fits.
    size = 256 * 1024
    store = sc.Store(size=size)
    kv = KVStore(store)
    kv.put_many([b"k%05d" % i for i in range(200)], [b"v" * 60] * 200)
    kv.delete_many([b"k%05d" % i for i in range(0, 200, 7)])   # holes below the top
    before = kv.stats()
    top = size - before["wilderness_bytes"]
    image = store.read(0, top)
    with kv.snapshot() as view:
        keys = [b"k%05d" % i for i in range(50)] + [b"n%05d" % i for i in range(3000)]
        values = [b"w" * (60 if i % 2 else 150) for i in range(50)] + [b"x" * 60] * 3000
        with pytest.raises(KVFull, match=r"put_many \(at item \d+ of 3050\)"):
            kv.put_many(keys, values)
        assert kv.stats() == before
        assert store.read(0, top) == image
        assert dict(view.items()) == dict(kv.items())
        view.verify()
    kv.verify()
    kv[b"big"] = b"B" * (before["wilderness_bytes"] - 4096)   # fit before: fits now
    kv.verify()
    store.close()


def test_failed_first_write_leaves_no_map():
    store = sc.Store(size=64 * 1024)
    kv = KVStore(store)
    with pytest.raises(KVFull):
        kv[b"k"] = b"v" * (100 * 1024)
    assert not kv.present and len(kv) == 0 and store.read(0, store.size) == bytes(store.size)
    with pytest.raises(KVFull):
        kv.put_many([b"%d" % i for i in range(1000)], [b"v" * 100] * 1000)
    assert not kv.present and store.read(0, store.size) == bytes(store.size)
    kv[b"k"] = b"v"                  # the region is still an empty map's
    assert kv.present and kv[b"k"] == b"v"
    kv.verify()
    store.close()


def test_failed_first_put_many_leaves_the_region_and_its_neighbours_as_they_were():
    # The region lies inside a larger store and a snapshot is live: the batch creates the
    # map, runs out of room and takes the map away again, touching no byte of the region
    # or around it, and none the snapshot reads.
    ps = 4096
    store = sc.Store(size=64 * ps)
    lo, hi = os.urandom(4 * ps), os.urandom(8 * ps)
    store.write(0, lo)           # pages before the region (pages 8-23), some never written
    store.write(24 * ps, hi)     # and after it
    kv = KVStore(store, offset=8 * ps, size=16 * ps)
    image = store.read(0, store.size)
    keys, values = [b"k%04d" % i for i in range(1000)], [b"v" * 100] * 1000
    with store.snapshot() as snap:
        with pytest.raises(KVFull, match=r"put_many \(at item \d+ of 1000\)"):
            kv.put_many(keys, values)
        assert store.read(0, store.size) == image and not kv.present
        assert snap.read(0, store.size) == image
    kv.put_many(keys[:100], values[:100])   # a smaller batch creates the map
    assert kv.present and dict(kv.items()) == dict(zip(keys[:100], values[:100]))
    kv.verify()
    assert store.read(0, 4 * ps) == lo and store.read(24 * ps, 8 * ps) == hi
    store.close()


def test_writes_to_a_region_holding_other_data_keep_the_data():
    store = sc.Store(size=256 * 1024)
    store.write(100_000, b"not a map")
    kv = KVStore(store)
    image = store.read(0, store.size)
    with pytest.raises(ValueError, match="holds data but no key-value header"):
        kv[b"k"] = b"v"
    assert store.read(0, store.size) == image
    with pytest.raises(ValueError, match="holds data but no key-value header"):
        kv.put_many([b"k"], [b"v"])
    assert store.read(0, store.size) == image and not kv.present
    store.close()


# ---- damaged bytes ---------------------------------------------------------------------------------
def _damage(store, offset, data):
    store.write(offset, data)


def test_damaged_header_bucket_and_heap_raise_corrupt_kv():
    def fresh():
        store = sc.Store(size=MiB)
        kv = KVStore(store)
        kv.put_many([b"%04d" % i for i in range(2000)], [b"v" * 40] * 2000)
        kv.verify()
        return store, kv

    cases = {
        "magic": (0, b"XXXXXXXX"),
        "version": (8, struct.pack("<I", 99)),
        "region size": (16, struct.pack("<Q", 12345)),
        "level": (28, struct.pack("<I", 60)),
        "top": (48, struct.pack("<Q", 1 << 40)),
        "segment": (160, struct.pack("<Q", 7)),
        "bucket count": (SEG0, struct.pack("<I", 200)),
        "bucket link": (SEG0 + 8, struct.pack("<Q", 0xFFFFFFFF0)),
        "slot record": (SEG0 + 24, struct.pack("<Q", 3)),
        "segment block head": (HEADER, struct.pack("<Q", 0)),
    }
    for name, (off, data) in cases.items():
        store, kv = fresh()
        _damage(store, off, data)
        with pytest.raises((CorruptKV, sc.UnsupportedFormat)):
            kv.verify()
        # every operation either works or names the damage (a foreign magic reads as "not a
        # map": ValueError); none crashes
        for op in (lambda: len(kv), lambda: list(kv.items()), lambda: kv.get_many(
                [b"%04d" % i for i in range(2000)]), lambda: kv.put_many([b"n%d" % i for i in range(300)], [b"x"] * 300),
                lambda: kv.delete_many([b"%04d" % i for i in range(0, 2000, 3)]),
                lambda: [kv.get(b"%04d" % i) for i in range(2000)]):
            try:
                op()
            except (CorruptKV, sc.UnsupportedFormat) as e:
                assert "damaged" in str(e) or "format" in str(e)
            except ValueError as e:
                assert name == "magic" and "no key-value header" in str(e)
        store.close()


def test_random_byte_flips_never_crash():
    rng = random.Random(9)
    for _ in range(60):
        store = sc.Store(size=MiB)
        kv = KVStore(store)
        items = rand_items(rng, 1500, vmax=60)
        kv.update(items)
        used = store.size - kv.stats()["wilderness_bytes"]
        for _ in range(rng.randint(1, 6)):
            off = rng.randrange(used)
            b = bytearray(store.read(off, 1))
            b[0] ^= 1 << rng.randrange(8)
            store.write(off, bytes(b))
        keys = list(items)[:300]
        for op in (kv.verify, lambda: kv.get_many(keys), lambda: list(kv.items()),
                   lambda: kv.put_many([b"p%d" % i for i in range(200)], [b"v" * 30] * 200),
                   lambda: kv.delete_many(keys[:100]), lambda: [kv.get(k) for k in keys]):
            try:
                op()
            except (CorruptKV, KVFull, sc.UnsupportedFormat, RuntimeError, ValueError):
                pass
        store.close()


# ---- lifetime, threads, fork -----------------------------------------------------------------------
def test_closed_store_and_closed_kvstore():
    store = sc.Store(size=MiB)
    kv = KVStore(store)
    kv[b"a"] = b"b"
    store.close()
    with pytest.raises(sc.StoreClosed):
        kv[b"a"]
    with pytest.raises(sc.StoreClosed):
        kv[b"a"] = b"c"
    with pytest.raises(sc.StoreClosed):
        kv.get_many([b"a"])
    kv.close()
    kv.close()
    assert repr(kv) == "<KVStore closed>"
    store = sc.Store(size=MiB)
    with KVStore(store) as kv2:
        kv2[b"x"] = b"y"
    with pytest.raises(sc.StoreClosed):
        len(kv2)
    assert not store.closed            # not opened by the KVStore: left open
    store.close()


def test_threads_share_one_map():
    store = sc.Store(size=32 * MiB)
    kv = KVStore(store)
    errors = []

    def work(t):
        try:
            rng = random.Random(t)
            mine = {}
            for i in range(3000):
                k = b"t%d-%d" % (t, rng.randrange(1000))
                r = rng.random()
                if r < 0.6:
                    mine[k] = kv[k] = rng.randbytes(rng.randint(0, 50))
                elif r < 0.8:
                    if kv.pop(k, None) is not None:
                        del mine[k]
                elif r < 0.9:
                    ks = [b"t%d-%d" % (t, rng.randrange(1000)) for _ in range(20)]
                    vs = [b"b%d" % j for j in range(20)]
                    kv.put_many(ks, vs)
                    mine.update(zip(ks, vs))
                else:
                    assert kv.get(k) == mine.get(k)
            assert {k: kv[k] for k in mine} == mine
        except BaseException as e:
            errors.append(e)

    snapper_stop = threading.Event()

    def snapper():
        while not snapper_stop.is_set():
            with kv.snapshot() as v:
                v.verify()

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    s = threading.Thread(target=snapper)
    s.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snapper_stop.set()
    s.join()
    assert not errors, errors
    kv.verify()
    store.close()


def test_forked_child_refuses_the_map(tmp_path):
    store = sc.Store(tmp_path / "s", size=MiB)
    kv = KVStore(store)
    kv[b"a"] = b"b"
    pid = os.fork()
    if pid == 0:
        try:
            kv[b"a"] = b"child"
            os._exit(1)
        except sc.StoreForked:
            os._exit(0)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert kv[b"a"] == b"b"
    store.close()
