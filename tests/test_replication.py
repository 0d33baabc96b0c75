"""Replication: Primary and Follower, in one process and across processes.

Every comparison is of per-page checksums (sc.page_checksum of each page), taken from the
primary right after the commit/publish that closed the awaited epoch and from the follower
once wait_for() returned for exactly that epoch, with no writes in between.

Multi-process tests drive tests/replication_child.py over stdin/stdout (one JSON request,
one JSON reply per line). A small TCP proxy in the test process (127.0.0.1 only) throttles,
pauses, records or drops follower connections. Every loop is bounded in count and time.
"""
from __future__ import annotations

import inspect
import ipaddress
import json
import queue
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pytest

import statecore as sc

# A library thread that dies of an exception (a crash, not a refusal) fails the test.
pytestmark = pytest.mark.filterwarnings(
    "error::pytest.PytestUnhandledThreadExceptionWarning")

HERE = Path(__file__).resolve().parent
CHILD = HERE / "replication_child.py"

PS = 4096
N_PAGES = 64           # in-process stores: 256 KiB
SIZE = PS * N_PAGES
MP_PAGES = 256         # multi-process stores: 1 MiB
MP_SIZE = PS * MP_PAGES
LOCAL = "127.0.0.1"


# ---- helpers ----------------------------------------------------------------------------
def page_sums(store: sc.Store) -> List[int]:
    data = store.read(0, store.size)
    ps = store.page_size
    return [sc.page_checksum(data[i * ps:(i + 1) * ps]) for i in range(store.n_pages)]


def assert_same_pages(expected: List[int], got: List[int], what: str = "") -> None:
    assert len(expected) == len(got), f"{what}: {len(got)} pages, expected {len(expected)}"
    bad = [i for i, (a, b) in enumerate(zip(expected, got)) if a != b]
    assert not bad, f"{what}: {len(bad)} pages differ from the primary, first {bad[:10]}"


def wait_until(pred, timeout: float = 10.0, interval: float = 0.01, what: str = "condition"):
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def random_writes(store: sc.Store, rng: np.random.Generator, pages: int, small: int = 8) -> None:
    ps = store.page_size
    if pages:
        ids = np.sort(rng.choice(store.n_pages, size=min(pages, store.n_pages), replace=False))
        store.write_pages(ids, rng.integers(0, 256, len(ids) * ps, dtype=np.uint8))
    for _ in range(small):
        n = int(rng.integers(1, 97))
        off = int(rng.integers(0, store.size - n))
        store.write(off, rng.integers(0, 256, n, dtype=np.uint8).tobytes())


def converge(follower: sc.Follower, primary_store: sc.Store, epoch: int,
             timeout: float = 10.0) -> None:
    """The follower reaches exactly `epoch` and holds the primary's bytes (the primary
    has not been written since the commit that closed `epoch`)."""
    follower.wait_for(epoch, timeout=timeout)
    assert follower.epoch == epoch
    assert_same_pages(page_sums(primary_store), page_sums(follower.store), "follower")


def session_of(primary: sc.Primary, port: int) -> Optional[Dict[str, Any]]:
    for s in primary.followers:
        if s["address"][1] == port:
            return s
    return None


class Proxy:
    """Forwards connections on 127.0.0.1 to `upstream`. Primary->follower bytes can be
    throttled (`rate`, bytes/s), paused (at once, or by `pause_after` once that many have
    gone through), recorded; drop_all() cuts every connection."""

    def __init__(self, upstream, rate: Optional[float] = None, small_buffers: bool = False,
                 record: bool = False) -> None:
        self.upstream = (upstream[0], int(upstream[1]))
        self.rate = rate
        self.small_buffers = small_buffers or rate is not None
        self.paused = False
        self.pause_after: Optional[int] = None
        self.forwarded = 0  # primary->follower bytes sent on
        self.record = record
        self.captured = bytearray()
        self.accepted = 0
        self._lock = threading.Lock()
        self._socks: List[socket.socket] = []
        self._closed = False
        self._lsock = socket.create_server((LOCAL, 0))
        self.address = self._lsock.getsockname()[:2]
        threading.Thread(target=self._accept, daemon=True, name="test-proxy").start()

    def _accept(self) -> None:
        for _ in range(10_000):
            try:
                down, _ = self._lsock.accept()
            except OSError:
                return
            up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            if self.small_buffers:
                up.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
                down.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 10)
            try:
                up.connect(self.upstream)
            except OSError:
                down.close()
                up.close()
                continue
            with self._lock:
                self._socks += [down, up]
                self.accepted += 1
            threading.Thread(target=self._pump, args=(down, up, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        deadline = time.monotonic() + 120
        try:
            while not self._closed and time.monotonic() < deadline:
                rate = self.rate if downstream else None
                data = src.recv(4096 if rate else 1 << 16)
                if not data:
                    break
                if downstream and self.pause_after is not None \
                        and self.forwarded + len(data) > self.pause_after:
                    self.paused = True  # in this thread: nothing more gets through first
                while downstream and self.paused and time.monotonic() < deadline:
                    time.sleep(0.01)  # hold what arrived until resumed
                if self.record:
                    with self._lock:
                        self.captured += data
                dst.sendall(data)
                if downstream:
                    self.forwarded += len(data)
                if rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def drop_all(self) -> None:
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._closed = True
        self._lsock.close()
        self.drop_all()


@pytest.fixture
def cleanup():
    """Closes what a test registers (followers, primaries, stores, proxies), last first,
    even when the test fails."""
    items: List[Any] = []
    yield items.append
    for obj in reversed(items):
        try:
            obj.close()
        except Exception:
            pass


def make_cert(tmp_path: Path):
    """A self-signed certificate for 127.0.0.1: with the cryptography package when it is
    installed, else with the openssl CLI. Neither available is a failure, not a skip."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    try:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        openssl = shutil.which("openssl")
        if openssl is None:
            pytest.fail("TLS test needs a certificate: neither the cryptography package nor "
                        "the openssl CLI is available")
        subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                        "-keyout", str(key), "-out", str(cert), "-days", "1",
                        "-subj", "/CN=statecore-test",
                        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                       check=True, capture_output=True, timeout=60)
        return cert, key
    pk = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "statecore-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    crt = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
           .public_key(pk.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(now - datetime.timedelta(hours=1))
           .not_valid_after(now + datetime.timedelta(days=1))
           .add_extension(x509.SubjectAlternativeName(
               [x509.IPAddress(ipaddress.ip_address(LOCAL)), x509.DNSName("localhost")]),
               critical=False)
           .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
           .sign(pk, hashes.SHA256()))
    cert.write_bytes(crt.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(pk.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return cert, key


# ---- in-process: API surface --------------------------------------------------------------
def test_primary_binds_loopback_by_default(cleanup):
    assert inspect.signature(sc.Primary).parameters["host"].default == LOCAL
    store = sc.Store(size=SIZE)
    cleanup(store)
    primary = sc.Primary(store)
    cleanup(primary)
    assert primary.address[0] == LOCAL
    assert primary._sock.getsockname()[0] == LOCAL
    assert primary.address[1] > 0


def test_plain_store_primary_streams_what_publish_closes(cleanup):
    rng = np.random.default_rng(1)
    store = sc.Store(size=SIZE)
    cleanup(store)
    random_writes(store, rng, N_PAGES)
    primary = sc.Primary(store)  # publishes the state it was created with
    cleanup(primary)
    replica = sc.Store(size=SIZE)
    cleanup(replica)
    follower = sc.Follower(replica, primary.address)
    cleanup(follower)
    converge(follower, store, primary.epoch)

    last = primary.epoch
    for step in range(5):
        random_writes(store, rng, int(rng.integers(0, 12)))
        epoch = primary.publish()
        assert epoch > last and primary.epoch == epoch
        last = epoch
        converge(follower, store, epoch)

    # Writes that were not published do not flow.
    store.write(0, b"\xab" * 100)
    time.sleep(0.3)
    assert follower.epoch == last and replica.read(0, 100) != b"\xab" * 100
    epoch = primary.publish()
    converge(follower, store, epoch)
    assert follower.status()["connects"] == 1


def test_a_caught_up_follower_spares_the_primarys_writers_their_copies(cleanup):
    """The published snapshot is read only for pages changed since the followers' epoch,
    so rewriting pages older than that copies none of them."""
    store = sc.Store(size=SIZE)
    cleanup(store)
    store.write(0, b"\x01" * SIZE)
    primary = sc.Primary(store)
    cleanup(primary)
    follower = fresh_follower(cleanup, primary.address)
    converge(follower, store, primary.epoch)
    converge(follower, store, primary.publish())  # published while the follower is caught up
    before = store.stats()["pages_preserved_total"]
    store.write(0, b"\x02" * SIZE)  # every page: all older than the follower's epoch
    assert store.stats()["pages_preserved_total"] == before
    converge(follower, store, primary.publish())


def test_a_checkpoint_published_to_a_primary_keeps_every_page(cleanup, tmp_path):
    """checkpoint() hands its snapshot to the primary and saves it in the background: the
    primary must not floor a snapshot it is not the only reader of."""
    ds = sc.DurableStore(tmp_path / "p", size=SIZE)
    cleanup(ds)
    ds.write(0, b"\x01" * SIZE)
    ds.commit()
    primary = sc.Primary(ds)
    cleanup(primary)
    follower = fresh_follower(cleanup, primary.address)
    follower.wait_for(ds.committed_epoch, timeout=10)
    gate = threading.Event()
    ds._checkpointer.submit(gate.wait)  # the save starts only after the writes below
    fut = ds.checkpoint()
    ds.write(0, b"\x02" * SIZE)
    gate.set()
    epoch = fut.result(timeout=30)
    from statecore.manifest import checkpoint_name
    restored = sc.Store.load(tmp_path / "p" / checkpoint_name(epoch))
    cleanup(restored)
    assert restored.read(0, SIZE) == b"\x01" * SIZE


def fresh_follower(cleanup, address) -> sc.Follower:
    """A follower on a new in-memory store; cleanup closes the follower, then the store."""
    store = sc.Store(size=SIZE)
    cleanup(store)
    follower = sc.Follower(store, address)
    cleanup(follower)
    return follower


def floored_primary(cleanup, seed: int):
    """A plain-Store primary whose last publication was made while one follower was
    caught up (so it is floored at that follower's epoch): (store, primary, follower)."""
    rng = np.random.default_rng(seed)
    store = sc.Store(size=SIZE)
    cleanup(store)
    random_writes(store, rng, N_PAGES)
    primary = sc.Primary(store)
    cleanup(primary)
    first = fresh_follower(cleanup, primary.address)
    converge(first, store, primary.epoch)
    random_writes(store, rng, 8)
    converge(first, store, primary.publish())
    return store, primary, first


def test_a_follower_joining_an_idle_primary_is_served_from_the_floored_publication(cleanup):
    store, primary, _ = floored_primary(cleanup, 11)
    # Nothing written since: the floor can come down to 0 for a full sync at once.
    late = fresh_follower(cleanup, primary.address)
    converge(late, store, primary.epoch)


def test_a_follower_the_floored_publication_cannot_serve_takes_the_next(cleanup):
    store, primary, first = floored_primary(cleanup, 12)
    store.write(0, b"\x5a" * SIZE)  # old pages rewritten: their copies were skipped
    late = fresh_follower(cleanup, primary.address)
    # The last publication cannot serve it (old pages are gone), and it is given nothing
    # else: never a mix of epochs.
    wait_until(lambda: any(s["state"] != "handshake" and s["sent_epoch"] == 0
                           for s in primary.followers), what="the late follower's session")
    time.sleep(0.3)
    assert late.epoch == 0
    converge(late, store, primary.publish())
    converge(first, store, primary.epoch)


def test_durable_primary_two_followers_byte_identical_at_each_commit(cleanup, tmp_path):
    rng = np.random.default_rng(2)
    ds = sc.DurableStore(tmp_path / "primary", size=SIZE)
    cleanup(ds)
    primary = sc.Primary(ds, secret=b"k")
    cleanup(primary)
    mem = sc.Store(size=SIZE)
    cleanup(mem)
    durable = sc.DurableStore(tmp_path / "replica", size=SIZE)
    cleanup(durable)
    followers = [sc.Follower(mem, primary.address, secret="k"),
                 sc.Follower(durable, primary.address, secret=b"k")]
    for f in followers:
        cleanup(f)
    for step in range(12):
        random_writes(ds, rng, N_PAGES if step == 0 else int(rng.integers(0, 20)),
                      small=int(rng.integers(0, 20)))
        epoch = ds.commit()
        for f in followers:
            converge(f, ds, epoch)
    assert durable.replica_epoch == epoch
    assert mem.uuid == durable.uuid == ds.uuid


def test_followers_report_acked_epoch_and_lag(cleanup, tmp_path):
    rng = np.random.default_rng(3)
    ds = sc.DurableStore(tmp_path / "primary", size=SIZE)
    cleanup(ds)
    primary = sc.Primary(ds)
    cleanup(primary)
    proxy = Proxy(primary.address)
    cleanup(proxy)
    follower = sc.Follower(sc.Store(size=SIZE), proxy.address)
    cleanup(follower)
    cleanup(follower.store)
    random_writes(ds, rng, N_PAGES)
    e0 = ds.commit()
    converge(follower, ds, e0)

    def entry():
        live = [s for s in primary.followers if s["state"] == "streaming"]
        assert len(live) == 1, primary.followers
        return live[0]

    s = wait_until(lambda: entry() if entry()["acked_epoch"] == e0 else None,
                   what="the ack of the first commit")
    assert s["lag_epochs"] == 0 and s["lag_bytes"] == 0 and s["sent_epoch"] == e0
    assert s["bytes_sent"] >= SIZE and s["error"] is None
    assert s["address"][0] == LOCAL

    proxy.paused = True  # the follower stops hearing from the primary
    random_writes(ds, rng, 4)
    e1 = ds.commit()
    random_writes(ds, rng, 4)
    e2 = ds.commit()
    s = wait_until(lambda: entry() if entry()["sent_epoch"] == e2 else None,
                   what="the sender to send up to the last commit")
    assert s["acked_epoch"] == e0
    assert s["lag_epochs"] == e2 - e0 >= 2
    assert s["lag_bytes"] > 0
    assert follower.epoch == e0

    proxy.paused = False
    converge(follower, ds, e2)
    s = wait_until(lambda: entry() if entry()["acked_epoch"] == e2 else None,
                   what="the ack after resuming")
    assert s["lag_epochs"] == 0 and s["lag_bytes"] == 0
    assert e1 < e2

    # Once a commit is acknowledged, nothing is reported in flight (the ACK may race
    # with the sender's own bookkeeping: repeat to give that race its chances).
    for i in range(25):
        random_writes(ds, rng, int(rng.integers(1, 8)), small=0)
        e = ds.commit()
        follower.wait_for(e, timeout=10)
        s = wait_until(lambda: entry() if entry()["acked_epoch"] == e else None,
                       what=f"the ack of commit {i}")
        assert (s["lag_epochs"], s["lag_bytes"]) == (0, 0), (i, s)


def test_wait_for_timeout_raises_timeout_error(cleanup):
    store = sc.Store(size=SIZE)
    cleanup(store)
    primary = sc.Primary(store)
    cleanup(primary)
    follower = sc.Follower(sc.Store(size=SIZE), primary.address)
    cleanup(follower)
    cleanup(follower.store)
    converge(follower, store, primary.epoch)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=str(primary.epoch + 5)):
        follower.wait_for(primary.epoch + 5, timeout=0.3)
    assert 0.25 <= time.monotonic() - t0 < 3
    with pytest.raises(TimeoutError):
        follower.wait_for(primary.epoch + 1, timeout=0)
    assert follower.wait_for(primary.epoch, timeout=0) is True  # reached: no wait


def test_durable_follower_resumes_from_its_replica_epoch_without_full_sync(cleanup, tmp_path):
    rng = np.random.default_rng(4)
    ds = sc.DurableStore(tmp_path / "primary", size=SIZE)
    cleanup(ds)
    random_writes(ds, rng, N_PAGES)  # every page holds data: a full sync carries them all
    primary = sc.Primary(ds)
    cleanup(primary)
    rdir = tmp_path / "replica"
    replica = sc.DurableStore(rdir, size=SIZE)
    follower = sc.Follower(replica, primary.address)
    for _ in range(3):
        random_writes(ds, rng, 6)
        e = ds.commit()
        converge(follower, ds, e)
    assert follower.status()["bytes_received"] >= SIZE  # the first sync was a full one
    follower.close()
    replica.close()

    ds.write_pages([1, 2, 3], rng.integers(0, 256, 3 * PS, dtype=np.uint8))
    ds.commit()
    ds.write_pages([3, 40], rng.integers(0, 256, 2 * PS, dtype=np.uint8))
    e_last = ds.commit()

    replica = sc.DurableStore(rdir, size=SIZE)
    cleanup(replica)
    assert replica.replica_epoch == e
    assert replica.recovery.replica_epoch == e
    follower = sc.Follower(replica, primary.address)
    cleanup(follower)
    assert follower.epoch == e  # it starts from what its journal holds
    converge(follower, ds, e_last)
    st = follower.status()
    assert st["deltas_applied"] == 1, st  # one coalesced delta: pages 1, 2, 3, 40
    assert st["bytes_received"] < 5 * PS + 2048, st
    sessions = [s for s in primary.followers if s["state"] == "streaming"]
    assert len(sessions) == 1 and sessions[0]["bytes_sent"] < 5 * PS + 2048, sessions
    assert replica.replica_epoch == e_last


def test_follower_restored_from_the_primarys_checkpoint_resumes_from_it(cleanup, tmp_path):
    rng = np.random.default_rng(5)
    store = sc.Store(size=SIZE)
    cleanup(store)
    random_writes(store, rng, N_PAGES)
    with store.snapshot() as snap:
        snap.save(tmp_path / "ckpt")
        base = snap.epoch
    primary = sc.Primary(store)
    cleanup(primary)
    restored = sc.Store.load(tmp_path / "ckpt")
    cleanup(restored)
    follower = sc.Follower(restored, primary.address)
    cleanup(follower)
    assert follower.epoch == base
    store.write_pages([7], rng.integers(0, 256, PS, dtype=np.uint8))
    epoch = primary.publish()
    converge(follower, store, epoch)
    assert follower.status()["bytes_received"] < 2 * PS + 2048


def test_tls_follower_converges_and_the_wire_is_encrypted(cleanup, tmp_path):
    cert, key = make_cert(tmp_path)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    assert client.check_hostname and client.verify_mode == ssl.CERT_REQUIRED

    store = sc.Store(size=SIZE)
    cleanup(store)
    marker = b"PLAINTEXT-MARKER-" * 200
    store.write(PS, marker)
    primary = sc.Primary(store, secret="tls-secret", ssl=server)
    cleanup(primary)
    proxy = Proxy(primary.address, record=True)
    cleanup(proxy)
    follower = sc.Follower(sc.Store(size=SIZE), proxy.address, secret="tls-secret",
                           ssl=client, server_hostname=LOCAL)
    cleanup(follower)
    cleanup(follower.store)
    converge(follower, store, primary.epoch)
    store.write(3 * PS, marker)
    converge(follower, store, primary.publish())
    with proxy._lock:
        wire_bytes = bytes(proxy.captured)
    assert len(wire_bytes) > 2 * len(marker)  # both pages crossed, encrypted
    assert sc.wire.MAGIC not in wire_bytes and marker[:32] not in wire_bytes

    # A plaintext follower, and one that does not trust the certificate, are refused;
    # the TLS follower keeps being served.
    plain = sc.Follower(sc.Store(size=SIZE), primary.address, secret="tls-secret",
                        reconnect=False)
    cleanup(plain)
    cleanup(plain.store)
    with pytest.raises((sc.ProtocolError, ConnectionError, ssl.SSLError)):
        plain.wait_for(primary.epoch, timeout=10)
    assert plain.epoch == 0
    untrusting = sc.Follower(sc.Store(size=SIZE), primary.address, secret="tls-secret",
                             ssl=ssl.create_default_context(), reconnect=False)
    cleanup(untrusting)
    cleanup(untrusting.store)
    with pytest.raises(ssl.SSLCertVerificationError):
        untrusting.wait_for(primary.epoch, timeout=10)
    assert untrusting.status()["state"] == "failed"
    store.write(5 * PS, b"after the refusals")
    converge(follower, store, primary.publish())
    assert follower.status()["connects"] == 1


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_idle_clients_are_dropped_after_the_handshake_timeout(cleanup, tmp_path, monkeypatch,
                                                              tls):
    """A client that connects and says nothing (not even a TLS hello) holds a session
    only until the handshake timeout; followers are served meanwhile."""
    from statecore import replication
    monkeypatch.setattr(replication, "HANDSHAKE_TIMEOUT", 0.5)
    server = client = None
    if tls:
        cert, key = make_cert(tmp_path)
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(cert, key)
        client = ssl.create_default_context(cafile=str(cert))
    store = sc.Store(size=SIZE)
    cleanup(store)
    primary = sc.Primary(store, ssl=server)
    cleanup(primary)
    idle = [socket.create_connection(primary.address, timeout=5) for _ in range(3)]
    for s in idle:
        cleanup(s)
    follower = sc.Follower(sc.Store(size=SIZE), primary.address, ssl=client)
    cleanup(follower)
    cleanup(follower.store)
    store.write(0, b"served while idle clients wait")
    converge(follower, store, primary.publish())
    t0 = time.monotonic()
    for s in idle:
        try:
            assert s.recv(100) == b""  # closed by the primary (socket timeout: 5 s)
        except ConnectionResetError:
            pass
    assert time.monotonic() - t0 < 4
    port = idle[0].getsockname()[1]
    st = wait_until(lambda: session_of(primary, port), what="the idle session")
    assert st["state"] == "closed" and "timed out" in (st["error"] or ""), st


# ---- in-process: refusals -------------------------------------------------------------------
def _other_store() -> sc.Store:
    s = sc.Store(size=SIZE)
    s.write(0, b"another lineage")
    s.snapshot().release()
    return s


REFUSALS = {
    "wrong secret": (lambda: sc.Store(size=SIZE), "wrong", sc.AuthenticationError,
                     "authentication failed", "failed authentication"),
    "no secret": (lambda: sc.Store(size=SIZE), None, sc.AuthenticationError,
                  "requires a secret", "closed"),
    "another store": (_other_store, "right", sc.PeerError, "another store",
                      "another store"),
    "other geometry": (lambda: sc.Store(size=2 * SIZE), "right", sc.PeerError,
                       "geometry differs", "geometry differs"),
    "other page size": (lambda: sc.Store(size=SIZE, page_size=1024), "right", sc.PeerError,
                        "geometry differs", "geometry differs"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_follower_gets_a_clear_error_and_the_primary_keeps_serving(cleanup, tmp_path,
                                                                         case):
    make_store, secret, exc, follower_msg, primary_msg = REFUSALS[case]
    rng = np.random.default_rng(6)
    ds = sc.DurableStore(tmp_path / "primary", size=SIZE)
    cleanup(ds)
    random_writes(ds, rng, N_PAGES)
    primary = sc.Primary(ds, secret="right")
    cleanup(primary)
    good = sc.Follower(sc.Store(size=SIZE), primary.address, secret="right")
    cleanup(good)
    cleanup(good.store)
    converge(good, ds, primary.epoch)

    bad_store = make_store()
    cleanup(bad_store)
    before = page_sums(bad_store)
    bad = sc.Follower(bad_store, primary.address, secret=secret)
    cleanup(bad)
    with pytest.raises(exc, match=follower_msg):  # not TimeoutError: refused, and says why
        bad.wait_for(primary.epoch + 1, timeout=10)
    st = bad.status()
    assert st["state"] == "failed" and follower_msg in st["error"]
    assert page_sums(bad_store) == before  # nothing was applied
    time.sleep(0.2)
    assert bad.status()["connects"] == 1  # a refusal is not retried

    refused = wait_until(lambda: [s for s in primary.followers if s["state"] == "closed"],
                         what="the refused session to close")
    if primary_msg != "closed":
        assert any(primary_msg in (s["error"] or "") for s in refused), refused

    # The primary keeps serving the follower it had and a new one.
    random_writes(ds, rng, 5)
    epoch = ds.commit()
    converge(good, ds, epoch)
    assert good.status()["connects"] == 1
    late = sc.Follower(sc.Store(size=SIZE), primary.address, secret="right")
    cleanup(late)
    cleanup(late.store)
    converge(late, ds, epoch)


def test_follower_with_a_secret_refuses_a_primary_without_one(cleanup):
    store = sc.Store(size=SIZE)
    cleanup(store)
    store.write(0, b"x" * 100)
    primary = sc.Primary(store)
    cleanup(primary)
    f = sc.Follower(sc.Store(size=SIZE), primary.address, secret="mine")
    cleanup(f)
    cleanup(f.store)
    with pytest.raises(sc.AuthenticationError, match="failed to prove"):
        f.wait_for(primary.epoch, timeout=10)
    assert f.epoch == 0 and f.store.read(0, 100) == bytes(100)


def test_follower_ahead_of_the_primary_is_refused(cleanup, tmp_path):
    """Two stores restored from one checkpoint share an identity; the one that moved on
    further cannot follow the other (it holds a different history)."""
    store = sc.Store(size=SIZE)
    cleanup(store)
    store.write(0, b"shared")
    with store.snapshot() as snap:
        snap.save(tmp_path / "ckpt")
    a = sc.Store.load(tmp_path / "ckpt")
    cleanup(a)
    b = sc.Store.load(tmp_path / "ckpt")
    cleanup(b)
    for i in range(5):
        b.write(i, b"diverged")
        b.snapshot().release()
    primary = sc.Primary(a)
    cleanup(primary)
    f = sc.Follower(b, primary.address)
    cleanup(f)
    with pytest.raises(sc.PeerError, match="ahead of the primary"):
        f.wait_for(primary.epoch + 10, timeout=10)


# ---- large deltas in parts ------------------------------------------------------------------
@pytest.fixture
def part_pages(monkeypatch):
    """Parts of 4 pages (followers ask for that, primaries send at most that), so the
    256 KiB stores of these tests move in many parts."""
    from statecore import transfer
    monkeypatch.setattr(transfer, "PART_BYTES", 4 * PS)
    return 4


def sums_of(store: sc.Store, pages) -> List[int]:
    return [sc.page_checksum(store.read(p * PS, PS)) for p in pages]


def test_full_sync_in_parts_is_one_delta_and_byte_identical(cleanup, part_pages):
    rng = np.random.default_rng(20)
    store = sc.Store(size=SIZE)
    cleanup(store)
    random_writes(store, rng, N_PAGES)  # every page: delta(0, E) carries all 64
    primary = sc.Primary(store)
    cleanup(primary)
    replica = sc.Store(size=SIZE)
    cleanup(replica)
    follower = sc.Follower(replica, primary.address)
    cleanup(follower)
    converge(follower, store, primary.epoch)
    st = follower.status()
    assert st["parts_received"] == N_PAGES // part_pages and st["deltas_applied"] == 1, st
    assert st["bytes_received"] >= SIZE
    assert replica.uuid == store.uuid
    # A large change goes in parts, a small one as one DELTA frame.
    random_writes(store, rng, 4 * part_pages + 1, small=0)
    converge(follower, store, primary.publish())
    st2 = follower.status()
    assert st2["parts_received"] - st["parts_received"] == 5 and st2["deltas_applied"] == 2
    random_writes(store, rng, 2, small=0)
    converge(follower, store, primary.publish())
    st3 = follower.status()
    assert st3["parts_received"] == st2["parts_received"] and st3["deltas_applied"] == 3
    from statecore.replication import _resume_epoch
    assert _resume_epoch(replica) == follower.epoch


def test_writes_published_during_a_sync_in_parts_follow_it(cleanup, part_pages):
    rng = np.random.default_rng(21)
    store = sc.Store(size=SIZE)
    cleanup(store)
    random_writes(store, rng, N_PAGES)
    primary = sc.Primary(store)
    cleanup(primary)
    proxy = Proxy(primary.address, rate=400_000)  # the sync takes about 0.7 s
    cleanup(proxy)
    follower = sc.Follower(sc.Store(size=SIZE), proxy.address)
    cleanup(follower)
    cleanup(follower.store)
    wait_until(lambda: follower.parts_received >= 2, what="the sync to start")
    for _ in range(3):  # rewrites pages the sync is sending, and publishes meanwhile
        random_writes(store, rng, 10)
        last = primary.publish()
    converge(follower, store, last, timeout=20)
    assert follower.status()["connects"] == 1


def test_a_sync_cut_in_the_middle_of_parts_says_nothing_and_resumes(cleanup, part_pages):
    """The connection drops while a full sync is half applied: the follower's epoch stays
    0 (wait_for does not return), the store remembers to resume from 0 although its own
    epoch moved with the parts applied, and the follower reconnects and ends identical."""
    from statecore.replication import _resume_epoch
    rng = np.random.default_rng(22)
    store = sc.Store(size=SIZE)
    cleanup(store)
    random_writes(store, rng, N_PAGES)
    primary = sc.Primary(store)
    cleanup(primary)
    proxy = Proxy(primary.address, rate=100_000)  # about 2.6 s for the whole sync
    cleanup(proxy)
    replica = sc.Store(size=SIZE)
    cleanup(replica)
    follower = sc.Follower(replica, proxy.address)
    cleanup(follower)
    wait_until(lambda: follower.parts_received >= 3, what="some parts to arrive")
    assert follower.epoch == 0
    with pytest.raises(TimeoutError):
        follower.wait_for(primary.epoch, timeout=0)
    wait_until(lambda: replica.epoch > 1, what="a part to be applied")
    assert sums_of(replica, range(4)) == sums_of(store, range(4))  # the first part is in
    assert _resume_epoch(replica) == 0
    proxy.rate = None
    proxy.drop_all()
    converge(follower, store, primary.epoch, timeout=20)
    assert follower.status()["connects"] >= 2
    assert _resume_epoch(replica) == follower.epoch == primary.epoch


def test_a_new_follower_on_a_half_synced_store_starts_over_from_zero(cleanup, part_pages):
    from statecore.replication import _resume_epoch
    rng = np.random.default_rng(23)
    store = sc.Store(size=SIZE)
    cleanup(store)
    random_writes(store, rng, N_PAGES)
    primary = sc.Primary(store)
    cleanup(primary)
    proxy = Proxy(primary.address, rate=100_000)
    cleanup(proxy)
    replica = sc.Store(size=SIZE)
    cleanup(replica)
    first = sc.Follower(replica, proxy.address)
    wait_until(lambda: replica.epoch > 1, what="a part to be applied")
    first.close()
    assert first.epoch == 0 and _resume_epoch(replica) == 0
    assert replica.epoch > primary.epoch  # the store's own counter is no guide
    second = sc.Follower(replica, primary.address)
    cleanup(second)
    assert second.epoch == 0
    converge(second, store, primary.epoch)


def test_a_large_commit_goes_in_parts_cut_from_its_own_buffer(cleanup, tmp_path, part_pages):
    """A caught-up follower gets a commit's own delta; when it is large, in parts whose
    pages are views of that delta's buffer (new headers and indexes, the same checksums)."""
    rng = np.random.default_rng(25)
    ds = sc.DurableStore(tmp_path / "primary", size=SIZE)
    cleanup(ds)
    primary = sc.Primary(ds)
    cleanup(primary)
    replica = sc.Store(size=SIZE)
    cleanup(replica)
    follower = sc.Follower(replica, primary.address)
    cleanup(follower)
    converge(follower, ds, primary.epoch)
    for pages in (N_PAGES, 4 * part_pages + 3, part_pages, 1):
        before = follower.status()
        ids = np.sort(rng.choice(N_PAGES, size=pages, replace=False))
        ds.write_pages(ids, rng.integers(0, 256, pages * PS, dtype=np.uint8))
        e = ds.commit()
        converge(follower, ds, e)
        st = follower.status()
        want = -(-pages // part_pages) if pages > part_pages else 0
        assert st["parts_received"] - before["parts_received"] == want, (pages, st)
        assert st["deltas_applied"] - before["deltas_applied"] == 1


def test_parts_cross_tls(cleanup, tmp_path, part_pages):
    cert, key = make_cert(tmp_path)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    rng = np.random.default_rng(26)
    ds = sc.DurableStore(tmp_path / "primary", size=SIZE)
    cleanup(ds)
    random_writes(ds, rng, N_PAGES)
    ds.commit()
    primary = sc.Primary(ds, ssl=server)  # a full sync built in parts
    cleanup(primary)
    follower = sc.Follower(sc.Store(size=SIZE), primary.address, ssl=client,
                           server_hostname=LOCAL)
    cleanup(follower)
    cleanup(follower.store)
    converge(follower, ds, primary.epoch)
    random_writes(ds, rng, 3 * part_pages)
    converge(follower, ds, ds.commit())  # a commit's delta cut in parts
    assert follower.status()["parts_received"] >= N_PAGES // part_pages + 3


def test_a_durable_follower_takes_large_deltas_whole(cleanup, tmp_path, part_pages):
    """A DurableStore journals each delta it applies as one record, so it does not ask
    for parts; a follower in memory on the same primary gets them."""
    rng = np.random.default_rng(24)
    ds = sc.DurableStore(tmp_path / "primary", size=SIZE)
    cleanup(ds)
    random_writes(ds, rng, N_PAGES)
    ds.commit()
    random_writes(ds, rng, 3)
    # The published commit is a delta from the last one, not from 0: a fresh follower's
    # full sync is built for it (and moves in parts where the follower takes them).
    primary = sc.Primary(ds)
    cleanup(primary)
    durable = sc.DurableStore(tmp_path / "replica", size=SIZE)
    cleanup(durable)
    mem = sc.Store(size=SIZE)
    cleanup(mem)
    followers = [sc.Follower(durable, primary.address), sc.Follower(mem, primary.address)]
    for f in followers:
        cleanup(f)
    for _ in range(2):
        random_writes(ds, rng, 20)
        e = ds.commit()
        for f in followers:
            converge(f, ds, e)
    assert followers[0].status()["parts_received"] == 0
    assert followers[1].status()["parts_received"] >= N_PAGES // part_pages
    assert durable.replica_epoch == e


# ---- separate processes ---------------------------------------------------------------------
class Child:
    """A replication_child.py process: JSON requests on stdin, one JSON reply per line."""

    def __init__(self, tmp_path: Path, name: str, *args: str) -> None:
        self.name = name
        self.log_path = tmp_path / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, str(CHILD), *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, cwd=str(HERE))
        self._lines: "queue.Queue[Optional[bytes]]" = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._hello: Optional[Dict[str, Any]] = None

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    @property
    def hello(self) -> Dict[str, Any]:
        if self._hello is None:
            self._hello = self.recv(timeout=60)
            assert self._hello.get("ready"), self._hello
        return self._hello

    def send(self, op: str, **kw: Any) -> None:
        self.proc.stdin.write((json.dumps({"op": op, **kw}) + "\n").encode())
        self.proc.stdin.flush()

    def recv(self, timeout: float = 30) -> Dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.name}: no reply in {timeout}s\n{self.log_tail()}")
        if line is None:
            raise AssertionError(f"{self.name} exited ({self.proc.poll()})\n{self.log_tail()}")
        msg = json.loads(line)
        assert "error" not in msg or "ok" in msg, f"{self.name}: {msg}\n{self.log_tail()}"
        return msg

    def call(self, op: str, rpc_timeout: float = 30, **kw: Any) -> Dict[str, Any]:
        self.hello
        self.send(op, **kw)
        return self.recv(rpc_timeout + kw.get("timeout", 0))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def quit(self) -> None:
        assert self.call("quit").get("ok")
        self.proc.wait(timeout=15)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._log.close()


def address_of(primary: Child) -> str:
    host, port = primary.hello["address"]
    assert host == LOCAL
    return f"{host}:{port}"


@pytest.fixture
def spawn(tmp_path, cleanup):
    def start(name: str, role: str, *args: str) -> Child:
        c = Child(tmp_path, name, role, "--size", str(MP_SIZE), "--page-size", str(PS), *args)
        cleanup(c)
        return c
    return start


def primary_proc(spawn, tmp_path, name="primary", *extra: str) -> Child:
    return spawn(name, "primary", "--dir", str(tmp_path / "primary-dir"), *extra)


def follower_proc(spawn, name: str, address: str, *extra: str) -> Child:
    return spawn(name, "follower", "--address", address, *extra)


def converged(follower: Child, reply: Dict[str, Any], timeout: float = 20) -> Dict[str, Any]:
    """The follower process reaches exactly the primary's epoch and holds its bytes."""
    w = follower.call("wait", epoch=reply["epoch"], timeout=timeout)
    assert w["ok"], f"{follower.name}: {w}\n{follower.log_tail()}"
    assert w["epoch"] == reply["epoch"], w["status"]
    assert_same_pages(reply["sums"], w["sums"], follower.name)
    return w


@pytest.mark.parametrize("part_bytes", [None, 2 * PS])
def test_processes_converge_byte_identical_at_each_awaited_epoch(spawn, tmp_path, part_bytes):
    parts = () if part_bytes is None else ("--part-bytes", str(part_bytes))
    p = primary_proc(spawn, tmp_path, "primary", *parts)
    addr = address_of(p)
    followers = [follower_proc(spawn, "mem", addr, *parts),
                 follower_proc(spawn, "durable", addr, "--dir", str(tmp_path / "fdir"),
                               *parts)]
    rng = np.random.default_rng(10)
    for step in range(10):
        pages = MP_PAGES if step == 0 else (0 if step == 4 else int(rng.integers(1, 40)))
        r = p.call("step", seed=step, pages=pages, small=0 if step == 4 else 16)
        for f in followers:
            converged(f, r)
    # Free-running load: commits do not wait for anyone; then both reach the last one.
    r = p.call("load", seed=99, commits=40, pages=12, small=8, rpc_timeout=60)
    for f in followers:
        w = converged(f, r)
        assert w["status"]["deltas_applied"] <= 10 + 40
    assert followers[1].call("status")["status"]["replica_epoch"] == r["epoch"]
    fl = p.call("followers")["followers"]
    assert len(fl) == 2 and all(s["state"] == "streaming" for s in fl), fl
    parts = [f.call("status")["status"]["parts_received"] for f in followers]
    assert parts[1] == 0  # a durable follower takes deltas whole
    assert (parts[0] >= MP_PAGES // 2) == (part_bytes is not None), parts


def test_follower_process_killed_mid_stream_resumes_from_its_journal(spawn, tmp_path):
    p = primary_proc(spawn, tmp_path)
    addr = address_of(p)
    fdir = str(tmp_path / "fdir")
    f = follower_proc(spawn, "follower-1", addr, "--dir", fdir)
    r0 = p.call("step", seed=1, pages=MP_PAGES)  # every page holds data
    converged(f, r0)

    # Later commits touch only the first 32 pages: a resume carries at most those.
    p.send("load", seed=2, commits=80, pages=4, small=4, span=32, pause=0.01)
    wait_until(lambda: f.call("status")["epoch"] > r0["epoch"] + 3, timeout=20,
               what="the follower to apply part of the stream")
    f.kill()
    r = p.recv(timeout=60)
    assert r["epoch"] >= r0["epoch"] + 80

    f2 = follower_proc(spawn, "follower-2", addr, "--dir", fdir)
    hello = f2.hello
    assert hello["replica_epoch"] > r0["epoch"], hello
    assert hello["start_epoch"] == hello["replica_epoch"]
    w = converged(f2, r)
    assert w["status"]["bytes_received"] < 32 * PS + 8192, w["status"]  # no full sync
    fl = [s for s in p.call("followers")["followers"] if s["state"] == "streaming"]
    assert len(fl) == 1 and fl[0]["bytes_sent"] < 32 * PS + 8192, fl
    assert fl[0]["acked_epoch"] <= r["epoch"]


def test_dropped_connections_reconnect_and_resume(spawn, tmp_path, cleanup):
    # A plain Store primary in its own process: publish() closes each epoch.
    p = spawn("primary", "primary", "--plain")
    proxy = Proxy(p.hello["address"])
    cleanup(proxy)
    f = follower_proc(spawn, "follower", f"{LOCAL}:{proxy.address[1]}")
    r0 = p.call("step", seed=1, pages=MP_PAGES)
    before = converged(f, r0)["status"]["bytes_received"]
    assert before >= MP_SIZE

    # 40 commits of at most 3 pages each: well under one full sync (256 pages) in all.
    p.send("load", seed=2, commits=40, pages=1, small=1, span=32, pause=0.01)
    wait_until(lambda: f.call("status")["epoch"] > r0["epoch"] + 3, timeout=20,
               what="the follower to apply part of the stream")
    proxy.drop_all()  # mid-stream
    r = p.recv(timeout=60)
    w = converged(f, r)
    assert w["status"]["connects"] >= 2, w["status"]
    assert w["status"]["bytes_received"] - before < MP_SIZE, w["status"]  # no full sync

    before = w["status"]["bytes_received"]
    proxy.drop_all()  # while idle
    r = p.call("step", seed=3, pages=3, small=0)
    w = converged(f, r)
    assert w["status"]["connects"] >= 3
    assert w["status"]["bytes_received"] - before < 3 * PS + 2048, w["status"]
    assert proxy.accepted >= 3


def test_primary_process_restarted_from_its_durable_directory(spawn, tmp_path):
    p1 = primary_proc(spawn, tmp_path, "primary-1")
    addr = address_of(p1)
    port = addr.rsplit(":", 1)[1]
    mem = follower_proc(spawn, "mem", addr)
    dur = follower_proc(spawn, "durable", addr, "--dir", str(tmp_path / "fdir"))
    r = p1.call("step", seed=1, pages=MP_PAGES)
    for f in (mem, dur):
        converged(f, r)
    r = p1.call("step", seed=2, pages=8)
    for f in (mem, dur):
        converged(f, r)
    received = mem.call("status")["status"]["bytes_received"]
    p1.call("write", seed=3, pages=20)  # never committed: lost by the crash
    p1.kill()

    p2 = primary_proc(spawn, tmp_path, "primary-2", "--port", port)
    assert p2.hello["address"] == p1.hello["address"]
    assert p2.hello["uuid"] == p1.hello["uuid"]
    now = p2.call("sums")
    assert now["epoch"] >= r["epoch"]
    assert_same_pages(r["sums"], now["sums"], "restarted primary")
    r2 = p2.call("step", seed=4, pages=6, span=32)
    for f in (mem, dur):
        w = converged(f, r2, timeout=30)
        assert w["status"]["connects"] >= 2, w["status"]
    assert (mem.call("status")["status"]["bytes_received"] - received
            < 32 * PS + 16384), "followers resumed with a full sync after the restart"

    # A clean restart too.
    p2.quit()
    p3 = primary_proc(spawn, tmp_path, "primary-3", "--port", port)
    assert p3.hello["uuid"] == p1.hello["uuid"]
    r3 = p3.call("step", seed=5, pages=6)
    for f in (mem, dur):
        converged(f, r3, timeout=30)


def test_far_behind_follower_catches_up_with_coalesced_deltas(spawn, tmp_path):
    p = primary_proc(spawn, tmp_path)
    addr = address_of(p)
    fdir = str(tmp_path / "fdir")
    f = follower_proc(spawn, "follower-1", addr, "--dir", fdir)
    r0 = p.call("step", seed=1, pages=64)
    converged(f, r0)
    f.quit()
    r = p.call("load", seed=2, commits=120, pages=3, small=2, rpc_timeout=60)
    assert r["epoch"] >= r0["epoch"] + 120

    back = follower_proc(spawn, "follower-2", addr, "--dir", fdir)
    fresh = follower_proc(spawn, "fresh", addr)
    assert back.hello["start_epoch"] == r0["epoch"]
    w = converged(back, r)
    assert w["status"]["deltas_applied"] <= 2, w["status"]  # one coalesced delta
    w = converged(fresh, r)
    assert w["status"]["deltas_applied"] <= 2, w["status"]


def test_slow_follower_blocks_neither_commits_nor_other_followers(spawn, tmp_path, cleanup):
    p = primary_proc(spawn, tmp_path)
    addr = address_of(p)
    proxy = Proxy(p.hello["address"], small_buffers=True)
    cleanup(proxy)
    fast = follower_proc(spawn, "fast", addr)
    slow = follower_proc(spawn, "slow", f"{LOCAL}:{proxy.address[1]}")
    r0 = p.call("step", seed=1, pages=MP_PAGES)
    for f in (fast, slow):
        converged(f, r0)

    # 40 commits of 64 pages: 10 MiB, more than the socket buffers between the primary
    # and a follower hold, so a follower that reads slowly blocks its sender mid-frame.
    load = dict(commits=40, pages=64, small=4)
    base = p.call("load", seed=2, **load)  # baseline: both followers keep up
    for f in (fast, slow):
        applied = converged(f, base)["status"]["deltas_applied"]

    proxy.rate = 200_000  # bytes/s
    t0 = time.monotonic()
    loaded = p.call("load", seed=3, **load)
    took = time.monotonic() - t0
    w = fast.call("wait", epoch=loaded["epoch"], timeout=10)
    assert w["ok"] and w["elapsed"] < 3, w
    assert_same_pages(loaded["sums"], w["sums"], "fast follower")
    behind = [s for s in p.call("followers")["followers"]
              if s["sent_epoch"] < loaded["epoch"]]
    assert len(behind) == 1, f"the throttled follower's sender never blocked: {behind}"
    assert behind[0]["acked_epoch"] < loaded["epoch"] and behind[0]["lag_epochs"] > 0

    b, s = statistics.median(base["durations"]), statistics.median(loaded["durations"])
    assert s < 3 * b + 0.005, (f"commits slowed from {b * 1e3:.2f} ms to {s * 1e3:.2f} ms "
                               "with a throttled follower")
    assert sum(loaded["durations"]) < 3 * sum(base["durations"]) + 0.5
    assert took < 30

    # The slow follower converges (still throttled, less so) and skipped epochs: what
    # piled up while its sender was blocked came as one coalesced delta.
    proxy.rate = 10_000_000
    w = converged(slow, loaded, timeout=30)
    assert w["status"]["deltas_applied"] - applied < 40, w["status"]


def test_process_refusals_leave_the_primary_serving(spawn, tmp_path):
    p = primary_proc(spawn, tmp_path, "primary", "--secret", "right")
    addr = address_of(p)
    good = follower_proc(spawn, "good", addr, "--secret", "right")
    r = p.call("step", seed=1, pages=MP_PAGES)
    converged(good, r)
    wrong = follower_proc(spawn, "wrong", addr, "--secret", "wrong")
    w = wrong.call("wait", epoch=r["epoch"], timeout=10)
    assert not w["ok"] and "AuthenticationError" in w["error"], w
    assert "authentication failed" in w["error"]
    # (Primary.followers forgets closed sessions when the next connection arrives.)
    fl = p.call("followers")["followers"]
    assert any("failed authentication" in (s["error"] or "") for s in fl), fl
    none = follower_proc(spawn, "none", addr)
    w = none.call("wait", epoch=r["epoch"], timeout=10)
    assert not w["ok"] and "requires a secret" in w["error"], w
    r = p.call("step", seed=2, pages=10)
    w = converged(good, r)
    assert w["status"]["connects"] == 1
