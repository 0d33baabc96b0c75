"""Replication: a Primary serves its store's deltas to Followers over sockets.

The primary never queues deltas per follower. It holds one published snapshot (the last
commit, or the last publish() of a plain Store); each follower's sender computes the delta
from what that follower has to the published snapshot when it is ready to send. A slow
follower therefore gets one coalesced delta (union of pages, newest content) when it
catches up, its backlog is bounded by the state size, and it blocks nobody: writers only
swap the published snapshot, and each follower has its own thread.

Handshake (control frames are JSON):
  F->P HELLO {nonce}                      P->F CHALLENGE {nonce, auth}
  F->P AUTH {mac, page_size, size, uuid, epoch, fresh, part_pages}
  P->F WELCOME {mac, uuid, mode: "deltas"|"full", since}   or ERROR {message}
  then P->F DELTA frames (encoded deltas) or, for a large delta to a follower that gave
  part_pages, PART frames (see transfer.py); F->P ACK {epoch}, PING both ways when idle.
With a secret, each side proves that it knows it (HMAC-SHA256 over both nonces and its
role) before any state flows: a peer without it gets nothing and applies nothing. That is
all a secret does. The frames after the handshake carry checksums against corruption, not
MACs, and nothing is encrypted: an attacker on the network path can read the state, and
alter or inject frames (a DELTA of its own) once the handshake has passed. Confidentiality
and integrity against such an attacker need ssl= (TLS); a secret on top of TLS still
decides which peers may replicate.

States: a session (Primary.followers) and a Follower are "syncing" from a WELCOME in
"full" mode until the full sync is sent (primary) or applied (follower), "streaming"
otherwise once connected. A Follower that stops for good is "failed" (its error says why),
one closed by close() is "closed".
"""
from __future__ import annotations

import logging
import os
import socket
import ssl as _ssl
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, NoReturn, Optional, Tuple, Union

import numpy as np

from . import errors, wire
from .delta import Delta
from .snapshot import Snapshot
from .store import Store
from .transfer import (PartApplier, PartBuilder, clear_resume_marker, part_pages_for,
                       resume_marker, split)

log = logging.getLogger("statecore")
# An attribute (True) of the record a Follower logs when it stops for good, for a caller
# that reports the failure itself (the `statecore follow` command) to filter that record
# out instead of showing the failure twice.
FOLLOWER_STOPPED = "statecore_follower_stopped"

PING_INTERVAL = 1.0
HANDSHAKE_TIMEOUT = 10.0

Secret = Union[str, bytes, None]


def _secret_bytes(secret: Secret) -> Optional[bytes]:
    if secret is None:
        return None
    if isinstance(secret, str):
        secret = secret.encode()
    if not isinstance(secret, (bytes, bytearray)) or not secret:
        raise TypeError("secret must be a non-empty str or bytes, or None")
    return bytes(secret)


def _is_fresh(store: Store) -> bool:
    s = store.stats()
    return store.epoch == 1 and s["pages_written"] == 0 and s["pages_applied"] == 0


class _Publication:
    """The snapshot followers are brought to, and the commit delta that led to it.

    Its floor is the oldest epoch a follower was at when it was published: senders read
    only pages changed after that, so writes skip copying older pages for it. A follower
    that needs older pages lowers the floor, which fails once such a copy was skipped; it
    then waits for the next publication, whose floor takes it into account."""

    def __init__(self, snap: Snapshot, delta: Optional[Delta], floor: int) -> None:
        snap._retain()  # owned until replaced; senders hold it while they read it
        self.snap = snap
        self.delta = delta
        self.epoch = snap.epoch
        self.floor = floor
        self._floor_lock = threading.Lock()

    def serves(self, since: int) -> bool:
        """Whether delta(since, epoch] can be read from the snapshot."""
        with self._floor_lock:
            if since >= self.floor:
                return True
            try:
                lowered = self.snap._set_floor(since)
            except errors.SnapshotReleased:
                return False
            if lowered:
                self.floor = since
            return lowered

    def drop(self) -> None:
        self.snap.release()


class Primary:
    """Serves followers in background threads. Deltas are published at each commit of a
    DurableStore, or by publish() for a plain Store."""

    def __init__(self, store: Store, host: str = "127.0.0.1", port: int = 0,
                 secret: Secret = None, ssl: Optional[_ssl.SSLContext] = None) -> None:
        self.store = store
        self._secret = _secret_bytes(secret)
        self._ssl = ssl
        self._cond = threading.Condition()
        self._pub: Optional[_Publication] = None
        self._sessions: List[_Session] = []
        self._closed = False
        self._limit = wire.delta_frame_limit(store.size, store.page_size)
        self._sock = socket.create_server((host, port))
        self.address: Tuple[str, int] = self._sock.getsockname()[:2]
        from .durable import DurableStore
        if isinstance(store, DurableStore):
            store.add_commit_listener(self._on_commit)
            store.commit()  # publishes the committed state
        else:
            self.publish()
        self._acceptor = threading.Thread(target=self._accept_loop, name="statecore-primary",
                                          daemon=True)
        self._acceptor.start()
        log.info("statecore: primary serving %s:%d", *self.address)

    # ---- publication --------------------------------------------------------------------
    def publish(self) -> int:
        """Snapshot a plain Store now and stream it to followers; returns its epoch."""
        if self._closed:
            raise errors.StateError("primary is closed: publish() has no follower to serve")
        with self.store.snapshot() as snap:
            self._publish(snap, None)
        return snap.epoch

    def _on_commit(self, delta: Delta, snap: Snapshot) -> None:
        # A floor is a promise for every reader of the snapshot: none for a checkpoint's
        # (saved in the background) or one another listener may read.
        listeners = getattr(self.store, "_listeners", ())  # a DurableStore's
        sole = getattr(snap, "_listeners_only", False) and len(listeners) == 1
        self._publish(snap, delta, sole_reader=sole)

    def _publish(self, snap: Snapshot, delta: Optional[Delta], sole_reader: bool = True) -> None:
        floor = self._floor_for() if sole_reader else 0
        if floor:
            snap._set_floor(floor)  # raised before any sender can read it
        pub = _Publication(snap, delta, floor)
        old: Optional[_Publication]
        with self._cond:
            if self._closed or (self._pub is not None and pub.epoch <= self._pub.epoch):
                # Closed: nobody would ever release it. Not newer: concurrent commits run
                # their listeners in any order, and followers must never be taken back.
                old = pub
            else:
                old, self._pub = self._pub, pub
                self._cond.notify_all()
        if old is not None:
            old.drop()

    def _floor_for(self) -> int:
        """The oldest epoch a follower will ask for a delta from: the lowest any session has
        been sent (0 during a handshake or a full sync). 0 with no follower connected: the
        next one may need anything, and must not wait for a publish that may never come."""
        with self._cond:
            sessions = [s for s in self._sessions if s.state != "closed"]
        return min((s.sent for s in sessions), default=0)

    @property
    def epoch(self) -> int:
        """The epoch followers are being brought to."""
        pub = self._pub
        return pub.epoch if pub else 0

    @property
    def followers(self) -> List[Dict[str, Any]]:
        """Each follower: address, state, acknowledged epoch, lag in epochs and bytes."""
        return [s.status() for s in list(self._sessions)]

    # ---- serving ----------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, addr = self._sock.accept()
            except OSError:
                return
            session = _Session(self, conn, addr)
            with self._cond:
                self._sessions = [s for s in self._sessions if s.is_alive()] + [session]
            session.start()

    def close(self) -> None:
        """Stop serving and disconnect every follower."""
        with self._cond:  # _publish decides under it: none is installed after this
            if self._closed:
                return
            self._closed = True
        from .durable import DurableStore
        if isinstance(self.store, DurableStore):
            self.store.remove_commit_listener(self._on_commit)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        with self._cond:
            self._cond.notify_all()
            sessions = list(self._sessions)
        for s in sessions:
            s.stop()
        for s in sessions:
            s.join(timeout=5)
        with self._cond:
            pub, self._pub = self._pub, None
        if pub is not None:
            pub.drop()

    def __enter__(self) -> "Primary":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Session(threading.Thread):
    """One follower connection on the primary: handshake, then a send loop (this thread)
    and an acknowledgement reader."""

    def __init__(self, primary: Primary, conn: socket.socket, addr: Any) -> None:
        super().__init__(name=f"statecore-session-{addr}", daemon=True)
        self.primary = primary
        self.conn = conn
        self.addr = addr
        self.state = "handshake"
        self.sent = 0
        self.acked = 0
        self.bytes_sent = 0
        self.bytes_acked = 0
        self._sent_log: List[Tuple[int, int]] = []  # (epoch, cumulative bytes) awaiting ack
        self._ack_rate = 0.0  # bytes/s, smoothed over recent acknowledgements
        self._last_ack = time.monotonic()
        self._halt = threading.Event()
        self.error: Optional[str] = None
        self.part_pages = 0  # > 0: the follower takes large deltas as PART frames
        self._builder: Optional[PartBuilder] = None

    def status(self) -> Dict[str, Any]:
        target = self.primary.epoch
        lag_bytes = self.bytes_sent - self.bytes_acked
        rate = self._ack_rate
        return {"address": self.addr, "state": self.state, "acked_epoch": self.acked,
                "sent_epoch": self.sent, "lag_epochs": max(0, target - self.acked),
                "lag_bytes": lag_bytes, "bytes_sent": self.bytes_sent,
                "ack_bytes_per_second": rate,
                # Catching up: what is in flight at the rate the follower has been acking.
                "eta_seconds": (lag_bytes / rate) if lag_bytes and rate else 0.0,
                "error": self.error}

    def stop(self) -> None:
        self._halt.set()
        _shutdown(self.conn)

    def run(self) -> None:
        try:
            self.conn.settimeout(HANDSHAKE_TIMEOUT)  # before the TLS handshake too
            if self.primary._ssl is not None:
                # Wrapped first, handshake after: stop() then shuts down the socket the
                # handshake reads (wrapping detaches the plain one).
                self.conn = self.primary._ssl.wrap_socket(self.conn, server_side=True,
                                                          do_handshake_on_connect=False)
                if self._halt.is_set():
                    return
                self.conn.do_handshake()
            self._handshake()
            self.conn.settimeout(None)
            threading.Thread(target=self._read_acks, daemon=True,
                             name=f"statecore-acks-{self.addr}").start()
            self._send_loop()
        except (OSError, errors.StateError, ValueError) as e:
            if not self._halt.is_set():
                self.error = str(e)
                level = logging.WARNING if isinstance(e, errors.StateError) else logging.INFO
                log.log(level, "statecore: follower %s: %s", self.addr, e)
        except Exception as e:  # a bug, not the peer: reported, never a silent thread death
            self.error = f"internal error: {type(e).__name__}: {e}"
            log.exception("statecore: follower %s: session failed", self.addr)
        finally:
            self.state = "closed"
            # Shut down first: the acknowledgement reader blocks on this socket, and a
            # close() alone sends no FIN until its recv returns, so the follower would
            # learn of the end only from its ping timeout. Halted too, so that the reader
            # does not report the hang-up in place of the error that caused it.
            self.stop()
            try:
                self.conn.close()
            except OSError:
                pass
            if self._builder is not None:
                self._builder.close()

    def _refuse(self, message: str) -> NoReturn:
        wire.send_error(self.conn, message)
        raise wire.ProtocolError(message)

    def _handshake(self) -> None:
        p, store = self.primary, self.primary.store
        hello = wire.recv_json(self.conn, wire.HELLO)
        f_nonce = _nonce_of(hello)
        p_nonce = os.urandom(16)
        wire.send_json(self.conn, wire.CHALLENGE, {"nonce": p_nonce.hex(),
                                                   "auth": p._secret is not None})
        auth = wire.recv_json(self.conn, wire.AUTH)
        if p._secret is not None and not wire.check_mac(p._secret, b"F", p_nonce, f_nonce,
                                                        auth.get("mac")):
            wire.send_error(self.conn, "authentication failed", "auth")
            raise wire.AuthenticationError(f"follower {self.addr} failed authentication")
        if auth.get("page_size") != store.page_size or auth.get("size") != store.size:
            self._refuse(f"store geometry differs: primary has size {store.size} and page_size "
                         f"{store.page_size}")
        since = auth.get("epoch")
        if not isinstance(since, int) or since < 0:
            self._refuse("invalid epoch in AUTH")
        if auth.get("uuid") == store.uuid.hex() and not auth.get("fresh"):
            mode = "deltas"
            if since > p.epoch:
                self._refuse(f"follower is at epoch {since}, ahead of the primary ({p.epoch}): "
                             "it follows a different history")
        elif auth.get("fresh"):
            mode, since = "full", 0
        else:
            self._refuse("follower holds another store (identity differs); start it from an "
                         "empty store to take a full sync")
        asked = auth.get("part_pages")
        if isinstance(asked, int) and not isinstance(asked, bool) and asked > 0:
            self.part_pages = min(asked, part_pages_for(store.page_size))
        wire.send_json(self.conn, wire.WELCOME, {
            "mac": wire.mac(p._secret, b"P", f_nonce, p_nonce), "uuid": store.uuid.hex(),
            "mode": mode, "since": since, "epoch": p.epoch})
        self.sent = self.acked = since
        self.state = "syncing" if mode == "full" else "streaming"

    def _send_loop(self) -> None:
        p = self.primary
        done = 0  # a publication this follower has, or cannot be served from
        while not self._halt.is_set() and not p._closed:
            done = max(done, self.sent)
            with p._cond:
                if p._pub is None or p._pub.epoch <= done:
                    p._cond.wait(timeout=PING_INTERVAL)
                pub = p._pub
            if self._halt.is_set() or p._closed:
                return
            if pub is None or pub.epoch <= done:
                wire.send_json(self.conn, wire.PING, {"epoch": self.sent})
                continue
            commit = pub.delta
            # A commit's delta from at or before what the follower has carries all it
            # lacks (from before: pages a DurableStore applied keep older versions).
            if commit is not None and commit.base_epoch <= self.sent:
                # The commit's own buffer: no extra work, no copy of its pages.
                if self.part_pages and commit.n_pages > self.part_pages:
                    for pieces, last in split(commit, self.part_pages):
                        if self._halt.is_set() or p._closed:
                            return
                        self._send(wire.PART, pieces, pub.epoch if last else None)
                else:
                    self._send(wire.DELTA, [commit.encode()], pub.epoch)
            elif pub.serves(self.sent):
                self._send_to(pub)
            else:
                done = pub.epoch  # writes moved on past its floor: the next one is ours

    def _send(self, ftype: int, pieces: List[Any], last_of: Optional[int]) -> None:
        """One frame of these body pieces; `last_of`: the epoch the follower holds once it
        has applied it."""
        self.bytes_sent += wire.HEADER_SIZE + sum(memoryview(b).nbytes for b in pieces)
        if last_of is not None:
            # Logged before sending: the follower's ACK can arrive before send_frame returns.
            self._sent_log.append((last_of, self.bytes_sent))
        wire.send_frame(self.conn, ftype, *pieces)
        if last_of is not None:
            self.sent = last_of
            if self.state == "syncing":
                self.state = "streaming"  # the full sync's last frame is on its way

    def _send_to(self, pub: _Publication) -> None:
        """delta(sent, pub] built from the published snapshot: one frame from a reused
        buffer when it is small, PART frames when it is large and the follower takes
        them, else one DELTA buffer as large as the delta."""
        try:
            store = pub.snap._acquire()
        except errors.SnapshotReleased:
            return  # replaced meanwhile; the loop picks up the newer one
        try:
            ids = np.frombuffer(memoryview(store._changed_pages(self.sent, pub.epoch)[0]),
                                dtype=np.uint64)
            if self._builder is None:
                self._builder = PartBuilder(store, self.part_pages or
                                            part_pages_for(store.page_size))
            if len(ids) > self._builder.part_pages and not self.part_pages:
                self._send(wire.DELTA, [store.delta(self.sent, pub.snap).encode()], pub.epoch)
                return
            for ftype, body, last in self._builder.frames(self.sent, pub.epoch, ids):
                if self._halt.is_set() or self.primary._closed:
                    return
                self._send(ftype, [body], pub.epoch if last else None)
        finally:
            pub.snap._done()

    def _read_acks(self) -> None:
        try:
            while not self._halt.is_set():
                ftype, body = wire.recv_frame(self.conn, wire.CONTROL_LIMIT)
                if ftype == wire.ACK:
                    epoch = wire._parse_json(body).get("epoch")
                    if isinstance(epoch, int) and epoch >= self.acked:
                        self._acknowledge(epoch)
                elif ftype != wire.PING:
                    raise wire.ProtocolError(f"unexpected {wire.NAMES[ftype]} from follower")
        except (OSError, errors.StateError) as e:
            if not self._halt.is_set():
                self.error = str(e)  # reported by Primary.followers
                log.info("statecore: follower %s disconnected: %s", self.addr, e)
            self.stop()
        except Exception as e:  # a bug: reported, and the session ends with it
            self.error = f"internal error: {type(e).__name__}: {e}"
            log.exception("statecore: follower %s: acknowledgement reader failed", self.addr)
            self.stop()

    def _acknowledge(self, epoch: int) -> None:
        before = self.bytes_acked
        while self._sent_log and self._sent_log[0][0] <= epoch:
            self.bytes_acked = self._sent_log.pop(0)[1]
        now = time.monotonic()
        if self.bytes_acked > before:
            sample = (self.bytes_acked - before) / max(now - self._last_ack, 1e-6)
            self._ack_rate = sample if not self._ack_rate else 0.7 * self._ack_rate + 0.3 * sample
            self._last_ack = now
        self.acked = epoch  # after bytes_acked: status() never pairs it with stale bytes


def _nonce_of(msg: Dict[str, Any]) -> bytes:
    try:
        nonce = bytes.fromhex(msg.get("nonce", ""))
    except (TypeError, ValueError):
        raise wire.ProtocolError("invalid nonce") from None
    if len(nonce) != 16:
        raise wire.ProtocolError("invalid nonce")
    return nonce


def _uuid_of(msg: Dict[str, Any]) -> bytes:
    try:
        uuid = bytes.fromhex(str(msg.get("uuid")))
    except ValueError:
        raise wire.ProtocolError("invalid store identity in WELCOME") from None
    if len(uuid) != 16:
        raise wire.ProtocolError("invalid store identity in WELCOME")
    return uuid


class Follower:
    """Keeps `store` equal to the primary's at `address`: connects, says what it has,
    applies the deltas it receives and acknowledges them; reconnects after a dropped
    connection and resumes from what it applied. A follower on a DurableStore journals what
    it applies, so it also resumes from its own state after a restart."""

    def __init__(self, store: Store, address: Tuple[str, int], secret: Secret = None,
                 ssl: Optional[_ssl.SSLContext] = None, *, reconnect: bool = True,
                 server_hostname: Optional[str] = None,
                 on_apply: Optional[Callable[[int, int], None]] = None) -> None:
        """on_apply(epoch, nbytes) is called in the follower's thread after each delta."""
        self.store = store
        self._on_apply = on_apply
        self.address = (address[0], int(address[1]))
        self._secret = _secret_bytes(secret)
        self._ssl = ssl
        self._hostname = server_hostname or address[0]
        self._reconnect = reconnect
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._sock: Optional[socket.socket] = None
        self.error: Optional[BaseException] = None
        self.state = "connecting"
        self.connects = 0
        self.bytes_received = 0
        self.deltas_applied = 0
        self.parts_received = 0
        self._part_pages = 0 if _takes_deltas_whole(store) else part_pages_for(store.page_size)
        self._epoch = _resume_epoch(store)
        # Until a primary has accepted us, the epoch is only what the store claims to hold:
        # wait_for must not report a state the primary never confirmed.
        self._confirmed = False
        self._failed = False  # stopped for good by an error (state "failed" until close())
        self._thread = threading.Thread(target=self._run, name="statecore-follower", daemon=True)
        self._thread.start()

    @property
    def epoch(self) -> int:
        """The last primary epoch whose delta this follower applied."""
        return self._epoch

    def wait_for(self, epoch: int, timeout: Optional[float] = None) -> bool:
        """Block until the follower has applied `epoch`. Raises TimeoutError after
        `timeout` seconds, the error that stopped the follower, or StateError once it is
        closed without having reached `epoch`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._epoch < epoch or not self._confirmed:
                self._raise_if_stopped(epoch)
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"follower at epoch {self._epoch}, waited for {epoch}")
                self._cond.wait(timeout=0.1 if left is None else min(left, 0.1))
        return True

    def _raise_if_stopped(self, epoch: int) -> None:
        """Raise why `epoch` will never come, if the follower stopped (called under _cond,
        which _fail and close notify)."""
        if self._failed and self.error is not None:
            raise self.error
        if self._stop.is_set() or not self._thread.is_alive():
            raise errors.StateError(f"follower closed at epoch {self._epoch} before reaching "
                                    f"epoch {epoch}")

    def status(self) -> Dict[str, Any]:
        return {"state": self.state, "epoch": self._epoch, "connects": self.connects,
                "bytes_received": self.bytes_received, "deltas_applied": self.deltas_applied,
                "parts_received": self.parts_received,
                "error": None if self.error is None else str(self.error)}

    def close(self) -> None:
        self._stop.set()
        sock = self._sock
        if sock is not None:
            _shutdown(sock)
        with self._cond:  # waiters give up now, not at their timeout (or never)
            self._cond.notify_all()
        self._thread.join(timeout=10)
        self.state = "closed"

    def __enter__(self) -> "Follower":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- the connection loop ---------------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            try:
                self._session()
                backoff = 0.05
            except (wire.AuthenticationError, wire.PeerError, errors.IncompatibleDelta,
                    errors.EpochGap) as e:
                # Refusals and broken lineage do not heal by retrying.
                self._fail(e)
                return
            except (OSError, errors.StateError, ValueError) as e:
                if self._stop.is_set():
                    return
                self.error = _kept(e)
                log.info("statecore: follower connection to %s:%d lost: %s", *self.address, e)
                if not self._reconnect:
                    self._fail(e)
                    return
            except Exception as e:
                # A bug, or an on_apply callback that raised: retrying would repeat it.
                # Recorded like a refusal, never a silent death that leaves waiters hanging.
                if self._stop.is_set():
                    return
                self._fail(e, unexpected=True)
                return
            self.state = "reconnecting"
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 2.0)

    def _fail(self, e: BaseException, unexpected: bool = False) -> None:
        log.warning("statecore: follower of %s:%d stopped: %s", *self.address, e,
                    exc_info=e if unexpected else None, extra={FOLLOWER_STOPPED: True})
        with self._cond:
            self.error = _kept(e)
            self.state = "failed"
            self._failed = True
            self._cond.notify_all()

    def _session(self) -> None:
        sock = socket.create_connection(self.address, timeout=HANDSHAKE_TIMEOUT)
        tls: Optional[_ssl.SSLSocket] = None
        if self._ssl is not None:
            # Handshake after self._sock is set: close() must be able to interrupt it.
            sock = tls = self._ssl.wrap_socket(sock, server_hostname=self._hostname,
                                               do_handshake_on_connect=False)
        self._sock = sock
        parts: Optional[PartApplier] = None
        try:
            if self._stop.is_set():
                return
            if tls is not None:
                tls.do_handshake()
            self.connects += 1
            limit = wire.delta_frame_limit(self.store.size, self.store.page_size)
            reuse = wire.RecvBuffer()
            if self._part_pages:
                parts = PartApplier(self.store, self._part_pages, _apply_replicated,
                                    lambda: _shutdown(sock))
            self._handshake(sock)
            sock.settimeout(PING_INTERVAL * 5)  # the primary pings when idle
            self.error = None
            try:
                self._receive(sock, limit, reuse, parts)
            except (OSError, errors.StateError, ValueError):
                if parts is not None:
                    parts.raise_failure()  # a part failed: that, not the closed socket
                raise
        finally:
            self._sock = None
            if parts is not None:
                parts.close()  # no part is applied once the session is over
            sock.close()

    def _receive(self, sock: socket.socket, limit: int, reuse: wire.RecvBuffer,
                 parts: Optional[PartApplier]) -> None:
        while not self._stop.is_set():
            ftype, body = wire.recv_frame(sock, limit, parts.buffer() if parts else reuse,
                                          parts.limit if parts else 0)
            if ftype == wire.PART:
                assert parts is not None  # recv_frame refuses PART frames otherwise
                self.bytes_received += wire.HEADER_SIZE + len(body)
                self.parts_received += 1
                done = parts.part(body, self._epoch)
                if done is not None:
                    self._applied(done[0], done[1], sock)
            elif ftype == wire.DELTA:
                if parts is not None and parts.in_transfer:
                    raise wire.ProtocolError("DELTA in the middle of a delta sent in parts")
                self._apply(body, sock)
            elif ftype == wire.ERROR:
                raise wire.peer_error(wire._parse_json(body))
            elif ftype != wire.PING:
                raise wire.ProtocolError(f"unexpected {wire.NAMES[ftype]} from primary")

    def _handshake(self, sock: socket.socket) -> None:
        store = self.store
        f_nonce = os.urandom(16)
        wire.send_json(sock, wire.HELLO, {"nonce": f_nonce.hex()})
        challenge = wire.recv_json(sock, wire.CHALLENGE)
        p_nonce = _nonce_of(challenge)
        if challenge.get("auth") and self._secret is None:
            raise wire.AuthenticationError("primary requires a secret and none was given")
        fresh = _is_fresh(store)
        auth = {"mac": wire.mac(self._secret, b"F", p_nonce, f_nonce),
                "page_size": store.page_size, "size": store.size, "uuid": store.uuid.hex(),
                "epoch": self._epoch, "fresh": fresh}
        if self._part_pages:
            auth["part_pages"] = self._part_pages
        wire.send_json(sock, wire.AUTH, auth)
        welcome = wire.recv_json(sock, wire.WELCOME)
        if self._secret is not None and not wire.check_mac(self._secret, b"P", f_nonce,
                                                           p_nonce, welcome.get("mac")):
            raise wire.AuthenticationError("primary failed to prove the shared secret")
        full = welcome.get("mode") == "full"
        if full:
            _adopt_identity(store, _uuid_of(welcome))
        self.state = "syncing" if full else "streaming"  # syncing until the sync is applied
        with self._cond:
            self._confirmed = True
            self._cond.notify_all()

    def _apply(self, body: Any, sock: socket.socket) -> None:
        delta = Delta.decode(body, copy=False)
        self.bytes_received += len(body) + wire.HEADER_SIZE
        _apply_replicated(self.store, delta)
        self._applied(delta.target_epoch, len(body), sock)

    def _applied(self, target: int, nbytes: int, sock: socket.socket) -> None:
        """A whole delta up to `target` is applied: say so, here and to the primary."""
        self.deltas_applied += 1
        epoch = max(self._epoch, target)
        self.store._replica_epoch = epoch
        clear_resume_marker(self.store)
        if self._on_apply is not None:
            self._on_apply(epoch, nbytes)  # before waiters wake: they may read its effects
        with self._cond:
            self._epoch = epoch
            if self.state == "syncing":
                self.state = "streaming"  # the full sync is in the store
            self._cond.notify_all()
        wire.send_json(sock, wire.ACK, {"epoch": epoch})


def _kept(e: BaseException) -> BaseException:
    """An error to keep on the follower: its traceback keeps file and line, but not the
    locals of the finished frames. Those hold deltas over receive buffers; kept, they
    would sit in a cycle (follower -> error -> traceback -> frame -> follower) that the
    garbage collector may break by releasing a buffer that a delta still exports."""
    traceback.clear_frames(e.__traceback__)
    return e


def _shutdown(sock: socket.socket) -> None:
    """Shut a connection down from another thread, waking whatever blocks on it. At the
    socket level: SSLSocket.shutdown drops the TLS state that the blocked thread (in the
    handshake or a read) is using, which would crash it instead of ending it with EOF."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


def _takes_deltas_whole(store: Store) -> bool:
    """Whether a follower on `store` must not ask for PART frames. Parts are applied as
    they arrive, so a transfer cut in the middle leaves pages of the new epoch over the
    old state; only the resume marker (a Python attribute) says so. That is enough for a
    store in memory, which does not outlive the attribute. A DurableStore journals each
    delta as one record, and a store file outlives the process: reopened after a cut
    transfer, it would resume from its own epoch (the cut delta's target) and never get
    the pages it missed. Taken whole, a delta is verified entirely before anything of it
    is applied, and a cut one leaves the store as it was."""
    return hasattr(store, "apply_replicated") or getattr(store, "path", None) is not None


def _resume_epoch(store: Store) -> int:
    """The newest primary epoch whose state `store` holds. A store that followed before
    remembers it (or, left in the middle of a delta sent in parts, the epoch that delta
    started from); otherwise (new, or restored from the primary's checkpoint) it is the
    last closed epoch."""
    partial = resume_marker(store)
    if partial is not None:
        return int(partial)
    known = getattr(store, "_replica_epoch", 0)
    return int(known) if known else store.epoch - 1


def _adopt_identity(store: Store, uuid: bytes) -> None:
    adopt = getattr(store, "adopt_identity", None)
    if adopt is not None:
        adopt(uuid)
    else:
        store._set_uuid(uuid)


def _apply_replicated(store: Store, delta: Delta) -> None:
    apply_durable = getattr(store, "apply_replicated", None)
    if apply_durable is not None:
        apply_durable(delta)
    else:
        store.apply(delta)
