"""statecore: a state engine for Python services that must recover fast.

State lives in an mmap'd page store; snapshots are O(1) and fork-free; deltas carry
exactly the pages changed between two epochs; replay applies them at memory speed."""
from .errors import (CorruptCheckpoint, CorruptData, CorruptDelta, CorruptStore, EpochGap,
                     IncompatibleDelta, SchemaMismatch, SnapshotReleased, StateError, StoreClosed,
                     StoreForked, StoreLocked, StoreMismatch, UnsupportedFormat)
from .store import Store
from .array import StateArray
from .snapshot import Snapshot
from .delta import Delta
from .replay import ReplayStats, replay
from .durable import DurableStore
from .recovery import RecoveryReport
from .replication import Follower, Primary
from .wire import AuthenticationError, PeerError, ProtocolError
from ._core import page_checksum
from .kv import CorruptKV, KVFull, KVStore

__version__ = "0.1.0"

__all__ = [
    "Store", "DurableStore", "RecoveryReport", "Primary", "Follower", "ProtocolError",
    "AuthenticationError", "PeerError", "SchemaMismatch", "StateArray", "Snapshot", "Delta", "ReplayStats", "replay", "page_checksum",
    "StateError", "StoreClosed", "StoreForked", "StoreLocked", "StoreMismatch",
    "UnsupportedFormat", "CorruptData", "CorruptDelta", "CorruptCheckpoint", "CorruptStore",
    "EpochGap", "IncompatibleDelta", "SnapshotReleased",
    "KVStore", "KVFull", "CorruptKV",
]
