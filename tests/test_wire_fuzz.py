"""Fuzzing the replication wire: wire.recv_frame over a socketpair, and hostile peers
against a live Primary and a live Follower.

Whatever arrives, the receiver raises a statecore error (wire.ProtocolError and its
subclasses, sc.CorruptDelta for a DELTA body, ConnectionError when the bytes stop short),
never anything else, never allocates more than the frame limit it was given, and never
applies anything it did not fully validate. A hostile peer is refused, the refusal is
reported, and the legitimate followers keep converging.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
import tracemalloc
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import statecore as sc
from statecore import _core, wire

# A library thread that dies of an exception (a crash, not a refusal) fails the test.
pytestmark = pytest.mark.filterwarnings(
    "error::pytest.PytestUnhandledThreadExceptionWarning")

LOCAL = "127.0.0.1"
SECRET = b"fuzz-secret"
PS = 512

# Errors a receiver may raise on hostile bytes. ConnectionError only when bytes stop short.
REFUSED = (wire.ProtocolError, sc.CorruptDelta, ConnectionError)


# ---- frame building and a socketpair receiver ---------------------------------------------------
def frame(ftype: int, body: bytes, version: int = wire.PROTOCOL_VERSION) -> bytes:
    return wire.frame_header(ftype, body, version) + bytes(body)


def raw_header(ftype: int, length: int, version: int = wire.PROTOCOL_VERSION,
               magic: bytes = wire.MAGIC, checksum: Optional[int] = None) -> bytes:
    head = struct.pack("<4sHHQ", magic, version, ftype, length)
    if checksum is None:
        checksum = _core.page_checksum(head)
    return head + struct.pack("<Q", checksum)


def control(ftype: int, payload: Dict[str, Any]) -> bytes:
    return frame(ftype, json.dumps(payload).encode())


def receive(data: bytes, limit: int = 1 << 20, *, json_expect: Optional[int] = None,
            decode: bool = True, part_limit: int = 1 << 20) -> Tuple[int, Any]:
    """Feed `data` (then EOF) to wire.recv_frame on the other end of a socketpair. A DELTA
    body goes through Delta.decode, a PART body through wire.part_fields and Delta.decode
    of the delta after its part header, a control body through the JSON parser."""
    a, b = socket.socketpair()
    writer = None
    try:
        b.settimeout(5)  # a receiver waiting for bytes that never come fails the test
        if len(data) < 100_000:
            a.sendall(data)
            a.shutdown(socket.SHUT_WR)
        else:
            def feed() -> None:
                try:
                    a.sendall(data)
                    a.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            writer = threading.Thread(target=feed, daemon=True)
            writer.start()
        if json_expect is not None:
            return json_expect, wire.recv_json(b, json_expect, limit)
        ftype, body = wire.recv_frame(b, limit, part_limit=part_limit)
        if decode and ftype == wire.DELTA:
            return ftype, sc.Delta.decode(body)
        if decode and ftype == wire.PART:
            fields = wire.part_fields(body)
            return ftype, (fields, sc.Delta.decode(body[wire.PART_HEADER_SIZE:]))
        if decode:
            return ftype, wire._parse_json(body)
        return ftype, body
    finally:
        b.close()
        if writer is not None:
            writer.join(timeout=5)
        a.close()


def refused(data: bytes, **kw: Any) -> BaseException:
    try:
        result = receive(data, **kw)
    except REFUSED as e:
        return e
    except socket.timeout:
        raise AssertionError(f"receiver hung on {len(data)} bytes")
    raise AssertionError(f"{len(data)} hostile bytes were accepted: {result!r:.200}")


def small_delta() -> bytes:
    s = sc.Store(size=8 * PS, page_size=PS)
    try:
        s.write(PS, os.urandom(PS))
        s.write(5 * PS + 7, b"x" * 100)
        with s.snapshot() as snap:
            return bytes(s.delta(0, snap).encode())
    finally:
        s.close()


DELTA_BODY = small_delta()


def part_bodies(n_pages: int = 8, part_pages: int = 3, page_size: int = PS,
                seed: int = 11) -> List[bytes]:
    """The PART frame bodies of delta(0, now) of a store whose n_pages pages all hold
    random bytes, as a primary builds them, part_pages pages a part."""
    from statecore.transfer import PartBuilder
    rng = np.random.default_rng(seed)
    s = sc.Store(size=n_pages * page_size, page_size=page_size)
    try:
        s.write(0, rng.integers(0, 256, s.size, dtype=np.uint8).tobytes())
        with s.snapshot() as snap:
            ids = np.frombuffer(s._changed_pages(0, snap.epoch)[0], dtype=np.uint64)
            builder = PartBuilder(s, part_pages)
            try:
                return [bytes(body) for ftype, body, last
                        in builder.frames(0, snap.epoch, ids.copy())]
            finally:
                builder.close()
    finally:
        s.close()


PART_BODIES = part_bodies()
HELLO_BODY = json.dumps({"nonce": os.urandom(16).hex()}).encode()


# ---- recv_frame -------------------------------------------------------------------------------
def test_valid_frames_round_trip():
    ftype, msg = receive(frame(wire.HELLO, HELLO_BODY))
    assert ftype == wire.HELLO and msg == json.loads(HELLO_BODY)
    ftype, delta = receive(frame(wire.DELTA, DELTA_BODY))
    assert ftype == wire.DELTA and delta.n_pages == 2 and bytes(delta.encode()) == DELTA_BODY
    for compression in ("none", "lz4"):
        d = sc.Delta.decode(DELTA_BODY)
        body = bytes(d.encode(compression))
        ftype, got = receive(frame(wire.DELTA, body))
        assert bytes(got.payload) == bytes(d.payload)
    # Back to back on one connection, through send_frame (the sendmsg path).
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(5)
        wire.send_json(a, wire.PING, {"epoch": 3})
        wire.send_frame(a, wire.DELTA, memoryview(DELTA_BODY))
        assert wire.recv_json(b, wire.PING) == {"epoch": 3}
        assert wire.recv_frame(b, 1 << 20) == (wire.DELTA, bytearray(DELTA_BODY))


def test_a_large_delta_frame_crosses_a_socketpair():
    s = sc.Store(size=1024 * 4096)
    try:
        s.write(0, os.urandom(s.size))
        body = bytes(s.delta(0).encode())
    finally:
        s.close()
    ftype, d = receive(frame(wire.DELTA, body), limit=wire.delta_frame_limit(1024 * 4096, 4096))
    assert ftype == wire.DELTA and d.n_pages == 1024


@pytest.mark.parametrize("which", ["control", "delta"])
def test_every_truncation_is_a_connection_error(which):
    data = frame(wire.HELLO, HELLO_BODY) if which == "control" else frame(wire.DELTA,
                                                                          DELTA_BODY)
    for cut in range(len(data)):
        e = refused(data[:cut])
        assert type(e) is ConnectionError, (cut, e)
        assert "closed by peer" in str(e)


def _flip_outcomes(data: bytes, positions) -> Dict[str, List[int]]:
    kinds: Dict[str, List[int]] = {}
    for bit in positions:
        mutated = bytearray(data)
        mutated[bit // 8] ^= 1 << (bit % 8)
        e = refused(bytes(mutated))
        kinds.setdefault(type(e).__name__, []).append(bit)
        if isinstance(e, ConnectionError):
            # Only a longer length field makes the receiver wait for bytes that never come.
            assert 8 <= bit // 8 < 16, (bit, e)
    return kinds


def test_every_bit_flip_in_a_control_frame_is_refused():
    data = frame(wire.AUTH, json.dumps({"mac": "ab" * 32, "epoch": 3}).encode())
    kinds = _flip_outcomes(data, range(len(data) * 8))
    assert set(kinds) <= {"ProtocolError", "ConnectionError"}, kinds


def test_every_bit_flip_in_a_delta_frame_is_refused():
    data = frame(wire.DELTA, DELTA_BODY)
    kinds = _flip_outcomes(data, range(len(data) * 8))
    assert set(kinds) <= {"ProtocolError", "ConnectionError", "CorruptDelta"}, kinds
    # The frame checksum covers header and index; Delta.decode catches the pages.
    digest = wire.HEADER_SIZE + _core.HEADER_SIZE + 24 * 2
    assert all(b // 8 >= digest for b in kinds["CorruptDelta"])
    assert all(b // 8 < digest for b in kinds["ProtocolError"])


def test_part_frames_round_trip_and_cover_the_delta():
    bodies = part_bodies()  # 8 pages of 512 B, 3 a part
    assert len(bodies) == 3
    ids, pages = [], []
    for seq, body in enumerate(bodies):
        ftype, (fields, delta) = receive(frame(wire.PART, body))
        assert ftype == wire.PART
        assert (fields.seq, fields.first, fields.total) == (seq, 3 * seq, 8)
        assert delta.n_pages == min(3, 8 - 3 * seq) and delta.base_epoch == 0
        ids += delta.page_ids.tolist()
        pages.append(bytes(delta.payload))
    assert ids == list(range(8))
    # The header the frame carries by default says version 2, what PART needs.
    assert wire.HEADER.unpack(wire.frame_header(wire.PART, bodies[0]))[1] == 2


def test_parts_cut_from_a_built_delta_are_its_pages_with_its_checksums():
    from statecore.transfer import split
    d = sc.Delta.decode(big_delta_body())
    got_ids, got_pages = [], bytearray()
    for seq, (pieces, last) in enumerate(split(d, 3)):
        body = b"".join(bytes(p) for p in pieces)
        # The first piece is the whole digest part: the frame checksum is the same.
        assert wire.frame_header(wire.PART, pieces[0], length=len(body)) == \
            wire.frame_header(wire.PART, body)
        ftype, (fields, part) = receive(frame(wire.PART, body))
        assert (fields.seq, fields.first, fields.total) == (seq, 3 * seq, d.n_pages)
        assert last == (fields.first + part.n_pages == d.n_pages)
        assert (part.base_epoch, part.target_epoch) == (d.base_epoch, d.target_epoch)
        got_ids += part.page_ids.tolist()
        got_pages += bytes(part.payload)
        assert part.checksums.tolist() == d.checksums[3 * seq:3 * seq + part.n_pages].tolist()
    assert got_ids == d.page_ids.tolist() and bytes(got_pages) == bytes(d.payload)


def big_delta_body() -> bytes:
    s = sc.Store(size=11 * PS, page_size=PS)
    try:
        s.write(0, np.random.default_rng(13).integers(0, 256, s.size, dtype=np.uint8).tobytes())
        return bytes(s.delta(0).encode())
    finally:
        s.close()


def test_every_truncation_of_a_part_frame_is_a_connection_error():
    data = frame(wire.PART, PART_BODIES[0])
    for cut in range(len(data)):
        e = refused(data[:cut])
        assert type(e) is ConnectionError, (cut, e)


def test_every_bit_flip_in_a_part_frame_is_refused():
    data = frame(wire.PART, PART_BODIES[0])
    kinds = _flip_outcomes(data, range(len(data) * 8))
    assert set(kinds) <= {"ProtocolError", "ConnectionError", "CorruptDelta"}, kinds
    # The frame checksum covers the part header, the delta's header and its index;
    # Delta.decode catches the pages.
    digest = wire.HEADER_SIZE + wire.PART_HEADER_SIZE + _core.HEADER_SIZE + 24 * 3
    assert all(b // 8 >= digest for b in kinds["CorruptDelta"])
    assert all(b // 8 < digest for b in kinds["ProtocolError"])


@settings(max_examples=200)
@given(body=st.binary(max_size=300))
def test_random_part_bodies_with_a_valid_frame_checksum_are_refused(body):
    e = refused(frame(wire.PART, body))
    assert isinstance(e, (wire.ProtocolError, sc.CorruptDelta))


@settings(max_examples=250)
@given(st.binary(max_size=400))
def test_random_bytes_are_refused(data):
    refused(data)


@settings(max_examples=250)
@given(ftype=st.integers(1, 8), length=st.integers(0, 2**64 - 1),
       checksum=st.integers(0, 2**64 - 1), body=st.binary(max_size=300))
def test_random_frames_behind_a_valid_prefix_are_refused(ftype, length, checksum, body):
    # Magic, version and type are right: the length, checksum and body are not.
    e = refused(raw_header(ftype, length, checksum=checksum) + body, limit=4096)
    assert isinstance(e, (wire.ProtocolError, ConnectionError))


@settings(max_examples=200)
@given(body=st.binary(max_size=300), ftype=st.sampled_from([wire.DELTA, wire.ACK]))
def test_random_bodies_with_a_valid_frame_checksum_are_refused(body, ftype):
    # The frame is well formed: what is inside is garbage (not a delta, not JSON).
    try:
        assume(not isinstance(json.loads(body), dict))
    except (ValueError, RecursionError):
        pass
    e = refused(frame(ftype, body))
    assert isinstance(e, (wire.ProtocolError, sc.CorruptDelta))


@pytest.mark.parametrize("ftype", sorted(wire.NAMES))
@pytest.mark.parametrize("length", ["cap+1", 2**32, 2**63, 2**64 - 1])
def test_oversized_length_headers_are_refused_before_allocating(ftype, length):
    limit = 1 << 30  # what a follower of a 1 GiB store accepts for DELTA frames
    part_limit = wire.part_frame_limit(1024, 4096)  # and for PART frames (4 MiB parts)
    cap = {wire.DELTA: limit, wire.PART: part_limit}.get(ftype, wire.CONTROL_LIMIT)
    n = cap + 1 if length == "cap+1" else length
    tracemalloc.start()
    try:
        e = refused(raw_header(ftype, n) + b"x" * 64, limit=limit, part_limit=part_limit)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert type(e) is wire.ProtocolError and "exceeds the limit" in str(e), e
    assert peak < 1 << 20, f"refusing a {n}-byte frame allocated {peak} bytes"


def test_frames_at_the_limit_are_read_and_one_byte_more_is_not():
    body = b"{}" + b" " * (wire.CONTROL_LIMIT - 2)
    assert receive(frame(wire.PING, body)) == (wire.PING, {})
    e = refused(frame(wire.PING, body + b" "))
    assert "exceeds the limit of 65536" in str(e)
    e = refused(frame(wire.DELTA, DELTA_BODY), limit=len(DELTA_BODY) - 1)
    assert "DELTA frame" in str(e) and "exceeds the limit" in str(e)
    assert receive(frame(wire.DELTA, DELTA_BODY), limit=len(DELTA_BODY))[0] == wire.DELTA


@pytest.mark.parametrize("version", [0, 3, 0x100, 0xFFFF])
def test_wrong_protocol_versions_are_refused(version):
    for ftype, body in ((wire.HELLO, HELLO_BODY), (wire.DELTA, DELTA_BODY),
                        (wire.PART, PART_BODIES[0])):
        e = refused(frame(ftype, body, version=version))
        assert type(e) is wire.ProtocolError
        assert f"protocol version {version} not supported" in str(e)


def test_both_protocol_versions_are_read_and_part_frames_need_version_2():
    # A version-1 peer's frames are read; what this side sends by default is stamped with
    # the version that introduced each frame type, so a version-1 peer reads it too.
    for version in (1, 2):
        assert receive(frame(wire.HELLO, HELLO_BODY, version=version))[0] == wire.HELLO
        assert receive(frame(wire.DELTA, DELTA_BODY, version=version))[0] == wire.DELTA
    assert wire.HEADER.unpack(wire.frame_header(wire.HELLO, HELLO_BODY))[1] == 1
    assert wire.HEADER.unpack(wire.frame_header(wire.DELTA, DELTA_BODY))[1] == 1
    assert wire.HEADER.unpack(wire.frame_header(wire.PART, PART_BODIES[0]))[1] == 2
    e = refused(frame(wire.PART, PART_BODIES[0], version=1))
    assert type(e) is wire.ProtocolError and "PART frames need protocol version 2" in str(e)


def test_part_frames_are_refused_where_they_were_not_asked_for():
    e = refused(frame(wire.PART, PART_BODIES[0]), part_limit=0)
    assert type(e) is wire.ProtocolError and "unexpected PART frame" in str(e)


@pytest.mark.parametrize("ftype", [0, 10, 100, 0xFFFF])
def test_unknown_frame_types_are_refused(ftype):
    e = refused(raw_header(ftype, 2) + b"{}")
    assert "unknown frame type" in str(e)


@pytest.mark.parametrize("magic", [b"SCW2", b"GET ", b"\x16\x03\x01\x02", b"\x00" * 4])
def test_bad_magic_is_refused(magic):
    e = refused(raw_header(wire.HELLO, 2, magic=magic) + b"{}")
    assert "not a statecore peer: bad magic" in str(e)


HOSTILE_JSON = {
    "empty": b"",
    "not json": b"hello there",
    "bad utf-8": b"\xff\xfe\xfa",
    "array": b"[1, 2, 3]",
    "null": b"null",
    "string": b'"nonce"',
    "nan": b"NaN",
    "deep arrays": b"[" * 60_000,
    "deep objects": b'{"a":' * 12_000,
    "huge exponent": b'{"nonce": 1e999999}',
    "truncated": b'{"nonce": "ab',
}


@pytest.mark.parametrize("case", sorted(HOSTILE_JSON))
def test_hostile_control_bodies_are_protocol_errors(case):
    body = HOSTILE_JSON[case]
    if case == "huge exponent":  # valid JSON (inf): a dict, for the caller to judge
        assert receive(frame(wire.HELLO, body), json_expect=wire.HELLO)[1]["nonce"] > 1e308
        return
    e = refused(frame(wire.HELLO, body), json_expect=wire.HELLO)
    assert type(e) is wire.ProtocolError and "control frame is not" in str(e), e


def test_recv_json_refuses_the_wrong_frame_and_reports_peer_errors():
    e = refused(control(wire.AUTH, {}), json_expect=wire.HELLO)
    assert "expected HELLO, got AUTH" in str(e)
    e = refused(frame(wire.DELTA, DELTA_BODY), json_expect=wire.HELLO)
    assert "expected HELLO, got DELTA" in str(e)
    e = refused(raw_header(wire.DELTA, wire.CONTROL_LIMIT + 1), json_expect=wire.HELLO,
                limit=wire.CONTROL_LIMIT)  # recv_json's default, what a session uses
    assert "DELTA frame" in str(e) and "exceeds the limit" in str(e)  # the control limit
    with pytest.raises(sc.AuthenticationError, match="authentication failed"):
        receive(control(wire.ERROR, {"message": "authentication failed", "code": "auth"}),
                json_expect=wire.WELCOME)
    with pytest.raises(sc.PeerError, match="primary refused: nope"):
        receive(control(wire.ERROR, {"message": "nope"}), json_expect=wire.WELCOME)
    with pytest.raises(sc.PeerError, match="primary refused"):
        receive(control(wire.ERROR, {"message": ["x"] * 3, "code": 7}),
                json_expect=wire.WELCOME)


# ---- hostile clients against a live Primary ----------------------------------------------------
SIZE = 32 * 4096


def page_sums(store: sc.Store) -> List[int]:
    data = store.read(0, store.size)
    return [sc.page_checksum(data[i:i + store.page_size])
            for i in range(0, store.size, store.page_size)]


def converge(follower: sc.Follower, store: sc.Store, epoch: int) -> None:
    follower.wait_for(epoch, timeout=10)
    assert follower.epoch == epoch
    assert page_sums(follower.store) == page_sums(store)


class Live:
    def __init__(self) -> None:
        self.store = sc.Store(size=SIZE)
        self.store.write(0, os.urandom(SIZE))
        self.primary = sc.Primary(self.store, secret=SECRET)
        self.follower = sc.Follower(sc.Store(size=SIZE), self.primary.address, secret=SECRET)
        converge(self.follower, self.store, self.primary.epoch)
        self.step = 0

    def still_serving(self) -> None:
        """The follower it had and a new one both reach a new epoch."""
        self.step += 1
        self.store.write(self.step * 4096 + 11, os.urandom(5000))
        epoch = self.primary.publish()
        converge(self.follower, self.store, epoch)
        assert self.follower.status()["connects"] == 1
        with sc.Store(size=SIZE) as s:
            late = sc.Follower(s, self.primary.address, secret=SECRET)
            try:
                converge(late, self.store, epoch)
            finally:
                late.close()

    def close(self) -> None:
        self.follower.close()
        self.primary.close()
        self.follower.store.close()
        self.store.close()


@pytest.fixture
def live(monkeypatch):
    # Senders notice a closed session at their next idle ping: make that come sooner.
    from statecore import replication
    monkeypatch.setattr(replication, "PING_INTERVAL", 0.2)
    lv = Live()
    yield lv
    lv.close()


def connect(primary: sc.Primary) -> socket.socket:
    s = socket.create_connection(primary.address, timeout=5)
    assert s.getpeername()[0] == LOCAL
    return s


def read_until_closed(sock: socket.socket, timeout: float = 5) -> bytes:
    """Everything the primary sends until it closes the connection."""
    got = bytearray()
    deadline = time.monotonic() + timeout
    for _ in range(10_000):
        if time.monotonic() > deadline:
            raise AssertionError(f"the primary did not close the connection ({bytes(got)!r})")
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        except socket.timeout:
            continue
        if not chunk:
            break
        got += chunk
    return bytes(got)


def session_error(primary: sc.Primary, port: int, timeout: float = 5) -> str:
    deadline = time.monotonic() + timeout
    for _ in range(1000):
        for s in primary.followers:
            if s["address"][1] == port and s["state"] == "closed":
                return s["error"] or ""
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    raise AssertionError(f"no closed session for port {port}: {primary.followers}")


def handshake(sock: socket.socket) -> Tuple[bytes, bytes]:
    f_nonce = os.urandom(16)
    wire.send_json(sock, wire.HELLO, {"nonce": f_nonce.hex()})
    challenge = wire.recv_json(sock, wire.CHALLENGE)
    assert challenge["auth"] is True
    return f_nonce, bytes.fromhex(challenge["nonce"])


def good_auth(f_nonce: bytes, p_nonce: bytes, **over: Any) -> Dict[str, Any]:
    msg = {"mac": wire.mac(SECRET, b"F", p_nonce, f_nonce), "page_size": 4096, "size": SIZE,
           "uuid": os.urandom(16).hex(), "epoch": 0, "fresh": True}
    msg.update(over)
    return msg


def _send(data: bytes) -> Callable[[socket.socket], None]:
    return lambda s: s.sendall(data)


def _hello_then(payload_fn: Callable[[bytes, bytes], Dict[str, Any]],
                raw: Optional[bytes] = None) -> Callable[[socket.socket], None]:
    def attack(s: socket.socket) -> None:
        f_nonce, p_nonce = handshake(s)
        if raw is not None:
            s.sendall(raw)
        else:
            wire.send_json(s, wire.AUTH, payload_fn(f_nonce, p_nonce))
    return attack


def _after_welcome(garbage: bytes) -> Callable[[socket.socket], None]:
    def attack(s: socket.socket) -> None:
        f_nonce, p_nonce = handshake(s)
        wire.send_json(s, wire.AUTH, good_auth(f_nonce, p_nonce))
        welcome = wire.recv_json(s, wire.WELCOME)
        assert wire.check_mac(SECRET, b"P", f_nonce, p_nonce, welcome["mac"])
        ftype, body = wire.recv_frame(s, 1 << 24)  # the full sync it asked for
        assert ftype == wire.DELTA and sc.Delta.decode(body).n_pages == 32
        s.sendall(garbage)
    return attack


def _truncated(s: socket.socket) -> None:
    s.sendall(frame(wire.HELLO, HELLO_BODY)[:30])
    s.shutdown(socket.SHUT_WR)


ATTACKS: Dict[str, Tuple[Callable[[socket.socket], None], str]] = {
    "garbage bytes": (_send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(64)),
                      "bad magic"),
    "random bytes": (_send(b"\x00" + os.urandom(200)), "bad magic"),
    "oversized HELLO": (_send(raw_header(wire.HELLO, 2**40)), "exceeds the limit"),
    "oversized DELTA first": (_send(raw_header(wire.DELTA, 2**62)), "exceeds the limit"),
    "max length": (_send(raw_header(wire.AUTH, 2**64 - 1)), "exceeds the limit"),
    "wrong protocol version": (_send(frame(wire.HELLO, HELLO_BODY, version=3)),
                               "protocol version 3 not supported"),
    "PART from a follower": (_after_welcome(frame(wire.PART, PART_BODIES[0])),
                             "unexpected PART frame"),
    "unknown frame type": (_send(raw_header(77, 2) + b"{}"), "unknown frame type 77"),
    "bad checksum": (_send(raw_header(wire.HELLO, len(HELLO_BODY), checksum=1) + HELLO_BODY),
                     "checksum mismatch"),
    "truncated frame": (_truncated, "connection closed by peer"),
    "HELLO not JSON": (_send(frame(wire.HELLO, b"nonce=1")), "not JSON"),
    "HELLO deeply nested": (_send(frame(wire.HELLO, b"[" * 60_000)), "not JSON"),
    "HELLO non-hex nonce": (_send(control(wire.HELLO, {"nonce": "zz" * 16})), "invalid nonce"),
    "HELLO short nonce": (_send(control(wire.HELLO, {"nonce": "00" * 8})), "invalid nonce"),
    "HELLO numeric nonce": (_send(control(wire.HELLO, {"nonce": 12345})), "invalid nonce"),
    "HELLO without nonce": (_send(control(wire.HELLO, {})), "invalid nonce"),
    "AUTH first": (_send(control(wire.AUTH, {"mac": ""})), "expected HELLO, got AUTH"),
    "AUTH wrong MAC": (_hello_then(lambda f, p: good_auth(f, p, mac="00" * 32)),
                       "failed authentication"),
    "AUTH without MAC": (_hello_then(lambda f, p: {k: v for k, v in good_auth(f, p).items()
                                                    if k != "mac"}),
                         "failed authentication"),
    "AUTH MAC with the primary's role": (
        _hello_then(lambda f, p: good_auth(f, p, mac=wire.mac(SECRET, b"P", f, p))),
        "failed authentication"),
    "AUTH MAC over swapped nonces": (
        _hello_then(lambda f, p: good_auth(f, p, mac=wire.mac(SECRET, b"F", f, p))),
        "failed authentication"),
    "AUTH numeric MAC": (_hello_then(lambda f, p: good_auth(f, p, mac=7)),
                         "failed authentication"),
    "AUTH non-ASCII MAC": (_hello_then(lambda f, p: good_auth(f, p, mac="\u00e9" * 64)),
                           "failed authentication"),
    "AUTH garbage": (_hello_then(None, raw=os.urandom(100)), "bad magic"),
    "AUTH bad epoch": (_hello_then(lambda f, p: good_auth(f, p, epoch="x", fresh=False)),
                       "invalid epoch"),
    "AUTH negative epoch": (_hello_then(lambda f, p: good_auth(f, p, epoch=-5)),
                            "invalid epoch"),
    "AUTH other geometry": (_hello_then(lambda f, p: good_auth(f, p, page_size=[4096])),
                            "geometry differs"),
    "AUTH another store": (_hello_then(lambda f, p: good_auth(f, p, fresh=False, epoch=3)),
                           "another store"),
    "garbage instead of ACK": (_after_welcome(os.urandom(64)), "bad magic"),
    "DELTA instead of ACK": (_after_welcome(frame(wire.DELTA, DELTA_BODY)),
                             "unexpected DELTA from follower"),
    "oversized ACK": (_after_welcome(raw_header(wire.ACK, 2**33)), "exceeds the limit"),
}


def test_check_mac_refuses_anything_but_the_right_ascii_string():
    a, b = os.urandom(16), os.urandom(16)
    good = wire.mac(SECRET, b"F", a, b)
    assert wire.check_mac(SECRET, b"F", a, b, good)
    # A peer's JSON can hold any type; compare_digest raises TypeError on non-ASCII text.
    for got in ("\u00e9" * 64, good[:-1] + "\u00e9", "\x00" * 64, good.encode(), None, 7,
                [good], {"mac": good}, "", good.upper()):
        assert wire.check_mac(SECRET, b"F", a, b, got) is False, got


@pytest.mark.parametrize("case", sorted(ATTACKS))
def test_hostile_client_is_refused_and_the_primary_keeps_serving(live, case):
    attack, expect = ATTACKS[case]
    sock = connect(live.primary)
    port = sock.getsockname()[1]
    try:
        try:
            attack(sock)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the primary hung up while we were still sending: refused
        tail = read_until_closed(sock)
    finally:
        sock.close()
    err = session_error(live.primary, port)
    assert expect in err, f"{case}: the primary logged {err!r}"
    if expect in ("failed authentication", "invalid epoch", "geometry differs",
                  "another store"):
        # A handshake refusal also tells the client why, in an ERROR frame.
        ftype, body = wire.HEADER.unpack(tail[:wire.HEADER_SIZE])[2], tail[wire.HEADER_SIZE:]
        assert ftype == wire.ERROR, tail
        msg = json.loads(body)
        assert msg["code"] == ("auth" if expect == "failed authentication" else "refused")
        said = "authentication failed" if expect == "failed authentication" else expect
        assert said in msg["message"], msg
    live.still_serving()


def test_idle_and_many_hostile_clients_do_not_stall_the_primary(live):
    idle = [connect(live.primary) for _ in range(3)]  # connect and say nothing
    noisy = [connect(live.primary) for _ in range(20)]
    try:
        for i, s in enumerate(noisy):
            s.sendall(os.urandom(24 + i) if i % 2 else raw_header(wire.HELLO, 2**50))
        live.still_serving()
        for s in noisy:
            read_until_closed(s)
        live.still_serving()
    finally:
        for s in idle + noisy:
            s.close()
    live.still_serving()


def test_a_stream_of_junk_frames_never_applies_anything(live):
    """A client that speaks valid frames of every type in every order gets nowhere."""
    rng = np.random.default_rng(7)
    before = page_sums(live.store)
    bodies = [HELLO_BODY, DELTA_BODY, b"{}", b'{"epoch": 99}', os.urandom(40)]
    for i in range(25):
        sock = connect(live.primary)
        try:
            for _ in range(int(rng.integers(1, 5))):
                ftype = int(rng.integers(1, 9))
                body = bodies[int(rng.integers(0, len(bodies)))]
                try:
                    sock.sendall(frame(ftype, body))
                except OSError:
                    break
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # already closed by the primary
            read_until_closed(sock)
        finally:
            sock.close()
    assert page_sums(live.store) == before  # a primary never applies what clients send
    live.still_serving()


# ---- hostile primaries against a live Follower --------------------------------------------
def _fake_primary(script: Callable[[socket.socket], None]):
    server = socket.create_server((LOCAL, 0))
    done = threading.Event()

    def serve() -> None:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            try:
                script(conn)
                done.wait(10)
            except OSError:
                pass
    threading.Thread(target=serve, daemon=True).start()
    return server, done


def _challenge(conn: socket.socket, **over: Any) -> Tuple[bytes, bytes, Dict[str, Any]]:
    hello = wire.recv_json(conn, wire.HELLO)
    f_nonce = bytes.fromhex(hello["nonce"])
    p_nonce = os.urandom(16)
    wire.send_json(conn, wire.CHALLENGE, {"nonce": p_nonce.hex(), "auth": True, **over})
    auth = wire.recv_json(conn, wire.AUTH)
    assert wire.check_mac(SECRET, b"F", p_nonce, f_nonce, auth["mac"])
    return f_nonce, p_nonce, auth


def _welcome_then(extra: Callable[[socket.socket], None], **over: Any):
    def script(conn: socket.socket) -> None:
        f_nonce, p_nonce, auth = _challenge(conn)
        msg = {"mac": wire.mac(SECRET, b"P", f_nonce, p_nonce), "uuid": os.urandom(16).hex(),
               "mode": "full", "since": 0, "epoch": 5}
        msg.update(over)
        wire.send_json(conn, wire.WELCOME, msg)
        extra(conn)
    return script


def _other_geometry_delta() -> bytes:
    s = sc.Store(size=SIZE * 2)
    try:
        s.write(0, b"y" * 100)
        return bytes(s.delta(0).encode())
    finally:
        s.close()


def _corrupt_delta() -> bytes:
    s = sc.Store(size=SIZE)
    try:
        s.write(0, b"z" * 5000)
        body = bytearray(s.delta(0).encode())
    finally:
        s.close()
    body[-1] ^= 0xFF  # a page byte: only the page checksum can tell
    return bytes(body)


PRIMARY_ATTACKS = {
    "garbage": (lambda c: c.sendall(os.urandom(100)), wire.ProtocolError),
    "wrong version": (lambda c: c.sendall(frame(wire.CHALLENGE, b"{}", version=9)),
                      wire.ProtocolError),
    "oversized CHALLENGE": (lambda c: c.sendall(raw_header(wire.CHALLENGE, 2**60)),
                            wire.ProtocolError),
    "CHALLENGE bad nonce": (lambda c: (wire.recv_json(c, wire.HELLO),
                                       c.sendall(control(wire.CHALLENGE, {"nonce": "x"}))),
                            wire.ProtocolError),
    "WELCOME without MAC": (_welcome_then(lambda c: None, mac=""), sc.AuthenticationError),
    "WELCOME non-ASCII MAC": (_welcome_then(lambda c: None, mac="\u00e9" * 64),
                              sc.AuthenticationError),
    "WELCOME without identity": (_welcome_then(lambda c: None, uuid=None), wire.ProtocolError),
    "WELCOME bad identity": (_welcome_then(lambda c: None, uuid="zz"), wire.ProtocolError),
    "DELTA garbage": (_welcome_then(lambda c: c.sendall(frame(wire.DELTA, os.urandom(300)))),
                      sc.CorruptDelta),
    "DELTA corrupt page": (_welcome_then(lambda c: c.sendall(frame(wire.DELTA,
                                                                   _corrupt_delta()))),
                           sc.CorruptDelta),
    "DELTA other geometry": (_welcome_then(lambda c: c.sendall(frame(
        wire.DELTA, _other_geometry_delta()))), sc.IncompatibleDelta),
    "oversized DELTA": (_welcome_then(lambda c: c.sendall(raw_header(wire.DELTA, 2**40))),
                        wire.ProtocolError),
}


# PART frames of delta(0, E) of a store of the follower's geometry, 5 pages a part.
PARTS = part_bodies(n_pages=SIZE // 4096, part_pages=5, page_size=4096, seed=12)
PART_SOURCE_PAGES = 5  # pages 0..4 travel in PARTS[0]


def _edit_part(body: bytes, **fields: int) -> bytes:
    """A PART body with some of its part header or delta header fields rewritten (the
    frame checksum is recomputed by frame(); the delta's own checksums are not)."""
    b = bytearray(body)
    seq, first, total, reserved = wire.PART_HEADER.unpack_from(b)
    vals = dict(seq=seq, first=first, total=total, reserved=reserved)
    vals.update({k: v for k, v in fields.items() if k in vals})
    wire.PART_HEADER.pack_into(b, 0, vals["seq"], vals["first"], vals["total"],
                               vals["reserved"])
    if "compression" in fields:
        struct.pack_into("<H", b, wire.PART_HEADER_SIZE + 12, fields["compression"])
    if "n_pages" in fields:
        struct.pack_into("<Q", b, wire.PART_HEADER_SIZE + 48, fields["n_pages"])
    return bytes(b)


def _other_geometry_part() -> bytes:
    return part_bodies(n_pages=2 * SIZE // 4096, part_pages=5, page_size=4096)[0]


def _corrupt_part(body: bytes) -> bytes:
    b = bytearray(body)
    b[-1] ^= 0xFF  # a page byte: only the page checksum can tell
    return bytes(b)


def _send_frames(*frames: bytes) -> Callable[[socket.socket], None]:
    return _welcome_then(lambda c: [c.sendall(f) for f in frames])


PRIMARY_ATTACKS.update({
    "PART not first": (_send_frames(frame(wire.PART, PARTS[1])), wire.ProtocolError),
    "PART corrupt page": (_send_frames(frame(wire.PART, _corrupt_part(PARTS[0]))),
                          sc.CorruptDelta),
    "PART compressed": (_send_frames(frame(wire.PART, _edit_part(PARTS[0], compression=1))),
                        wire.ProtocolError),
    "PART without pages": (_send_frames(frame(wire.PART, _edit_part(PARTS[0], n_pages=0))),
                           wire.ProtocolError),
    "PART reserved bits": (_send_frames(frame(wire.PART, _edit_part(PARTS[0], reserved=1))),
                           wire.ProtocolError),
    "PART stamped version 1": (_send_frames(frame(wire.PART, PARTS[0], version=1)),
                               wire.ProtocolError),
    "PART other geometry": (_send_frames(frame(wire.PART, _other_geometry_part())),
                            sc.IncompatibleDelta),
    "PART oversized": (_send_frames(raw_header(wire.PART, 2**40)), wire.ProtocolError),
    "PART too short": (_send_frames(frame(wire.PART, b"x" * 40)), wire.ProtocolError),
    "PART past its total": (_send_frames(frame(wire.PART, _edit_part(PARTS[0], total=3))),
                            wire.ProtocolError),
})


@pytest.mark.parametrize("case", sorted(PRIMARY_ATTACKS))
def test_follower_refuses_a_hostile_primary_and_applies_nothing(case):
    script, exc = PRIMARY_ATTACKS[case]
    server, done = _fake_primary(script)
    store = sc.Store(size=SIZE)
    follower = sc.Follower(store, server.getsockname()[:2], secret=SECRET, reconnect=False)
    try:
        with pytest.raises(exc):
            follower.wait_for(1, timeout=10)
        assert follower.status()["state"] == "failed"
        assert follower.epoch == 0 and store.read(0, SIZE) == bytes(SIZE)
    finally:
        done.set()
        follower.close()
        server.close()
        store.close()


# Valid first part, then something wrong: the first part was whole and valid, so it may
# be applied; what follows is not, the follower's epoch never moves, and the store
# remembers to resume from the epoch it had (0), not from its own moved epoch.
PART_SEQUENCE_ATTACKS = {
    "out of order": ([PARTS[0], PARTS[2]], wire.ProtocolError),
    "repeated pages": ([PARTS[0], _edit_part(PARTS[0], seq=1, first=PART_SOURCE_PAGES)],
                       wire.ProtocolError),
    "total changes": ([PARTS[0], _edit_part(PARTS[1], total=999)], wire.ProtocolError),
    "DELTA amid parts": ([PARTS[0], ("delta", _corrupt_delta())], wire.ProtocolError),
    "corrupt second part": ([PARTS[0], _corrupt_part(PARTS[1])], sc.CorruptDelta),
    "hang up": ([PARTS[0], "close"], ConnectionError),
}


@pytest.mark.parametrize("case", sorted(PART_SEQUENCE_ATTACKS))
def test_a_broken_sequence_of_parts_never_moves_the_followers_epoch(case):
    from statecore.replication import _resume_epoch
    steps, exc = PART_SEQUENCE_ATTACKS[case]

    def script(conn: socket.socket) -> None:
        for step in steps:
            if step == "close":
                conn.shutdown(socket.SHUT_RDWR)
                return
            if isinstance(step, tuple):
                conn.sendall(frame(wire.DELTA, step[1]))
            else:
                conn.sendall(frame(wire.PART, step))

    server, done = _fake_primary(_welcome_then(script))
    store = sc.Store(size=SIZE)
    follower = sc.Follower(store, server.getsockname()[:2], secret=SECRET, reconnect=False)
    try:
        with pytest.raises(exc):
            follower.wait_for(1, timeout=10)
        assert follower.status()["state"] == "failed"
        assert follower.epoch == 0 and follower.deltas_applied == 0
        assert _resume_epoch(store) == 0  # though the store's own epoch moved on
        first = sc.Delta.decode(PARTS[0][wire.PART_HEADER_SIZE:])
        second = sc.Delta.decode(PARTS[1][wire.PART_HEADER_SIZE:])
        assert store.epoch == first.target_epoch + 1
        # The first part is in, nothing of the second.
        for delta, present in ((first, True), (second, False)):
            for i, page in enumerate(delta.page_ids.tolist()):
                got = store.read(page * 4096, 4096)
                assert got == (bytes(delta.page(i)) if present else bytes(4096)), page
    finally:
        done.set()
        follower.close()
        server.close()
        store.close()
