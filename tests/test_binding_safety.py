"""The binding (_core.pyx, _kv.pyx) against hostile use: closed or never-opened handles,
stores closed in the middle of a call, objects made with __new__, copies and pickles of
native buffers, caller buffers of the wrong size or changed after validation, damaged
counts. Each must raise a clear exception, never crash.

A reproducer that crashed the interpreter runs in a subprocess, so a crash fails its test
instead of killing pytest. Races are made deterministic: the store is closed from inside
the call (an argument's __array__, a snapshot's _acquire) at the point another thread's
close() would have to land.
"""
from __future__ import annotations

import copy
import pickle
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import statecore as sc
from statecore import _core, errors
from statecore.kv import CorruptKV, KVStore

MiB = 1 << 20


def run_script(code: str, timeout: float = 120) -> str:
    """Run code in a fresh interpreter; a crash (signal) or an uncaught error fails."""
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"exit status {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc.stdout


# ---- 1. no use of the store handle before the closed check ---------------------------------
def test_read_pages_when_the_ids_close_the_store():
    # page_id_array converts the ids (numpy calls __array__) before _snap_read_pages runs;
    # the store is closed by then, as by another thread's close().
    out = run_script("""
        import numpy as np, statecore as sc
        s = sc.Store(size=1 << 20)
        snap = s.snapshot()
        class Ids:
            def __array__(self, dtype=None, copy=None):
                s.close()
                return np.array([0], dtype=np.uint64)
        try:
            snap.read_pages(Ids())
        except sc.StateError as e:
            print(type(e).__name__)
    """)
    assert out.split() == ["StoreClosed"]


def test_snap_read_pages_on_a_closed_store():
    out = run_script("""
        import numpy as np, statecore as sc
        s = sc.Store(size=1 << 20)
        snap = s.snapshot()
        s.close()
        try:
            s._snap_read_pages(snap.epoch, np.zeros(1, np.uint64))
        except sc.StoreClosed as e:
            print("StoreClosed")
    """)
    assert out.split() == ["StoreClosed"]


def _every_store_call(s, dv, epoch):
    """(name, call) for every method and property of StoreCore that uses the handle."""
    from statecore import errors
    ids = np.zeros(1, np.uint64)
    idx = np.zeros(1, np.int64)
    page = bytes(4096)
    return [
        ("_sync", lambda: s._sync()),
        ("size", lambda: s.size),
        ("page_size", lambda: s.page_size),
        ("n_pages", lambda: s.n_pages),
        ("epoch", lambda: s.epoch),
        ("_uuid", lambda: s._uuid()),
        ("_set_uuid", lambda: s._set_uuid(bytes(16))),
        ("_schema_version", lambda: s._schema_version()),
        ("_set_schema_version", lambda: s._set_schema_version(1)),
        ("_set_epoch", lambda: s._set_epoch(5)),
        ("_page_version", lambda: s._page_version(0)),
        ("memoryview", lambda: memoryview(s)),
        ("_writable_region", lambda: s._writable_region()),
        ("_write", lambda: s._write(0, b"x")),
        ("_write_pages", lambda: s._write_pages(ids, page)),
        ("_write_pages (none)", lambda: s._write_pages(ids[:0], b"")),
        ("_touch_pages", lambda: s._touch_pages(ids)),
        ("_touch_rows", lambda: s._touch_rows(idx, 1, 0, 8)),
        ("_write_rows", lambda: s._write_rows(idx, 1, 0, 8, bytes(8), 8)),
        ("_touch_range", lambda: s._touch_range(0, 1)),
        ("_read", lambda: s._read(0, 1)),
        ("_snapshot", lambda: s._snapshot()),
        ("_release", lambda: s._release(epoch)),
        ("_set_floor", lambda: s._set_floor(epoch, 0)),
        ("_snap_read", lambda: s._snap_read(epoch, 0, 1)),
        ("_snap_read_pages", lambda: s._snap_read_pages(epoch, ids)),
        ("_changed_pages", lambda: s._changed_pages(0, epoch)),
        ("_clear_dirty", lambda: s._clear_dirty(epoch)),
        ("_delta_build", lambda: s._delta_build(0, epoch)),
        ("_delta_build_pages", lambda: s._delta_build_pages(0, epoch, ids, bytearray(8192))),
        ("_apply", lambda: s._apply(dv, False)),
        ("_replay", lambda: s._replay([dv], False, 0)),
        ("_checkpoint_save", lambda: s._checkpoint_save(epoch, -1)),
        ("_restore", lambda: s._restore(dv, errors.CorruptCheckpoint)),
        ("_enter_call", lambda: s._enter_call()),
        ("_stats", lambda: s._stats()),
    ]


@pytest.mark.parametrize("how", ["closed", "never opened"])
def test_every_store_call_on_a_closed_store_raises_store_closed(how):
    out = run_script(f"""
        import sys
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
        import statecore as sc
        from statecore import _core
        from test_binding_safety import _every_store_call
        src = sc.Store(size=1 << 20)
        src.write(0, b"x")
        dv = src.delta(0)._view
        if {how!r} == "closed":
            s = sc.Store(size=1 << 20)
            epoch = s.snapshot().epoch
            s.close()
        else:
            s = _core.StoreCore()
            epoch = 1
        for name, call in _every_store_call(s, dv, epoch):
            try:
                call()
            except sc.StoreClosed:
                continue
            print("no StoreClosed from", name)
        print("done")
    """)
    assert out.split("\n")[:-1] == ["done"], out


def test_store_cannot_be_opened_twice():
    s = sc.Store(size=MiB)
    try:
        with pytest.raises(ValueError, match="already open"):
            s._open(None, MiB, 4096)
    finally:
        s.close()


# ---- 2. KVStore opening while the store is closed -------------------------------------------
def test_kv_attach_when_the_store_closes_during_the_snapshot_acquire():
    # KVCore._attach runs snap._acquire() (Python) before sc_kv_open: a close() landing
    # there must not free the store the map is opened on.
    out = run_script("""
        import statecore as sc
        from statecore.kv import KVStore
        store = sc.Store(size=1 << 20)
        snap = store.snapshot()
        real_acquire = snap._acquire
        calls = []
        def acquire():
            calls.append(1)
            got = real_acquire()
            if len(calls) == 2:  # the one in KVCore._attach
                store.close()
            return got
        snap._acquire = acquire
        try:
            KVStore(snap)
        except sc.StateError as e:
            print(type(e).__name__)
    """)
    assert out.split() == ["StoreClosed"]


def test_store_cannot_close_during_a_kv_call():
    s = sc.Store(size=MiB)
    s._enter_call()
    with pytest.raises(errors.StateError, match="still running"):
        s.close()
    assert not s.closed
    s._leave_call()
    with pytest.raises(RuntimeError, match="without a matching"):
        s._leave_call()
    s.close()
    assert s.closed


def test_kv_attach_races_close():
    # The reproducer's race, for a few hundred rounds: no crash, a map or an error.
    run_script("""
        import sys, threading, statecore as sc
        sys.setswitchinterval(1e-6)
        for trial in range(300):
            s = sc.Store(size=1 << 20)
            snap = s.snapshot()
            go = threading.Event()
            def closer():
                go.wait()
                try:
                    s.close()
                except sc.StateError:
                    pass
            t = threading.Thread(target=closer)
            t.start()
            go.set()
            try:
                KV = sc.KVStore(snap)
                KV.close()
            except sc.StateError:
                pass
            t.join()
            s.close()
    """)


# ---- 3. native buffers are neither copied nor pickled ---------------------------------------
def test_native_buffer_refuses_copy_and_pickle():
    out = run_script("""
        import copy, pickle, statecore as sc
        s = sc.Store(size=1 << 20)
        s.write(0, b"x" * 5000)
        nb = s.delta(0).encode().obj
        for f in (copy.copy, copy.deepcopy, pickle.dumps):
            try:
                f(nb)
            except TypeError as e:
                print("TypeError" if "NativeBuffer" in str(e) else e)
    """)
    assert out.split() == ["TypeError"] * 3


def test_region_refuses_copy_and_pickle():
    s = sc.Store(size=MiB)
    try:
        region = s._writable_region()
        for f in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match="cannot copy or pickle a _Region"):
                f(region)
        assert s._exports_count == 0
    finally:
        s.close()


# ---- 4. a delta buffer changed after validation ---------------------------------------------
@pytest.mark.parametrize("entry,value", [(0, 1 << 40), (0, 256), (1, 0), (0, 5)])
def test_apply_of_a_delta_whose_buffer_changed(entry, value):
    # entry 0: the first page id (past the store, one past its last page, equal to the
    # next id); entry 1: the first version (at the delta's base).
    out = run_script(f"""
        import struct, statecore as sc
        src = sc.Store(size=1 << 20)
        src.write(0, b"x" * 4096)
        src.write(5 * 4096, b"y" * 4096)
        buf = bytearray(src.delta(0).encode())
        d = sc.Delta.decode(buf, copy=False)
        n = d.n_pages
        at = 128 + 8 * n * {entry}
        saved = buf[at:at + 8]
        struct.pack_into("<Q", buf, at, {value})
        dst = sc.Store(size=1 << 20)
        for how in ("apply", "replay"):
            try:
                dst.apply(d) if how == "apply" else sc.replay(dst, [d])
            except sc.CorruptDelta as e:
                print(how, "CorruptDelta", "changed after it was validated" in str(e))
            assert dst.epoch == 1 and bytes(memoryview(dst)) == bytes(1 << 20)
        buf[at:at + 8] = saved  # put back: it applies
        assert dst.apply(d) == 2 and dst.read(0, 1 << 20) == src.read(0, 1 << 20)
    """)
    assert out.split("\n")[:-1] == ["apply CorruptDelta True", "replay CorruptDelta True"]


def test_restore_of_a_checkpoint_whose_index_changed(tmp_path):
    # As when the file under a mapped checkpoint changes between parse and restore.
    out = run_script(f"""
        import struct, statecore as sc
        from statecore import _core, errors
        src = sc.Store(size=1 << 20)
        src.write(0, b"x" * 4096)
        path = {str(tmp_path / "c.ckpt")!r}
        with src.snapshot() as snap:
            snap.save(path)
        buf = bytearray(open(path, "rb").read())
        dv = _core.parse(buf, _core.KIND_CHECKPOINT, False, errors.CorruptCheckpoint)
        struct.pack_into("<Q", buf, 128, 1 << 40)
        dst = sc.Store(size=1 << 20)
        try:
            dst._restore(dv, errors.CorruptCheckpoint)
        except errors.CorruptCheckpoint as e:
            print("CorruptCheckpoint", "index changed" in str(e))
        assert dst.epoch == 1 and bytes(memoryview(dst)) == bytes(1 << 20)
        struct.pack_into("<Q", buf, 128, 0)
        dst._restore(dv, errors.CorruptCheckpoint)
        assert dst.read(0, 4096) == b"x" * 4096
    """)
    assert out.split() == ["CorruptCheckpoint", "True"]


def test_decode_documents_copy_false():
    doc = sc.Delta.decode.__doc__
    assert "must not change" in doc and "never a crash" in doc


# ---- 5. caller buffers must hold what the count says ---------------------------------------
def test_write_pages_short_data_in_front_of_a_guard_page():
    out = run_script("""
        import ctypes, numpy as np, statecore as sc
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        p = libc.mmap(None, 8192, 3, 0x22, -1, 0)
        libc.mprotect(p + 4096, 4096, 0)
        short = memoryview((ctypes.c_char * 4096).from_address(p)).cast("B")[4095:]
        s = sc.Store(size=1 << 20)
        try:
            s._write_pages(np.array([0], np.uint64), short)
        except ValueError as e:
            print("ValueError")
    """)
    assert out.split() == ["ValueError"]


@pytest.mark.parametrize("n_bytes", [0, 1, 4095, 4097, 8192])
def test_write_pages_data_size_must_match(n_bytes):
    out = run_script(f"""
        import numpy as np, statecore as sc
        s = sc.Store(size=1 << 20)
        for ids, data in ((np.array([3], np.uint64), bytes({n_bytes})),
                          (np.array([], np.uint64), bytes({n_bytes} or 1))):
            try:
                s._write_pages(ids, data)
            except ValueError as e:
                print("ValueError", "len(ids) * page_size" in str(e))
        assert s._stats()["pages_written"] == 0 and s.epoch == 1
        s._write_pages(np.array([3], np.uint64), b"p" * 4096)
        assert s.read(3 * 4096, 4096) == b"p" * 4096
    """)
    assert out.split("\n")[:-1] == ["ValueError True"] * 2


# ---- 6. objects made with __new__ -------------------------------------------------------------
def test_region_made_with_new():
    out = run_script("""
        import statecore._core as c
        r = c._Region.__new__(c._Region)
        try:
            memoryview(r)
        except TypeError as e:
            print("TypeError", "_writable_region" in str(e))
    """)
    assert out.split() == ["TypeError", "True"]


def test_kv_iterator_made_with_new():
    out = run_script("""
        import statecore as sc
        kv = sc.KVStore(sc.Store(size=1 << 20))
        T = type(iter(kv))
        it = T.__new__(T)
        for _ in range(2):
            try:
                next(it)
            except TypeError as e:
                print("TypeError")
    """)
    assert out.split() == ["TypeError", "TypeError"]


# ---- 7. a damaged KV count ---------------------------------------------------------------
@pytest.mark.parametrize("count", [2**64 - 1, 2**63, MiB // 16 + 1])
def test_damaged_kv_count_is_corrupt_kv(count):
    store = sc.Store(size=MiB)
    kv = KVStore(store)
    kv[b"a"] = b"1"
    store.write(40, struct.pack("<Q", count))  # the header's count
    with pytest.raises(CorruptKV, match="counts"):
        len(kv)
    with pytest.raises(CorruptKV):
        list(kv)
    store.write(40, struct.pack("<Q", 1))
    assert len(kv) == 1 and list(kv) == [b"a"]
    kv.close()
    store.close()


# ---- 8. lengths past Py_ssize_t ------------------------------------------------------------
@pytest.mark.parametrize("length", [2**63, 2**63 + 5, 2**64 - 1, MiB + 1])
def test_huge_read_lengths_raise_index_error(length):
    s = sc.Store(size=MiB)
    try:
        with pytest.raises(IndexError, match=f"length {length}"):
            s._read(0, length)
        with s.snapshot() as snap:
            with pytest.raises(IndexError, match=f"length {length}"):
                s._snap_read(snap.epoch, 0, length)
        with pytest.raises(IndexError, match="length 1 at offset"):
            s._read(MiB, 1)
        assert s._read(MiB - 3, 3) == bytes(3)
    finally:
        s.close()


# ---- replay's views ---------------------------------------------------------------------------
def test_replay_rejects_none_views():
    s = sc.Store(size=MiB)
    try:
        with pytest.raises(TypeError, match=r"views\[0\] is None"):
            s._replay([None], False, 0)
    finally:
        s.close()


def test_replay_keeps_its_views_alive_while_the_list_is_cleared():
    # The core reads the views' buffers without the GIL: another thread emptying the list
    # (and dropping the last references) must not free them under it. The first view's
    # buffer is a 64 MiB bytes object, which the allocator unmaps when it is freed.
    out = run_script("""
        import gc, threading, time, statecore as sc
        from statecore import _core
        size = 64 << 20
        src = sc.Store(size=size)
        src.write(0, b"\\x5a" * size)
        s1 = src.snapshot()
        src.write(0, b"\\xa5" * 4096)
        s2 = src.snapshot()
        views = [sc.Delta.decode(bytes(src.delta(0, s1).encode()))._view,
                 sc.Delta.decode(bytes(src.delta(s1, s2).encode()))._view]
        dst = sc.Store(size=size)
        progress = _core.Progress()
        def clear_while_copying():
            while progress.done == 0:
                time.sleep(0.0001)
            views.clear()
            gc.collect()
        t = threading.Thread(target=clear_while_copying)
        t.start()
        print(dst._replay(views, False, 1, progress)[1])
        t.join()
        print(dst.read(0, size) == src.read(0, size))
    """)
    assert out.split() == [str(64 * 256), "True"]
