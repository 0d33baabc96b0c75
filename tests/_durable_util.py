"""Helpers shared by test_durable.py, test_durable_faults.py and test_crash.py.

A `Model` is a plain bytearray mirror of a store's bytes; every write goes to both, so
the store's full state can be compared with the model's at any committed epoch."""
from __future__ import annotations

import hashlib
import os
import random
import struct
from typing import Dict, List, Tuple

import statecore as sc
from statecore import journal
from statecore.manifest import NAME as MANIFEST_NAME, checkpoint_name, read_manifest

__all__ = ["Model", "state_hash", "digest", "random_writes", "record_spans", "flip_bit",
           "truncate", "files_fingerprint", "segment_files", "checkpoint_files",
           "MANIFEST_NAME", "checkpoint_name", "read_manifest", "craft_manifest"]


def digest(data) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def state_hash(store: sc.Store) -> str:
    return digest(store.read(0, store.size))


class Model:
    """The expected bytes of a store, plus the hash of each committed epoch."""

    def __init__(self, size: int, page_size: int, data: bytes | None = None) -> None:
        self.size, self.page_size = size, page_size
        self.data = bytearray(data if data is not None else bytes(size))
        self.at: Dict[int, str] = {0: digest(bytes(size))}  # epoch -> state hash

    def hash(self) -> str:
        return digest(self.data)

    def committed(self, epoch: int) -> None:
        self.at[epoch] = self.hash()

    def write(self, store: sc.Store, offset: int, data: bytes) -> None:
        store.write(offset, data)
        self.data[offset:offset + len(data)] = data

    def write_pages(self, store: sc.Store, ids: List[int], data: bytes) -> None:
        store.write_pages(ids, data)
        ps = self.page_size
        for i, p in enumerate(ids):
            self.data[p * ps:(p + 1) * ps] = data[i * ps:(i + 1) * ps]


def random_writes(rng: random.Random, store: sc.Store, model: Model, n: int) -> None:
    """n writes of assorted shapes: small, page-crossing, whole pages (vectorized)."""
    size, ps = model.size, model.page_size
    for _ in range(n):
        kind = rng.random()
        if kind < 0.6:
            length = rng.randint(1, min(3 * ps, size))
            off = rng.randrange(0, size - length + 1)
            model.write(store, off, rng.randbytes(length))
        else:
            ids = sorted(rng.sample(range(size // ps), rng.randint(1, min(4, size // ps))))
            model.write_pages(store, ids, rng.randbytes(len(ids) * ps))


def record_spans(path: str) -> List[Tuple[int, int, int, int]]:
    """(start, end, base_epoch, target_epoch) of every record of a journal segment."""
    with open(path, "rb") as f:
        buf = f.read()
    spans = []
    pos = 0
    while pos + journal.FRAME_SIZE <= len(buf):
        length = struct.unpack_from("<Q", buf, pos + 8)[0]
        body = buf[pos + journal.FRAME_SIZE:pos + journal.FRAME_SIZE + length]
        d = sc.Delta.decode(body)
        end = pos + journal.FRAME_SIZE + length
        spans.append((pos, end, d.base_epoch, d.target_epoch))
        pos = end
    assert pos == len(buf), f"{path}: trailing bytes after the last record"
    return spans


def flip_bit(path: str, offset: int, bit: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ (1 << bit)]))


def truncate(path: str, length: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(length)


def files_fingerprint(directory: str) -> Dict[str, str]:
    """Name -> content hash of every file but the lock file."""
    out = {}
    for name in sorted(os.listdir(directory)):
        if name == "LOCK":
            continue
        with open(os.path.join(directory, name), "rb") as f:
            out[name] = digest(f.read())
    return out


def segment_files(directory: str) -> List[str]:
    return sorted(n for n in os.listdir(directory)
                  if n.startswith("journal-") and n.endswith(".log"))


def checkpoint_files(directory: str) -> List[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith("ckpt-") and n.endswith(".sc"))


def craft_manifest(directory: str, **changes) -> None:
    """Rewrite the manifest with some fields changed, with a valid checksum."""
    import json
    from statecore import _core
    from statecore.manifest import MAGIC
    path = os.path.join(directory, MANIFEST_NAME)
    with open(path, "rb") as f:
        data = f.read()
    raw = json.loads(data[16:])
    raw.update(changes)
    body = json.dumps(raw, sort_keys=True).encode()
    with open(path, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", _core.page_checksum(body)) + body)
