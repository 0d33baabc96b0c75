"""The manifest of a durable directory: which checkpoints and journal segments hold its
state. Replaced atomically (temporary name, fsync, rename, fsync of the directory), so
recovery finds the newest checkpoint with one read instead of a directory scan.

File: b"SCMANIF1" | u64 murmur3 checksum of the body | JSON body."""
from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import asdict, dataclass, field
from typing import Dict, List

from . import _core, errors
from ._args import check_page_size, check_size
from .checkpoint import fsync_directory

MAGIC = b"SCMANIF1"
FORMAT_VERSION = 1
NAME = "MANIFEST"
_CKPT = re.compile(r"^ckpt-(\d{20})\.sc$")
_SEGMENT = re.compile(r"^journal-(\d{20})\.log$")


def checkpoint_name(epoch: int) -> str:
    return f"ckpt-{epoch:020d}.sc"


@dataclass
class Manifest:
    size: int
    page_size: int
    uuid: str
    schema_version: int = 0
    checkpoints: List[int] = field(default_factory=list)  # epochs, oldest first
    segments: List[int] = field(default_factory=list)     # start epochs, oldest first
    # For a follower's store: the primary epoch each checkpoint holds (key: str(epoch)).
    replica_epochs: Dict[str, int] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def encode(self) -> bytes:
        body = json.dumps(asdict(self), sort_keys=True).encode()
        return MAGIC + struct.pack("<Q", _core.page_checksum(body)) + body

    @classmethod
    def decode(cls, data: bytes) -> "Manifest":
        if len(data) < 16 or data[:8] != MAGIC:
            raise errors.CorruptData("manifest has no statecore magic")
        body = data[16:]
        if struct.unpack_from("<Q", data, 8)[0] != _core.page_checksum(body):
            raise errors.CorruptData("manifest checksum mismatch")
        try:
            raw = json.loads(body)
        except ValueError as e:
            raise errors.CorruptData(f"manifest body is not JSON: {e}") from None
        version = raw.get("format_version", 0)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise errors.UnsupportedFormat(
                f"manifest format {version} is newer than this statecore reads ({FORMAT_VERSION})")
        if not isinstance(raw, dict):
            raise errors.CorruptData("manifest body is not a JSON object")
        try:
            manifest = cls(**raw)
        except TypeError as e:
            raise errors.CorruptData(f"manifest fields invalid: {e}") from None
        problem = manifest._invalid()
        if problem:
            raise errors.CorruptData(f"manifest fields invalid: {problem}")
        return manifest

    def _invalid(self) -> str:
        """What is wrong with fields read from disk (the checksum says they are what was
        written, not that a writer wrote sense), or ""."""
        if not all(_is_uint(v) for v in (self.size, self.page_size, self.schema_version)):
            return "size, page_size and schema_version must be non-negative integers"
        try:
            check_size(self.size, check_page_size(self.page_size))
        except ValueError as e:
            return f"not a store's geometry: {e}"
        if not isinstance(self.uuid, str) or not re.fullmatch(r"[0-9a-f]{32}", self.uuid):
            return "uuid must be 32 hex digits"
        for name in ("checkpoints", "segments"):
            epochs = getattr(self, name)
            if not isinstance(epochs, list) or not all(_is_uint(e) for e in epochs) \
                    or epochs != sorted(set(epochs)):
                return f"{name} must be increasing non-negative integers"
        if not self.segments:
            return "no journal segment listed"
        if not isinstance(self.replica_epochs, dict) or not all(
                isinstance(k, str) and _is_uint(v) for k, v in self.replica_epochs.items()):
            return "replica_epochs must map epochs to non-negative integers"
        return ""


def _is_uint(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def write_manifest(directory: str, manifest: Manifest) -> None:
    path = os.path.join(directory, NAME)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        data = manifest.encode()
        if os.write(fd, data) != len(data):
            raise OSError("short write of the manifest")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_directory(path)


def read_manifest(directory: str) -> Manifest:
    with open(os.path.join(directory, NAME), "rb") as f:
        return Manifest.decode(f.read())


def scan_directory(directory: str) -> tuple[List[int], List[int]]:
    """Checkpoint epochs and segment starts present on disk (fallback when the manifest
    is damaged)."""
    ckpts, segs = [], []
    for name in os.listdir(directory):
        m = _CKPT.match(name)
        if m:
            ckpts.append(int(m.group(1)))
        m = _SEGMENT.match(name)
        if m:
            segs.append(int(m.group(1)))
    return sorted(ckpts), sorted(segs)
