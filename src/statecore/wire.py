"""The replication wire protocol: versioned, length-prefixed, checksummed frames.

Frame header (24 bytes, little-endian):
  magic b"SCW1" | protocol version u16 | frame type u16 | body length u64 |
  checksum u64 = murmur3 of (the first 16 header bytes + the body's digest part)
The digest part is the whole body for control frames (small JSON); for DELTA frames the
delta's header and index, for PART frames the part header and the delta's header and
index: the index carries a checksum of every page, and the receiver decodes (fully
validates) every delta before applying it.

Versions: a frame carries the version of the protocol that introduced its type (1 for
all but PART, 2), so a peer that speaks only version 1 reads every frame it is ever sent:
PART frames go only to followers that asked for them in AUTH. A receiver accepts
versions 1 to PROTOCOL_VERSION and refuses a PART frame that claims version 1.

PART (version 2): one part of a large delta(a, b], sent in order. Body:
  seq u64 (0, 1, ...) | first u64 (pages of the delta sent before this part) |
  total u64 (pages in the whole delta) | reserved u64 (0) | an encoded delta (a, b] of
  the next pages (uncompressed, at least one page, page ids above the previous part's)
The last part is the one with first + its pages == total."""
from __future__ import annotations

import json
import socket
import struct
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from . import _core, errors
from .delta import header_and_index_end

MAGIC = b"SCW1"
PROTOCOL_VERSION = 2       # the newest this side speaks
MIN_PROTOCOL_VERSION = 1   # the oldest it still reads
HEADER = struct.Struct("<4sHHQQ")
HEADER_SIZE = HEADER.size  # 24
CONTROL_LIMIT = 64 << 10   # control frames (JSON) are small; a peer cannot make us allocate more

HELLO, CHALLENGE, AUTH, WELCOME, DELTA, ACK, PING, ERROR, PART = range(1, 10)
NAMES = {HELLO: "HELLO", CHALLENGE: "CHALLENGE", AUTH: "AUTH", WELCOME: "WELCOME",
         DELTA: "DELTA", ACK: "ACK", PING: "PING", ERROR: "ERROR", PART: "PART"}
INTRODUCED = {PART: 2}     # frame type -> the protocol version that added it (else 1)

PART_HEADER = struct.Struct("<QQQQ")  # seq, first, total, reserved
PART_HEADER_SIZE = PART_HEADER.size   # 32: the delta after it stays 8-byte aligned


class ProtocolError(errors.StateError):
    """The peer sent something that is not a valid statecore frame, or broke the protocol."""


class AuthenticationError(ProtocolError):
    """The peer did not prove knowledge of the shared secret."""


class PeerError(errors.StateError):
    """The peer refused us and said why (an ERROR frame)."""


def _digest_part(ftype: int, body: Any) -> bytes:
    mv = memoryview(body).cast("B")
    if ftype not in (DELTA, PART):
        return bytes(mv)
    return bytes(mv[:header_and_index_end(mv, PART_HEADER_SIZE if ftype == PART else 0)])


def frame_header(ftype: int, body: Any, version: Optional[int] = None,
                 length: Optional[int] = None) -> bytes:
    """The 24-byte header of a frame; `version` defaults to the one that introduced the
    frame's type (a test may stamp any). With `length`, `body` is only the start of a
    longer body, and holds its whole digest part."""
    if version is None:
        version = INTRODUCED.get(ftype, MIN_PROTOCOL_VERSION)
    if length is None:
        length = memoryview(body).nbytes
    head = struct.pack("<4sHHQ", MAGIC, version, ftype, length)
    return head + struct.pack("<Q", _core.page_checksum(head + _digest_part(ftype, body)))


def send_frame(sock: socket.socket, ftype: int, body: Any, *more: Any) -> int:
    """Send header and body without copying the body (sendmsg where available). The body
    may come in pieces (`more` after the first); the first holds the digest part."""
    pieces = [memoryview(b).cast("B") for b in (body, *more)]
    length = sum(p.nbytes for p in pieces)
    parts: List[memoryview] = [memoryview(frame_header(ftype, body, length=length)), *pieces]
    total = sum(p.nbytes for p in parts)
    if not hasattr(sock, "sendmsg") or _is_tls(sock):
        for p in parts:
            sock.sendall(p)
        return total
    while parts:
        sent = sock.sendmsg(parts)
        while parts and sent >= parts[0].nbytes:
            sent -= parts[0].nbytes
            parts.pop(0)
        if parts and sent:
            parts[0] = parts[0][sent:]
    return total


def _is_tls(sock: socket.socket) -> bool:
    import ssl
    return isinstance(sock, ssl.SSLSocket)


def send_json(sock: socket.socket, ftype: int, payload: Dict[str, Any]) -> None:
    send_frame(sock, ftype, json.dumps(payload).encode())


class RecvBuffer:
    """A receive buffer reused across DELTA and PART frames: a fresh bytearray per frame
    costs a zeroing pass and a page fault per page, more than receiving the bytes. The body
    of the last frame is valid until the next receive into the same buffer."""

    def __init__(self) -> None:
        self._mem = np.empty(0, dtype=np.uint8)

    def take(self, n: int) -> memoryview:
        if self._mem.size < n:
            self._mem = np.empty(max(n, self._mem.size * 3 // 2), dtype=np.uint8)
        return self._mem.data[:n]


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    n, got = view.nbytes, 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError(f"connection closed by peer ({got} of {n} bytes received)")
        got += k


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf))
    return buf


def recv_frame(sock: socket.socket, limit: int, reuse: Optional[RecvBuffer] = None,
               part_limit: int = 0) -> Tuple[int, Any]:
    """One frame: (type, body). The length is checked against `limit` (DELTA),
    `part_limit` (PART; 0: PART frames were not asked for and are refused) or the control
    limit before any allocation; the checksum before anything looks at the body. With
    `reuse`, a DELTA or PART body is received into that buffer instead of a new
    bytearray."""
    raw = _recv_exact(sock, HEADER_SIZE)
    magic, version, ftype, length, checksum = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ProtocolError(f"not a statecore peer: bad magic {bytes(magic)!r}")
    if not MIN_PROTOCOL_VERSION <= version <= PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version} not supported (this side speaks "
                            f"{MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION})")
    if ftype not in NAMES:
        raise ProtocolError(f"unknown frame type {ftype}")
    if version < INTRODUCED.get(ftype, MIN_PROTOCOL_VERSION):
        raise ProtocolError(f"{NAMES[ftype]} frames need protocol version "
                            f"{INTRODUCED[ftype]}, got {version}")
    if ftype == PART and not part_limit:
        raise ProtocolError("unexpected PART frame (not asked for)")
    cap = {DELTA: limit, PART: part_limit}.get(ftype, min(limit, CONTROL_LIMIT))
    if length > cap:
        raise ProtocolError(f"{NAMES[ftype]} frame of {length} bytes exceeds the limit of {cap}")
    if reuse is not None and ftype in (DELTA, PART):
        body: Any = reuse.take(length)
        _recv_into(sock, body)
    else:
        body = _recv_exact(sock, length)
    if _core.page_checksum(bytes(raw[:16]) + _digest_part(ftype, body)) != checksum:
        raise ProtocolError(f"{NAMES[ftype]} frame checksum mismatch")
    return ftype, body


def recv_json(sock: socket.socket, expect: int, limit: int = CONTROL_LIMIT) -> Dict[str, Any]:
    ftype, body = recv_frame(sock, limit)
    if ftype == ERROR:
        raise peer_error(_parse_json(body))
    if ftype != expect:
        raise ProtocolError(f"expected {NAMES[expect]}, got {NAMES[ftype]}")
    return _parse_json(body)


def peer_error(msg: Dict[str, Any]) -> errors.StateError:
    text = f"primary refused: {msg.get('message', 'refused')}"
    return AuthenticationError(text) if msg.get("code") == "auth" else PeerError(text)


def _parse_json(body: bytearray) -> Dict[str, Any]:
    try:
        obj = json.loads(bytes(body))
    except (ValueError, RecursionError) as e:  # RecursionError: deeply nested input
        raise ProtocolError(f"control frame is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("control frame is not a JSON object")
    return obj


def delta_frame_limit(size: int, page_size: int) -> int:
    """Largest DELTA frame a store of this geometry can need: every page, plus index."""
    n = size // page_size
    return _core.HEADER_SIZE + n * (24 + page_size) + (1 << 20)


def part_frame_limit(part_pages: int, page_size: int) -> int:
    """Largest PART frame carrying at most `part_pages` pages."""
    return PART_HEADER_SIZE + _core.delta_pages_bytes(part_pages, page_size)


class PartFields(NamedTuple):
    seq: int
    first: int
    total: int
    reserved: int
    compression: int
    base: int
    target: int
    n_pages: int


def part_fields(body: Any) -> PartFields:
    """The part header and the delta header fields a receiver sequences parts by. Read
    from a frame whose checksum passed (it covers them); Delta.decode validates the rest."""
    mv = memoryview(body).cast("B")
    if len(mv) < PART_HEADER_SIZE + _core.HEADER_SIZE:
        raise ProtocolError(f"PART frame of {len(mv)} bytes is too short for a part")
    seq, first, total, reserved = PART_HEADER.unpack_from(mv)
    compression = struct.unpack_from("<H", mv, PART_HEADER_SIZE + 12)[0]
    base, target, n = struct.unpack_from("<QQQ", mv, PART_HEADER_SIZE + 32)
    return PartFields(seq, first, total, reserved, compression, base, target, n)


def send_error(sock: socket.socket, message: str, code: str = "refused") -> None:
    try:
        send_json(sock, ERROR, {"message": message, "code": code})
    except OSError:
        pass


def mac(secret: Optional[bytes], role: bytes, a: bytes, b: bytes) -> str:
    """HMAC-SHA256 proof of the shared secret, bound to both nonces and the role."""
    import hashlib
    import hmac
    if secret is None:
        return ""
    return hmac.new(secret, role + a + b, hashlib.sha256).hexdigest()


def check_mac(secret: bytes, role: bytes, a: bytes, b: bytes, got: Any) -> bool:
    """Whether `got` (from the peer's JSON: any type) is the proof mac() makes. Anything
    but an ASCII str is simply wrong: compare_digest raises TypeError on a non-ASCII str,
    which would end the handshake as a crash instead of a refusal."""
    import hmac
    if not isinstance(got, str) or not got.isascii():
        return False
    return hmac.compare_digest(mac(secret, role, a, b).encode(), got.encode())
