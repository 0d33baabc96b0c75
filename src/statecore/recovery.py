"""Recovery of a durable directory: newest good checkpoint, then the journal after it.

Nothing is skipped silently: every checkpoint passed over, torn tail cut or record not
applied is listed in the report with the reason and the bytes involved."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Tuple

from . import errors
from .checkpoint import read_checkpoint, restore_into
from .delta import Delta
from .journal import FLAG_REPLICATED, Damage, read_segment, segment_name
from .manifest import Manifest, checkpoint_name
from .replay import replay

if TYPE_CHECKING:
    from .store import Store


@dataclass
class Discarded:
    what: str     # file (and offset) that was not used
    reason: str
    bytes: int = 0

    def __str__(self) -> str:
        return f"{self.what}: {self.reason} ({self.bytes} bytes)"


@dataclass
class RecoveryReport:
    """What opening a durable directory did."""
    fresh: bool = False
    checkpoint_epoch: Optional[int] = None
    checkpoint_file: Optional[str] = None
    checkpoint_bytes: int = 0
    deltas_replayed: int = 0
    pages_replayed: int = 0
    journal_bytes: int = 0
    committed_epoch: int = 0   # newest committed epoch whose state was recovered
    replica_epoch: int = 0     # newest primary epoch applied, for a follower's store
    seconds: float = 0.0
    discarded: List[Discarded] = field(default_factory=list)
    repairs: List[str] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return self.checkpoint_bytes + self.journal_bytes

    def __str__(self) -> str:
        from .progress import human_bytes
        if self.fresh:
            return "new durable store"
        base = (f"checkpoint {self.checkpoint_epoch}" if self.checkpoint_epoch is not None
                else "empty state")
        lines = [f"recovered epoch {self.committed_epoch} from {base} + {self.deltas_replayed} "
                 f"deltas ({human_bytes(self.bytes)}) in {self.seconds:.3f} s"]
        lines += [f"discarded {d}" for d in self.discarded]
        lines += [f"repaired: {r}" for r in self.repairs]
        return "\n".join(lines)


def _load_newest_checkpoint(store: "Store", directory: str, manifest: Manifest,
                            report: RecoveryReport) -> int:
    """Restore the newest checkpoint whose checks all hold; returns its epoch (0: none)."""
    for epoch in reversed(manifest.checkpoints):
        path = os.path.join(directory, checkpoint_name(epoch))
        try:
            view = read_checkpoint(path, verify_pages=False)
            if view.store_pages * view.page_size != store.size \
                    or view.page_size != store.page_size:
                report.discarded.append(Discarded(os.path.basename(path),
                                                  "made for another store size or page size"))
                continue
            restore_into(store, view, path)  # on a bad page the store is left empty
        except (errors.CorruptCheckpoint, OSError) as e:
            size = os.path.getsize(path) if os.path.exists(path) else 0
            report.discarded.append(Discarded(os.path.basename(path), str(e), size))
            continue
        report.checkpoint_epoch = epoch
        report.replica_epoch = manifest.replica_epochs.get(str(epoch), 0)
        report.checkpoint_file = os.path.basename(path)
        report.checkpoint_bytes = view.total_bytes
        return epoch
    if manifest.segments[:1] != [0]:
        raise errors.CorruptCheckpoint(
            f"no usable checkpoint in {directory!r} and the journal does not reach back to "
            f"epoch 0: state cannot be proven; discarded: "
            + "; ".join(map(str, report.discarded)))
    return 0


def _segments_after(manifest: Manifest, base: int) -> List[int]:
    """Segments holding records with target > base: segment i covers (start_i, start_i+1]."""
    starts = manifest.segments
    first = max((i for i, s in enumerate(starts) if s <= base), default=0)
    return starts[first:]


def _collect(directory: str, starts: List[int], base: int, report: RecoveryReport
             ) -> Tuple[List[Delta], List[Any], Optional[Tuple[str, Damage, bool]]]:
    """Valid deltas after `base`, in order, up to the first damage or gap."""
    deltas: List[Delta] = []
    maps: List[Any] = []
    reached = base
    for i, start in enumerate(starts):
        name = segment_name(start)
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            if i == len(starts) - 1:
                continue  # rotated but nothing committed there yet
            return deltas, maps, (name, Damage(0, "segment file missing", 0), False)
        records, damage, mm = read_segment(path)
        if mm is not None:
            maps.append(mm)
        for d, flags in records:
            if d.target_epoch <= reached:
                continue  # already in the checkpoint
            if d.base_epoch > reached:
                return deltas, maps, (name, Damage(-1, f"gap: record ({d.base_epoch}, "
                                                   f"{d.target_epoch}] after epoch {reached}",
                                                   0), False)
            deltas.append(d)
            reached = d.target_epoch
            if flags & FLAG_REPLICATED:
                report.replica_epoch = max(report.replica_epoch, d.target_epoch)
            report.journal_bytes += d.nbytes
        if damage is not None:
            return deltas, maps, (name, damage, i == len(starts) - 1)
    return deltas, maps, None


def recover(store: "Store", directory: str, manifest: Manifest,
            progress: Optional[Callable[[int, int], None]] = None
            ) -> Tuple[RecoveryReport, Optional[Tuple[str, Damage, bool]]]:
    """Bring an empty store to the newest provable committed state of `directory`."""
    t0 = time.perf_counter()
    report = RecoveryReport()
    base = _load_newest_checkpoint(store, directory, manifest, report)
    loaded = report.checkpoint_bytes
    if progress is not None and loaded:
        progress(loaded, loaded)
    deltas, maps, damage = _collect(directory, _segments_after(manifest, base), base, report)
    if deltas:
        # One bar over both phases: the checkpoint bytes, then the replayed page bytes.
        on_replay = None if progress is None else (
            lambda done, total: progress(loaded + done, loaded + total))
        stats = replay(store, deltas, progress=on_replay)
        report.deltas_replayed = stats.deltas
        report.pages_replayed = stats.pages
        # Records carry the schema version they were committed under (a migration's
        # commit may be newer than the manifest, which is written after it).
        store._set_schema_version(max(store._schema_version(), deltas[-1].schema_version))
    report.committed_epoch = deltas[-1].target_epoch if deltas else base
    store._set_epoch(report.committed_epoch + 1)
    del deltas, maps  # the deltas point into the mappings; both go together
    if damage is not None:
        name, dmg, at_tail = damage
        what = f"{name} at offset {dmg.offset}" if dmg.offset >= 0 else name
        if at_tail:
            reason = f"torn or corrupt tail cut at the last whole record: {dmg.reason}"
        else:
            reason = (f"{dmg.reason}; replay stopped here, so commits after epoch "
                      f"{report.committed_epoch} in this and later segments are lost")
        report.discarded.append(Discarded(what, reason, dmg.bytes_after))
    report.seconds = time.perf_counter() - t0
    return report, damage
