"""Operator tools: describe statecore files and verify a durable directory."""
from __future__ import annotations

import errno
import fnmatch
import os
from typing import Any, Callable, Dict, List, Optional

from . import _core, errors
from ._args import DEFAULT_PAGE_SIZE
from .checkpoint import open_readonly_mmap, read_checkpoint
from .delta import COMPRESSIONS
from .journal import read_segment
from .manifest import NAME as MANIFEST_NAME
from .manifest import checkpoint_name, read_manifest, scan_directory
from .journal import segment_name

_DELTA_KINDS = {b"SCCKPT01": ("checkpoint", _core.KIND_CHECKPOINT, errors.CorruptCheckpoint),
                b"SCDELTA1": ("delta", _core.KIND_DELTA, errors.CorruptDelta)}
_COMPRESSION_NAMES = {code: name for name, code in COMPRESSIONS.items()}


def _describe_delta(path: str, magic: bytes, size: int) -> Dict[str, Any]:
    """A checkpoint's or delta file's header, as the core's parser reads and checks it
    (header and index; the pages are `statecore verify`'s work)."""
    kind, code, corrupt = _DELTA_KINDS[magic]
    try:
        # The view holds the mapping open; both go when this function returns.
        view = _core.parse(open_readonly_mmap(path), code, False, corrupt)
    except errors.UnsupportedFormat:
        raise errors.UnsupportedFormat(
            f"{path!r}: {kind} format version is newer than this statecore reads (version "
            f"{_core.FORMAT_VERSION})") from None
    except errors.StateError as e:
        raise type(e)(f"{path!r}: {e}") from None
    return {"kind": kind, "file_bytes": size,
            "format_version": view.format_version, "page_size": view.page_size,
            "size": view.store_pages * view.page_size, "base_epoch": view.base_epoch,
            "epoch": view.target_epoch, "pages": view.n_pages,
            "schema_version": view.schema_version,
            "payload_bytes": view.total_bytes - view.payload_offset,
            "compression": _COMPRESSION_NAMES.get(view.compression, view.compression),
            "store_uuid": view.store_uuid.hex()}


def describe(path: str) -> Dict[str, Any]:
    """Format version, page size, epochs, sizes and schema version of any statecore path."""
    if os.path.isdir(path):
        return _describe_directory(path)
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
    if not os.path.isfile(path):
        # A device or FIFO has no size to check and may never end (or block on read).
        raise errors.CorruptData(f"{path!r} is not a regular file or directory")
    with open(path, "rb") as f:
        head = f.read(_core.STORE_HEADER_BYTES)
    size = os.path.getsize(path)
    magic = head[:8]
    if magic in _DELTA_KINDS:
        return _describe_delta(path, magic, size)
    if magic == b"SCSTORE1":
        try:
            # The core's checks, without opening the store (which takes its lock).
            h = _core.read_store_header(head)
        except errors.StateError as e:
            raise type(e)(f"{path!r}: {e}") from None
        return {"kind": "store file", "format_version": h["format_version"],
                "page_size": h["page_size"], "size": h["size"], "epoch": h["epoch"],
                "schema_version": h["schema_version"], "file_bytes": size}
    # A journal segment is created empty, so an empty file is one only by its name.
    if magic[:4] == b"SCJR" or (size == 0 and fnmatch.fnmatch(os.path.basename(path),
                                                             "journal-*.log")):
        return _describe_segment(path)
    if magic == b"SCMANIF1":
        return {"kind": "manifest", **vars(read_manifest(os.path.dirname(path) or "."))}
    if size == 0:
        raise errors.CorruptData(f"{path!r} is empty: not a statecore file")
    raise errors.CorruptData(f"{path!r} is not a statecore file (magic {magic!r})")


def _describe_segment(path: str) -> Dict[str, Any]:
    records, damage, _ = read_segment(path)
    out: Dict[str, Any] = {"kind": "journal segment", "file_bytes": os.path.getsize(path),
                           "records": len(records)}
    if records:
        out.update(format_version=records[0][0].format_version,
                   page_size=records[0][0].page_size,
                   size=records[0][0].store_pages * records[0][0].page_size,
                   first_base_epoch=records[0][0].base_epoch,
                   last_epoch=records[-1][0].target_epoch,
                   schema_version=records[-1][0].schema_version)
    if damage is not None:
        out["damage"] = f"at offset {damage.offset}: {damage.reason}"
    return out


def _describe_directory(path: str) -> Dict[str, Any]:
    if not os.path.exists(os.path.join(path, MANIFEST_NAME)):
        ckpts, segs = scan_directory(path)
        if ckpts or segs:
            raise errors.CorruptData(f"{path!r} has no MANIFEST; `statecore recover` with "
                                     "--size rebuilds it from the checkpoints and journal")
        raise errors.CorruptData(f"{path!r} is not a durable store directory (no MANIFEST, "
                                 "checkpoint or journal segment)")
    m = read_manifest(path)
    files = sorted(os.listdir(path))
    return {"kind": "durable directory", "format_version": m.format_version,
            "page_size": m.page_size, "size": m.size, "schema_version": m.schema_version,
            "uuid": m.uuid, "checkpoints": m.checkpoints, "journal_segments": m.segments,
            "bytes": sum(os.path.getsize(os.path.join(path, f)) for f in files),
            "files": files}


def verify_directory(directory: str,
                     progress: Optional[Callable[[int, int], None]] = None) -> Dict[str, Any]:
    """Check every checksum of a durable directory without changing it, and say what
    recovery would do."""
    files: List[Dict[str, Any]] = []
    ok = True
    try:
        manifest = read_manifest(directory)
        files.append({"file": MANIFEST_NAME, "status": "ok"})
        ckpts, segs = manifest.checkpoints, manifest.segments
    except (OSError, errors.CorruptData) as e:
        files.append({"file": MANIFEST_NAME, "status": "damaged", "detail": str(e)})
        ok = False
        ckpts, segs = scan_directory(directory)
        manifest = None
    names = [checkpoint_name(e) for e in ckpts] + [segment_name(s) for s in segs]
    total = sum(_size(os.path.join(directory, n)) for n in names)
    done = 0
    for name in names:
        path = os.path.join(directory, name)
        status, detail = _verify_file(path, name.startswith("ckpt-"))
        ok = ok and status in ("ok", "missing (empty)")
        files.append({"file": name, "status": status, "detail": detail})
        done += _size(path)
        if progress:
            progress(done, total)
    return {"ok": ok, "files": files, "recovery": _dry_run(directory, manifest)}


def _size(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


def _verify_file(path: str, is_checkpoint: bool) -> tuple:
    if not os.path.exists(path):
        return ("missing (empty)" if not is_checkpoint else "missing"), ""
    if is_checkpoint:
        try:
            view = read_checkpoint(path)
            return "ok", f"epoch {view.target_epoch}, {view.n_pages} pages"
        except (errors.StateError, OSError) as e:
            return "damaged", str(e)
    records, damage, _ = read_segment(path)
    if damage is None:
        return "ok", f"{len(records)} records"
    return "damaged", (f"{len(records)} good records, then at offset {damage.offset}: "
                       f"{damage.reason} ({damage.bytes_after} bytes)")


def _dry_run(directory: str, manifest: Any) -> str:
    """Recover into memory (nothing on disk changes) and describe the outcome."""
    from .recovery import recover
    from .store import Store
    if manifest is None:
        return ("rebuild the manifest from the directory listing (run `statecore recover "
                f"DIR --size SIZE`, adding --page-size if the store's is not {DEFAULT_PAGE_SIZE})")
    with Store(size=manifest.size, page_size=manifest.page_size) as scratch:
        try:
            report, _ = recover(scratch, directory, manifest)
        except errors.StateError as e:
            return f"fail: {e}"
    return str(report).replace("\n", "; ")
