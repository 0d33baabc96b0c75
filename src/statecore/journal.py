"""The commit journal: append-only segments of framed, checksummed delta records.

Record frame (little-endian, 32 bytes, then the encoded delta):
  magic b"SCJR" | format version u16 | flags u16 | payload length u64 |
  payload checksum u64 | frame checksum u64 (over the 24 bytes before it)
The payload checksum covers the delta's header and index; the index holds a checksum
of every page, so the record is covered end to end without hashing the pages twice."""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

from . import _core, errors
from .checkpoint import fsync_directory
from .delta import Delta, header_and_index_end

MAGIC = b"SCJR"
FORMAT_VERSION = 1
FRAME = struct.Struct("<4sHHQQQ")
FRAME_SIZE = FRAME.size  # 32
FLAG_REPLICATED = 1  # the record is a primary's delta applied by a follower


def _digest_prefix(delta_bytes: memoryview) -> int:
    """Checksum of the delta's header and index (which checksums every page)."""
    return _core.page_checksum(delta_bytes[:header_and_index_end(delta_bytes)])


def frame(delta_bytes: memoryview, flags: int = 0) -> bytes:
    head = FRAME.pack(MAGIC, FORMAT_VERSION, flags, len(delta_bytes),
                      _digest_prefix(delta_bytes), 0)
    return head[:24] + struct.pack("<Q", _core.page_checksum(head[:24]))


def segment_name(start_epoch: int) -> str:
    return f"journal-{start_epoch:020d}.log"


@dataclass
class Damage:
    """Where and why reading a segment stopped early."""
    offset: int
    reason: str
    bytes_after: int  # bytes from offset to the end of the segment


class JournalWriter:
    """Appends framed records to one segment file; the caller decides when to fsync."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.broken: Optional[str] = None  # why no record may be appended any more
        created = not os.path.exists(path)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            self.size = os.fstat(self.fd).st_size
            if created:
                # The file's name must be durable before a record in it is called durable
                # (fdatasync covers the data, not the directory entry).
                fsync_directory(path)
        except BaseException:
            self.close()
            raise

    def append(self, delta_bytes: memoryview, flags: int = 0) -> int:
        """Write one record (header + the delta buffer itself, no copy). On failure the
        segment is cut back so a half-written record never precedes later ones."""
        if self.broken:
            raise errors.StateError(f"journal unusable: {self.broken}")
        head = frame(delta_bytes, flags)
        total = len(head) + len(delta_bytes)
        start = self.size
        try:
            written = os.writev(self.fd, [head, delta_bytes])
            while written < total:  # short write: finish it from where it stopped
                rest = (head + bytes(delta_bytes))[written:]
                written += os.write(self.fd, rest)
        except BaseException:
            self._cut_back(start)
            raise
        self.size = start + total
        return start

    def _cut_back(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as e:
            # A torn record stays in the segment. Recovery stops at it, so a record
            # appended after it would be lost although its commit returned: append no more.
            self.broken = f"a failed append could not be cut back ({e})"

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _map(path: str) -> Optional[mmap.mmap]:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return None
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


Record = Tuple[Delta, int]  # (delta, flags)


def read_segment(path: str) -> Tuple[List[Record], Optional[Damage], Optional[mmap.mmap]]:
    """Every whole, valid record of a segment, in order, decoded without copies (the
    deltas point into the returned mapping); reading stops at the first bad record."""
    mm = _map(path)
    if mm is None:
        return [], None, None
    buf = memoryview(mm)
    records: List[Record] = []
    damage = None
    for item in _records(buf):
        if isinstance(item, Damage):
            damage = item
            break
        records.append(item)
    return records, damage, mm


def _records(buf: memoryview) -> Iterator["Record | Damage"]:
    pos, end = 0, len(buf)
    while pos < end:
        bad = _check_frame(buf, pos)
        if bad:
            yield Damage(pos, bad, end - pos)
            return
        flags, length = struct.unpack_from("<HQ", buf, pos + 6)
        body = buf[pos + FRAME_SIZE:pos + FRAME_SIZE + length]
        try:
            delta = Delta.decode(body, copy=False)
        except errors.UnsupportedFormat:
            raise  # checksums hold: a newer statecore wrote it; not damage to cut away
        except errors.StateError as e:
            yield Damage(pos, f"record does not decode: {e}", end - pos)
            return
        yield delta, flags
        pos += FRAME_SIZE + length


def _check_frame(buf: memoryview, pos: int) -> Optional[str]:
    end = len(buf)
    if end - pos < FRAME_SIZE:
        return f"torn record header ({end - pos} of {FRAME_SIZE} bytes)"
    magic, version, _, length, digest, check = FRAME.unpack_from(buf, pos)
    if magic != MAGIC or check != _core.page_checksum(buf[pos:pos + 24]):
        return "record header checksum mismatch"
    if version > FORMAT_VERSION:
        raise errors.UnsupportedFormat(
            f"journal record format {version} is newer than this statecore reads "
            f"({FORMAT_VERSION}); upgrade statecore")
    if length > end - pos - FRAME_SIZE:
        return f"torn record: {length} bytes announced, {end - pos - FRAME_SIZE} present"
    if _digest_prefix(buf[pos + FRAME_SIZE:pos + FRAME_SIZE + length]) != digest:
        return "record checksum mismatch"
    return None
