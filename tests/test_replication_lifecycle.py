"""Replication: how Primary and Follower end, fail and report their state.

Each test pins down one way a session, a follower or a publication could end badly: a
thread that dies without saying why, a waiter that is never woken, a close() that blocks,
a snapshot nobody releases, a publication that goes backwards, a state never reported, a
store file that resumes from the wrong epoch. In-process only, small stores, every wait
bounded. Helpers and fixtures come from test_replication.
"""
from __future__ import annotations

import socket
import ssl
import threading
import time
from typing import Any, List

import numpy as np
import pytest

import statecore as sc
from statecore import replication, wire
from test_replication import (LOCAL, N_PAGES, PS, SIZE, Proxy, cleanup,  # noqa: F401
                              converge, make_cert, part_pages, random_writes, wait_until)

# A library thread that dies of an exception (a crash, not a refusal) fails the test.
pytestmark = pytest.mark.filterwarnings(
    "error::pytest.PytestUnhandledThreadExceptionWarning")


def serving(cleanup, seed: int = 0):
    """A plain Store with every page written, and a Primary that published it."""
    store = sc.Store(size=SIZE)
    cleanup(store)
    random_writes(store, np.random.default_rng(seed), N_PAGES)
    primary = sc.Primary(store)
    cleanup(primary)
    return store, primary


def follower_on(cleanup, address, store=None, **kw: Any) -> sc.Follower:
    if store is None:
        store = sc.Store(size=SIZE)
        cleanup(store)
    follower = sc.Follower(store, address, **kw)
    cleanup(follower)
    return follower


# ---- an unexpected exception is a recorded failure, never a silent thread death ------------
def test_an_on_apply_callback_that_raises_fails_the_follower_with_its_error(cleanup):
    store, primary = serving(cleanup, 1)
    calls: List[int] = []

    def on_apply(epoch: int, nbytes: int) -> None:
        calls.append(epoch)
        raise KeyError("bug in the callback")

    follower = follower_on(cleanup, primary.address, on_apply=on_apply)
    t0 = time.monotonic()
    with pytest.raises(KeyError, match="bug in the callback"):
        follower.wait_for(primary.epoch, timeout=5)
    assert time.monotonic() - t0 < 4.5  # woken by the failure, not by the 5 s timeout
    st = follower.status()
    assert st["state"] == "failed" and "bug in the callback" in st["error"]
    assert isinstance(follower.error, KeyError) and calls == [primary.epoch]
    wait_until(lambda: not follower._thread.is_alive(), what="the follower thread to end")
    with pytest.raises(KeyError):  # and every later wait says the same at once
        follower.wait_for(primary.epoch, timeout=5)


def test_a_bug_in_a_primary_session_is_reported_and_the_primary_keeps_serving(
        cleanup, monkeypatch):
    store, primary = serving(cleanup, 2)
    real = replication._Session._send_loop
    broken = {"left": 1}

    def send_loop(self: Any) -> None:
        if broken["left"]:
            broken["left"] -= 1
            raise RuntimeError("bug in the sender")
        real(self)

    monkeypatch.setattr(replication._Session, "_send_loop", send_loop)
    first = follower_on(cleanup, primary.address, reconnect=False)
    with pytest.raises(OSError):  # the primary hung up on it
        first.wait_for(primary.epoch, timeout=5)
    entry = wait_until(lambda: [s for s in primary.followers if s["error"]],
                       what="the failed session")[0]
    assert entry["state"] == "closed"
    assert entry["error"] == "internal error: RuntimeError: bug in the sender"
    converge(follower_on(cleanup, primary.address), store, primary.epoch)


# ---- closing ---------------------------------------------------------------------------------
def test_close_wakes_waiters_and_a_closed_follower_says_so(cleanup):
    store, primary = serving(cleanup, 3)
    follower = follower_on(cleanup, primary.address)
    converge(follower, store, primary.epoch)
    outcome: List[BaseException] = []

    def waiter() -> None:
        try:
            follower.wait_for(primary.epoch + 1)  # no timeout: only close() ends it
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    time.sleep(0.2)
    assert t.is_alive()
    follower.close()
    t.join(2)
    assert not t.is_alive(), "close() left a waiter blocked"
    assert len(outcome) == 1 and type(outcome[0]) is sc.StateError
    assert "follower closed" in str(outcome[0])
    t0 = time.monotonic()
    with pytest.raises(sc.StateError, match="follower closed"):
        follower.wait_for(primary.epoch + 1, timeout=5)
    assert time.monotonic() - t0 < 1
    assert follower.wait_for(primary.epoch, timeout=0) is True  # reached before closing


def test_close_interrupts_the_follower_s_tls_handshake(cleanup):
    silent = socket.create_server((LOCAL, 0))  # accepts, never answers the TLS hello
    cleanup(silent)
    follower = follower_on(cleanup, silent.getsockname()[:2],
                           ssl=ssl.create_default_context())
    silent.settimeout(5)
    conn, _ = silent.accept()
    cleanup(conn)
    wait_until(lambda: follower._sock is not None, what="the follower's TLS socket")
    time.sleep(0.2)  # the follower is now (most likely) waiting for the server's hello
    t0 = time.monotonic()
    follower.close()
    assert time.monotonic() - t0 < 5  # the handshake's own timeout is 10 s
    assert not follower._thread.is_alive() and follower.status()["state"] == "closed"


def test_primary_close_interrupts_a_session_s_tls_handshake(cleanup, tmp_path):
    cert, key = make_cert(tmp_path)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    store = sc.Store(size=SIZE)
    cleanup(store)
    primary = sc.Primary(store, ssl=server)
    cleanup(primary)
    mute = socket.create_connection(primary.address, timeout=5)  # never sends a hello
    cleanup(mute)
    wait_until(lambda: primary.followers, what="the session")
    time.sleep(0.2)  # the session is now (most likely) waiting for the client's hello
    t0 = time.monotonic()
    primary.close()
    assert time.monotonic() - t0 < 4  # without the fix: 5 s, the handshake's timeout


def test_a_commit_published_while_the_primary_closes_is_released(cleanup, tmp_path):
    """commit() calls its listeners after close() removed the primary's: the snapshot it
    hands over must be released, or every later write copies pages for it forever."""
    ds = sc.DurableStore(tmp_path / "p", size=SIZE)
    cleanup(ds)
    inside, go = threading.Event(), threading.Event()
    armed = {"on": False}

    def slow_listener(delta: Any, snap: Any) -> None:  # runs before the primary's
        if armed["on"]:
            inside.set()
            go.wait(5)

    ds.add_commit_listener(slow_listener)
    primary = sc.Primary(ds)
    cleanup(primary)
    ds.write(0, b"a" * PS)
    armed["on"] = True
    t = threading.Thread(target=ds.commit, daemon=True)
    t.start()
    assert inside.wait(5)
    primary.close()
    go.set()
    t.join(5)
    assert primary._pub is None and ds.stats()["live_snapshots"] == 0
    ds.write(0, b"y" * SIZE)
    assert ds.stats()["preserved_bytes"] == 0


def test_publish_after_close_raises_and_keeps_nothing(cleanup):
    store = sc.Store(size=SIZE)
    cleanup(store)
    primary = sc.Primary(store)
    primary.close()
    with pytest.raises(sc.StateError, match="primary is closed"):
        primary.publish()
    assert store.stats()["live_snapshots"] == 0


# ---- publication order ---------------------------------------------------------------------
def test_an_older_commit_published_last_does_not_take_the_primary_back(cleanup, tmp_path):
    """Concurrent commits call their listeners in any order: the newest one published
    stays published, and the older snapshot is released."""
    ds = sc.DurableStore(tmp_path / "p", size=SIZE)
    cleanup(ds)
    inside, go = threading.Event(), threading.Event()
    armed = {"on": False}

    def gate(delta: Any, snap: Any) -> None:  # runs before the primary's listener
        if armed["on"]:
            armed["on"] = False
            inside.set()
            go.wait(5)

    ds.add_commit_listener(gate)
    primary = sc.Primary(ds)
    cleanup(primary)
    follower = follower_on(cleanup, primary.address)
    follower.wait_for(primary.epoch, timeout=5)
    older: List[int] = []
    ds.write(0, b"older")
    armed["on"] = True
    t = threading.Thread(target=lambda: older.append(ds.commit()), daemon=True)
    t.start()
    assert inside.wait(5)  # the older commit is durable, its publication held back
    ds.write(PS, b"newer")
    newer = ds.commit()
    assert primary.epoch == newer
    go.set()
    t.join(5)
    assert older and older[0] < newer
    assert primary.epoch == newer  # not taken back by the older publication
    assert ds.stats()["live_snapshots"] == 1  # the publication's; the older one released
    converge(follower, ds, newer)


# ---- states ----------------------------------------------------------------------------------
def test_a_full_sync_reads_syncing_on_both_sides_until_it_is_done(cleanup, monkeypatch):
    store, primary = serving(cleanup, 4)
    held, release = threading.Event(), threading.Event()
    real = wire.send_frame

    def send_frame(sock: Any, ftype: int, body: Any, *more: Any) -> int:
        if ftype in (wire.DELTA, wire.PART):  # the primary's full sync waits for the test
            held.set()
            release.wait(5)
        return real(sock, ftype, body, *more)

    monkeypatch.setattr(wire, "send_frame", send_frame)
    follower = follower_on(cleanup, primary.address)
    assert held.wait(5)
    wait_until(lambda: follower.state == "syncing", what="the follower to say syncing")
    [session] = primary.followers
    assert session["state"] == "syncing" and session["sent_epoch"] == 0
    release.set()
    converge(follower, store, primary.epoch)
    assert follower.state == "streaming"
    wait_until(lambda: primary.followers[0]["state"] == "streaming",
               what="the session to say streaming")


# ---- a follower on a store file ------------------------------------------------------------
def test_a_follower_on_a_store_file_takes_large_deltas_whole(cleanup, tmp_path, part_pages):
    store, primary = serving(cleanup, 5)
    replica = sc.Store(tmp_path / "replica.store", size=SIZE)
    cleanup(replica)
    follower = follower_on(cleanup, primary.address, replica)
    converge(follower, store, primary.epoch)
    random_writes(store, np.random.default_rng(6), 4 * part_pages)
    converge(follower, store, primary.publish())
    st = follower.status()
    assert st["parts_received"] == 0 and st["deltas_applied"] == 2


def test_a_store_file_cut_mid_sync_and_reopened_ends_identical(cleanup, tmp_path, part_pages):
    """The connection drops in the middle of a full sync, the store file is closed and
    reopened (a restart): the new follower must get every page, not resume from the
    target of the delta that was cut."""
    store, primary = serving(cleanup, 7)
    proxy = Proxy(primary.address, rate=400_000, record=True)  # the sync takes ~0.7 s
    cleanup(proxy)
    path = tmp_path / "replica.store"
    replica = sc.Store(path, size=SIZE)
    first = sc.Follower(replica, proxy.address, reconnect=False)
    proxy.pause_after = SIZE // 2  # the proxy stops the sync half-way itself

    try:
        wait_until(lambda: proxy.paused, what="half the sync to pass")
        proxy.drop_all()
        with pytest.raises(OSError):
            first.wait_for(primary.epoch, timeout=5)
    finally:
        first.close()
    assert first.epoch == 0
    replica.close()

    store.write(0, b"moved on")
    epoch = primary.publish()
    replica = sc.Store(path)  # the restart
    cleanup(replica)
    converge(follower_on(cleanup, primary.address, replica), store, epoch)


# ---- what a secret does ------------------------------------------------------------------------
def test_the_docs_say_a_secret_guards_the_handshake_and_tls_the_stream():
    doc = " ".join((replication.__doc__ or "").split())
    assert "before any state flows" in doc
    assert "not MACs" in doc and "inject" in doc
    assert "Confidentiality and integrity against such an attacker need ssl=" in doc
