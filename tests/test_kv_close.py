"""KVStore.close() against calls running in other threads, and every call after close().

A call that released the GIL must never find its C handle freed under it: close() raises
sc.StateError while a call is in flight (as Store.close does) and the call completes;
afterwards every call raises sc.StoreClosed. The race tests run in a subprocess, so a
crash fails the test instead of killing pytest. They are deterministic: the call in the
other thread is held at a known point inside it (the store's write lock for a live map,
the snapshot's _acquire for a view) while close() is tried.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import statecore as sc
from statecore.kv import KVStore

MiB = 1 << 20


def run_script(code: str, timeout: float = 120) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"exit status {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc.stdout


# Shared by both race scripts: close() while the other thread's call is held inside it.
CLOSE_REFUSED = r"""
import statecore as sc

def assert_close_refused(name, obj):
    try:
        obj.close()
        raise SystemExit(f"{name}: close() freed it under a running call")
    except sc.StoreClosed:
        raise SystemExit(f"{name}: StoreClosed is for calls after close")
    except sc.StateError as e:
        assert "a call is still running in another thread" in str(e), e
    assert not obj.closed

def assert_calls_refused_after_close(obj, keys):
    try:
        obj.get_many(keys[:3])
        raise SystemExit("a call after close() worked")
    except sc.StoreClosed:
        pass
"""

LIVE = CLOSE_REFUSED + r"""
import threading
import statecore as sc
from statecore.kv import KVStore

store = sc.Store(size=64 << 20)
real = store._write_lock
armed = threading.Event()
entered = threading.Event()

class AnnouncingLock:
    # The store's write lock; once armed, an acquire says so before it blocks. A KV call
    # takes it inside the call, after it has counted itself.
    def acquire(self, *args):
        if armed.is_set():
            entered.set()
        return real.acquire(*args)
    def release(self):
        return real.release()
    def locked(self):
        return real.locked()
    def __enter__(self):
        return self.acquire()
    def __exit__(self, *exc):
        self.release()

store._write_lock = AnnouncingLock()
kv = KVStore(store)       # binds the lock's methods now
keys = [b"k%06d" % i for i in range(20000)]
kv.put_many(keys, [b"v" * 20] * len(keys))
kv[b"big"] = b"B" * (2 << 20)          # a single get of it releases the GIL
ops = {
    "put_many": lambda: kv.put_many(keys, [b"w" * 20] * len(keys)),
    "get_many": lambda: kv.get_many(keys),
    "delete_many": lambda: kv.delete_many([b"nope%d" % i for i in range(1000)]),
    "verify": kv.verify,
    "big put": lambda: kv.__setitem__(b"big2", b"C" * (2 << 20)),
    "big get": lambda: kv[b"big"],
}
for name, op in ops.items():
    result = []
    armed.clear(); entered.clear()
    real.acquire()                      # the call will wait for it, inside the call
    armed.set()
    t = threading.Thread(target=lambda: result.append(op()))
    t.start()
    assert entered.wait(10), name
    assert_close_refused(name, kv)
    armed.clear()
    real.release()
    t.join(30)
    assert not t.is_alive() and len(result) == 1, name
    print(name, "ok")
assert kv[b"k000001"] == b"w" * 20 and kv[b"big2"] == b"C" * (2 << 20)
kv.verify()
kv.close()
assert_calls_refused_after_close(kv, keys)
print("done")
"""

VIEW = CLOSE_REFUSED + r"""
import threading
import statecore as sc
from statecore.kv import KVStore

store = sc.Store(size=64 << 20)
kv = KVStore(store)
keys = [b"k%06d" % i for i in range(20000)]
kv.put_many(keys, [b"v" * 20] * len(keys))
kv[b"big"] = b"B" * (2 << 20)
view = kv.snapshot()
kv.put_many(keys, [b"w" * 20] * len(keys))   # the view keeps reading the old values
snap = view.source
acquire = snap._acquire
entered = threading.Event()
go = threading.Event()

def held_acquire():
    # Views hold their snapshot while they read: hold the call right there.
    entered.set()
    assert go.wait(10)
    return acquire()

ops = {
    "get_many": lambda: view.get_many(keys),
    "verify": view.verify,
    "big get": lambda: view[b"big"],
    "iterate": lambda: sum(1 for _ in view),
}
for name, op in ops.items():
    result = []
    entered.clear(); go.clear()
    snap._acquire = held_acquire
    t = threading.Thread(target=lambda: result.append(op()))
    t.start()
    assert entered.wait(10), name
    assert_close_refused(name, view)
    assert not snap.released
    del snap._acquire
    go.set()
    t.join(30)
    assert not t.is_alive() and len(result) == 1, name
    print(name, "ok")
assert view[b"k000001"] == b"v" * 20
view.close()
assert snap.released
assert_calls_refused_after_close(view, keys)
print("done")
"""


def test_close_refuses_while_a_live_call_runs():
    out = run_script(LIVE)
    assert out.splitlines()[-1] == "done", out


def test_close_refuses_while_a_view_call_runs():
    out = run_script(VIEW)
    assert out.splitlines()[-1] == "done", out


# What the audit ran: close() from the main thread while another thread runs batch after
# batch. close() either raises StateError (a call is running) or succeeds between calls,
# after which the other thread gets StoreClosed; nothing else, and no crash.
STRESS = r"""
import sys, threading, time
import statecore as sc
from statecore.kv import KVStore

mode = sys.argv[1]
store = sc.Store(size=16 << 20)
kv = KVStore(store)
keys = [b"k%06d" % i for i in range(50000)]
kv.put_many(keys, [b"v" * 20] * len(keys))
target = kv.snapshot() if mode == "view" else kv
errors = []
started = threading.Event()

def worker():
    started.set()
    try:
        for _ in range(2000):
            if mode == "view":
                assert target.get_many(keys)[7] == b"v" * 20
                target.verify()
            else:
                target.put_many(keys, [b"w" * 20] * len(keys))
                target.delete_many(keys[:100])
            time.sleep(0.001)     # a gap between calls, where close() may succeed
        errors.append("close() never succeeded")
    except sc.StoreClosed:
        pass
    except BaseException as e:
        errors.append(repr(e))

t = threading.Thread(target=worker, daemon=True)
t.start()
started.wait()
refused = 0
while True:
    time.sleep(0.0007)
    try:
        target.close()
        break
    except sc.StateError as e:
        assert "still running" in str(e), e
        refused += 1
t.join(60)
assert not t.is_alive()
assert not errors, errors
KVStore(store).verify()
print("closed after", refused, "refusals")
"""


@pytest.mark.parametrize("mode", ["live", "view"])
def test_close_while_batches_run_never_crashes(mode):
    proc = subprocess.run([sys.executable, "-c", STRESS, mode], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("closed after"), proc.stdout


def test_every_call_after_close_raises_store_closed():
    store = sc.Store(size=MiB)
    kv = KVStore(store)
    kv[b"a"] = b"1"
    with kv.snapshot() as snap_view:
        assert snap_view[b"a"] == b"1"
    snap = store.snapshot()
    kv.close()
    kv.close()                          # idempotent
    calls = {
        "snapshot": kv.snapshot,
        "snapshot_view": lambda: kv.snapshot_view(snap),
        "commit": kv.commit,
        "update": lambda: kv.update({}),
        "update items": lambda: kv.update({b"b": b"2"}),
        "get": lambda: kv.get(b"a"),
        "getitem": lambda: kv[b"a"],
        "contains": lambda: b"a" in kv,
        "setitem": lambda: kv.__setitem__(b"a", b"2"),
        "delitem": lambda: kv.__delitem__(b"a"),
        "len": lambda: len(kv),
        "iter": lambda: list(kv),
        "items": lambda: list(kv.items()),
        "get_many": lambda: kv.get_many([b"a"]),
        "put_many": lambda: kv.put_many([], []),
        "delete_many": lambda: kv.delete_many([b"a"]),
        "clear": kv.clear,
        "stats": kv.stats,
        "verify": kv.verify,
        "present": lambda: kv.present,
        "with": lambda: kv.__enter__(),
    }
    for name, call in calls.items():
        with pytest.raises(sc.StoreClosed):
            call()
            pytest.fail(name)
    assert repr(kv) == "<KVStore closed>"
    snap.release()
    assert KVStore(store)[b"a"] == b"1"   # the map itself is untouched
    store.close()


def test_an_iterator_of_a_closed_map_raises_store_closed():
    store = sc.Store(size=MiB)
    kv = KVStore(store)
    kv.put_many([b"%d" % i for i in range(2000)], [b"v"] * 2000)
    it = iter(kv)
    next(it)
    kv.close()
    with pytest.raises(sc.StoreClosed):
        list(it)
    store.close()


# A Store closed by a finalizer that the garbage collector runs in the middle of an
# iterator's refill. In CPython 3.11 a collection runs inside the allocation of a tracked
# object (a pair of items() is one) that crosses the threshold; the pairs must be made
# after the refill is done with the handle. Before, a view read on from the freed store,
# and a live map hung: the finalizer waited for the write lock the refill held.
FINALIZER_CLOSES = r"""
import gc, sys
import statecore as sc
from statecore.kv import KVStore

store = sc.Store(size=16 << 20)
kv = KVStore(store)
keys = [b"k%06d" % i for i in range(2000)]
kv.put_many(keys, [b"v" * 200] * len(keys))
source = kv.snapshot() if sys.argv[1] == "view" else kv
closed = []

class ClosesTheStore:
    def __init__(self):
        self.cycle = self     # only the collector frees it
    def __del__(self):
        store.close()
        closed.append(True)

spare = [(i, i) for i in range(5000)]   # empties the free list of pairs: each new one counts
gc.collect()
gc.set_threshold(200)                   # a collection 200 pairs into the first refill
ClosesTheStore()
got = []
try:
    for k, v in source.items():
        got.append((k, v))
    raise SystemExit("the store was not closed during the iteration")
except (sc.StoreClosed, sc.SnapshotReleased) as e:
    print(type(e).__name__)
finally:
    gc.set_threshold(700)
assert closed and store.closed
assert len(got) == 512 and all(v == b"v" * 200 and k in keys for k, v in got), len(got)
"""


@pytest.mark.parametrize("source", ["live", "view"])
def test_a_finalizer_closing_the_store_during_iteration(source):
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", FINALIZER_CLOSES,
                           source], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ("StoreClosed" if source == "live" else "SnapshotReleased")
